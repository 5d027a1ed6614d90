-- Give a running task back to the queue (graceful stop): see hand_back. What the run
-- streamed was paid for: it is booked (book_extra), and the task's reservation stays for
-- its next run. ARGV: id, run token, cost json ('' for none), books (_common.lua).
-- Returns 1, or 0 when the run was stale.
if hand_back(ARGV[1], ARGV[2]) == nil then return 0 end
if ARGV[3] and ARGV[3] ~= '' then
  local tk = task_key(ARGV[1])
  local t = redis.call('HMGET', tk, 'tenant', 'user', 'tier', 'kind', 'model', 'qr')
  book_extra({ARGV[1], t[1], t[2], t[3], t[4], t[5], t[6]}, 'handed_back', use_of(ARGV[3]), ARGV[4],
    now_ms())
end
redis.call('PUBLISH', P .. 'wake', ARGV[1])
return 1
