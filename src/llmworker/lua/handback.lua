-- Give a running task back to the queue (graceful stop): its slots are freed and it
-- waits at the front of its user's queue; the interrupted run does not count as an attempt.
-- ARGV: id, run token. Returns 1, or 0 when the run was stale.
local id, token = ARGV[1], ARGV[2]
local tk = task_key(id)
local t = redis.call('HMGET', tk, 'token', 'status', 'guards', 'tier', 'model', 'user', 'kind')
release(t[3], token)
if t[1] ~= token or t[2] ~= 'running' then return 0 end
redis.call('ZREM', P .. 'running', id)
local attempts = redis.call('HINCRBY', tk, 'attempts', -1)
redis.call('HSET', tk, 'status', 'queued')
redis.call('HDEL', tk, 'holder')
enqueue(id, t[4], t[5], t[7], t[6], true)
status_event(id, 'queued', attempts)
redis.call('PUBLISH', P .. 'wake', id)
return 1
