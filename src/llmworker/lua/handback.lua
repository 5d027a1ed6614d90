-- Give a running task back to the queue (graceful stop): see hand_back.
-- ARGV: id, run token. Returns 1, or 0 when the run was stale.
if hand_back(ARGV[1], ARGV[2]) == nil then return 0 end
redis.call('PUBLISH', P .. 'wake', ARGV[1])
return 1
