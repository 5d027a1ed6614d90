-- The outcome of one callback attempt.
-- ARGV: id, the attempt (its cb_attempts when claimed), outcome ('delivered', 'published',
--       'retry' or 'failed'), ms until the retry, error text.
-- Only the latest attempt of a pending callback counts: an attempt that outlived its
-- visibility time, while another one took over, changes nothing (a callback that was
-- delivered can never be queued again). Returns 1 if recorded, else 0.
local id, attempt, outcome, retry_ms, err = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local tk = task_key(id)
local t = redis.call('HMGET', tk, 'cb_status', 'cb_attempts')
if t[1] ~= 'pending' or t[2] ~= attempt then return 0 end
redis.call('HDEL', tk, 'cb_inflight')
if outcome == 'retry' then
  redis.call('ZADD', P .. 'callbacks', now_ms() + retry_ms, id)
  redis.call('HSET', tk, 'cb_error', err)
else
  redis.call('ZREM', P .. 'callbacks', id)
  redis.call('HSET', tk, 'cb_status', outcome, 'cb_error', err)
end
return 1
