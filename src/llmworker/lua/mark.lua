-- Note a field on a task's record, only while the record exists (an expired task is not
-- brought back as a record without a lifetime). ARGV: id, field, value. Returns 1 if set.
local tk = task_key(ARGV[1])
if redis.call('EXISTS', tk) == 0 then return 0 end
redis.call('HSET', tk, ARGV[2], ARGV[3])
return 1
