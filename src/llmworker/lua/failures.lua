-- The latest tasks that did not succeed, newest first, filtered. Entries whose record
-- expired, or whose id a new task has taken since, are dropped from the list on the way.
-- ARGV: status, model, error code, tenant ('' = any), how many at most.
-- Returns JSON: {tasks = {{id, tenant, kind, tier, model, user, status, error json,
-- finished_at, attempts, retried_as}, ...}, facets = {status = {...}, model = {...}, error = {...}}}.
local want_status, want_model, want_error, want_tenant = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local limit = tonumber(ARGV[5])
local tasks, gone = {}, {}
local seen = {status = {}, model = {}, error = {}}
local listed = redis.call('ZREVRANGE', P .. 'failures', 0, -1, 'WITHSCORES')
for i = 1, #listed, 2 do
  local id, when = listed[i], listed[i + 1]
  local t = redis.call('HMGET', task_key(id), 'status', 'model', 'kind', 'tier', 'user', 'error',
    'finished_at', 'attempts', 'tenant', 'retried_as')
  -- Gone: the record expired, or the id was taken again by a new task since (ids may be
  -- chosen by the submitter), which is no failure until it ends as one.
  if (t[1] ~= 'failed' and t[1] ~= 'cancelled') or t[7] ~= when then
    gone[#gone + 1] = id
  else
    local code = ''
    if t[6] then
      local ok, err = pcall(cjson.decode, t[6])
      if ok and type(err) == 'table' and type(err.code) == 'string' then code = err.code end
    end
    local tenant = t[9] or 'default'
    if want_tenant == '' or want_tenant == tenant then
      seen.status[t[1]] = true
      seen.model[t[2] or ''] = true
      if code ~= '' then seen.error[code] = true end
      if #tasks < limit and (want_status == '' or want_status == t[1])
        and (want_model == '' or want_model == t[2]) and (want_error == '' or want_error == code) then
        tasks[#tasks + 1] = {id, tenant, t[3] or '', t[4] or '', t[2] or '', t[5] or '', t[1],
          t[6] or '', tonumber(t[7]) or 0, tonumber(t[8]) or 0, t[10] or ''}
      end
    end
  end
end
if #gone > 0 then redis.call('ZREM', P .. 'failures', unpack(gone)) end
local facets = {}
for name, set in pairs(seen) do
  local list = {}
  for value in pairs(set) do list[#list + 1] = value end
  table.sort(list)
  facets[name] = list
end
return cjson.encode({tasks = tasks, facets = facets})
