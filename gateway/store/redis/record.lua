-- Settlements without markers of their own, and the mark of the run that carries them.
-- Comes after settle.lua and before batch.lua (protocol.rs's BATCH_LUA).
--
-- A run that carries settlements without markers of their own (`record`) starts with its
-- mark: a set holding '*', and the id of each record that failed in the run. A record's
-- retry (its run's answer lost) finds there whether the run applied it; a run sent again
-- finds its mark, and records again only what failed.
-- KEYS: the mark.
local run_mark, run_resent = nil, false
local function mark(KEYS, ARGV)
  local ttl_ms = unpack(ARGV, 1, 1)
  run_mark = KEYS[1]
  run_resent = redis.call('SADD', run_mark, '*') == 0
  redis.call('PEXPIRE', run_mark, ttl_ms)
  return 1
end

-- A settlement that only records (issue 23): a call that holds nothing in Redis (its slots in
-- a block or none, its reservation from an escrow or none, its token buckets sliced or none)
-- is charged to the balance, logged in the usage stream, and counted in its usage row, whose
-- counters the run adds up and writes once (`write_tallies`). Like `record`, it sets no marker
-- of its own: its run's mark says whether it was applied. Mirrors settle.lua's account side,
-- which a held copy of it runs. prelude.lua comes first.
--
-- The calling convention, which protocol.rs holds to these lines in a test: the arguments,
-- in order. KEYS: the account hash, its usage hash, the usage stream.
-- Reply: APPLIED (settle.lua's), or ALREADY when the run was sent twice and applied it.

-- Usage rows' counters added up over the run: usage hash -> row -> sums.
local tallies = {}

local function tally_one(KEYS, ARGV)
  local call_id, cost, metered, input_tokens, output_tokens, total_tokens, key_id, agent,
    account, request_id, session_id, status, stream_maxlen = unpack(ARGV, 1, 13)
  local account_hash, usage, stream = KEYS[1], KEYS[2], KEYS[3]
  local rows = tallies[usage]
  if not rows then
    rows = {}
    tallies[usage] = rows
  end
  local row = '\31' .. key_id .. '\31' .. agent
  local sums = rows[row]
  -- Everything it changes is read (and checked) first, once per run.
  if not sums then
    hmget(usage, 'requests' .. row, 'input_tokens' .. row, 'output_tokens' .. row,
      'total_tokens' .. row, 'cost' .. row)
  end
  local charge = tonumber(cost)
  local has_balance = hget(account_hash, 'balance')
  if not has_balance then hget(account_hash, 'debit_before_seed') end

  if metered == '1' then
    redis.call('XADD', stream, 'MAXLEN', '~', stream_maxlen, '*',
      'call_id', call_id, 'request_id', request_id, 'time_ms', int(now), 'account', account,
      'key_id', key_id, 'agent', agent, 'session_id', session_id,
      'status', status, 'input_tokens', input_tokens,
      'output_tokens', output_tokens, 'total_tokens', total_tokens, 'cost', cost)
  end
  if charge > 0 then
    -- No balance (Redis restarted empty, not seeded yet): the seed takes it off.
    hincrby(account_hash, has_balance and 'balance' or 'debit_before_seed',
      has_balance and ('-' .. cost) or cost)
  end
  if metered == '1' then
    if not sums then
      sums = { 0, 0, 0, 0, 0 }
      rows[row] = sums
    end
    sums[1] = sums[1] + 1
    sums[2] = sums[2] + tonumber(input_tokens)
    sums[3] = sums[3] + tonumber(output_tokens)
    sums[4] = sums[4] + tonumber(total_tokens)
    sums[5] = sums[5] + charge
  end
  return APPLIED
end

-- A settlement without a marker of its own (its first argument is its call id): applied
-- unless its run was sent again and applied it; one that fails is noted in the run's mark,
-- so that its retry, and a resent run, apply it still.
local function unmarked(apply)
  return function(KEYS, ARGV)
    local call_id = unpack(ARGV, 1, 1)
    if run_resent and redis.call('SISMEMBER', run_mark, call_id) == 0 then return ALREADY end
    local ok, reply = pcall(apply, KEYS, ARGV)
    if not ok then
      redis.call('SADD', run_mark, call_id)
      error(reply, 0)
    end
    if run_resent then redis.call('SREM', run_mark, call_id) end
    return reply
  end
end

-- settle.lua's settlement, its own marker neither read nor set.
local record = unmarked(function(KEYS, ARGV) return settle(KEYS, ARGV, true) end)
local tally = unmarked(tally_one)

-- The run's usage counters, one HINCRBY per field (by `flush`).
local function write_tallies()
  for usage, rows in pairs(tallies) do
    for row, sums in pairs(rows) do
      hincrby(usage, 'requests' .. row, int(sums[1]))
      hincrby(usage, 'input_tokens' .. row, int(sums[2]))
      hincrby(usage, 'output_tokens' .. row, int(sums[3]))
      hincrby(usage, 'total_tokens' .. row, int(sums[4]))
      hincrby(usage, 'cost' .. row, int(sums[5]))
    end
  end
end
