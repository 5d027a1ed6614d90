-- Claim up to n runnable tasks: each the oldest waiting task of its tier whose guards
-- (model per tier, model over all tiers, user) all have a free slot; its slots are taken
-- in all of them at once, as leases that expire unless the holder renews them.
-- ARGV: replica id, n, lease ms, idle ms, the weighted tier schedule (space separated),
--       the tiers by weight (space separated), the kinds this replica runs (space
--       separated; '*' for any), then limits as name, value pairs:
--       'm:<tier>:<model>' model-tier limit, 't:<model>' model total, 'u:<tier>' per user.
-- A claim that comes back short lists the replica in 'idle' for idle ms (it will wait
-- for a wake); a full one takes it off (it claims again at once). See wake().
-- Returns a list of claimed task records, each a flat field/value list.
local replica, n, lease_ms, idle_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local schedule, ranked = {}, {}
for t in string.gmatch(ARGV[5], '%S+') do schedule[#schedule + 1] = t end
for t in string.gmatch(ARGV[6], '%S+') do ranked[#ranked + 1] = t end
local kinds = {}
for k in string.gmatch(ARGV[7], '%S+') do kinds[k] = true end
local lim = {}
for i = 8, #ARGV, 2 do lim[ARGV[i]] = tonumber(ARGV[i + 1]) end

local now = now_ms()
local expires = now + lease_ms
local cutoff = lapse_cutoff(now, lease_ms)
-- Every redis.call costs: what one call of this script reads once, it keeps here, and
-- keeps current as it takes slots and tasks.
local held = {}     -- guard key -> live leases
local routes = {}   -- tier -> routes with waiting tasks (a stale entry only costs a look)
local waiting = {}  -- depth field -> change, written once at the end

local function room(key, limit)
  if limit == nil then return true end
  if held[key] == nil then
    -- Expired leases belong to holders that died or stalled: their slots return here.
    redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
    held[key] = redis.call('ZCARD', key)
  end
  return held[key] < limit
end

-- A model whose provider asked to wait (pause.lua) takes no task until its hold expires.
local holds = {}
local function held_back(model)
  if holds[model] == nil then holds[model] = redis.call('EXISTS', P .. 'hold:' .. model) == 1 end
  return holds[model]
end

local function routes_of(tier)
  if routes[tier] == nil then routes[tier] = redis.call('SMEMBERS', P .. 'lanes:' .. tier) end
  return routes[tier]
end

-- The oldest waiting task of a tier that can run here now: {seq, route, model, user}.
local function best_in_tier(tier)
  local user_limit = lim['u:' .. tier] or 0
  local best = nil
  for _, route in ipairs(routes_of(tier)) do
    local model, kind = string.match(route, '^(.-)|(.*)$')
    if (kinds[kind] or kinds['*']) and not held_back(model)
        and room(P .. 'g:m:' .. tier .. ':' .. model, lim['m:' .. tier .. ':' .. model] or 0)
        and room(P .. 'g:t:' .. model, lim['t:' .. model]) then
      local lane = lane_key(tier, route)
      local start, done = 0, false
      while not done do
        local users = redis.call('ZRANGE', lane, start, start + 31, 'WITHSCORES')
        if #users == 0 then break end
        for j = 1, #users, 2 do
          local seq = tonumber(users[j + 1])
          if best and seq >= best[1] then done = true; break end
          if room(P .. 'g:u:' .. users[j], user_limit) then
            best = {seq, route, model, users[j]}
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

local function take(tier, route, model, user)
  local uq = user_queue(tier, route, user)
  local id = redis.call('LPOP', uq)
  fix_head(tier, route, user, true)
  waiting[tier] = (waiting[tier] or 0) - 1
  waiting[tier .. '|' .. model] = (waiting[tier .. '|' .. model] or 0) - 1
  local tk = task_key(id)
  local record = redis.call('HGETALL', tk)
  local at = {}
  for i = 1, #record, 2 do at[record[i]] = i + 1 end
  local attempts = tonumber(record[at.attempts]) + 1
  local runs = tonumber(record[at.runs]) + 1
  local token = id .. ':' .. runs
  local guards = {P .. 'g:m:' .. tier .. ':' .. model, P .. 'g:u:' .. user}
  if lim['t:' .. model] then guards[#guards + 1] = P .. 'g:t:' .. model end
  for _, g in ipairs(guards) do
    redis.call('ZADD', g, expires, token)
    if held[g] then held[g] = held[g] + 1 end
  end
  redis.call('ZADD', P .. 'running', expires, id)
  local changes = {status = 'running', token = token, holder = replica, started_at = now,
    guards = table.concat(guards, '\n'), attempts = attempts, runs = runs}
  local flat = {}
  for name, value in pairs(changes) do
    value = tostring(value)
    flat[#flat + 1] = name
    flat[#flat + 1] = value
    -- The reply is the record as it is now: patch the copy read above.
    if at[name] then
      record[at[name]] = value
    else
      record[#record + 1] = name
      record[#record + 1] = value
    end
  end
  redis.call('HSET', tk, unpack(flat))
  status_event(id, 'running', attempts, nil, runs)
  return record
end

local claimed = {}
-- The weighted round robin's position: read once, advanced once per turn taken.
local turn = tonumber(redis.call('GET', P .. 'wrr') or '0')
while #claimed < n do
  turn = turn + 1
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
  claimed[#claimed + 1] = take(tier, found[2], found[3], found[4])
end
redis.call('SET', P .. 'wrr', turn)
for field, delta in pairs(waiting) do redis.call('HINCRBY', P .. 'depth', field, delta) end
if #claimed < n then
  redis.call('ZADD', P .. 'idle', now + idle_ms, replica)
else
  redis.call('ZREM', P .. 'idle', replica)
end
return claimed
