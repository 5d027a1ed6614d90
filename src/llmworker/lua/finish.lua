-- End a run: record the outcome and free its slots, once.
-- ARGV: id, run token, status ('' to only free the slots), result json, error json,
--       usage json, ttl s.
-- The outcome is recorded while the run still holds the task (running, its token), and
-- also when the run's lease lapsed and the reaper put the task back in the queue but no
-- run has started since (the token is still this run's): the outcome was computed, and
-- paid for, once; running it again would pay twice. The task leaves the queue then.
-- Returns 1 when recorded; 0 when the run was stale (cancelled, or another run started):
-- then only this run's slots are freed.
local id, token, status = ARGV[1], ARGV[2], ARGV[3]
local tk = task_key(id)
local current = redis.call('HMGET', tk, 'token', 'status', 'guards', 'attempts', 'tier', 'model', 'user', 'kind')
local now = now_ms()
release(current[3], token)
wake(id, now)
if status == '' or current[1] ~= token then return 0 end
if current[2] == 'queued' then
  local tier, model, user = current[5], current[6], current[7]
  local route = route_of(model, current[8])
  redis.call('LREM', user_queue(tier, route, user), 1, id)
  fix_head(tier, route, user)
  count_waiting(tier, model, -1)
elseif current[2] ~= 'running' then
  return 0
end
local fields = {}
if ARGV[4] ~= '' then fields[#fields + 1] = 'result'; fields[#fields + 1] = ARGV[4] end
if ARGV[5] ~= '' then fields[#fields + 1] = 'error'; fields[#fields + 1] = ARGV[5] end
if ARGV[6] ~= '' then fields[#fields + 1] = 'usage'; fields[#fields + 1] = ARGV[6] end
finalize(id, status, tonumber(ARGV[7]), now, fields)
status_event(id, status, current[4], ARGV[5] ~= '' and ARGV[5] or nil)
return 1
