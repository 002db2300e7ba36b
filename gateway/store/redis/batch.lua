-- A group commit: the admissions and settlements waiting on one connection, in the order
-- they came, as one script run. Each call runs as it would alone (admit.lua, settle.lua,
-- log_usage.lua, prelude.lua before them), on state read once and written once; one call's
-- error fails only that call. Atomic like any script, so the run is the calls one after another.
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

local KINDS = { admit = admit, settle = settle, log_usage = log_usage, forget = forget }

local replies = {}
local at, first_key = 1, 1
while at <= #ARGV do
  local run = KINDS[ARGV[at]]
  local key_count, arg_count = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local keys = { unpack(KEYS, first_key, first_key + key_count - 1) }
  local args = { unpack(ARGV, at + 3, at + 2 + arg_count) }
  local ok, reply = pcall(run, keys, args)
  if not ok then
    reply = type(reply) == 'table' and reply.err or tostring(reply)
  end
  replies[#replies + 1] = reply
  at = at + 3 + arg_count
  first_key = first_key + key_count
end
flush()
return replies
