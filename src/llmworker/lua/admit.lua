-- Admit one task: idempotent by id and by idempotency key, capped per tier, durable.
-- ARGV: id, idempotency key ('' for none), tier, model, user, tier cap, the lane's
--       model-tier limit, kind, then the record's other fields as name, value pairs.
-- Returns {'created', created_at} | {'exists', existing id} | {'full', waiting count}.
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

local now = now_ms()
local seq = redis.call('INCR', P .. 'seq')
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', tk, 'id', id, 'kind', kind, 'tier', tier, 'model', model, 'user', user, 'idem', idem,
  'status', 'queued', 'attempts', 0, 'runs', 0, 'seq', seq, 'created_at', now, unpack(fields))
if idem ~= '' then redis.call('SET', P .. 'ik:' .. idem, id) end
enqueue(id, tier, model, kind, user, false)
for i = 9, #ARGV, 2 do
  if ARGV[i] == 'models' then mark_spillable(tier, route_of(model, kind)) end
end
status_event(id, 'queued', 0)
-- Wake idle dispatchers only when the lane has a free slot: while it is full, the
-- release of a slot wakes them instead, so a burst of submissions costs no futile claims.
-- Live leases only: slots of dead holders not yet pruned are free too.
local live = redis.call('ZCOUNT', P .. 'g:m:' .. tier .. ':' .. model, '(' .. now, '+inf')
if live < lane_limit then wake(id, now) end
return {'created', now}
