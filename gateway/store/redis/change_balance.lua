-- An operator's change to a balance. KEYS[1]: the account hash; ARGV[1]: 'add' | 'set',
-- ARGV[2]: the amount. An unknown account: nil (nothing is created).
if redis.call('HEXISTS', KEYS[1], 'balance') == 0 then return false end
if ARGV[1] == 'add' then
  redis.call('HINCRBY', KEYS[1], 'balance', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'balance', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'balance', 'reserved')
