-- An operator's change to a balance. KEYS[1]: the account hash; ARGV[1]: 'add' | 'set',
-- ARGV[2]: the amount. Reply: CHANGED, balance, reserved; OVERFLOW when an add would leave
-- the 64-bit range (Redis refuses it, and nothing changes); false for an unknown account
-- (nothing is created). Any other error is Redis's own.
local CHANGED, OVERFLOW = 1, 2
if redis.call('HEXISTS', KEYS[1], 'balance') == 0 then return false end
if ARGV[1] == 'add' then
  local added = redis.pcall('HINCRBY', KEYS[1], 'balance', ARGV[2])
  if type(added) == 'table' and added.err then
    if string.find(added.err, 'overflow', 1, true) then return { OVERFLOW } end
    return added
  end
else
  redis.call('HSET', KEYS[1], 'balance', ARGV[2])
end
local state = redis.call('HMGET', KEYS[1], 'balance', 'reserved')
return { CHANGED, state[1], state[2] }
