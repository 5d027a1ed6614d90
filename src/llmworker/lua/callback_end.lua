-- The outcome of one callback attempt.
-- ARGV: id, outcome ('delivered', 'retry' or 'failed'), ms until the retry, error text.
-- 'delivered' and 'failed' leave the outbox for good: at most one successful delivery.
local id, outcome, retry_ms, err = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local tk = task_key(id)
if redis.call('EXISTS', tk) == 0 then
  redis.call('ZREM', P .. 'callbacks', id)
  return 0
end
if outcome == 'retry' then
  redis.call('ZADD', P .. 'callbacks', now_ms() + retry_ms, id)
  redis.call('HSET', tk, 'cb_error', err)
else
  redis.call('ZREM', P .. 'callbacks', id)
  redis.call('HSET', tk, 'cb_status', outcome, 'cb_error', err)
end
return 1
