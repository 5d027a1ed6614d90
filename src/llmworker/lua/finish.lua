-- End a run: record the outcome, free its slots and settle its rate reservations, once.
-- ARGV: id, run token, status ('' to only free the slots), result json, error json,
--       usage json, ttl s, tokens the run used, calls it made, output tokens ('' when
--       unknown: see settle_rates), cost json (usage.py; '' for none), books (see
--       _common.lua: the ledger's day and the quota windows now).
-- The outcome is recorded while the run still holds the task (running, its token), and
-- also when the run's lease lapsed and the reaper put the task back in the queue but no
-- run has started since (the token is still this run's): the outcome was computed, and
-- paid for, once; running it again would pay twice. The task leaves the queue then.
-- Every recorded outcome, and the end of a run stopped by a cancel, enters the books: a
-- ledger entry, and the task's quota reservation settled to what the run used.
-- Returns 1 when recorded; 0 when the run was stale (cancelled, or another run started):
-- then only this run's slots are freed and its reservations settled.
local id, token, status = ARGV[1], ARGV[2], ARGV[3]

-- This run lapsed but reports: one lapsed run fewer to book at an estimate.
local function unlapse(tk)
  local left = redis.call('HINCRBY', tk, 'lapsed', -1)
  if left <= 0 then redis.call('HDEL', tk, 'lapsed') end
  return left >= 0
end
local tk = task_key(id)
local current = redis.call('HMGET', tk, 'token', 'status', 'guards', 'attempts', 'tier', 'model',
  'user', 'kind', 'rl', 'models', 'tenant', 'qr')
local now = now_ms()
release(current[3], token)
if current[9] and current[9] ~= '' then
  settle_rates(current[9], token, tonumber(ARGV[8]), tonumber(ARGV[9]), now)
end
-- The model's usual output, for the next tasks' estimates (TPM_*, quotas): a moving
-- average, kept where something reserves with it.
local output = tonumber(ARGV[10])
local estimates = (current[9] and string.find(current[9], 'tpm:', 1, true)) or
  (current[12] and current[12] ~= '')
if output and output > 0 and current[6] and estimates then
  local key = model_state(current[6])
  local before = tonumber(redis.call('HGET', key, 'out') or '')
  redis.call('HSET', key, 'out', before and math.floor(before * 0.9 + output * 0.1 + 0.5) or output)
end
wake(id, now)
if current[1] ~= token then return 0 end
local t = {id, current[11], current[7], current[5], current[8], current[6], current[12]}
if status == '' or current[2] == 'cancelled' then
  if current[2] == 'cancelled' and redis.call('ZREM', P .. 'qp', id) == 1 then
    -- A run stopped (or ending) after a cancel: what it streamed was paid for (cancel.lua
    -- listed it in 'qp' to be booked once, and kept its record until then).
    book_run(tk, t, 'cancelled', use_of(ARGV[11]), ARGV[12], now)
    if ARGV[11] ~= '' then redis.call('HSET', tk, 'cost', ARGV[11]) end
    redis.call('EXPIRE', tk, tonumber(redis.call('HGET', tk, 'keep') or '') or 86400)
  elseif current[2] == 'queued' and unlapse(tk) then
    -- A run whose lease lapsed, stopping: booked as it was, not at an estimate.
    book_extra(t, 'lapsed', use_of(ARGV[11]), ARGV[12], now)
  end
  return 0
end
if current[2] == 'queued' then
  -- The run whose lease lapsed reports after all: it is the task's end, not a lapse.
  unlapse(tk)
  local tier, model, user = current[5], current[6], current[7]
  local route = route_of(model, current[8])
  redis.call('LREM', user_queue(tier, route, user), 1, id)
  fix_head(tier, route, user)
  count_waiting(tier, model, -1)
elseif current[2] ~= 'running' then
  return 0
end
local fields = {}
if ARGV[4] ~= '' then fields[#fields + 1] = 'result'; fields[#fields + 1] = ARGV[4] end
if ARGV[5] ~= '' then fields[#fields + 1] = 'error'; fields[#fields + 1] = ARGV[5] end
if ARGV[6] ~= '' then fields[#fields + 1] = 'usage'; fields[#fields + 1] = ARGV[6] end
if ARGV[11] and ARGV[11] ~= '' then fields[#fields + 1] = 'cost'; fields[#fields + 1] = ARGV[11] end
-- A task with other models says how it ended on the one it ran on last.
if current[10] and current[10] ~= '' then add_tried(tk, {model = current[6], outcome = status}) end
-- Before finalize, which gives the stream (if any) the record's TTL.
status_event(id, status, current[4], ARGV[5] ~= '' and ARGV[5] or nil)
finalize(id, status, tonumber(ARGV[7]), now, fields)
book_run(tk, t, status, use_of(ARGV[11]), ARGV[12], now)
return 1
