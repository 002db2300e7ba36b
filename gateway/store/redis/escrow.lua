-- An account's escrow for one gateway instance (issue 23): units of the balance counted as
-- reserved (`held:<id>`, leased in the account's lease set under `<id>` like a call's
-- reservation), from which the instance reserves its calls' costs alone. A call's cost is
-- charged to the balance by its own settlement; a sync first releases from the escrow what
-- those calls spent (and, given back, what none of its calls holds), then grants up to `ask`
-- more. Mirrors turnpike_core::escrow::{apply_flush, EscrowSizing::grant, apply_grant}.
-- An escrow its instance stops renewing (a crash) is given back when its lease runs out, by
-- whichever script sweeps the lease set next. prelude.lua comes first.
--
-- A sync sent twice (its answer lost, the gateway sends it again) is applied once: its marker
-- (KEYS[3], unique per sync) says it was, and the second changes nothing.
--
-- The calling convention, which protocol.rs holds to these lines in a test: the arguments,
-- in order. KEYS: the account hash, its lease set, this sync's marker.
-- Reply: granted (units), held (the escrow after), free (balance - reserved after).
local ESCROW_MARKER_MS = 60000

local function escrow(KEYS, ARGV)
  local id, ask, released, reserve, lease_ms, free_divisor, min_reserves = unpack(ARGV, 1, 7)
  local account, leases = KEYS[1], KEYS[2]
  local field = 'held:' .. id
  hmget(account, 'balance', 'reserved', field)
  sweep_leases(account, leases)
  local held = tonumber(hget(account, field)) or 0
  local granted = 0
  if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ESCROW_MARKER_MS) then
    local back = math.min(math.max(tonumber(released), 0), held)
    held = held - back
    if back > 0 then hincrby(account, 'reserved', '-' .. int(back)) end
    local state = hmget(account, 'balance', 'reserved')
    if state[1] and tonumber(ask) > 0 then
      local free = tonumber(state[1]) - (tonumber(state[2]) or 0)
      local largest = math.floor(math.max(free, 0) / tonumber(free_divisor))
      local least = tonumber(min_reserves) * math.max(tonumber(reserve), 1)
      if largest >= least then
        granted = math.min(math.max(tonumber(ask), least), largest)
        hincrby(account, 'reserved', int(granted))
      end
    end
    held = held + granted
    if held > 0 then
      hset(account, field, held)
      zadd(leases, int(now + tonumber(lease_ms)), id)
    else
      hdel(account, field)
      zrem(leases, id)
    end
  end
  local state = hmget(account, 'balance', 'reserved')
  local free = (tonumber(state[1]) or 0) - (tonumber(state[2]) or 0)
  return { granted, held, free }
end
