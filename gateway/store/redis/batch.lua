-- A group commit: the admissions and settlements waiting on one connection, in the order
-- they came, as one script run. Each call runs as it would alone (admit.lua, settle.lua,
-- log_usage.lua, prelude.lua before them), on state read once and written once; one call's
-- error fails only that call, and leaves nothing of it behind. Atomic like any script, so the
-- run is the calls one after another. It starts with a shebang (protocol.rs), so Redis judges
-- `maxmemory` once, before the run: a run is refused whole (nothing applied) or runs whole.
--
-- ARGV: per call its kind, its key count and its argument count, then its arguments; KEYS:
-- each call's keys, in the same order. Reply: per call its own reply, or the text of its error.
-- A settled call's marker, given a short life once the gateway knows the outcome: long
-- enough for a duplicate still on its way to find it. KEYS: the marker.
local function forget(KEYS, ARGV)
  local grace_ms = unpack(ARGV, 1, 1)
  redis.call('PEXPIRE', KEYS[1], grace_ms)
  return 1
end

local KINDS = {
  admit = admit, settle = settle, record = record, tally = tally, mark = mark,
  log_usage = log_usage, forget = forget,
}

-- Takes a failed call's changes out of the run's state: only the calls that succeeded are
-- written. A call writes to Redis at once (leases, markers, the usage log) only after it has
-- read and checked everything it changes, so a failure leaves nothing of it there either.
local function undo_call(log)
  for i = #log, 1, -1 do
    local change = log[i]
    change.h.values[change.field] = change.value
    change.h.written[change.field] = change.written
    change.h.added[change.field] = change.added
  end
end

local replies = {}
local at, first_key = 1, 1
while at <= #ARGV do
  local run = KINDS[ARGV[at]]
  local key_count, arg_count = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local keys = { unpack(KEYS, first_key, first_key + key_count - 1) }
  local args = { unpack(ARGV, at + 3, at + 2 + arg_count) }
  undo = {}
  local ok, reply = pcall(run, keys, args)
  if not ok then
    undo_call(undo)
    reply = type(reply) == 'table' and reply.err or tostring(reply)
  end
  undo = nil
  replies[#replies + 1] = reply
  at = at + 3 + arg_count
  first_key = first_key + key_count
end
write_tallies()
flush()
return replies
