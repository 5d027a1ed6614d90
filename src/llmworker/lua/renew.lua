-- Extend the leases of a replica's running tasks and its own heartbeat.
-- ARGV: replica id, lease ms, then id, token, quiet triples (quiet '1': the run keeps its
-- events, nobody having followed it when it last knew).
-- Returns {lost, followed}: the ids whose run no longer holds its lease, or whose task was
-- cancelled (the holder must stop them, since their slots may already serve another
-- run), and the quiet runs somebody follows now (they write their events from now on).
-- Both are also told over Pub/Sub; this catches what a reconnecting replica missed.
local replica, lease_ms = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local expires = now + lease_ms
lapse_cutoff(now, lease_ms)
redis.call('ZADD', P .. 'replicas', expires, replica)
redis.call('ZREMRANGEBYSCORE', P .. 'replicas', '-inf', now)
local lost, followed = {}, {}
for i = 3, #ARGV, 3 do
  local id, token = ARGV[i], ARGV[i + 1]
  local tk = task_key(id)
  local t = redis.call('HMGET', tk, 'token', 'status', 'guards')
  local held = t[1] == token and t[2] == 'running'
  if held then
    for g in string.gmatch(t[3], '[^\n]+') do
      if not redis.call('ZSCORE', g, token) then held = false end
    end
  end
  if held then
    redis.call('ZADD', P .. 'running', 'XX', expires, id)
    for g in string.gmatch(t[3], '[^\n]+') do redis.call('ZADD', g, 'XX', expires, token) end
    if ARGV[i + 2] == '1' and redis.call('EXISTS', P .. 'fl:' .. id) == 1 then
      followed[#followed + 1] = id
    end
  else
    lost[#lost + 1] = id
  end
end
return {lost, followed}
