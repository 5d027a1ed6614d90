-- A replica's hub follows a task's events for its readers (hub.py): it is named in
-- 'fl:<id>' for ttl ms (renewed while its readers stay), so every event of the task is
-- written and the hub told of it (_common.lua, emit); the replica running the task
-- hears of it on 'follow' and writes the run's text so far, then streams (events.py).
-- A task nobody followed yet has no stream: it starts with the task's status, the first
-- thing a reader needs. ARGV: id, hub, ttl ms. Returns the task's status, or false if
-- there is no such task.
local id, hub, ttl_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('HMGET', task_key(id), 'status', 'attempts', 'runs')
local status = t[1]
if not status then return false end
local fl = P .. 'fl:' .. id
redis.call('SADD', fl, hub)
redis.call('PEXPIRE', fl, ttl_ms)
if status == 'queued' or status == 'running' then
  if redis.call('EXISTS', P .. 'ev:' .. id) == 0 then
    status_event(id, status, t[2], nil, status == 'running' and t[3] or nil)
  end
  if status == 'running' then redis.call('PUBLISH', P .. 'follow', id) end
end
return status
