-- A model's provider asked to wait (a 429 with Retry-After): hold the model's dispatch
-- until then (hold_model), and give this run's task back to the queue with its slots
-- freed, so that other models and tiers keep every slot busy instead of a run sleeping
-- on its slot. ARGV: id, run token, model, ms to wait. Returns {1, ms the model is held}
-- or {0, 0} when the run was stale (cancelled, or taken over).
local id, token, model = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local held = hold_model(model, tonumber(ARGV[4]), now)
if hand_back(id, token) == nil then return {0, 0} end
redis.call('HINCRBY', task_key(id), 'pauses', 1)
-- The freed slots may let another model's or user's task run now.
wake(id, now)
return {1, held}
