-- Prepended to every script. KEYS[1] is the deployment's key prefix "{prefix}:"; every
-- key below is built from it, so all of them share one hash tag (see keys.py).
local P = KEYS[1]
local EVENTS_MAXLEN = 2000

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

local function emit(id, etype, data)
  redis.call('XADD', P .. 'ev:' .. id, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', etype, 'data', data)
end

-- err is already JSON: it is spliced in, not decoded and encoded again.
-- run: set on 'running', the run's number: a task handed back or requeued starts over,
-- and a reader that showed the last run's text knows to drop it.
local function status_event(id, status, attempts, err, run)
  local body = '{"status":"' .. status .. '","attempts":' .. (tonumber(attempts) or 0)
  if run then body = body .. ',"run":' .. run end
  if err then body = body .. ',"error":' .. err end
  emit(id, 'status', body .. '}')
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
    if redis.call('ZCARD', lane) == 0 then redis.call('SREM', P .. 'lanes:' .. tier, route) end
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
  redis.call('EXPIRE', P .. 'ev:' .. id, ttl_s)
  if t[1] and t[1] ~= '' then redis.call('EXPIRE', P .. 'ik:' .. t[1], ttl_s) end
end

-- Give a running task back to the queue: its slots are freed and it waits at the front
-- of its user's queue; the interrupted run does not count as an attempt. Returns the
-- task's attempts, or nil when the run was stale (it no longer holds the task).
local function hand_back(id, token)
  local tk = task_key(id)
  local t = redis.call('HMGET', tk, 'token', 'status', 'guards', 'tier', 'model', 'user', 'kind')
  release(t[3], token)
  if t[1] ~= token or t[2] ~= 'running' then return nil end
  redis.call('ZREM', P .. 'running', id)
  local attempts = redis.call('HINCRBY', tk, 'attempts', -1)
  redis.call('HSET', tk, 'status', 'queued')
  redis.call('HDEL', tk, 'holder')
  enqueue(id, t[4], t[5], t[7], t[6], true)
  status_event(id, 'queued', attempts)
  return attempts
end

-- Hold a model's dispatch for ms (its provider asked to wait, or said a limit is used
-- up): claims skip it while 'hold:<model>' lives. A later hold never shortens an earlier
-- one. Returns how long the model is held (ms), and whether this call lengthened it.
local function hold_model(model, ms)
  local hold = P .. 'hold:' .. model
  local left = redis.call('PTTL', hold)
  if left < ms then
    redis.call('SET', hold, '1', 'PX', ms)
    return ms, true
  end
  return left, false
end
