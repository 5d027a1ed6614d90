-- Read what /metrics, /v1/stats and the dashboard show, in one round trip. Read-only;
-- the cost grows with the lanes and guards configured, not with the tasks waiting.
-- ARGV: detail ('1': also throughput, provider health and running tasks), tiers and
--       models (space-separated), models with a total cap, health minutes, throughput
--       minutes, how many running tasks to list.
-- Returns JSON (see observe/snapshot.py).
local detail = ARGV[1] == '1'
local function words(s)
  local out = {}
  for w in string.gmatch(s, '%S+') do out[#out + 1] = w end
  return out
end
local tiers, models, totals = words(ARGV[2]), words(ARGV[3]), words(ARGV[4])
local now = now_ms()
local live = '(' .. now
local out = {now = now}

out.depth = redis.call('HGETALL', P .. 'depth')

-- The oldest waiting task of each tier and model: each lane's first user (lowest
-- sequence number) holds the lane's oldest task at the head of its queue.
local oldest = {}
for _, tier in ipairs(tiers) do
  for _, route in ipairs(redis.call('SMEMBERS', P .. 'lanes:' .. tier)) do
    local user = redis.call('ZRANGE', lane_key(tier, route), 0, 0)[1]
    local head = user and redis.call('LINDEX', user_queue(tier, route, user), 0)
    local created = head and tonumber(redis.call('HGET', task_key(head), 'created_at'))
    if created then
      local name = tier .. '|' .. string.match(route, '^(.*)|[^|]*$')
      if not oldest[name] or created < oldest[name] then oldest[name] = created end
    end
  end
end
local flat = {}
for name, created in pairs(oldest) do flat[#flat + 1] = name; flat[#flat + 1] = created end
out.oldest = flat

local used = {}
for _, model in ipairs(models) do
  for _, tier in ipairs(tiers) do
    used[#used + 1] = 'm:' .. tier .. ':' .. model
    used[#used + 1] = redis.call('ZCOUNT', P .. 'g:m:' .. tier .. ':' .. model, live, '+inf')
  end
end
for _, model in ipairs(totals) do
  used[#used + 1] = 't:' .. model
  used[#used + 1] = redis.call('ZCOUNT', P .. 'g:t:' .. model, live, '+inf')
end
out.guards = used
-- What each model's provider said lately (see model_state): held (ms still), its
-- circuit (open or half-open, ms still, the code that opened it) and its adaptive cap.
local holds, states = {}, {}
for _, model in ipairs(models) do
  local f = redis.call('HMGET', model_state(model), 'hold', 'circuit', 'c_until', 'c_code', 'cap',
    'c_since', 'probe_until')
  local left = (tonumber(f[1]) or 0) - now
  if left > 0 then holds[#holds + 1] = model; holds[#holds + 1] = left end
  if f[2] or f[5] then
    local circuit = nil
    if f[2] then
      local untl = tonumber(f[3]) or 0
      circuit = {state = untl > now and 'open' or 'half_open', left_ms = math.max(0, untl - now),
        code = f[4] or '', since = tonumber(f[6]) or now,
        probing = (tonumber(f[7]) or 0) > now}
    end
    states[#states + 1] = {model = model, circuit = circuit, cap = tonumber(f[5])}
  end
end
out.states = states
out.holds = holds
out.running = redis.call('ZCARD', P .. 'running')
out.replicas = redis.call('ZCOUNT', P .. 'replicas', live, '+inf')
out.callbacks = redis.call('ZCARD', P .. 'callbacks')

if detail then
  local minute = math.floor(now / 60000)
  local health = {}
  for m = minute - tonumber(ARGV[5]) + 1, minute do
    local h = redis.call('HGETALL', P .. 'ph:' .. m)
    for i = 1, #h, 2 do health[h[i]] = (health[h[i]] or 0) + tonumber(h[i + 1]) end
  end
  local hflat = {}
  for field, n in pairs(health) do hflat[#hflat + 1] = field; hflat[#hflat + 1] = n end
  out.health = hflat

  local span = tonumber(ARGV[6])
  local tp = {}
  for m = minute - span + 1, minute do
    local c = redis.call('HMGET', P .. 'tp:' .. m, 'succeeded', 'failed', 'cancelled')
    tp[#tp + 1] = {tonumber(c[1]) or 0, tonumber(c[2]) or 0, tonumber(c[3]) or 0}
  end
  out.throughput = {start = (minute - span + 1) * 60000, minutes = tp}

  -- Running tasks, longest running first: a few more than shown are read, as the set is
  -- ordered by lease expiry, which renewals keep close together.
  local tasks = {}
  local limit = tonumber(ARGV[7])
  for _, id in ipairs(redis.call('ZRANGE', P .. 'running', 0, limit * 4 - 1)) do
    local t = redis.call('HMGET', task_key(id), 'kind', 'tier', 'model', 'user', 'started_at',
      'attempts', 'tenant', 'status')
    if t[8] == 'running' then
      tasks[#tasks + 1] = {id, t[1], t[2], t[3], t[4], tonumber(t[5]) or now, tonumber(t[6]) or 0, t[7] or ''}
    end
  end
  table.sort(tasks, function(a, b) return a[6] < b[6] end)
  while #tasks > limit do table.remove(tasks) end
  out.tasks = tasks
end
return cjson.encode(out)
