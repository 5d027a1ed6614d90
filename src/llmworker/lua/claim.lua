-- Claim up to n runnable tasks: each the oldest waiting task of its tier whose guards
-- (model per tier, model over all tiers, user) all have a free slot, whose model may be
-- called now (not held, its circuit not open, under its adaptive cap and its RPM/TPM
-- windows); its slots and its window entries are taken in all of them at once, the
-- slots as leases that expire unless the holder renews them.
-- ARGV: replica id, n, lease ms, idle ms, the weighted tier schedule (space separated),
--       the tiers by weight (space separated), the kinds this replica runs (space
--       separated; '*' for any), then limits as name, value pairs:
--       'm:<tier>:<model>' model-tier limit, 't:<model>' model total, 'u:<tier>' per user,
--       'r:<model>[:<tier>]' requests and 'k:<model>[:<tier>]' tokens per window,
--       'w' the window (ms), 'o' the output tokens assumed of a model until learned,
--       'a' 1 when caps adapt, 'l:<model>' the first cap of a model whose cap adapts to
--       its latency, 's' ms after which a task may spill to its next model.
-- A claim that comes back short lists the replica in 'idle' for idle ms (it will wait
-- for a wake); a full one takes it off (it claims again at once). See wake().
-- Returns {ms until a model held back now may take its waiting tasks (-1: none), then
-- each claimed task's record as a flat field/value list}.
local replica, n, lease_ms, idle_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local schedule, ranked = {}, {}
for t in string.gmatch(ARGV[5], '%S+') do schedule[#schedule + 1] = t end
for t in string.gmatch(ARGV[6], '%S+') do ranked[#ranked + 1] = t end
local kinds = {}
for k in string.gmatch(ARGV[7], '%S+') do kinds[k] = true end
local lim = {}
for i = 8, #ARGV, 2 do lim[ARGV[i]] = tonumber(ARGV[i + 1]) end
local window, spill_ms, adaptive = lim['w'] or 60000, lim['s'], lim['a'] == 1

local now = now_ms()
local expires = now + lease_ms
local cutoff = lapse_cutoff(now, lease_ms)
local horizon = now - window
-- Every redis.call costs: what one call of this script reads once, it keeps here, and
-- keeps current as it takes slots and tasks.
local held = {}     -- guard key -> live leases
local routes = {}   -- tier -> routes with waiting tasks (a stale entry only costs a look)
local waiting = {}  -- depth field -> change, written once at the end
local wake_at = nil -- the earliest time a model held back now may take tasks

local function later(t)
  if wake_at == nil or t < wake_at then wake_at = t end
end

local function used(key)
  if held[key] == nil then
    -- Expired leases belong to holders that died or stalled: their slots return here.
    redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
    held[key] = redis.call('ZCARD', key)
  end
  return held[key]
end

local function room(key, limit)
  if limit == nil then return true end
  return used(key) < limit
end

-- Rate windows: requests (entries) and tokens in the last window, and when the oldest
-- entry leaves it.
local requests, tokens = {}, {}
local function oldest_leaves(scope)
  local first = redis.call('ZRANGE', P .. scope, 0, 0, 'WITHSCORES')
  return (tonumber(first[2]) or now) + window
end
local function requests_ok(scope, limit)
  if not limit then return true end
  if requests[scope] == nil then
    redis.call('ZREMRANGEBYSCORE', P .. scope, '-inf', horizon)
    requests[scope] = redis.call('ZCARD', P .. scope)
  end
  if requests[scope] < limit then return true end
  later(oldest_leaves(scope))
  return false
end
local function tokens_ok(scope, limit, want)
  if not limit then return true end
  if tokens[scope] == nil then tokens[scope] = tpm_prune(scope, horizon) end
  -- One task larger than the whole window still runs, alone.
  if tokens[scope] + want <= limit or tokens[scope] <= 0 then return true end
  later(oldest_leaves(scope))
  return false
end

-- What stops a model now, read once per model: its hold, its circuit (open; half-open
-- lets one probe through) and its adaptive cap.
local states = {}
local function state_of(model)
  local s = states[model]
  if s then return s end
  s = {}
  local f = redis.call('HMGET', model_state(model), 'hold', 'circuit', 'c_until', 'probe_until', 'cap')
  local hold = tonumber(f[1])
  if hold and hold > now then s.stop = hold end
  if f[2] then
    local untl = math.max(tonumber(f[3]) or 0, tonumber(f[4]) or 0)
    if untl > now then s.stop = math.max(s.stop or 0, untl) else s.probe = true end
  end
  -- A model whose cap adapts to latency starts at its floor (adapt.lua, start).
  if adaptive then s.cap = tonumber(f[5]) or lim['l:' .. model] end
  states[model] = s
  return s
end

-- Whether a task of this tier may start on model now (but for its tokens, see fits).
local function stopped(model)
  local s = state_of(model)
  if s.stop then
    later(s.stop)
    return true
  end
  return not requests_ok('rpm:' .. model, lim['r:' .. model])
end

local function open_for(tier, model)
  local s = state_of(model)
  if stopped(model) then return false end
  local limit = lim['m:' .. tier .. ':' .. model] or 0
  if not room(P .. 'g:m:' .. tier .. ':' .. model, limit) then return false end
  if not room(P .. 'g:t:' .. model, lim['t:' .. model]) then return false end
  if s.cap then
    local total = 0
    for _, t in ipairs(ranked) do
      if lim['m:' .. t .. ':' .. model] then total = total + used(P .. 'g:m:' .. t .. ':' .. model) end
    end
    if total >= s.cap then return false end
  end
  return requests_ok('rpm:' .. model .. ':' .. tier, lim['r:' .. model .. ':' .. tier])
end

-- The tokens a task is expected to use on model: its input's, estimated at admission,
-- and its max_tokens or the model's usual output.
local function expected(id, model)
  local f = redis.call('HMGET', task_key(id), 'est_in', 'max_out')
  local out = tonumber(f[2])
  if not out then
    out = tonumber(redis.call('HGET', model_state(model), 'out') or '') or lim['o'] or 512
  end
  -- Whole and bounded: it is added up with HINCRBY, which must not fail mid-claim.
  return math.floor(math.min((tonumber(f[1]) or 0) + out, 1e12))
end

-- The token windows that apply, and whether the task fits them: its estimate, or nil.
local function fits(tier, model, id)
  local all, per = lim['k:' .. model], lim['k:' .. model .. ':' .. tier]
  if not all and not per then return 0 end
  local want = expected(id, model)
  if tokens_ok('tpm:' .. model, all, want) and tokens_ok('tpm:' .. model .. ':' .. tier, per, want) then
    return want
  end
  return nil
end

local function routes_of(tier)
  if routes[tier] == nil then routes[tier] = redis.call('SMEMBERS', P .. 'lanes:' .. tier) end
  return routes[tier]
end

local spillable = {}
local function may_spill(tier, route)
  if spillable[tier] == nil then
    spillable[tier] = {}
    for _, r in ipairs(redis.call('SMEMBERS', P .. 'sp:' .. tier)) do spillable[tier][r] = true end
  end
  return spillable[tier][route]
end

-- A task of a lane whose model cannot take it: the next of its models that can, if its
-- model is stopped (held, circuit open, out of requests: at once) or full (after it has
-- waited spill ms). Returns that model and the task's token estimate for it.
-- How many users' tasks a claim looks at in a lane whose model is stopped or full.
local SPILL_LOOKS = 32
local function spill_to(tier, model, id)
  local f = redis.call('HMGET', task_key(id), 'models', 'created_at')
  if not f[1] or f[1] == '' then return nil end
  if not stopped(model) then
    if not spill_ms then return nil end
    local due = (tonumber(f[2]) or now) + spill_ms
    -- Not waited long enough yet: look again when it has.
    if due > now then later(due); return nil end
  end
  local past = false
  for m in string.gmatch(f[1], '[^,]+') do
    if past and open_for(tier, m) then
      local want = fits(tier, m, id)
      if want then return m, want end
    end
    if m == model then past = true end
  end
  return nil
end

-- The oldest waiting task of a tier that can run here now:
-- {seq, route, model to run on, user, token estimate}.
local function best_in_tier(tier)
  local user_limit = lim['u:' .. tier] or 0
  local best = nil
  for _, route in ipairs(routes_of(tier)) do
    local model, kind = string.match(route, '^(.-)|(.*)$')
    if kinds[kind] or kinds['*'] then
      local direct = open_for(tier, model)
      if direct or may_spill(tier, route) then
        local lane = lane_key(tier, route)
        local start, done, looked = 0, false, 0
        while not done do
          local users = redis.call('ZRANGE', lane, start, start + 31, 'WITHSCORES')
          if #users == 0 then break end
          for j = 1, #users, 2 do
            local seq = tonumber(users[j + 1])
            if best and seq >= best[1] then done = true; break end
            if room(P .. 'g:u:' .. users[j], user_limit) then
              -- The user's oldest task: on the lane's own model it runs first or nothing
              -- of this lane does; a task that cannot move does not keep a later one
              -- of another user from moving (a bounded look).
              local id = redis.call('LINDEX', user_queue(tier, route, users[j]), 0)
              local run_on, want = nil, nil
              if direct then
                want = fits(tier, model, id)
                if want then run_on = model end
              end
              if not run_on then run_on, want = spill_to(tier, model, id) end
              if run_on then
                best = {seq, route, run_on, users[j], want}
                done = true
                break
              end
              looked = looked + 1
              if direct or looked >= SPILL_LOOKS then done = true; break end
            end
          end
          start = start + 32
        end
      end
    end
  end
  return best
end

local function take(tier, route, model, user, want)
  local uq = user_queue(tier, route, user)
  local id = redis.call('LPOP', uq)
  fix_head(tier, route, user, true)
  local lane_model = string.match(route, '^(.-)|')
  waiting[tier] = (waiting[tier] or 0) - 1
  waiting[tier .. '|' .. lane_model] = (waiting[tier .. '|' .. lane_model] or 0) - 1
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
  -- The run's places in the rate windows, settled when it ends (settle_rates).
  local scopes = {}
  for _, scope in ipairs({model, model .. ':' .. tier}) do
    local suffix = scope == model and '' or ':' .. tier
    if lim['r:' .. model .. suffix] then
      redis.call('ZADD', P .. 'rpm:' .. scope, now, token)
      requests['rpm:' .. scope] = (requests['rpm:' .. scope] or 0) + 1
      scopes[#scopes + 1] = 'rpm:' .. scope
    end
    if lim['k:' .. model .. suffix] then
      redis.call('ZADD', P .. 'tpm:' .. scope, now, token)
      redis.call('HSET', P .. 'tpmv:' .. scope, token, want)
      redis.call('HINCRBY', P .. 'tpmv:' .. scope, '_sum', want)
      tokens['tpm:' .. scope] = (tokens['tpm:' .. scope] or 0) + want
      scopes[#scopes + 1] = 'tpm:' .. scope
    end
  end
  redis.call('ZADD', P .. 'running', expires, id)
  local changes = {status = 'running', token = token, holder = replica, started_at = now,
    guards = table.concat(guards, '\n'), attempts = attempts, runs = runs}
  if #scopes > 0 or record[at.rl] then changes.rl = table.concat(scopes, '\n') end
  if model ~= lane_model then
    changes.model = model
    add_tried(tk, {model = lane_model, outcome = 'spilled'})
  end
  local s = state_of(model)
  local extra = {}
  if s.probe then
    -- A half-open circuit: this run is its one probe, for as long as its lease.
    redis.call('HSET', model_state(model), 'probe', token, 'probe_until', expires)
    s.probe, s.stop = nil, expires
    extra = {'probe', '1'}
  end
  if model ~= lane_model then extra[#extra + 1] = 'spilled_from'; extra[#extra + 1] = lane_model end
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
  -- Not stored: what this run is (a probe; moved off its lane's model).
  for _, v in ipairs(extra) do record[#record + 1] = v end
  -- Somebody follows the task: its writer streams this run's events from the start.
  if status_event(id, 'running', attempts, nil, runs) then
    record[#record + 1] = 'followed'
    record[#record + 1] = '1'
  end
  return record
end

local claimed = {0}
-- The weighted round robin's position: read once, advanced once per turn taken.
local turn = tonumber(redis.call('GET', P .. 'wrr') or '0')
while #claimed - 1 < n do
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
  claimed[#claimed + 1] = take(tier, found[2], found[3], found[4], found[5])
end
redis.call('SET', P .. 'wrr', turn)
for field, delta in pairs(waiting) do redis.call('HINCRBY', P .. 'depth', field, delta) end
if #claimed - 1 < n then
  redis.call('ZADD', P .. 'idle', now + idle_ms, replica)
else
  redis.call('ZREM', P .. 'idle', replica)
end
claimed[1] = wake_at and math.max(0, wake_at - now) or -1
return claimed
