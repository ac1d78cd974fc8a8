-- KEYS[1] the client's TAT (ms, server clock); ARGV admitted (by one replica since its last sync), limit,
-- period_ms. Adds those requests to the shared TAT; returns how far past now it lies (ms).
local admitted, limit, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = math.max(tonumber(redis.call('GET', KEYS[1])) or now, now) + admitted * period / limit
if tat > now then
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now))
end
return math.floor(tat - now)
