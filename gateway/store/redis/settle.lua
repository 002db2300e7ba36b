-- Settlement of one call, or the refund of an admission another script refused (cluster
-- mode, where the agent's buckets live in another slot). Mirrors gateway/admission.rs.
-- Idempotent: the first run sets a marker for the call id; a second run changes nothing.
--
-- KEYS: marker; [account hash, reservation leases, usage hash] when ARGV[4] = 1;
--       [usage stream] when ARGV[13] = 1; then per scope its limiter hash and in-flight set.
-- ARGV: call id, marker ttl ms, refund (1|0), account side (1|0), cost, metered (1|0),
--       input, output, total tokens, key id, agent, account, stream (1|0), stream maxlen,
--       request id, session id, status, scope count, then per scope seven numbers:
--       holds a slot (1|0), tokens rate, period, burst, requests rate, period, burst.
-- Reply: 1 applied, 0 already settled.
-- prelude.lua comes first: now, EXACT, int, capacity, refilled, spec, release_held.
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then return 0 end

local call_id = ARGV[1]
local refund = ARGV[3] == '1'
local account_side = ARGV[4] == '1'
local cost = tonumber(ARGV[5])
local metered = ARGV[6] == '1'
local total = tonumber(ARGV[9])
local streamed = ARGV[13] == '1'
local scope_count = tonumber(ARGV[18])

local next_key = 2
local function take_key()
  local k = KEYS[next_key]
  next_key = next_key + 1
  return k
end

if account_side then
  local account, leases, usage = take_key(), take_key(), take_key()
  -- The reservation is given back unless its lease already expired and gave it back.
  release_held(account, leases, call_id)
  if cost > 0 then redis.call('HINCRBY', account, 'balance', '-' .. ARGV[5]) end
  if metered then
    local row = '\31' .. ARGV[10] .. '\31' .. ARGV[11]
    redis.call('HINCRBY', usage, 'requests' .. row, 1)
    redis.call('HINCRBY', usage, 'input_tokens' .. row, ARGV[7])
    redis.call('HINCRBY', usage, 'output_tokens' .. row, ARGV[8])
    redis.call('HINCRBY', usage, 'total_tokens' .. row, ARGV[9])
    redis.call('HINCRBY', usage, 'cost' .. row, ARGV[5])
  end
end

if streamed and metered then
  redis.call('XADD', take_key(), 'MAXLEN', '~', ARGV[14], '*',
    'request_id', ARGV[15], 'time_ms', int(now), 'account', ARGV[12], 'key_id', ARGV[10],
    'agent', ARGV[11], 'session_id', ARGV[16], 'status', ARGV[17],
    'input_tokens', ARGV[7], 'output_tokens', ARGV[8], 'total_tokens', ARGV[9], 'cost', ARGV[5])
end

for i = 1, scope_count do
  local at = 18 + (i - 1) * 7
  local limiter, inflight = take_key(), take_key()
  if ARGV[at + 1] == '1' then redis.call('ZREM', inflight, call_id) end
  local tokens, requests = spec(at + 2), spec(at + 5)
  if tokens and metered and total > 0 then
    local state = redis.call('HMGET', limiter, 'tl', 'tu')
    local level, updated = refilled(tonumber(state[1]), tonumber(state[2]), tokens)
    level = math.max(level - total * tokens.period, -EXACT)
    redis.call('HSET', limiter, 'tl', int(level), 'tu', int(updated))
  end
  if refund and requests then
    -- Gives back the request token the refused admission took.
    local state = redis.call('HMGET', limiter, 'rl', 'ru')
    local level, updated = refilled(tonumber(state[1]), tonumber(state[2]), requests)
    redis.call('HSET', limiter, 'rl', int(math.min(level + requests.period, capacity(requests))),
      'ru', int(updated))
  end
end
return 1
