-- Move a running task to another of its models before anything of its run came back:
-- its slots are freed, its reservations settled, and it waits at the front of its
-- user's queue in the new model's lane (the run does not count as an attempt).
-- ARGV: id, run token, the candidates in order (space separated), '1' to pass over
--       models that are held or whose circuit is open, the reason, the error's code,
--       ms to hold the model it leaves (0: none).
-- Returns the model it moved to; '' when no candidate would take it (nothing changed)
-- or the run was stale (its slots were freed).
local id, token, reason, code = ARGV[1], ARGV[2], ARGV[5], ARGV[6]
local hold_ms = tonumber(ARGV[7])
local tk = task_key(id)
local t = redis.call('HMGET', tk, 'token', 'status', 'guards', 'tier', 'model', 'user', 'kind', 'rl')
if t[1] ~= token or t[2] ~= 'running' then
  release(t[3], token)
  return ''
end
local now = now_ms()
local target = nil
for m in string.gmatch(ARGV[3], '%S+') do
  local ok = true
  if ARGV[4] == '1' then
    local f = redis.call('HMGET', model_state(m), 'hold', 'circuit', 'c_until')
    if (tonumber(f[1]) or 0) > now or (f[2] and (tonumber(f[3]) or 0) > now) then ok = false end
  end
  if ok then target = m; break end
end
if not target then return '' end
release(t[3], token)
settle_rates(t[8], token, 0, 1, now)
if hold_ms > 0 then hold_model(t[5], hold_ms, now) end
redis.call('ZREM', P .. 'running', id)
local attempts = redis.call('HINCRBY', tk, 'attempts', -1)
redis.call('HSET', tk, 'status', 'queued', 'model', target)
redis.call('HDEL', tk, 'holder')
add_tried(tk, {model = t[5], outcome = reason, error = code})
enqueue(id, t[4], target, t[7], t[6], true)
mark_spillable(t[4], route_of(target, t[7]))
status_event(id, 'queued', attempts)
wake(id, now)
return target
