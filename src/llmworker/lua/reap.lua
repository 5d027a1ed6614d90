-- Requeue running tasks whose lease lapsed (their replica died or stalled), or fail
-- them once they have used MAX_ATTEMPTS. The run token stays on a requeued task until
-- a claim starts it again: an outcome its run records meanwhile still counts (finish).
-- What a dead run used is unknown: its books take its task's quota reservation's
-- estimate, when the task ends (a requeued task's reservation stays for its next run).
-- Runs cancelled while their holder died ('qp') are booked the same way, now.
-- ARGV: max attempts, ttl s, how many at most, lease ms, books (_common.lua).
-- Returns {requeued, failed, ms until the next lease lapses (-1: none), the failed tasks'
-- '<tier>|<model>' (for the metrics)}.
local max_attempts, ttl_s, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local cutoff, paused_till = lapse_cutoff(now, tonumber(ARGV[4]))
local requeued, failed, failed_lanes = 0, 0, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', cutoff, 'LIMIT', 0, limit)) do
  local tk = task_key(id)
  local t = redis.call('HMGET', tk, 'token', 'status', 'guards', 'tier', 'model', 'user', 'attempts',
    'kind', 'rl', 'models', 'tenant', 'qr')
  redis.call('ZREM', P .. 'running', id)
  if t[2] == 'running' then
    release(t[3], t[1])
    -- What the dead run used is unknown: its tokens go back, its request stays counted.
    settle_rates(t[9], t[1], nil, nil, now)
    if tonumber(t[7]) >= max_attempts then
      book_run(tk, {id, t[11], t[6], t[4], t[8], t[5], t[12]}, 'failed', use_guessed(t[12]), ARGV[5], now)
      local err = cjson.encode({code = 'lease_expired', message =
        'The task was started ' .. t[7] .. ' times and each run stopped renewing its lease ' ..
        '(its worker died or stalled); raise MAX_ATTEMPTS or LEASE_TTL_S if runs block the event loop.'})
      status_event(id, 'failed', t[7], err)
      finalize(id, 'failed', ttl_s, now, {'error', err})
      failed = failed + 1
      failed_lanes[failed] = t[4] .. '|' .. t[5]
    else
      -- Booked when the task ends, unless this run reports after all (finish.lua).
      redis.call('HINCRBY', tk, 'lapsed', 1)
      redis.call('HSET', tk, 'status', 'queued')
      redis.call('HDEL', tk, 'holder')
      enqueue(id, t[4], t[5], t[8], t[6], true)
      if t[10] and t[10] ~= '' then mark_spillable(t[4], route_of(t[5], t[8])) end
      status_event(id, 'queued', t[7])
      requeued = requeued + 1
    end
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'qp', '-inf', cutoff, 'LIMIT', 0, limit)) do
  redis.call('ZREM', P .. 'qp', id)
  local tk = task_key(id)
  local t = redis.call('HMGET', tk, 'tenant', 'user', 'tier', 'kind', 'model', 'qr', 'keep')
  if t[2] then
    book_run(tk, {id, t[1], t[2], t[3], t[4], t[5], t[6]}, 'cancelled', use_guessed(t[6]), ARGV[5], now)
    redis.call('EXPIRE', tk, tonumber(t[7]) or ttl_s)
  end
end
if requeued + failed > 0 then redis.call('PUBLISH', P .. 'wake', 'reap') end
-- Replicas listed as idle past their time have stopped waiting, or died.
redis.call('ZREMRANGEBYSCORE', P .. 'idle', '-inf', now)
local nxt = redis.call('ZRANGE', P .. 'running', 0, 0, 'WITHSCORES')
local booked = redis.call('ZRANGE', P .. 'qp', 0, 0, 'WITHSCORES')
if #booked > 0 and (#nxt == 0 or tonumber(booked[2]) < tonumber(nxt[2])) then nxt = booked end
local wait = -1
if #nxt > 0 then
  wait = math.max(0, tonumber(nxt[2]) - now)
  -- Leases that lapsed during the gap wait for the pause to end, not for nothing.
  if paused_till then wait = math.max(wait, paused_till - now) end
end
return {requeued, failed, wait, failed_lanes}
