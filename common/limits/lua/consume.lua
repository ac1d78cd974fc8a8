-- KEYS TOK, HOLDS; ARGV id, tokens_so_far, grow_by, limit, ttl_ms, expire_at. Returns {allowed, tokens held}.
-- A hold that already expired (missed renewals) is taken again from what is left.
local id, tokens, grow, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local amount = tonumber(redis.call('HGET', TOK, 'r:' .. id)) or 0
local available = limit - used - (held - amount)
if tokens > available then
  return {0, amount}
end
local new = math.max(amount, math.min(tokens + grow, available))
hold(id, new, amount, tonumber(ARGV[5]))
keep_until(ARGV[6])
return {1, new}
