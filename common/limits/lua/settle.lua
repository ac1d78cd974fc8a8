-- KEYS TOK, HOLDS; ARGV id, actual tokens, expire_at. Charged even when the hold already expired:
-- the tokens were used.
local amount = tonumber(redis.call('HGET', TOK, 'r:' .. ARGV[1]))
if amount then
  redis.call('HINCRBY', TOK, 'held', -amount)
  redis.call('HDEL', TOK, 'r:' .. ARGV[1])
  redis.call('ZREM', HOLDS, ARGV[1])
end
redis.call('HINCRBY', TOK, 'used', tonumber(ARGV[2]))
keep_until(ARGV[3])
return 1
