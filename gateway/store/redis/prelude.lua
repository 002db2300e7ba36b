-- Shared by admit.lua and settle.lua (prepended to each): the clock, the token-bucket
-- arithmetic of turnpike_core::limits, bucket specs, and giving back a reservation. Levels
-- are in units where one token is `period` units, so refill is an exact integer; doubles
-- count exactly below 2^53.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local EXACT = 9007199254740992 -- 2^53, also the deepest a bucket's debt goes (limits::MAX_DEBT)

-- A whole number as Redis should store it: never in exponent notation.
local function int(x)
  return string.format('%.0f', x)
end

local function capacity(b)
  return math.min(b.burst * b.period, EXACT)
end

-- The bucket at now: a new one starts full; refill is capped; a clock step back refills nothing.
local function refilled(level, updated, b)
  if level == nil then return capacity(b), now end
  local elapsed = math.max(now - updated, 0)
  return math.min(level + elapsed * b.rate, capacity(b)), math.max(now, updated)
end

-- A bucket spec from its rate, period and burst arguments; a rate of 0: no such bucket.
local function bucket_spec(rate, period, burst)
  rate = tonumber(rate)
  if rate == 0 then return nil end
  return { rate = rate, period = tonumber(period), burst = tonumber(burst) }
end

-- Gives back call `id`'s reservation, if it still holds one, and ends its lease. Amounts stay
-- decimal strings: Redis adds them as 64-bit integers, exactly.
local function release_held(account, leases, id)
  local held = redis.call('HGET', account, 'held:' .. id)
  if held then
    redis.call('HINCRBY', account, 'reserved', '-' .. held)
    redis.call('HDEL', account, 'held:' .. id)
  end
  redis.call('ZREM', leases, id)
end
