-- Add prepaid credit to a user, once per reference. ARGV: user, nano-USD, tokens (either
-- may be 0), reference ('' for none), how long a reference is remembered (s).
-- Returns {applied (1/0), nano-USD balance or false, tokens balance or false}.
local user, nusd, tokens, ref = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local key = user_key(user)
local applied = 1
if ref ~= '' then
  if not redis.call('SET', P .. 'crref:' .. user .. ':' .. ref, '1', 'NX', 'EX', tonumber(ARGV[5])) then
    applied = 0
  end
end
if applied == 1 then
  if nusd ~= 0 then redis.call('HINCRBY', key, 'nusd', ARGV[2]) end
  if tokens ~= 0 then redis.call('HINCRBY', key, 'tokens', ARGV[3]) end
end
local b = redis.call('HMGET', key, 'nusd', 'tokens')
return {applied, b[1], b[2]}
