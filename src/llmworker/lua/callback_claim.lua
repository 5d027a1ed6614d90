-- Take up to n callbacks that are due, for one delivery attempt each: each stays in the
-- outbox, due again after the visibility time, so an attempt whose replica dies is
-- retried by another. A callback whose task record expired, or that is no longer
-- pending, leaves the outbox.
-- ARGV: n, visibility ms.
-- Returns {ms until the next one is due (-1: none), how many expired, records...}, each
-- record a flat field/value list; its cb_attempts, counted here, names the attempt.
local n, visibility_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local out = {-1, 0}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'callbacks', '-inf', now, 'LIMIT', 0, n)) do
  local tk = task_key(id)
  local state = redis.call('HGET', tk, 'cb_status')
  if state ~= 'pending' then
    redis.call('ZREM', P .. 'callbacks', id)
    if not state then out[2] = out[2] + 1 end
  else
    redis.call('ZADD', P .. 'callbacks', now + visibility_ms, id)
    local attempt = redis.call('HINCRBY', tk, 'cb_attempts', 1)
    -- Being attempted: callback_renew may extend its visibility until callback_end.
    redis.call('HSET', tk, 'cb_inflight', attempt)
    out[#out + 1] = redis.call('HGETALL', tk)
  end
end
local nxt = redis.call('ZRANGE', P .. 'callbacks', 0, 0, 'WITHSCORES')
if #nxt > 0 then out[1] = math.max(0, tonumber(nxt[2]) - now) end
return out
