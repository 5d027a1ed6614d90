-- A model's circuit (see model_state): opened when its provider refuses the key or the
-- account is out of quota, or when its calls keep failing (an outage), so that no call
-- goes out until it may work again; then claims
-- let one run through (half-open), whose first answered call closes it.
-- ARGV: 'open', model, ms, code  -> 1 if it was closed before (a change), else 0
--       'close', model, run token -> 1 if this closed it (the token's run was the probe,
--                                    or '' to close it whatever probes)
--       'probe_end', model, token -> the probe ended without an answer: the next claim
--                                    may probe again (1 if it was the probe)
local op, model = ARGV[1], ARGV[2]
local key = model_state(model)
local now = now_ms()
if op == 'open' then
  local was = redis.call('HGET', key, 'circuit')
  redis.call('HSET', key, 'circuit', 'open', 'c_until', now + tonumber(ARGV[3]), 'c_code', ARGV[4])
  if not was then redis.call('HSET', key, 'c_since', now) end
  redis.call('HDEL', key, 'probe', 'probe_until')
  -- Waiting tasks with other models may go there now.
  redis.call('PUBLISH', P .. 'wake', 'circuit')
  return was and 0 or 1
end
local probe = redis.call('HGET', key, 'probe')
if op == 'close' then
  if not redis.call('HGET', key, 'circuit') then return 0 end
  if ARGV[3] ~= '' and probe ~= ARGV[3] then return 0 end
  redis.call('HDEL', key, 'circuit', 'c_until', 'c_code', 'c_since', 'probe', 'probe_until')
  redis.call('PUBLISH', P .. 'wake', 'circuit')
  return 1
end
if probe ~= ARGV[3] then return 0 end
redis.call('HDEL', key, 'probe', 'probe_until')
redis.call('PUBLISH', P .. 'wake', 'circuit')
return 1
