-- One metered call's usage log entry, on a Redis Cluster, where the stream lives in a slot of
-- its own (so it goes in a `batch` run of that slot). Idempotent like settle.lua: the first
-- run for a call id sets a marker in the stream's slot and appends; a retried run appends
-- nothing.
--
-- The calling convention, which protocol.rs holds to these lines in a test: the arguments,
-- in order, then the entry's field and value pairs. KEYS: marker, usage stream.
-- Reply: APPLIED, or ALREADY when the marker was there.
local ALREADY, APPLIED = 0, 1

local function log_usage(KEYS, ARGV)
  local call_id, marker_ttl_ms, stream_maxlen = unpack(ARGV, 1, 3)
  local FIELDS_AT = 4
  if not redis.call('SET', KEYS[1], call_id, 'NX', 'PX', marker_ttl_ms) then return ALREADY end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', stream_maxlen, '*', unpack(ARGV, FIELDS_AT, #ARGV))
  return APPLIED
end
