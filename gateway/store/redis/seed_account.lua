-- Seeds one account's starting balance, unless it has a live one. KEYS[1]: the account hash;
-- ARGV[1]: the starting balance. What calls were charged while the account had no balance
-- (Redis restarted empty, and held settlements were written before this seed) waits in
-- `debit_before_seed`, and comes off now: the balance is the start less every charge.
-- Reply: 1 when seeded, 0 when the account kept its balance.
if redis.call('HEXISTS', KEYS[1], 'balance') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'balance', ARGV[1])
local debit = redis.call('HGET', KEYS[1], 'debit_before_seed')
if debit then
  redis.call('HINCRBY', KEYS[1], 'balance', '-' .. debit)
  redis.call('HDEL', KEYS[1], 'debit_before_seed')
end
return 1
