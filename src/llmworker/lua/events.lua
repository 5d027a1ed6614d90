-- A running task's own events (events.py): progress, and its answer's text in batches.
-- ARGV: id, then type and data of each event, in order. They are written when the
-- task's stream exists or somebody follows it (_common.lua, emit); each following
-- replica's hub is told once. 'always': write even when nobody follows (TOKEN_EVENTS).
-- Returns the number of events written.
local id = ARGV[1]
local always = ARGV[2] == '1'
local ev = P .. 'ev:' .. id
local readers = redis.call('SMEMBERS', P .. 'fl:' .. id)
if #readers == 0 and not always and redis.call('EXISTS', ev) == 0 then return 0 end
local written = 0
for i = 3, #ARGV - 1, 2 do
  redis.call('XADD', ev, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', ARGV[i], 'data', ARGV[i + 1])
  written = written + 1
end
-- A stream written after its task ended lives as long as finalize would have let it.
local ttl = redis.call('PTTL', task_key(id))
if ttl > 0 then redis.call('PEXPIRE', ev, math.min(ttl, EVENTS_KEPT_S * 1000)) end
for _, hub in ipairs(readers) do redis.call('PUBLISH', P .. 'hub:' .. hub, id) end
return written
