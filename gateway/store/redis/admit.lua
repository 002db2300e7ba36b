-- Admission (mode 'admit') or a read-only look at the quota (mode 'peek'). Mirrors
-- turnpike_core::admission: every bucket of every scope is judged on the state refilled to
-- now, then everything is taken or nothing is. Time is this server's TIME, so gateway
-- instances with skewed clocks agree. prelude.lua comes first.
--
-- The calling convention; protocol.rs holds its own copy to these tables in a test.
local ARGS = { 'mode', 'call_id', 'lease_ms', 'reserve', 'scope_count' }
local SCOPE_ARGS = { 'enforce', 'requests_rate', 'requests_period', 'requests_burst',
  'tokens_rate', 'tokens_period', 'tokens_burst', 'concurrency' }
local REPLY = { 'outcome', 'slots', 'scope', 'bucket', 'retry_ms', 'has_quota', 'limit',
  'remaining', 'reset', 'shadow_count' }
local OUTCOME = { rate_limited = 0, admitted = 1, broke = 2, peeked = 3 }
local BUCKET = { requests = 1, tokens = 2, concurrency = 3 }
-- ARGV: ARGS, then SCOPE_ARGS for each of scope_count scopes. reserve -1: unpriced; enforce
--   1 | 0 (shadow); a rate of 0: no such bucket; concurrency 0: no limit.
-- KEYS: [account hash, reservation leases] when priced, then per scope its limiter hash and
--   its in-flight lease set.
-- Reply: REPLY's fields in order (absent ones 0), then shadow_count pairs (scope, bucket).
--   slots: bitmask of the scopes holding a slot (admitted); scope (1-based), bucket and
--   retry_ms: the refusal (rate_limited).
local CONCURRENCY_RETRY_MS = 1000

local arg = named(ARGS, 0)
local mode, call_id = arg.mode, arg.call_id
local lease_until = now + tonumber(arg.lease_ms)
local reserve = tonumber(arg.reserve)
local scope_count = tonumber(arg.scope_count)
local priced = reserve >= 0
local first_scope_key = priced and 3 or 1

local function millis_to_refill(deficit, rate)
  if deficit <= 0 then return 0 end
  return math.ceil(deficit / math.max(rate, 1))
end

-- A bucket refilled to now, and the wait for one whole token (nil: one is there).
local function judged(level, updated, b)
  local now_level, now_updated = refilled(tonumber(level), tonumber(updated), b)
  if now_level >= b.period then return now_level, now_updated, nil end
  return now_level, now_updated, millis_to_refill(b.period - now_level, b.rate)
end

local function quota(level, b)
  return b.burst, math.floor(math.max(level, 0) / b.period),
    math.ceil(millis_to_refill(capacity(b) - level, b.rate) / 1000)
end

local scopes = {}
local refusal = nil
local shadow = {}
for i = 1, scope_count do
  local a = named(SCOPE_ARGS, #ARGS + (i - 1) * #SCOPE_ARGS)
  local s = {
    limiter = KEYS[first_scope_key + (i - 1) * 2],
    inflight = KEYS[first_scope_key + (i - 1) * 2 + 1],
    enforce = a.enforce == '1',
    requests = bucket_spec(a, 'requests'),
    tokens = bucket_spec(a, 'tokens'),
    concurrency = tonumber(a.concurrency),
  }
  scopes[i] = s
  local state = redis.call('HMGET', s.limiter, 'rl', 'ru', 'tl', 'tu')
  local denials = {}
  local wait
  if s.requests then
    s.rl, s.ru, wait = judged(state[1], state[2], s.requests)
    if wait then denials[#denials + 1] = { BUCKET.requests, wait } end
  end
  if s.tokens then
    s.tl, s.tu, wait = judged(state[3], state[4], s.tokens)
    if wait then denials[#denials + 1] = { BUCKET.tokens, wait } end
  end
  if s.concurrency > 0 and mode == 'admit' then
    -- Slots are leases: one a crashed instance never gave back expires by itself.
    redis.call('ZREMRANGEBYSCORE', s.inflight, '-inf', now)
    if redis.call('ZCARD', s.inflight) >= s.concurrency then
      denials[#denials + 1] = { BUCKET.concurrency, CONCURRENCY_RETRY_MS }
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

-- The enforced request bucket with the fewest tokens left, for the RateLimit-* headers.
local function tightest(fields)
  for _, s in ipairs(scopes) do
    if s.enforce and s.requests then
      local limit, remaining, reset = quota(s.rl, s.requests)
      if fields.has_quota ~= 1 or remaining < fields.remaining then
        fields.has_quota, fields.limit, fields.remaining, fields.reset = 1, limit, remaining, reset
      end
    end
  end
end

local function reply(fields)
  tightest(fields)
  fields.shadow_count = #shadow
  local out = {}
  for i, name in ipairs(REPLY) do out[i] = fields[name] or 0 end
  for _, hit in ipairs(shadow) do
    out[#out + 1] = hit[1]
    out[#out + 1] = hit[2]
  end
  return out
end

if mode == 'peek' then return reply({ outcome = OUTCOME.peeked }) end

-- The same call admitted before (a client library resending after a lost answer) takes
-- nothing twice: its reservation or its slots are the sign.
local held_before = priced and redis.call('HEXISTS', KEYS[1], 'held:' .. call_id) == 1
local slots_before, seen_before = 0, held_before
for i, s in ipairs(scopes) do
  if s.concurrency > 0 and redis.call('ZSCORE', s.inflight, call_id) then
    slots_before = slots_before + 2 ^ (i - 1)
    seen_before = true
  end
end
if seen_before then return reply({ outcome = OUTCOME.admitted, slots = slots_before }) end

if refusal then
  return reply({ outcome = OUTCOME.rate_limited, scope = refusal.scope,
    bucket = refusal.bucket, retry_ms = math.min(refusal.retry_ms, EXACT) })
end

if priced then
  local account, leases = KEYS[1], KEYS[2]
  -- Reservations of calls whose lease ran out (their instance died) are given back first.
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 64)
  for _, id in ipairs(expired) do
    release_held(account, leases, id)
  end
  local balance = redis.call('HMGET', account, 'balance', 'reserved')
  local free = (tonumber(balance[1]) or 0) - (tonumber(balance[2]) or 0)
  if free < reserve then return reply({ outcome = OUTCOME.broke }) end
  if reserve > 0 then
    redis.call('HINCRBY', account, 'reserved', arg.reserve)
    redis.call('HSET', account, 'held:' .. call_id, arg.reserve)
    redis.call('ZADD', leases, lease_until, call_id)
  end
end

local slots = 0
for i, s in ipairs(scopes) do
  if s.requests and (s.enforce or s.rl >= s.requests.period) then
    s.rl = s.rl - s.requests.period
  end
  if s.requests and s.tokens then
    redis.call('HSET', s.limiter, 'rl', int(s.rl), 'ru', int(s.ru), 'tl', int(s.tl), 'tu', int(s.tu))
  elseif s.requests then
    redis.call('HSET', s.limiter, 'rl', int(s.rl), 'ru', int(s.ru))
  elseif s.tokens then
    redis.call('HSET', s.limiter, 'tl', int(s.tl), 'tu', int(s.tu))
  end
  if s.concurrency > 0 then
    redis.call('ZADD', s.inflight, lease_until, call_id)
    slots = slots + 2 ^ (i - 1)
  end
end
return reply({ outcome = OUTCOME.admitted, slots = slots })
