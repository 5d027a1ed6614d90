-- Prepended to every script. KEYS[1] is the deployment's key prefix "{prefix}:"; every
-- key below is built from it, so all of them share one hash tag (see keys.py).
local P = KEYS[1]
local EVENTS_MAXLEN = 2000
local EVENTS_KEPT_S = 600

-- Redis server time, so that every replica's leases use one clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Leases count only time in which Redis could be reached. Every claim, renewal and reap
-- notes the time in 'clock'. Holders renew every third of a lease, so a gap of more than
-- two thirds of a lease means nobody reached Redis meanwhile (it was down, restarting
-- from its file, or cut off from every replica), and no holder could renew. Then a pause
-- opens ('pause' = "<from> <until> <opened>"): until every holder has had one whole lease
-- to renew, only leases that lapsed before the gap count as lapsed. Another gap while a
-- pause lasts extends it, never past three leases after it opened, so replicas that keep
-- stalling cannot hold a dead replica's slots for ever. Returns the time up to which
-- leases have lapsed, and the pause's end (or nil).
local function lapse_cutoff(now, lease_ms)
  local last = tonumber(redis.call('GET', P .. 'clock') or now)
  redis.call('SET', P .. 'clock', now)
  local from, till, opened
  local pause = redis.call('GET', P .. 'pause')
  if pause then
    from, till, opened = string.match(pause, '^(%d+) (%d+) (%d+)$')
    from, till, opened = tonumber(from), tonumber(till), tonumber(opened)
    if not till or now >= till then
      redis.call('DEL', P .. 'pause')
      from, till, opened = nil, nil, nil
    end
  end
  if now - last > lease_ms * 2 / 3 then
    if till then
      till = math.max(till, math.min(now + lease_ms, opened + 3 * lease_ms))
    else
      from, till, opened = last, now + lease_ms, now
    end
    redis.call('SET', P .. 'pause', from .. ' ' .. till .. ' ' .. opened)
  end
  if till then return from, till end
  return now, nil
end

local function task_key(id) return P .. 'task:' .. id end
-- A route is '<model>|<kind>': tasks wait per tier and route, so a replica claims only
-- the kinds it has handlers for, while the guards stay per model.
local function route_of(model, kind) return model .. '|' .. kind end
local function user_queue(tier, route, user) return P .. 'uq:' .. tier .. ':' .. route .. ':' .. user end
local function lane_key(tier, route) return P .. 'lane:' .. tier .. ':' .. route end

-- A task's events are written only while somebody may read them: once a reader followed
-- it ('fl:<id>' names the replicas whose readers do) the stream exists, and from then on
-- every event goes in. A task nobody follows costs no stream: a reader who comes later
-- gets the record, and a running task's text so far from its writer (events.py). Each
-- following replica's hub is told which task has news on its own channel. Returns
-- whether the event was written.
-- Who may read a task's events: the hubs that follow it, and whether its stream exists.
local function audience(id)
  return redis.call('SMEMBERS', P .. 'fl:' .. id), redis.call('EXISTS', P .. 'ev:' .. id) == 1
end

local function add_event(id, etype, data)
  redis.call('XADD', P .. 'ev:' .. id, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', etype, 'data', data)
end

local function tell_hubs(hubs, id)
  for _, hub in ipairs(hubs) do redis.call('PUBLISH', P .. 'hub:' .. hub, id) end
end

local function emit(id, etype, data)
  local hubs, exists = audience(id)
  if #hubs == 0 and not exists then return false end
  add_event(id, etype, data)
  tell_hubs(hubs, id)
  return true
end

-- err is already JSON: it is spliced in, not decoded and encoded again.
-- run: set on 'running', the run's number: a task handed back or requeued starts over,
-- and a reader that showed the last run's text knows to drop it.
local function status_event(id, status, attempts, err, run)
  local body = '{"status":"' .. status .. '","attempts":' .. (tonumber(attempts) or 0)
  if run then body = body .. ',"run":' .. run end
  if err then body = body .. ',"error":' .. err end
  return emit(id, 'status', body .. '}')
end

-- A lane (tier, route) lists each user with waiting tasks once, scored by the sequence
-- number of that user's oldest waiting task: the lowest score whose user has room is the
-- oldest task that can run, found without walking past other tasks of blocked users.
-- still_listed: the lane is known to be in lanes:<tier> already (one fewer call).
local function fix_head(tier, route, user, still_listed)
  local lane = lane_key(tier, route)
  local head = redis.call('LINDEX', user_queue(tier, route, user), 0)
  if head then
    redis.call('ZADD', lane, redis.call('HGET', task_key(head), 'seq'), user)
    if not still_listed then redis.call('SADD', P .. 'lanes:' .. tier, route) end
  else
    redis.call('ZREM', lane, user)
    if redis.call('ZCARD', lane) == 0 then
      redis.call('SREM', P .. 'lanes:' .. tier, route)
      redis.call('SREM', P .. 'sp:' .. tier, route)
    end
  end
end

local function count_waiting(tier, model, delta)
  redis.call('HINCRBY', P .. 'depth', tier, delta)
  redis.call('HINCRBY', P .. 'depth', tier .. '|' .. model, delta)
end

-- front: a task handed back or requeued goes before the user's newer tasks.
local function enqueue(id, tier, model, kind, user, front)
  local route = route_of(model, kind)
  local uq = user_queue(tier, route, user)
  local len
  if front then len = redis.call('LPUSH', uq, id) else len = redis.call('RPUSH', uq, id) end
  if front or len == 1 then fix_head(tier, route, user) end
  count_waiting(tier, model, 1)
end

-- Tell idle dispatchers that work may be claimable. Only dispatchers whose last claim
-- came back short wait for this (claim.lua lists them in 'idle' until they claim again);
-- busy ones claim again on their own. So under load nobody publishes and nobody parses
-- a message per task, and an idle replica still wakes at once.
local function wake(reason, now)
  -- Entries past their time are replicas that stopped waiting (or died): not counted
  -- here, and removed by the reaper.
  if redis.call('ZCOUNT', P .. 'idle', '(' .. now, '+inf') > 0 then
    redis.call('PUBLISH', P .. 'wake', reason)
  end
end

local function release(guards, token)
  if not guards or guards == '' then return end
  for g in string.gmatch(guards, '[^\n]+') do redis.call('ZREM', g, token) end
end

-- What the dashboard shows of finished tasks, kept in Redis so every replica counts and
-- a restart forgets nothing: final states per minute ('tp:<minute>', two hours), and the
-- latest tasks that did not succeed ('failures', the newest FAILURES_KEPT).
local THROUGHPUT_TTL_S = 7200
local FAILURES_KEPT = 500
local function count_final(id, status, now)
  local tp = P .. 'tp:' .. math.floor(now / 60000)
  if redis.call('HINCRBY', tp, status, 1) == 1 then redis.call('EXPIRE', tp, THROUGHPUT_TTL_S) end
  if status ~= 'succeeded' then
    local failures = P .. 'failures'
    redis.call('ZADD', failures, now, id)
    if redis.call('ZCARD', failures) > FAILURES_KEPT then
      redis.call('ZREMRANGEBYRANK', failures, 0, -FAILURES_KEPT - 1)
    end
  end
end

-- A final state: the record, its events and its idempotency key expire together. A task
-- with a callback_url enters the callback outbox, due now, in the same step: a replica
-- that dies right after cannot lose the callback.
-- fields: more field, value pairs to store with the status (the outcome), or nil.
local function finalize(id, status, ttl_s, now, fields)
  local tk = task_key(id)
  local t = redis.call('HMGET', tk, 'idem', 'callback_url')
  local changes = {'status', status, 'finished_at', now}
  for _, v in ipairs(fields or {}) do changes[#changes + 1] = v end
  if t[2] and t[2] ~= '' then
    changes[#changes + 1] = 'cb_status'
    changes[#changes + 1] = 'pending'
    redis.call('ZADD', P .. 'callbacks', now, id)
  end
  redis.call('HSET', tk, unpack(changes))
  count_final(id, status, now)
  redis.call('ZREM', P .. 'running', id)
  redis.call('EXPIRE', tk, ttl_s)
  -- A late reader needs the record, not the events: they stay for a reader resuming
  -- a stream cut near the end, not as long as the record.
  redis.call('EXPIRE', P .. 'ev:' .. id, math.min(ttl_s, EVENTS_KEPT_S))
  if t[1] and t[1] ~= '' then redis.call('EXPIRE', P .. 'ik:' .. t[1], ttl_s) end
end

-- A model's state ('ms:<model>', a hash): what its provider said lately. Fields:
--   hold                 ms until which claims skip the model (its provider asked to wait)
--   circuit, c_until, c_code, c_since, probe, probe_until
--                        a circuit opened by a refused key or an exhausted quota (circuit.lua)
--   cap, cap_at, ceiling, oks, base, short
--                        the adaptive cap over all tiers and what moves it (adapt.lua)
--   out                  the model's usual output in tokens (learned when TPM_* is set)
local function model_state(model) return P .. 'ms:' .. model end

-- Hold a model's dispatch for ms (its provider asked to wait, or said a limit is used
-- up): claims skip it until then. A later hold never shortens an earlier one. Returns
-- how long the model is held (ms), and whether this call lengthened it.
local function hold_model(model, ms, now)
  local key = model_state(model)
  local untl = tonumber(redis.call('HGET', key, 'hold') or '0')
  if untl < now + ms then
    redis.call('HSET', key, 'hold', now + ms)
    return ms, true
  end
  return untl - now, false
end

-- Rate windows: 'rpm:<model>[:<tier>]' (zset of run tokens by when they were claimed)
-- and 'tpm:<model>[:<tier>]' (the same, with 'tpmv:<model>[:<tier>]', a hash of each
-- entry's tokens and their '_sum'). A run's scopes are on its record ('rl').
local function tpm_values(scope) return P .. 'tpmv:' .. string.sub(scope, 5) end

-- Drop the window's entries older than W ms; the tokens left in it.
local function tpm_prune(scope, cutoff)
  local z, v = P .. scope, tpm_values(scope)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff, 'LIMIT', 0, 1000)
  while #old > 0 do
    local gone = 0
    for _, n in ipairs(redis.call('HMGET', v, unpack(old))) do gone = gone + (tonumber(n) or 0) end
    redis.call('HDEL', v, unpack(old))
    redis.call('ZREM', z, unpack(old))
    redis.call('HINCRBY', v, '_sum', -gone)
    if #old < 1000 then break end
    old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff, 'LIMIT', 0, 1000)
  end
  return tonumber(redis.call('HGET', v, '_sum') or '0')
end

-- Settle a run's reservations: its token entries become the tokens it used (gone if
-- none), and its request entry stays only if it made a call (one more entry per call
-- past the first). used, calls: nil when unknown (a lapsed lease): tokens go, the
-- request stays.
local function settle_rates(scopes, token, used, calls, now)
  if not scopes or scopes == '' then return end
  for scope in string.gmatch(scopes, '[^\n]+') do
    if string.sub(scope, 1, 4) == 'tpm:' then
      local v = tpm_values(scope)
      local old = tonumber(redis.call('HGET', v, token) or '')
      if old then
        local new = used or 0
        if new <= 0 then
          redis.call('HDEL', v, token)
          redis.call('ZREM', P .. scope, token)
        else
          redis.call('HSET', v, token, new)
        end
        redis.call('HINCRBY', v, '_sum', math.max(new, 0) - old)
      end
    elseif calls == 0 then
      redis.call('ZREM', P .. scope, token)
    elseif calls and calls > 1 then
      for i = 2, calls do redis.call('ZADD', P .. scope, now, token .. '#' .. i) end
    end
  end
end

-- Append one entry to a task's 'tried' (a JSON list: the models a task went through
-- and how each ended).
local function add_tried(tk, entry)
  local tried = redis.call('HGET', tk, 'tried')
  local item = cjson.encode(entry)
  if tried and #tried > 2 then
    tried = string.sub(tried, 1, -2) .. ',' .. item .. ']'
  else
    tried = '[' .. item .. ']'
  end
  redis.call('HSET', tk, 'tried', tried)
end

-- A lane whose tasks have other models to go to: claims look at it when its own model
-- cannot take them ('sp:<tier>', a set of routes; stale entries only cost a look).
local function mark_spillable(tier, route) redis.call('SADD', P .. 'sp:' .. tier, route) end

-- Give a running task back to the queue: its slots are freed and it waits at the front
-- of its user's queue; the interrupted run does not count as an attempt. Returns the
-- task's attempts, or nil when the run was stale (it no longer holds the task).
local function hand_back(id, token)
  local tk = task_key(id)
  local t = redis.call('HMGET', tk, 'token', 'status', 'guards', 'tier', 'model', 'user', 'kind',
    'rl', 'models')
  release(t[3], token)
  -- Nothing of the run was answered: no tokens; its request may have counted.
  settle_rates(t[8], token, 0, 1, now_ms())
  if t[1] ~= token or t[2] ~= 'running' then return nil end
  redis.call('ZREM', P .. 'running', id)
  local attempts = redis.call('HINCRBY', tk, 'attempts', -1)
  redis.call('HSET', tk, 'status', 'queued')
  redis.call('HDEL', tk, 'holder')
  enqueue(id, t[4], t[5], t[7], t[6], true)
  if t[9] and t[9] ~= '' then mark_spillable(t[4], route_of(t[5], t[7])) end
  status_event(id, 'queued', attempts)
  return attempts
end

-- Money, tokens and quotas. Costs are counted in nano-USD, whole numbers. 'books'
-- (quotas.py, Books.arg): '<day> <month> <day window expires at, s> <month window expires
-- at, s> <ledger kept, s>', the day (dYYYY-MM-DD) and month (mYYYY-MM) being those of
-- QUOTA_TIMEZONE now.
-- A user's windows live in one hash per month, 'q:<user>:<month>': field '<month>' for
-- the month and '<day>' for each of its days, each '<tasks> <tokens> <nusd> <reserved
-- tasks> <reserved tokens> <reserved nusd>'. The user's own limits and credits are
-- 'qu:<user>' (quotas.py). So an admission reads two hashes and writes one.
local function words(s)
  local out = {}
  for w in string.gmatch(s or '', '%S+') do out[#out + 1] = w end
  return out
end

local function quota_key(user, month) return P .. 'q:' .. user .. ':' .. month end
local function user_key(user) return P .. 'qu:' .. user end

local function window_of(packed)
  if not packed then return {0, 0, 0, 0, 0, 0} end
  local a, b, c, d, e, f = string.match(packed, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
  return {tonumber(a) or 0, tonumber(b) or 0, tonumber(c) or 0, tonumber(d) or 0, tonumber(e) or 0,
    tonumber(f) or 0}
end

local function window_text(v)
  return string.format('%d %d %d %d %d %d', v[1], v[2], v[3], v[4], v[5], v[6])
end

-- Add deltas {tasks, tokens, nusd, reserved tasks, reserved tokens, reserved nusd} to
-- the user's day and month windows ('<day> <month> <expires at, s>'); now_v: the two
-- fields when already read.
local function add_windows(user, where, delta, now_v)
  local w = words(where)
  local key = quota_key(user, w[2])
  now_v = now_v or redis.call('HMGET', key, w[1], w[2])
  local day, month = window_of(now_v[1]), window_of(now_v[2])
  for i = 1, 6 do
    day[i] = day[i] + delta[i]
    month[i] = month[i] + delta[i]
  end
  -- New fields mean a new day (or key): only then is its expiry set.
  if redis.call('HSET', key, w[1], window_text(day), w[2], window_text(month)) > 0 then
    redis.call('EXPIREAT', key, w[3])
  end
end

local function add_fields(key, pairs_)
  for i = 1, #pairs_, 2 do
    if pairs_[i + 1] ~= 0 then redis.call('HINCRBY', key, pairs_[i], pairs_[i + 1]) end
  end
end

-- Move a user's credits of the kinds a task draws on ('u' USD, 'k' tokens, as in 'qr'):
-- their reservations by the reserved deltas, their balances down by what was used.
local function move_credits(user, kinds, reserved_tokens, reserved_nusd, tokens, nusd)
  local delta = {}
  if string.find(kinds, 'u', 1, true) then delta = {'r_nusd', reserved_nusd, 'nusd', -nusd} end
  if string.find(kinds, 'k', 1, true) then
    delta[#delta + 1] = 'r_tokens'; delta[#delta + 1] = reserved_tokens
    delta[#delta + 1] = 'tokens'; delta[#delta + 1] = -tokens
  end
  add_fields(user_key(user), delta)
end

-- The windows now, as add_windows takes them.
local function windows_now(books)
  local b = words(books)
  return b[1] .. ' ' .. b[2] .. ' ' .. b[4]
end

-- Settle a task's quota reservation ('qr' on its record: '<task> <input> <output> <nusd,
-- n for a model without a price> <day> <month> <expires at, s> <credits: u usd, k tokens,
-- - none>', admit.lua) to what it used: the reservation leaves 'reserved', the use enters
-- 'used', and its credits pay it. A task without a reservation is counted in the current
-- windows. counted: the task counts against tasks per day/month (it succeeded or used
-- tokens: a failure before any token, a cancel in the queue, pay nothing).
local function settle_quota(tk, user, qr, tokens, nusd, counted, books)
  local task = counted and 1 or 0
  if qr and qr ~= '' then
    local r = words(qr)
    local r_task, r_tokens, r_nusd = tonumber(r[1]), tonumber(r[2]) + tonumber(r[3]), tonumber(r[4]) or 0
    task = math.min(task, r_task)
    add_windows(user, r[5] .. ' ' .. r[6] .. ' ' .. r[7],
      {task, tokens, nusd, -r_task, -r_tokens, -r_nusd})
    move_credits(user, r[8], -r_tokens, -r_nusd, tokens, nusd)
    redis.call('HDEL', tk, 'qr')
  elseif books and (task > 0 or tokens > 0 or nusd > 0) then
    add_windows(user, windows_now(books), {task, tokens, nusd, 0, 0, 0})
  end
end

-- The ledger: one entry per finished attempt ('ledger', a stream kept for the books'
-- retention) and daily totals ('ld:<day>' per tier, model and user; 'lt:<day>' per tier
-- and model), fields '<measure>|<tier>|<model>[|<user>]'. Measures: n attempts, t tasks
-- ended, in / cin / out / rsn tokens (input, cached input, output, reasoning), nusd cost,
-- unp attempts that used tokens of a model without a price.
-- t: the task's record fields {id, tenant, user, tier, kind, model}; u: {input,
-- cached_input, output, reasoning, nusd (nil: no price), source, estimated}.
local function ledger_add(t, status, u, books, now)
  local b = words(books)
  local keep_s = tonumber(b[5]) or 2592000
  local usd = u.nusd and string.format('%.9f', u.nusd / 1e9) or ''
  redis.call('XADD', P .. 'ledger', 'MINID', '~', now - keep_s * 1000, '*',
    'at', now, 'day', b[1], 'task', t[1], 'tenant', t[2] or '', 'user', t[3] or '', 'tier', t[4] or '',
    'kind', t[5] or '', 'model', t[6] or '', 'status', status, 'in', u.input, 'cin', u.cached_input,
    'out', u.output, 'rsn', u.reasoning, 'usd', usd, 'src', u.source or '', 'est', u.estimated and 1 or 0)
  local ended = (status == 'succeeded' or status == 'failed' or status == 'cancelled') and 1 or 0
  local unpriced = (not u.nusd and u.input + u.output > 0) and 1 or 0
  local tail = '|' .. (t[4] or '') .. '|' .. (t[6] or '')
  for _, k in ipairs({{P .. 'lt:' .. b[1], tail}, {P .. 'ld:' .. b[1], tail .. '|' .. (t[3] or '')}}) do
    local s = k[2]
    -- A day's first entry (of its tier, model and user) sets the day's expiry.
    if redis.call('HINCRBY', k[1], 'n' .. s, 1) == 1 then redis.call('EXPIRE', k[1], keep_s + 172800) end
    add_fields(k[1], {'t' .. s, ended, 'in' .. s, u.input, 'cin' .. s, u.cached_input,
      'out' .. s, u.output, 'rsn' .. s, u.reasoning, 'nusd' .. s, u.nusd or 0, 'unp' .. s, unpriced})
  end
end

-- A run's use from its cost JSON (usage.py, Cost.to_record), for the books.
local function use_of(cost)
  if not cost or cost == '' then
    return {input = 0, cached_input = 0, output = 0, reasoning = 0, nusd = nil, estimated = false}
  end
  local c = cjson.decode(cost)
  local tk = c.tokens or {}
  local nusd = nil
  if type(c.usd) == 'number' then nusd = math.floor(c.usd * 1e9 + 0.5) end
  return {input = tk.input or 0, cached_input = tk.cached_input or 0, output = tk.output or 0,
    reasoning = tk.reasoning or 0, nusd = nusd, source = type(c.source) == 'string' and c.source or nil,
    estimated = c.estimated == true}
end

-- What a run whose end nobody saw (its replica died) probably used: its task's
-- reservation's estimate ('n' as its price: a model without one), or nothing known.
local function use_guessed(qr)
  local r = words(qr)
  if #r < 4 then
    return {input = 0, cached_input = 0, output = 0, reasoning = 0, nusd = nil, estimated = true}
  end
  return {input = tonumber(r[2]), cached_input = 0, output = tonumber(r[3]), reasoning = 0,
    nusd = tonumber(r[4]), source = 'reservation', estimated = true}
end

-- A run that ended without ending its task (handed back mid-stream at a shutdown, or
-- lapsed: its replica died): its ledger entry, and its use charged to the user's windows
-- and credits. The task's reservation stays for the run that ends it.
-- t: the task's record fields {id, tenant, user, tier, kind, model, qr}.
local function book_extra(t, status, u, books, now)
  ledger_add(t, status, u, books, now)
  local tokens, nusd = u.input + u.output, u.nusd or 0
  if tokens == 0 and nusd == 0 then return end
  local where, credit = windows_now(books), '-'
  if t[7] and t[7] ~= '' then
    local r = words(t[7])
    where, credit = r[5] .. ' ' .. r[6] .. ' ' .. r[7], r[8]
  end
  add_windows(t[3], where, {0, tokens, nusd, 0, 0, 0})
  move_credits(t[3], credit, 0, 0, tokens, nusd)
end

-- Runs of the task that lapsed ('lapsed' on its record, counted by reap.lua) are booked
-- at their estimate once the task ends: a run that lapsed may still report (finish.lua),
-- and then it is booked as it was, once. Returns how many were booked.
local function book_lapsed(tk, t, books, now)
  local n = tonumber(redis.call('HGET', tk, 'lapsed') or '0') or 0
  for _ = 1, n do book_extra(t, 'lapsed', use_guessed(t[7]), books, now) end
  if n > 0 then redis.call('HDEL', tk, 'lapsed') end
  return n
end

-- The books of the run that ended its task: its ledger entry (and those of its runs that
-- lapsed), and the task's quota reservation settled to what it used.
local function book_run(tk, t, status, u, books, now)
  local lapsed = book_lapsed(tk, t, books, now)
  ledger_add(t, status, u, books, now)
  local tokens = u.input + u.output
  settle_quota(tk, t[3], t[7], tokens, u.nusd or 0, status == 'succeeded' or tokens > 0 or lapsed > 0,
    books)
end
