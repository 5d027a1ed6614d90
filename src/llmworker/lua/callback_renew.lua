-- Keep the callbacks this replica is attempting invisible to the others while the
-- attempts run: a replica that dies stops renewing, and its callbacks are due again
-- within one visibility time, not after the longest attempt could take.
-- ARGV: visibility ms, then id, attempt pairs. An attempt that has ended (a retry now
-- waits its backoff, or the callback was recorded) or was taken over by a newer one is
-- left alone.
local due = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local t = redis.call('HMGET', task_key(ARGV[i]), 'cb_status', 'cb_inflight')
  if t[1] == 'pending' and t[2] == ARGV[i + 1] then
    redis.call('ZADD', P .. 'callbacks', 'XX', due, ARGV[i])
  end
end
return 1
