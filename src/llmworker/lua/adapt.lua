-- Adaptive caps: each model's cap over all tiers, between its floor (MIN_<MODEL>) and its
-- top (MAX_*), moved by what its calls met (see model_state; claim.lua applies it). Only
-- runs claimed after the cap's last change count: the others were let in under the old
-- cap, and their 429s (and retries) say nothing new, so a burst of them cuts once.
-- - A rate limit (429) cuts the cap: back to the last cap that completed a clean round
--   when it was probing above it; else to BETA of itself (the provider's room shrank).
-- - For providers that signal overload only by latency, a round whose mean time to first
--   token is past TOLERANCE times the unloaded level cuts it the same way, by the
--   gradient (to no less than LATENCY_BETA of itself). A round counts only calls made
--   while no more runs than the cap were in flight: until the runs let in above a cut
--   cap have drained, the provider is still as loaded as before.
-- - A round of clean completions (as many as the cap) raises it by one; the cap that met
--   the last cut is tried again only after PATIENCE (LATENCY_PATIENCE) rounds just below.
-- Back at its top with nothing to remember, the model's cap is dropped: claims then use
-- the static limits alone (a latency-signalling model keeps its cap, at the top).
-- ARGV: the tiers (space separated), then groups of 8: model, top, floor, clean calls (of runs claimed after the last
--       change), rate-limited calls (of any run), the latest claim of those (ms), mean
--       time to first token (ms, -1: none), '1' if latency counts.
-- Returns groups of 5: model, cap (-1: none), when it last changed (ms), the cap before,
-- why it changed ('' when it did not).
local BETA, LATENCY_BETA, TOLERANCE = 0.7, 0.2, 1.5
-- Rounds just below the cap that met the last cut before trying it again: a 429 costs
-- one call, a round too slow costs every call of the round.
local PATIENCE, LATENCY_PATIENCE, PROBE_CALLS = 8, 64, 2
local now = now_ms()
local tiers = ARGV[1]
local out = {}
for i = 2, #ARGV, 8 do
  local model, top, floor = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local oks, limited, started = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  local ttft, latency = tonumber(ARGV[i + 6]), ARGV[i + 7] == '1'
  floor = math.min(floor, top)
  local key = model_state(model)
  local f = redis.call('HMGET', key, 'cap', 'cap_at', 'ceiling', 'oks', 'base', 'lsum', 'good',
    'start')
  -- A model that signals overload only by latency starts at a quarter of its top (at
  -- least its floor) and doubles its cap each clean round until a round is slow (as
  -- claim.lua assumes while it has no cap): the first calls do not all pile onto a
  -- provider whose room nobody knows yet.
  local start = latency and (f[8] == '1' or not f[1])
  local first = math.max(floor, math.ceil(top / 4))
  local cap = math.min(tonumber(f[1]) or (latency and first or top), top)
  local cap_at, ceiling, count = tonumber(f[2]) or 0, tonumber(f[3]), tonumber(f[4]) or 0
  local base, lsum, good = tonumber(f[5]), tonumber(f[6]) or 0, tonumber(f[7])
  local from, reason = cap, ''
  count = count + oks
  local slow = false
  if latency then
    if ttft >= 0 then
      -- The unloaded level: the lowest seen, drifting up slowly so that it can follow a
      -- provider that became slower for good.
      if not base or ttft < base then base = ttft else base = base + (ttft - base) * 0.01 end
    end
    local inflight = 0
    for t in string.gmatch(tiers, '%S+') do
      inflight = inflight + redis.call('ZCOUNT', P .. 'g:m:' .. t .. ':' .. model, '(' .. now, '+inf')
    end
    if inflight > cap then
      -- Runs let in above the cap are still draining: what calls meet now says nothing
      -- of the cap. The round starts when they are gone.
      count, lsum = 0, 0
    elseif ttft >= 0 then
      lsum = lsum + ttft * oks
    end
    -- A round of slow calls is as many as are in flight (fewer than the cap when the
    -- demand is lower); a probe above the last good cap is given up after PROBE_CALLS
    -- slow ones, as every call made meanwhile is slowed by it.
    local round = math.max(1, math.min(cap, inflight))
    if good and cap > good then round = math.min(round, PROBE_CALLS) end
    slow = base ~= nil and count > 0 and count >= round and lsum / count > base * TOLERANCE
  end
  local function cut(beta)
    start = false
    ceiling = cap
    if good and cap > good then
      cap = good
    else
      cap = math.max(floor, math.min(cap - 1, math.floor(cap * beta)))
      good = nil
    end
  end
  if limited > 0 and started >= cap_at then
    cut(BETA)
    reason = 'rate_limited'
  elseif limited > 0 then
    -- Runs let in before the last change still meet 429s: not a clean round.
    count = 0
  elseif slow then
    cut(math.max(LATENCY_BETA, base * TOLERANCE * count / lsum))
    reason = 'latency'
  elseif count >= cap and not (base and lsum > base * TOLERANCE * count) then
    if not good or cap > good then good = cap end
    local patience = latency and LATENCY_PATIENCE or PATIENCE
    if start and cap < top then
      cap = math.min(top, cap * 2)
      reason = 'starting'
    elseif cap < top and not (ceiling and cap + 1 >= ceiling and count < cap * patience) then
      cap = cap + 1
      if ceiling and cap >= ceiling then ceiling = nil end
      reason = 'recovered'
    end
  end
  cap = math.max(cap, math.min(floor, top))
  if cap ~= from then
    cap_at, count, lsum = now, 0, 0
    -- More room: idle replicas may claim now.
    if cap > from then redis.call('PUBLISH', P .. 'wake', 'cap') end
  else
    reason = ''
  end
  if cap >= top and not ceiling and not latency then
    redis.call('HDEL', key, 'cap', 'cap_at', 'ceiling', 'good')
    -- At the top only a latency cut needs the round counted.
    if latency then
      redis.call('HSET', key, 'oks', count, 'lsum', lsum)
    else
      redis.call('HDEL', key, 'oks', 'lsum')
    end
    cap = -1
  else
    redis.call('HSET', key, 'cap', cap, 'cap_at', cap_at, 'oks', count, 'lsum', lsum)
    if ceiling then redis.call('HSET', key, 'ceiling', ceiling) else redis.call('HDEL', key, 'ceiling') end
    if good then redis.call('HSET', key, 'good', good) else redis.call('HDEL', key, 'good') end
    redis.call('HSET', key, 'start', start and '1' or '0')
  end
  if base then redis.call('HSET', key, 'base', base) end
  out[#out + 1] = model
  out[#out + 1] = cap
  out[#out + 1] = cap_at
  out[#out + 1] = from
  out[#out + 1] = reason
end
return out
