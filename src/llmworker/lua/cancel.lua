-- Cancel a task. A queued one leaves its queue and never runs, and its quota reservation
-- is refunded; a running one is marked cancelled and its holder told to stop (it frees
-- the slots and books what streamed, finish.lua; if the holder is dead, the leases lapse
-- and the reaper books it). ARGV: id, ttl s. Returns the status before, or false if unknown.
local id, ttl_s = ARGV[1], tonumber(ARGV[2])
local tk = task_key(id)
local t = redis.call('HMGET', tk, 'status', 'tier', 'model', 'user', 'attempts', 'kind', 'qr')
if not t[1] then return false end
if t[1] == 'queued' then
  local route = route_of(t[3], t[6])
  redis.call('LREM', user_queue(t[2], route, t[4]), 1, id)
  fix_head(t[2], route, t[4])
  count_waiting(t[2], t[3], -1)
  if t[7] then settle_quota(tk, t[4], t[7], 0, 0, false, nil) end
elseif t[1] == 'running' then
  -- Booked once, by the run's end or, past its lease, by the reaper.
  local lease = redis.call('ZSCORE', P .. 'running', id)
  if lease then redis.call('ZADD', P .. 'qp', lease, id) end
else
  return t[1]
end
finalize(id, 'cancelled', ttl_s, now_ms())
status_event(id, 'cancelled', t[5])
if t[1] == 'running' then redis.call('PUBLISH', P .. 'cancel', id) end
return t[1]
