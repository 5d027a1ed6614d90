-- A running task's own events (events.py): progress, and its answer's text in batches.
-- ARGV: id, always ('1': write even when nobody follows, TOKEN_EVENTS), the run's
-- running status (written first when the stream does not exist yet, else ''), then
-- type and data of each event, in order. They are written when the task's stream exists
-- or somebody follows it (_common.lua, emit); each following replica's hub is told once.
-- Returns the number of events written.
local id = ARGV[1]
local always = ARGV[2] == '1'
local hubs, exists = audience(id)
if #hubs == 0 and not always and not exists then return 0 end
local written = 0
if ARGV[3] ~= '' and not exists then
  -- A stream that exists has the run's status: claim.lua or a reader's follow.lua.
  add_event(id, 'status', ARGV[3])
  written = 1
end
for i = 4, #ARGV - 1, 2 do
  add_event(id, ARGV[i], ARGV[i + 1])
  written = written + 1
end
if not exists then
  -- A stream made after its task ended (a last batch behind the final state) lives as
  -- long as finalize would have let it: never longer than EVENTS_KEPT_S.
  local tk = task_key(id)
  local ttl = redis.call('PTTL', tk)
  local status = redis.call('HGET', tk, 'status')
  local ev = P .. 'ev:' .. id
  if ttl > 0 then
    redis.call('PEXPIRE', ev, math.min(ttl, EVENTS_KEPT_S * 1000))
  elseif status ~= 'queued' and status ~= 'running' then
    redis.call('EXPIRE', ev, EVENTS_KEPT_S)
  end
end
tell_hubs(hubs, id)
return written
