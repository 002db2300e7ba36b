-- Admission. Mirrors
-- turnpike_core::admission: every bucket of every scope is judged on the state refilled to
-- now, then everything is taken or nothing is. Time is this server's TIME, so gateway
-- instances with skewed clocks agree. prelude.lua comes first.

local RATE_LIMITED, ADMITTED, BROKE = 0, 1, 2
local REQUESTS, TOKENS, CONCURRENCY = 1, 2, 3
local CONCURRENCY_RETRY_MS = 1000

local function millis_to_refill(deficit, rate)
  if deficit <= 0 then return 0 end
  return math.ceil(deficit / math.max(rate, 1))
end

-- A bucket refilled to now, and the wait for one whole token (nil: one is there).
local function judged(level, updated, b, held, held_at)
  local now_level, now_updated = refilled(tonumber(level), tonumber(updated), b, held, held_at)
  if now_level >= b.period then return now_level, now_updated, nil end
  return now_level, now_updated, millis_to_refill(b.period - now_level, b.rate)
end

local function quota(level, b)
  return b.burst, math.floor(math.max(level, 0) / b.period),
    math.ceil(millis_to_refill(capacity(b) - level, b.rate) / 1000)
end

-- One admission, on this run's state. The calling convention, which protocol.rs
-- holds to these lines in a test: the arguments, in order, then the same eight for each of
-- scope_count scopes.
local function admit(KEYS, ARGV)
  local call_id, lease_ms, reserve, scope_count = unpack(ARGV, 1, 4)
  local SCOPE_ARGS = 8
  -- reserve -1: unpriced; enforce 1 | 0 (shadow); a rate of 0: no such bucket; concurrency 0:
  -- no limit. KEYS: [account hash, reservation leases] when priced, then per scope its
  -- limiter hash and its in-flight lease set.
  -- Reply: the fields `reply` lists, in order, then shadow_count pairs (scope, bucket). slots:
  -- bitmask of the scopes holding a slot (admitted); scope (1-based), bucket and retry_ms: the
  -- refusal (rate limited).
  local lease_until = int(now + tonumber(lease_ms))
  local reserve_amount = reserve
  reserve = tonumber(reserve)
  scope_count = tonumber(scope_count)
  local priced = reserve >= 0
  local first_scope_key = priced and 3 or 1

  local scopes = {}
  local refusal = nil
  local shadow = {}
  for i = 1, scope_count do
    local at = 4 + (i - 1) * SCOPE_ARGS
    local enforce, requests_rate, requests_period, requests_burst,
      tokens_rate, tokens_period, tokens_burst, concurrency = unpack(ARGV, at + 1, at + SCOPE_ARGS)
    local s = {
      limiter = KEYS[first_scope_key + (i - 1) * 2],
      inflight = KEYS[first_scope_key + (i - 1) * 2 + 1],
      enforce = enforce == '1',
      requests = bucket_spec(requests_rate, requests_period, requests_burst),
      tokens = bucket_spec(tokens_rate, tokens_period, tokens_burst),
      concurrency = tonumber(concurrency),
    }
    scopes[i] = s
    local state = hmget(s.limiter, 'rl', 'ru', 'tl', 'tu', 'ro', 'ra', 'to', 'ta')
    local denials = {}
    local wait
    if s.requests then
      s.rl, s.ru, wait = judged(state[1], state[2], s.requests, state[5], state[6])
      if wait then denials[#denials + 1] = { REQUESTS, wait } end
    end
    if s.tokens then
      s.tl, s.tu, wait = judged(state[3], state[4], s.tokens, state[7], state[8])
      if wait then denials[#denials + 1] = { TOKENS, wait } end
    end
    if s.concurrency > 0 then
      -- Slots are leases: one a crashed instance never gave back expires by itself.
      zsweep(s.inflight)
      if zcard(s.inflight) >= s.concurrency then
        denials[#denials + 1] = { CONCURRENCY, CONCURRENCY_RETRY_MS }
      end
    end
    for _, d in ipairs(denials) do
      if not s.enforce then
        shadow[#shadow + 1] = { i, d[1] }
      elseif refusal == nil or d[2] > refusal.retry_ms then
        refusal = { scope = i, bucket = d[1], retry_ms = d[2] }
      end
    end
  end

  -- The enforced request bucket with the fewest tokens left, for the RateLimit-* headers:
  -- has_quota (1 | 0), limit, remaining, reset.
  local function tightest()
    local best = nil
    for _, s in ipairs(scopes) do
      if s.enforce and s.requests then
        local limit, remaining, reset = quota(s.rl, s.requests)
        if best == nil or remaining < best[3] then best = { 1, limit, remaining, reset } end
      end
    end
    if best == nil then return 0, 0, 0, 0 end
    return best[1], best[2], best[3], best[4]
  end

  local function reply(outcome, slots, scope, bucket, retry_ms)
    local has_quota, limit, remaining, reset = tightest()
    local shadow_count = #shadow
    local out = { outcome, slots, scope, bucket, retry_ms, has_quota, limit, remaining, reset, shadow_count }
    for _, hit in ipairs(shadow) do
      out[#out + 1] = hit[1]
      out[#out + 1] = hit[2]
    end
    return out
  end

  -- The same call admitted before (a client library resending after a lost answer) takes
  -- nothing twice: its reservation or its slots are the sign.
  local held_before = priced and hget(KEYS[1], 'held:' .. call_id) ~= false
  local slots_before, seen_before = 0, held_before
  for i, s in ipairs(scopes) do
    if s.concurrency > 0 and redis.call('ZSCORE', s.inflight, call_id) then
      slots_before = slots_before + 2 ^ (i - 1)
      seen_before = true
    end
  end
  if seen_before then return reply(ADMITTED, slots_before, 0, 0, 0) end

  if refusal then
    return reply(RATE_LIMITED, 0, refusal.scope, refusal.bucket, math.min(refusal.retry_ms, EXACT))
  end

  if priced then
    local account, leases = KEYS[1], KEYS[2]
    sweep_leases(account, leases)
    local balance = hmget(account, 'balance', 'reserved')
    local free = (tonumber(balance[1]) or 0) - (tonumber(balance[2]) or 0)
    if free < reserve then return reply(BROKE, 0, 0, 0, 0) end
    if reserve > 0 then
      hincrby(account, 'reserved', reserve_amount)
      hset(account, 'held:' .. call_id, reserve_amount)
      zadd(leases, lease_until, call_id)
    end
  end

  local slots = 0
  for i, s in ipairs(scopes) do
    if s.requests and (s.enforce or s.rl >= s.requests.period) then
      s.rl = s.rl - s.requests.period
    end
    if s.requests then
      hset(s.limiter, 'rl', s.rl)
      hset(s.limiter, 'ru', s.ru)
    end
    if s.tokens then
      hset(s.limiter, 'tl', s.tl)
      hset(s.limiter, 'tu', s.tu)
    end
    if s.concurrency > 0 then
      zadd(s.inflight, lease_until, call_id)
      slots = slots + 2 ^ (i - 1)
    end
  end
  return reply(ADMITTED, slots, 0, 0, 0)
end
