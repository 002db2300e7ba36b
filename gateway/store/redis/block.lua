-- A block of one concurrency limit's slots for one gateway instance (issue 23). The block is
-- the instance's members of the limit's in-flight lease set (`<instance>#1` to `#n`, one
-- lease for all), so admit.lua's count of the set counts every block with the calls seated
-- one by one, and a block its instance stops renewing (a crash) goes when its lease runs out.
-- Mirrors turnpike_core::slot_blocks::apply_sync. prelude.lua comes first.
--
-- The block goes to `target` slots: fewer at once; more only while at least min_slots are
-- free (the end game gives nothing), and no more than are free. `upper`: the most members
-- the instance may have in the set (a sync whose answer was lost may have grown it); those
-- beyond the new size go. Sending the same sync twice changes nothing more.
--
-- The calling convention, which protocol.rs holds to these lines in a test: the arguments,
-- in order. KEYS: the in-flight lease set.
-- Reply: held (slots now the instance's), free (slots of the cap not taken after).
local function block(KEYS, ARGV)
  local instance, cap, target, upper, lease_ms, min_slots = unpack(ARGV, 1, 6)
  cap, target, upper = tonumber(cap), tonumber(target), tonumber(upper)
  local inflight = KEYS[1]
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
  local names = {}
  for i = 1, math.max(upper, target) do names[i] = instance .. '#' .. i end
  -- A block's members share one lease and go from the top: those left are #1 to #held.
  local held = 0
  if upper > 0 then
    for _, score in ipairs(redis.call('ZMSCORE', inflight, unpack(names, 1, upper))) do
      if score then held = held + 1 end
    end
  end
  local new = target
  if target > held then
    local free = cap - redis.call('ZCARD', inflight)
    local granted = 0
    if free >= tonumber(min_slots) then granted = math.min(target - held, free) end
    new = held + math.max(granted, 0)
  end
  if new > 0 then
    local lease_until = int(now + tonumber(lease_ms))
    local members = {}
    for i = 1, new do
      members[#members + 1] = lease_until
      members[#members + 1] = names[i]
    end
    redis.call('ZADD', inflight, unpack(members))
  end
  if upper > new then redis.call('ZREM', inflight, unpack(names, new + 1, upper)) end
  local free = cap - redis.call('ZCARD', inflight)
  return { new, free }
end
