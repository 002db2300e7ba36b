-- A slice of one token bucket for one gateway instance (issue 23). What the instance gives
-- back goes in first (never above full; below zero is usage it debited beyond its slice,
-- owed to the bucket), then up to ask_tokens whole tokens come out. Mirrors
-- turnpike_core::slices::{give_back, grant}, on the same hash fields admit.lua judges.
--
-- What each instance holds is recorded (`<b>s:<instance>`, their sum `<b>o`, when a sync
-- last changed them `<b>a`) and counts
-- against the bucket's capacity wherever it is refilled (prelude.lua's `refilled`): a token
-- is in the bucket or in one slice, never both, so the fleet never has more than a burst to
-- hand out. A holding is leased: one its instance stops renewing (a crash) stops counting
-- when its lease runs out. prelude.lua comes first.
--
-- A sync sent twice (its answer lost, the gateway sends it again) is applied once: its marker
-- (KEYS[3], unique per sync) says it was, and the second gets nothing.
--
-- The calling convention, which protocol.rs holds to these lines in a test: the arguments,
-- in order. bucket: 'r' (requests) or 't' (usage tokens); keep_units: what the instance
-- still holds after giving back. KEYS: the limiter hash, the bucket's slice leases, this
-- sync's marker.
-- Reply: granted (units), level (units left in the bucket after the grant), kept (what the
-- instance is recorded keeping: less than keep_units when its holding had expired).
local SYNC_MARKER_MS = 60000

local function slice(KEYS, ARGV)
  local bucket, instance, rate, period, burst, ask_tokens, give_units, keep_units,
    lease_ms = unpack(ARGV, 1, 9)
  local b = bucket_spec(rate, period, burst)
  local limits, leases = KEYS[1], KEYS[2]
  local level_field, updated_field, held_field = bucket .. 'l', bucket .. 'u', bucket .. 'o'
  local mine = bucket .. 's:' .. instance

  -- Holdings whose lease ran out, of either bucket, are read with everything else first.
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  local fields = { level_field, updated_field, held_field, mine, 'ro', 'to' }
  for _, member in ipairs(expired) do
    fields[#fields + 1] = string.sub(member, 1, 1) .. 's' .. string.sub(member, 2)
  end
  hmget(limits, unpack(fields))
  for _, member in ipairs(expired) do
    local field = string.sub(member, 1, 1) .. 's' .. string.sub(member, 2)
    local held = hget(limits, field)
    if held then
      hincrby(limits, string.sub(member, 1, 1) .. 'o', '-' .. held)
      hdel(limits, field)
    end
    zrem(leases, member)
  end

  -- Refilled under the holdings as recorded; then this instance's holding is what it keeps
  -- now (what it used meanwhile is gone, what it gives back is the bucket's again).
  local held_before = tonumber(hget(limits, mine)) or 0
  local held_total = tonumber(hget(limits, held_field)) or 0
  local state = hmget(limits, level_field, updated_field)
  -- Swept just now: what is left is live.
  local level, updated = refilled(tonumber(state[1]), tonumber(state[2]), b, held_total, now)
  -- An instance keeps no more than it is recorded holding: one whose holding expired while
  -- its sync was on the way keeps nothing (the reply says so).
  local keep = math.min(math.max(tonumber(keep_units), 0), math.max(held_before, 0))
  local cap = capacity(b) - math.min(math.max(held_total - held_before + keep, 0), capacity(b))
  local give = tonumber(give_units)
  if give > 0 then
    level = math.max(level, math.min(level + give, cap))
  elseif give < 0 then
    level = math.max(level + give, -EXACT)
  end
  if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', SYNC_MARKER_MS) then
    return { 0, level, 0 }
  end
  local whole = math.max(math.floor(math.min(level, cap) / b.period), 0)
  local granted = math.min(whole, tonumber(ask_tokens)) * b.period
  level = level - granted
  local holding = keep + granted
  hset(limits, level_field, level)
  hset(limits, updated_field, updated)
  hincrby(limits, held_field, int(holding - held_before))
  hset(limits, bucket .. 'a', now)
  if holding > 0 then
    hset(limits, mine, holding)
    zadd(leases, int(now + tonumber(lease_ms)), bucket .. ':' .. instance)
  else
    hdel(limits, mine)
    zrem(leases, bucket .. ':' .. instance)
  end
  return { granted, level, keep }
end
