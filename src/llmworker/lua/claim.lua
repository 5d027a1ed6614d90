-- Claim up to n runnable tasks: each the oldest waiting task of its tier whose guards
-- (model per tier, model over all tiers, user) all have a free slot; its slots are taken
-- in all of them at once, as leases that expire unless the holder renews them.
-- ARGV: replica id, n, lease ms, the weighted tier schedule (space separated), the tiers
--       by weight (space separated), then limits as name, value pairs:
--       'm:<tier>:<model>' model-tier limit, 't:<model>' model total, 'u:<tier>' per user.
-- Returns a list of claimed task records, each a flat field/value list.
local replica, n, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local schedule, ranked = {}, {}
for t in string.gmatch(ARGV[4], '%S+') do schedule[#schedule + 1] = t end
for t in string.gmatch(ARGV[5], '%S+') do ranked[#ranked + 1] = t end
local lim = {}
for i = 6, #ARGV, 2 do lim[ARGV[i]] = tonumber(ARGV[i + 1]) end

local now = now_ms()
local expires = now + lease_ms
local pruned = {}

local function room(key, limit)
  if limit == nil then return true end
  if not pruned[key] then
    -- Expired leases belong to holders that died or stalled: their slots return here.
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    pruned[key] = true
  end
  return redis.call('ZCARD', key) < limit
end

-- The oldest waiting task of a tier that can run now: {seq, model, user} or nil.
local function best_in_tier(tier)
  local user_limit = lim['u:' .. tier] or 0
  local best = nil
  for _, model in ipairs(redis.call('SMEMBERS', P .. 'lanes:' .. tier)) do
    if room(P .. 'g:m:' .. tier .. ':' .. model, lim['m:' .. tier .. ':' .. model] or 0)
        and room(P .. 'g:t:' .. model, lim['t:' .. model]) then
      local lane = lane_key(tier, model)
      local start, done = 0, false
      while not done do
        local users = redis.call('ZRANGE', lane, start, start + 31, 'WITHSCORES')
        if #users == 0 then break end
        for j = 1, #users, 2 do
          local seq = tonumber(users[j + 1])
          if best and seq >= best[1] then done = true; break end
          if room(P .. 'g:u:' .. users[j], user_limit) then
            best = {seq, model, users[j]}
            done = true
            break
          end
        end
        start = start + 32
      end
    end
  end
  return best
end

local function take(tier, model, user)
  local uq = user_queue(tier, model, user)
  local id = redis.call('LPOP', uq)
  fix_head(tier, model, user)
  count_waiting(tier, model, -1)
  local tk = task_key(id)
  local attempts = redis.call('HINCRBY', tk, 'attempts', 1)
  local token = id .. ':' .. redis.call('HINCRBY', tk, 'runs', 1)
  local guards = {P .. 'g:m:' .. tier .. ':' .. model, P .. 'g:u:' .. user}
  if lim['t:' .. model] then guards[#guards + 1] = P .. 'g:t:' .. model end
  for _, g in ipairs(guards) do redis.call('ZADD', g, expires, token) end
  redis.call('ZADD', P .. 'running', expires, id)
  redis.call('HSET', tk, 'status', 'running', 'token', token, 'holder', replica,
    'started_at', now, 'guards', table.concat(guards, '\n'))
  status_event(id, 'running', attempts)
  return redis.call('HGETALL', tk)
end

local claimed = {}
while #claimed < n do
  local turn = redis.call('INCR', P .. 'wrr')
  local preferred = schedule[(turn % #schedule) + 1]
  local found = nil
  local tier = preferred
  found = best_in_tier(preferred)
  if not found then
    for _, t in ipairs(ranked) do
      if t ~= preferred then
        found = best_in_tier(t)
        if found then tier = t; break end
      end
    end
  end
  if not found then break end
  claimed[#claimed + 1] = take(tier, found[2], found[3])
end
return claimed
