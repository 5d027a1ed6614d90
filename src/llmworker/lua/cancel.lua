-- Cancel a task. A queued one leaves its queue and never runs, and its quota reservation
-- is refunded; a running one is marked cancelled and its holder told to stop (it frees
-- the slots and books what streamed, finish.lua; if the holder is dead, the leases lapse
-- and the reaper books it: the record is kept until then). ARGV: id, ttl s, books
-- (_common.lua). Returns the status before, or false if unknown.
local id, ttl_s = ARGV[1], tonumber(ARGV[2])
local tk = task_key(id)
local t = redis.call('HMGET', tk, 'status', 'tier', 'model', 'user', 'attempts', 'kind', 'qr', 'tenant')
if not t[1] then return false end
local now = now_ms()
local running = false
if t[1] == 'queued' then
  local route = route_of(t[3], t[6])
  redis.call('LREM', user_queue(t[2], route, t[4]), 1, id)
  fix_head(t[2], route, t[4])
  count_waiting(t[2], t[3], -1)
  -- Runs of it that lapsed were paid for; the rest of its reservation goes back.
  local lapsed = book_lapsed(tk, {id, t[8], t[4], t[2], t[6], t[3], t[7]}, ARGV[3], now)
  settle_quota(tk, t[4], t[7], 0, 0, lapsed > 0, ARGV[3])
elseif t[1] == 'running' then
  running = redis.call('ZSCORE', P .. 'running', id)
else
  return t[1]
end
-- Before finalize, which gives the stream (if any) the record's TTL.
status_event(id, 'cancelled', t[5])
finalize(id, 'cancelled', ttl_s, now)
if running then
  -- Booked once, by the run's end or, past its lease, by the reaper.
  redis.call('ZADD', P .. 'qp', running, id)
  redis.call('PERSIST', tk)
  redis.call('HSET', tk, 'keep', ttl_s)
end
if t[1] == 'running' then redis.call('PUBLISH', P .. 'cancel', id) end
return t[1]
