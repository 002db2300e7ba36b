-- Shared by admit.lua and settle.lua (prepended to each, and to batch.lua): the clock, the
-- token-bucket arithmetic of turnpike_core::limits, bucket specs, giving back a reservation,
-- and the state one script run reads once and writes once however many calls it carries.
-- Levels are in units where one token is `period` units, so refill is an exact integer;
-- doubles count exactly below 2^53.
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
-- `held`: units gateway instances hold in slices of it (slice.lua), which count against its
-- capacity: a token is in the bucket or in one slice, so the fleet never has more than a
-- burst to hand out.
-- (Holdings taken under an older spec may exceed a new, smaller capacity for the second or
-- two until they go back: they never take it below empty.)
--
-- `held_at`: when a sync last changed the holdings. Each holding is leased for
-- HOLDINGS_LEASE_MS from its own last sync, so once that long has passed since the last sync
-- of any, none is live (their instances stopped): they no longer count, even before a sync
-- sweeps them.
local HOLDINGS_LEASE_MS = 2000

local function held_now(b, held, held_at)
  held_at = tonumber(held_at)
  if held_at == nil or now - held_at >= HOLDINGS_LEASE_MS then return 0 end
  return math.min(math.max(tonumber(held) or 0, 0), capacity(b))
end

local function refilled(level, updated, b, held, held_at)
  local cap = capacity(b) - held_now(b, held, held_at)
  if level == nil then return cap, now end
  local elapsed = math.max(now - updated, 0)
  return math.min(level + elapsed * b.rate, cap), math.max(now, updated)
end

-- A bucket spec from its rate, period and burst arguments; a rate of 0: no such bucket.
local function bucket_spec(rate, period, burst)
  rate = tonumber(rate)
  if rate == 0 then return nil end
  return { rate = rate, period = tonumber(period), burst = tonumber(burst) }
end

-- Hash fields as this run sees them. A field is read from Redis the first time a call asks
-- for it; `hset` and `hdel` are kept here and written by `flush`; `hincrby` adds up here
-- and is sent by `flush` as one HINCRBY per field. So a batch of calls on one key reads and
-- writes its buckets and its account once. Values read are integer strings (checked as they
-- are read), numbers once changed, false when absent.
local hashes = {}

-- While a call of a batch runs, what each of its `hset`, `hdel` and `hincrby` replaced, so a
-- call that fails part-way can be taken out of the run's state (batch.lua's `undo_call`).
local undo = nil

local function hash(name)
  local h = hashes[name]
  if not h then
    h = { name = name, values = {}, written = {}, added = {} }
    hashes[name] = h
  end
  return h
end

-- Every field the scripts keep is an integer. One that is not (written by hand) fails the
-- call that reads it, before that call has written anything, and no other call: `flush`
-- never meets a field HINCRBY would refuse.
local function checked(name, field, v)
  if v and not (#v <= 20 and string.match(v, '^%-?%d+$')) then
    error({ err = 'DAMAGED field ' .. field .. ' of ' .. name .. ' is not an integer' })
  end
  return v
end

-- The fields' values, in order (false: absent), like HMGET.
local function hmget(name, ...)
  local h = hash(name)
  local fields = { ... }
  local unread = {}
  for _, f in ipairs(fields) do
    if h.values[f] == nil then unread[#unread + 1] = f end
  end
  if #unread > 0 then
    local got = redis.call('HMGET', name, unpack(unread))
    for i, f in ipairs(unread) do
      h.values[f] = checked(name, f, got[i])
    end
  end
  local found = {}
  for i, f in ipairs(fields) do found[i] = h.values[f] end
  return found
end

-- One field, as `hmget` reads it (this is the common case, without its tables).
local function hget(name, field)
  local h = hash(name)
  local v = h.values[field]
  if v == nil then
    v = checked(name, field, redis.call('HGET', name, field))
    h.values[field] = v
  end
  return v
end

-- Notes what a change to `field` replaces, while a batch's call runs.
local function remember(h, field)
  if undo then
    undo[#undo + 1] = { h = h, field = field, value = h.values[field],
      written = h.written[field], added = h.added[field] }
  end
end

-- `value`: a string, or a whole number (written without exponent notation).
local function hset(name, field, value)
  local h = hash(name)
  remember(h, field)
  h.values[field] = value
  h.written[field] = true
end

local function hdel(name, field)
  hset(name, field, false)
end

-- Adds `delta` (a decimal string) to an integer field, read (and checked) first. Sums stay in
-- doubles' exact range: one that could leave it goes to Redis at once, which adds 64-bit
-- integers exactly (and which no undo takes back: only a balance near 2^52 gets there).
local function hincrby(name, field, delta)
  local known = hget(name, field)
  local h = hash(name)
  local d = tonumber(delta)
  local sum = (h.added[field] or 0) + d
  if math.abs(d) >= EXACT / 2 or math.abs(sum) >= EXACT / 2 then
    if h.added[field] then redis.call('HINCRBY', name, field, int(h.added[field])) end
    h.added[field] = nil
    h.values[field] = tostring(redis.call('HINCRBY', name, field, delta))
    return
  end
  remember(h, field)
  h.added[field] = sum
  h.values[field] = (tonumber(known) or 0) + d
end

-- Sorted sets (leases) are written at once, but swept of expired members and counted once
-- per run: ZADD and ZREM say what they changed, so the count stays exact.
local zsets = {}

local function zset(name)
  local z = zsets[name]
  if not z then
    z = { name = name }
    zsets[name] = z
  end
  return z
end

-- Removes the members whose lease ran out before now, once per run.
local function zsweep(name)
  local z = zset(name)
  if not z.swept then
    redis.call('ZREMRANGEBYSCORE', name, '-inf', now)
    z.swept = true
  end
end

local function zcard(name)
  local z = zset(name)
  if z.count == nil then z.count = redis.call('ZCARD', name) end
  return z.count
end

local function zadd(name, score, member)
  local z = zset(name)
  local added = redis.call('ZADD', name, score, member)
  if z.count then z.count = z.count + added end
end

local function zrem(name, member)
  local z = zset(name)
  local removed = redis.call('ZREM', name, member)
  if z.count then z.count = z.count - removed end
end

-- Writes what this run kept: every hash's sums, then its set and deleted fields.
local function flush()
  for name, h in pairs(hashes) do
    for field, sum in pairs(h.added) do
      if sum ~= 0 then redis.call('HINCRBY', name, field, int(sum)) end
    end
    local set, deleted = {}, {}
    for field in pairs(h.written) do
      local v = h.values[field]
      if v then
        set[#set + 1] = field
        set[#set + 1] = type(v) == 'number' and int(v) or v
      else
        deleted[#deleted + 1] = field
      end
    end
    if #set > 0 then redis.call('HSET', name, unpack(set)) end
    if #deleted > 0 then redis.call('HDEL', name, unpack(deleted)) end
  end
end

-- Gives back call `id`'s reservation, if it still holds one, and ends its lease. Amounts stay
-- decimal strings: Redis adds them as 64-bit integers, exactly. Both fields are read before
-- the lease goes, so a damaged one leaves the lease in place.
local function release_held(account, leases, id)
  local held = hmget(account, 'held:' .. id, 'reserved')[1]
  if held then
    hincrby(account, 'reserved', '-' .. held)
    hdel(account, 'held:' .. id)
    -- A lease is only ever taken with a hold (admit.lua, extend.lua).
    zrem(leases, id)
  end
end

-- Reservations whose lease ran out (the instance of their call died, or the instance of an
-- escrow stopped renewing it) are given back, once per run. Everything they change is read
-- (and checked) first, the balance too: a damaged field fails the call before any lease goes.
local function sweep_leases(account, leases)
  local lease_set = zset(leases)
  if lease_set.swept then return end
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  local fields = { 'balance', 'reserved' }
  for _, id in ipairs(expired) do fields[#fields + 1] = 'held:' .. id end
  hmget(account, unpack(fields))
  lease_set.swept = true
  for _, id in ipairs(expired) do
    local held = hget(account, 'held:' .. id)
    release_held(account, leases, id)
    -- A lease whose hold is gone already goes too (release_held ends only a held one's).
    if not held then zrem(leases, id) end
  end
end
