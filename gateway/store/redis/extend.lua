-- A running stream's extension. Mirrors turnpike_core::admission::extend: the call's hold
-- grows towards hold_to by what the account has free (never beyond), its leases run
-- lease_ms from now, and the key's token bucket is read. Sending it twice changes nothing
-- more (hold_to is a total). prelude.lua comes first.
--
-- KEYS: [account hash, reservation leases, the call's settled marker] when priced = 1, then
-- per scope its limiter hash and in-flight lease set. A call already settled gets nothing. ARGV: the arguments below, then for each of scope_count scopes:
-- holds_slot (1 | 0), read_tokens (1 | 0), tokens_rate, tokens_period, tokens_burst.
-- Reply: held, has_tokens (1 | 0), tokens_left.
local call_id, lease_ms, hold_to, priced, scope_count = unpack(ARGV, 1, 5)
local SCOPE_ARGS = 5
local lease_until = int(now + tonumber(lease_ms))
local held, has_tokens, tokens_left = 0, 0, 0
local next_key = 1

if priced == '1' then
  local account, leases, settled = KEYS[1], KEYS[2], KEYS[3]
  if redis.call('EXISTS', settled) == 1 then return { 0, 0, 0 } end
  next_key = 4
  local field = 'held:' .. call_id
  held = tonumber(redis.call('HGET', account, field)) or 0
  local want = tonumber(hold_to) - held
  if want > 0 then
    local state = redis.call('HMGET', account, 'balance', 'reserved')
    local free = math.max((tonumber(state[1]) or 0) - (tonumber(state[2]) or 0), 0)
    local grow = math.min(want, free)
    if grow > 0 then
      redis.call('HINCRBY', account, 'reserved', int(grow))
      redis.call('HINCRBY', account, field, int(grow))
      held = held + grow
    end
  end
  if held > 0 then redis.call('ZADD', leases, lease_until, call_id) end
end

for i = 1, tonumber(scope_count) do
  local at = 5 + (i - 1) * SCOPE_ARGS
  local holds_slot, read_tokens, tokens_rate, tokens_period, tokens_burst =
    unpack(ARGV, at + 1, at + SCOPE_ARGS)
  local limiter, inflight = KEYS[next_key], KEYS[next_key + 1]
  next_key = next_key + 2
  if holds_slot == '1' then redis.call('ZADD', inflight, 'XX', lease_until, call_id) end
  local tokens = bucket_spec(tokens_rate, tokens_period, tokens_burst)
  if read_tokens == '1' and tokens then
    local state = redis.call('HMGET', limiter, 'tl', 'tu', 'to', 'ta')
    local level = refilled(tonumber(state[1]), tonumber(state[2]), tokens, state[3], state[4])
    has_tokens, tokens_left = 1, math.floor(level / tokens.period)
  end
end
return { int(held), has_tokens, int(tokens_left) }
