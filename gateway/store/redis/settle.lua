-- Settlement of one call, or the refund of an admission another script refused (cluster
-- mode, where the agent's buckets live in another slot). Mirrors turnpike_core::admission.
-- Idempotent: the first run sets a marker for the call id; a second run changes nothing.
-- prelude.lua comes first.
--
-- The calling convention; protocol.rs holds its own copy to these tables in a test.
local ARGS = { 'call_id', 'marker_ttl_ms', 'refund', 'account_side', 'cost', 'metered',
  'input_tokens', 'output_tokens', 'total_tokens', 'key_id', 'agent', 'account', 'stream',
  'stream_maxlen', 'request_id', 'session_id', 'status', 'scope_count' }
local SCOPE_ARGS = { 'holds_slot', 'tokens_rate', 'tokens_period', 'tokens_burst',
  'requests_rate', 'requests_period', 'requests_burst' }
local SETTLED = { already = 0, applied = 1 }
-- ARGV: ARGS, then SCOPE_ARGS for each of scope_count scopes; flags are 1 | 0; the requests
--   bucket is sent only to refund a request token.
-- KEYS: marker; [account hash, reservation leases, usage hash] when account_side;
--   [usage stream] when stream; then per scope its limiter hash and in-flight set.
-- Reply: SETTLED.applied, or SETTLED.already when the marker was there.
local arg = named(ARGS, 0)
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', arg.marker_ttl_ms) then
  return SETTLED.already
end

local call_id = arg.call_id
local cost = tonumber(arg.cost)
local metered = arg.metered == '1'
local total = tonumber(arg.total_tokens)

local next_key = 2
local function take_key()
  local k = KEYS[next_key]
  next_key = next_key + 1
  return k
end

if arg.account_side == '1' then
  local account, leases, usage = take_key(), take_key(), take_key()
  -- The reservation is given back unless its lease already expired and gave it back.
  release_held(account, leases, call_id)
  if cost > 0 then redis.call('HINCRBY', account, 'balance', '-' .. arg.cost) end
  if metered then
    local row = '\31' .. arg.key_id .. '\31' .. arg.agent
    redis.call('HINCRBY', usage, 'requests' .. row, 1)
    redis.call('HINCRBY', usage, 'input_tokens' .. row, arg.input_tokens)
    redis.call('HINCRBY', usage, 'output_tokens' .. row, arg.output_tokens)
    redis.call('HINCRBY', usage, 'total_tokens' .. row, arg.total_tokens)
    redis.call('HINCRBY', usage, 'cost' .. row, arg.cost)
  end
end

if arg.stream == '1' and metered then
  redis.call('XADD', take_key(), 'MAXLEN', '~', arg.stream_maxlen, '*',
    'request_id', arg.request_id, 'time_ms', int(now), 'account', arg.account,
    'key_id', arg.key_id, 'agent', arg.agent, 'session_id', arg.session_id,
    'status', arg.status, 'input_tokens', arg.input_tokens,
    'output_tokens', arg.output_tokens, 'total_tokens', arg.total_tokens, 'cost', arg.cost)
end

for i = 1, tonumber(arg.scope_count) do
  local a = named(SCOPE_ARGS, #ARGS + (i - 1) * #SCOPE_ARGS)
  local limiter, inflight = take_key(), take_key()
  if a.holds_slot == '1' then redis.call('ZREM', inflight, call_id) end
  local tokens, requests = bucket_spec(a, 'tokens'), bucket_spec(a, 'requests')
  if tokens and metered and total > 0 then
    local state = redis.call('HMGET', limiter, 'tl', 'tu')
    local level, updated = refilled(tonumber(state[1]), tonumber(state[2]), tokens)
    level = math.max(level - total * tokens.period, -EXACT)
    redis.call('HSET', limiter, 'tl', int(level), 'tu', int(updated))
  end
  if arg.refund == '1' and requests then
    -- Gives back the request token the refused admission took.
    local state = redis.call('HMGET', limiter, 'rl', 'ru')
    local level, updated = refilled(tonumber(state[1]), tonumber(state[2]), requests)
    redis.call('HSET', limiter, 'rl', int(math.min(level + requests.period, capacity(requests))),
      'ru', int(updated))
  end
end
return SETTLED.applied
