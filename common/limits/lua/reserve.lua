-- KEYS TOK, HOLDS; ARGV id, cost, limit, ttl_ms, expire_at. Returns {allowed, remaining}.
return reserve(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
