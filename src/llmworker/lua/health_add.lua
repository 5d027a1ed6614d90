-- Add one replica's provider calls since its last report to this minute's counts
-- ('ph:<minute>', two hours): the dashboard's provider health, over every replica.
-- ARGV: field, count pairs ('<model>|n|<outcome>', '<model>|d|<bucket>', '<model>|t|<bucket>').
local key = P .. 'ph:' .. math.floor(now_ms() / 60000)
for i = 1, #ARGV, 2 do redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', key, 7200)
return 1
