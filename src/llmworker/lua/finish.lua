-- End a run: record the outcome and free its slots, once.
-- ARGV: id, run token, status ('' to only free the slots), result json, error json,
--       usage json, ttl s.
-- Returns 1 when recorded; 0 when the run was stale (cancelled, or its lease lapsed and
-- the task was requeued, or is about to be): then only this run's slots are freed.
local id, token, status = ARGV[1], ARGV[2], ARGV[3]
local tk = task_key(id)
local current = redis.call('HMGET', tk, 'token', 'status', 'guards', 'attempts')
local now = now_ms()
release(current[3], token)
wake(id, now)
if status == '' or current[1] ~= token or current[2] ~= 'running' then return 0 end
local fields = {}
if ARGV[4] ~= '' then fields[#fields + 1] = 'result'; fields[#fields + 1] = ARGV[4] end
if ARGV[5] ~= '' then fields[#fields + 1] = 'error'; fields[#fields + 1] = ARGV[5] end
if ARGV[6] ~= '' then fields[#fields + 1] = 'usage'; fields[#fields + 1] = ARGV[6] end
finalize(id, status, tonumber(ARGV[7]), now, fields)
status_event(id, status, current[4], ARGV[5] ~= '' and ARGV[5] or nil)
return 1
