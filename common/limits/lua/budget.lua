-- A user-day's token budget. Expects TOK (hash: used, held, r:<id> -> tokens held by that reservation)
-- and HOLDS (zset: reservation id -> deadline, ms, server clock). First drops the holds whose deadline
-- has passed, then defines hold, keep_until and reserve for the script that follows.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', HOLDS, '-inf', now)
for _, id in ipairs(expired) do
  local amount = tonumber(redis.call('HGET', TOK, 'r:' .. id)) or 0
  redis.call('HINCRBY', TOK, 'held', -amount)
  redis.call('HDEL', TOK, 'r:' .. id)
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', HOLDS, '-inf', now)
end
local used = tonumber(redis.call('HGET', TOK, 'used')) or 0
local held = tonumber(redis.call('HGET', TOK, 'held')) or 0
local function hold(id, amount, old, ttl)
  redis.call('HSET', TOK, 'r:' .. id, amount)
  redis.call('HINCRBY', TOK, 'held', amount - old)
  redis.call('ZADD', HOLDS, now + ttl, id)
end
local function keep_until(at)
  redis.call('EXPIREAT', TOK, at)
  redis.call('EXPIREAT', HOLDS, at)
end
-- hold `cost` of `limit` for a new reservation `id`, or refuse: {1|0, remaining}
local function reserve(id, cost, limit, ttl, expire_at)
  if used + held + cost > limit then
    return {0, limit - used - held}
  end
  hold(id, cost, 0, ttl)
  keep_until(expire_at)
  return {1, limit - used - held - cost}
end
