-- One chat completion's way in, in one round trip: requests/min first (a refused request holds nothing);
-- then a fresh cached answer, if the caller names one, which costs no tokens; else the token reservation.
-- KEYS rate TAT, TOK, HOLDS[, cache entry]; ARGV rate limit, period_ms, id, cost, limit, ttl_ms, expire_at,
-- the cache entry's least remaining ms to count as fresh (it was stored for stale_ttl, is fresh for ttl).
-- Returns the GCRA reply, then {1|0 reserved, remaining} or {-1, 0, cached answer}.
local rate = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if rate[1] == 0 then
  return rate
end
if #KEYS == 4 and redis.call('PTTL', KEYS[4]) > tonumber(ARGV[8]) then
  rate[5], rate[6], rate[7] = -1, 0, redis.call('GET', KEYS[4])
  return rate
end
local tokens = reserve(ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7])
rate[5], rate[6] = tokens[1], tokens[2]
return rate
