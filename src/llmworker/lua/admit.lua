-- Admit one task: idempotent by id and by idempotency key, capped per tier, durable.
-- ARGV: id, idempotency key ('' for none), tier, model, user, tier cap, the lane's
--       model-tier limit, kind, the quota's terms (quotas.py, Terms.arg), then the
--       record's other fields as name, value pairs.
-- Quotas: the user's own limits ('qo:<user>') over the tier's; when any applies, or the
-- user holds credits ('cr:<user>'), the task's estimated use is checked against what the
-- day's and the month's windows have used and reserved, and against the credits left,
-- and reserved in the same step: concurrent submissions cannot overspend.
-- Returns {'created', created_at} | {'exists', existing id} | {'full', waiting count} |
-- {'quota', limit name, limit, used and reserved, this task's need} |
-- {'credits', 'usd' or 'tokens', left, this task's need}.
local id, idem, tier, model, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cap, lane_limit, kind = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local tk = task_key(id)
if redis.call('EXISTS', tk) == 1 then return {'exists', id} end
if idem ~= '' then
  local other = redis.call('GET', P .. 'ik:' .. idem)
  if other and redis.call('EXISTS', task_key(other)) == 1 then return {'exists', other} end
end
local waiting = tonumber(redis.call('HGET', P .. 'depth', tier) or '0')
if waiting >= cap then return {'full', waiting} end

local LIMITS = {'tasks_per_day', 'tokens_per_day', 'usd_per_day', 'tasks_per_month',
  'tokens_per_month', 'usd_per_month'}
-- Output a task reserves when it names no max_tokens and its model's usual output is not
-- known yet.
local DEFAULT_OUTPUT = 1024
local q = words(ARGV[9])
local own = redis.call('HMGET', P .. 'qo:' .. user, unpack(LIMITS))
local limits, any = {}, false
for i = 1, 6 do
  local limit = tonumber(own[i]) or tonumber(q[8 + i])
  if limit and limit >= 0 then limits[i] = limit; any = true end
end
local credit = redis.call('HMGET', P .. 'cr:' .. user, 'nusd', 'tokens', 'r_nusd', 'r_tokens')
local reservation
if any or credit[1] or credit[2] then
  local est_in, out = tonumber(q[5]), tonumber(q[6])
  if out <= 0 then out = tonumber(redis.call('HGET', model_state(model), 'out') or '') or DEFAULT_OUTPUT end
  local tokens = est_in + out
  local nusd = math.ceil(est_in * tonumber(q[7]) + out * tonumber(q[8]))
  local need = {1, tokens, nusd}
  local windows = {quota_key(user, q[1]), quota_key(user, q[3])}
  -- The month first: when both are used up, the month's reset is the one to wait for.
  for w = 2, 1, -1 do
    local v = redis.call('HMGET', windows[w], 'tasks', 'tokens', 'nusd', 'r_tasks', 'r_tokens', 'r_nusd')
    for m = 1, 3 do
      local limit = limits[(w - 1) * 3 + m]
      local taken = (tonumber(v[m]) or 0) + (tonumber(v[m + 3]) or 0)
      if limit and taken + need[m] > limit then
        return {'quota', LIMITS[(w - 1) * 3 + m], limit, taken, need[m]}
      end
    end
  end
  local kinds = ''
  if credit[1] then
    local left = tonumber(credit[1]) - (tonumber(credit[3]) or 0)
    if left < nusd or left <= 0 then return {'credits', 'usd', left, nusd} end
    kinds = kinds .. 'u'
  end
  if credit[2] then
    local left = tonumber(credit[2]) - (tonumber(credit[4]) or 0)
    if left < tokens or left <= 0 then return {'credits', 'tokens', left, tokens} end
    kinds = kinds .. 'k'
  end
  for w = 1, 2 do
    add_fields(windows[w], {'r_tasks', 1, 'r_tokens', tokens, 'r_nusd', nusd})
    redis.call('EXPIREAT', windows[w], q[w * 2])
  end
  if kinds ~= '' then
    add_fields(P .. 'cr:' .. user, {'r_nusd', string.find(kinds, 'u', 1, true) and nusd or 0,
      'r_tokens', string.find(kinds, 'k', 1, true) and tokens or 0})
  else
    kinds = '-'
  end
  local priced = (tonumber(q[7]) > 0 or tonumber(q[8]) > 0) and nusd or 'n'
  reservation = table.concat({1, est_in, out, priced, q[1], q[2], q[3], q[4], kinds}, ' ')
end

local now = now_ms()
local seq = redis.call('INCR', P .. 'seq')
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
if reservation then fields[#fields + 1] = 'qr'; fields[#fields + 1] = reservation end
redis.call('HSET', tk, 'id', id, 'kind', kind, 'tier', tier, 'model', model, 'user', user, 'idem', idem,
  'status', 'queued', 'attempts', 0, 'runs', 0, 'seq', seq, 'created_at', now, unpack(fields))
if idem ~= '' then redis.call('SET', P .. 'ik:' .. idem, id) end
enqueue(id, tier, model, kind, user, false)
for i = 10, #ARGV, 2 do
  if ARGV[i] == 'models' then mark_spillable(tier, route_of(model, kind)) end
end
status_event(id, 'queued', 0)
-- Wake idle dispatchers only when the lane has a free slot: while it is full, the
-- release of a slot wakes them instead, so a burst of submissions costs no futile claims.
-- Live leases only: slots of dead holders not yet pruned are free too.
local live = redis.call('ZCOUNT', P .. 'g:m:' .. tier .. ':' .. model, '(' .. now, '+inf')
if live < lane_limit then wake(id, now) end
return {'created', now}
