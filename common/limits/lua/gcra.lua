-- gcra(key, limit, period_ms): one request for the client whose TAT (ms, server clock) is at `key`.
-- Returns {allowed, remaining, reset_ms, retry_ms}.
local function gcra(key, limit, period)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local interval = period / limit
  local tat = math.max(tonumber(redis.call('GET', key)) or now, now)
  local new_tat = tat + interval
  local retry = new_tat - period - now
  if retry > 0 then
    return {0, 0, math.ceil(tat - now), math.ceil(retry)}
  end
  redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
  return {1, math.floor((period - (new_tat - now)) / interval + 1e-9), math.ceil(new_tat - now), 0}
end
