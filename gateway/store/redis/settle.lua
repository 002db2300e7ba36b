-- Settlement of one call, or the refund of an admission another script refused (cluster
-- mode, where the agent's buckets live in another slot). Mirrors turnpike_core::admission.
-- Idempotent: the first run sets a marker for the call id (once it has read everything it
-- changes); a second run changes nothing.
-- The gateway shortens the marker's life (batch.lua's `forget`) once it knows the outcome.
-- prelude.lua comes first.
--
-- The calling convention, which protocol.rs holds to these lines in a test: the arguments,
-- in order, then the same seven for each of scope_count scopes. Flags are 1 | 0; the
-- requests bucket is sent only to refund a request token. KEYS: marker; [account hash,
-- reservation leases, usage hash] when account_side; [usage stream] when stream; then per
-- scope its limiter hash and in-flight set.
-- Reply: APPLIED, or ALREADY when the marker was there.
local ALREADY, APPLIED = 0, 1

-- One settlement, on this run's state. `unmarked` (batch.lua's `record`): the call's marker
-- is neither read nor set; the run's mark makes it apply once.
-- A held settlement whose first try went unmarked in a run whose answer was lost also checks
-- that run's mark (batch.lua's `mark`): a key after all those it writes.
local function settle(KEYS, ARGV, unmarked)
  local call_id, marker_ttl_ms, refund, account_side, cost, metered, input_tokens,
    output_tokens, total_tokens, key_id, agent, account, stream, stream_maxlen, request_id,
    session_id, status, scope_count = unpack(ARGV, 1, 18)
  local SCOPE_ARGS = 7
  if not unmarked and redis.call('EXISTS', KEYS[1]) == 1 then return ALREADY end

  local charge = tonumber(cost)
  local total = tonumber(total_tokens)

  local next_key = 2
  local function take_key()
    local k = KEYS[next_key]
    next_key = next_key + 1
    return k
  end
  local account_hash, leases, usage, row
  if account_side == '1' then
    account_hash, leases, usage = take_key(), take_key(), take_key()
    row = '\31' .. key_id .. '\31' .. agent
  end
  local stream_key = (stream == '1') and take_key() or nil
  local scopes = {}
  for i = 1, tonumber(scope_count) do
    local at = 18 + (i - 1) * SCOPE_ARGS
    local holds_slot, tokens_rate, tokens_period, tokens_burst,
      requests_rate, requests_period, requests_burst = unpack(ARGV, at + 1, at + SCOPE_ARGS)
    scopes[i] = {
      limiter = take_key(),
      inflight = take_key(),
      holds_slot = holds_slot == '1',
      tokens = bucket_spec(tokens_rate, tokens_period, tokens_burst),
      requests = bucket_spec(requests_rate, requests_period, requests_burst),
    }
  end

  local run_mark = KEYS[next_key]
  if run_mark and redis.call('SISMEMBER', run_mark, '*') == 1
    and redis.call('SISMEMBER', run_mark, call_id) == 0 then
    return ALREADY
  end

  -- Everything the settlement changes is read (and checked) before anything is written: a
  -- damaged field fails this call whole, marker and all, and no other.
  if account_hash then
    hmget(account_hash, 'held:' .. call_id, 'reserved', 'balance', 'debit_before_seed')
    if metered == '1' then
      hmget(usage, 'requests' .. row, 'input_tokens' .. row, 'output_tokens' .. row,
        'total_tokens' .. row, 'cost' .. row)
    end
  end
  for _, s in ipairs(scopes) do
    s.debits_tokens = s.tokens and metered == '1' and total > 0
    s.refunds_request = refund == '1' and s.requests
    if s.debits_tokens then hmget(s.limiter, 'tl', 'tu', 'to', 'ta') end
    if s.refunds_request then hmget(s.limiter, 'rl', 'ru', 'ro', 'ra') end
  end
  if not unmarked then redis.call('SET', KEYS[1], '1', 'PX', marker_ttl_ms) end

  if account_hash then
    -- The reservation is given back unless its lease already expired and gave it back.
    release_held(account_hash, leases, call_id)
    if charge > 0 then
      if hget(account_hash, 'balance') then
        hincrby(account_hash, 'balance', '-' .. cost)
      else
        -- No balance to charge (Redis restarted empty and is not seeded yet): the charge
        -- waits for the seed, which takes it off the starting balance (seed_account.lua).
        hincrby(account_hash, 'debit_before_seed', cost)
      end
    end
    if metered == '1' then
      hincrby(usage, 'requests' .. row, '1')
      hincrby(usage, 'input_tokens' .. row, input_tokens)
      hincrby(usage, 'output_tokens' .. row, output_tokens)
      hincrby(usage, 'total_tokens' .. row, total_tokens)
      hincrby(usage, 'cost' .. row, cost)
    end
  end

  if stream_key and metered == '1' then
    redis.call('XADD', stream_key, 'MAXLEN', '~', stream_maxlen, '*',
      'call_id', call_id, 'request_id', request_id, 'time_ms', int(now), 'account', account,
      'key_id', key_id, 'agent', agent, 'session_id', session_id,
      'status', status, 'input_tokens', input_tokens,
      'output_tokens', output_tokens, 'total_tokens', total_tokens, 'cost', cost)
  end

  for _, s in ipairs(scopes) do
    if s.holds_slot then zrem(s.inflight, call_id) end
    if s.debits_tokens then
      local state = hmget(s.limiter, 'tl', 'tu', 'to', 'ta')
      local level, updated =
        refilled(tonumber(state[1]), tonumber(state[2]), s.tokens, state[3], state[4])
      hset(s.limiter, 'tl', math.max(level - total * s.tokens.period, -EXACT))
      hset(s.limiter, 'tu', updated)
    end
    if s.refunds_request then
      -- Gives back the request token the refused admission took.
      local state = hmget(s.limiter, 'rl', 'ru', 'ro', 'ra')
      local level, updated =
        refilled(tonumber(state[1]), tonumber(state[2]), s.requests, state[3], state[4])
      local cap = capacity(s.requests) - held_now(s.requests, state[3], state[4])
      hset(s.limiter, 'rl', math.max(level, math.min(level + s.requests.period, cap)))
      hset(s.limiter, 'ru', updated)
    end
  end
  return APPLIED
end
