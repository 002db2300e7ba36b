-- Shared by admit.lua and settle.lua (prepended to each): the clock, the token-bucket
-- arithmetic of turnpike_core::limits, named arguments, and giving back a reservation. Levels
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

-- The arguments `names` lists, by name, from ARGV[offset + 1] on: protocol.rs sends them in
-- that order.
local function named(names, offset)
  local args = {}
  for i, name in ipairs(names) do args[name] = ARGV[offset + i] end
  return args
end

-- The `kind` bucket ('requests' or 'tokens') of a scope's named arguments; rate 0: none.
local function bucket_spec(args, kind)
  local rate = tonumber(args[kind .. '_rate'])
  if rate == 0 then return nil end
  return { rate = rate, period = tonumber(args[kind .. '_period']),
    burst = tonumber(args[kind .. '_burst']) }
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
