-- Adaptive caps: each model's cap over all tiers, between its floor (MIN_<MODEL>) and its
-- top (MAX_*), moved by what its calls met (see model_state; claim.lua applies it):
-- - a rate limit (429) on a call that started after the last change cuts it to BETA of
--   itself (calls started before it were sent under the old cap: their 429s say nothing
--   new, so a burst of them cuts once);
-- - for providers that signal overload only by latency, a time to first token past
--   TOLERANCE times its unloaded level cuts it by the ratio (to no less than LATENCY_BETA
--   of itself, at most once a round);
-- - a round of clean completions (as many as the cap) raises it by one; just below the
--   cap that last met a 429 it waits PATIENCE rounds before trying that one again.
-- Back at its top with nothing to remember, the model's cap is dropped: claims then use
-- the static limits alone.
-- ARGV: groups of 8: model, top, floor, clean calls (started after the last change),
--       rate-limited calls, the latest start of those (ms), mean time to first token
--       (ms, -1: none), '1' if latency counts.
-- Returns groups of 5: model, cap (-1: none), when it last changed (ms), the cap before,
-- why it changed ('' when it did not).
local BETA, LATENCY_BETA, TOLERANCE, PATIENCE = 0.7, 0.8, 1.5, 8
local now = now_ms()
local out = {}
for i = 1, #ARGV, 8 do
  local model, top, floor = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local oks, limited, started = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  local ttft, latency = tonumber(ARGV[i + 6]), ARGV[i + 7] == '1'
  floor = math.min(floor, top)
  local key = model_state(model)
  local f = redis.call('HMGET', key, 'cap', 'cap_at', 'ceiling', 'oks', 'base', 'short')
  local cap = math.min(tonumber(f[1]) or top, top)
  local cap_at, ceiling, count = tonumber(f[2]) or 0, tonumber(f[3]), tonumber(f[4]) or 0
  local base, short = tonumber(f[5]), tonumber(f[6])
  local from, reason = cap, ''
  if latency and ttft >= 0 then
    -- The unloaded level: the lowest seen, drifting up slowly so that it can follow a
    -- provider that became slower for good.
    if not base or ttft < base then base = ttft else base = base + (ttft - base) * 0.01 end
    short = short and (short * 0.7 + ttft * 0.3) or ttft
  end
  local slow = latency and short and base and short > base * TOLERANCE
  count = count + oks
  if limited > 0 and started >= cap_at then
    ceiling = cap
    cap = math.max(floor, math.floor(cap * BETA))
    reason = 'rate_limited'
  elseif slow and count >= cap then
    -- Latency grows smoothly with load: a gentler cut than a 429's, by the gradient.
    local ratio = math.max(LATENCY_BETA, base * TOLERANCE / short)
    ceiling = cap
    cap = math.max(floor, math.min(cap - 1, math.floor(cap * ratio)))
    reason = 'latency'
  elseif not slow and count >= cap and cap < top then
    if not (ceiling and cap + 1 >= ceiling and count < cap * PATIENCE) then
      cap = cap + 1
      if ceiling and cap >= ceiling then ceiling = nil end
      reason = 'recovered'
    end
  end
  if cap ~= from then
    cap_at, count = now, 0
  else
    reason = ''
  end
  if cap >= top and not ceiling then
    redis.call('HDEL', key, 'cap', 'cap_at', 'ceiling')
    -- At the top only a latency cut needs the round counted.
    if latency then redis.call('HSET', key, 'oks', count) else redis.call('HDEL', key, 'oks') end
    cap = -1
  else
    redis.call('HSET', key, 'cap', cap, 'cap_at', cap_at, 'oks', count)
    if ceiling then redis.call('HSET', key, 'ceiling', ceiling) else redis.call('HDEL', key, 'ceiling') end
  end
  if base then redis.call('HSET', key, 'base', base, 'short', short) end
  out[#out + 1] = model
  out[#out + 1] = cap
  out[#out + 1] = cap_at
  out[#out + 1] = from
  out[#out + 1] = reason
end
return out
