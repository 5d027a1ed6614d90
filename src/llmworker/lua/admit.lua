-- Admit one task: idempotent by id and by idempotency key, capped per tier, durable.
-- ARGV: id, idempotency key ('' for none), tier, model, user, tier cap, the lane's
--       model-tier limit, kind, the quota's terms (quotas.py, Terms.arg), then the
--       record's other fields as name, value pairs.
-- Quotas: the user's own limits ('qu:<user>') over the tier's; when any applies, or the
-- user holds credits (also 'qu:<user>'), the task's estimated use is checked against what the
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
-- The terms: day, month, the month window's expiry, the input's tokens, max_tokens (0:
-- none), nano-USD per input and per output token, then the tier's six limits (-1: none).
local q = words(ARGV[9])
local own = redis.call('HMGET', user_key(user), 'tasks_per_day', 'tokens_per_day', 'usd_per_day',
  'tasks_per_month', 'tokens_per_month', 'usd_per_month', 'nusd', 'tokens', 'r_nusd', 'r_tokens')
local limits, any = {}, false
for i = 1, 6 do
  local limit = tonumber(own[i]) or tonumber(q[7 + i])
  if limit and limit >= 0 then limits[i] = limit; any = true end
end
local reservation
if any or own[7] or own[8] then
  local est_in, out = tonumber(q[4]), tonumber(q[5])
  if out <= 0 then out = tonumber(redis.call('HGET', model_state(model), 'out') or '') or DEFAULT_OUTPUT end
  local tokens = est_in + out
  local nusd = math.ceil(est_in * tonumber(q[6]) + out * tonumber(q[7]))
  local need = {1, tokens, nusd}
  local now_v = redis.call('HMGET', quota_key(user, q[2]), q[1], q[2])
  -- The month first: when both are used up, the month's reset is the one to wait for.
  for w = 2, 1, -1 do
    local v = window_of(now_v[w])
    for m = 1, 3 do
      local limit = limits[(w - 1) * 3 + m]
      if limit and v[m] + v[m + 3] + need[m] > limit then
        return {'quota', LIMITS[(w - 1) * 3 + m], limit, v[m] + v[m + 3], need[m]}
      end
    end
  end
  local kinds = ''
  if own[7] then
    local left = tonumber(own[7]) - (tonumber(own[9]) or 0)
    if left < nusd or left <= 0 then return {'credits', 'usd', left, nusd} end
    kinds = kinds .. 'u'
  end
  if own[8] then
    local left = tonumber(own[8]) - (tonumber(own[10]) or 0)
    if left < tokens or left <= 0 then return {'credits', 'tokens', left, tokens} end
    kinds = kinds .. 'k'
  end
  local where = q[1] .. ' ' .. q[2] .. ' ' .. q[3]
  add_windows(user, where, {0, 0, 0, 1, tokens, nusd}, now_v)
  move_credits(user, kinds, tokens, nusd, 0, 0)
  if kinds == '' then kinds = '-' end
  local priced = (tonumber(q[6]) > 0 or tonumber(q[7]) > 0) and nusd or 'n'
  reservation = table.concat({1, est_in, out, priced, where, kinds}, ' ')
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
-- Wake idle dispatchers only when the lane has a free slot: while it is full, the
-- release of a slot wakes them instead, so a burst of submissions costs no futile claims.
-- Live leases only: slots of dead holders not yet pruned are free too.
local live = redis.call('ZCOUNT', P .. 'g:m:' .. tier .. ':' .. model, '(' .. now, '+inf')
if live < lane_limit then wake(id, now) end
return {'created', now}
