//! W3C Trace Context (`traceparent`) for the worker's request. The gateway exports no spans
//! of its own, so a valid `traceparent` from the client is passed on unchanged (the worker's
//! span is then a child of the client's, with no gap in the trace); a missing or malformed
//! one is replaced by a new trace, unsampled, so a worker's logs and traces still join the
//! gateway's access line by trace id.

use rand::Rng;
use std::io::Write;

/// A `traceparent`'s length: `vv-` + 32 + `-` + 16 + `-ff`.
const LEN: usize = 55;

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase, as sent on the wire,
/// held inline (no allocation per call). The default is none yet (empty), before a
/// request's head is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    header: [u8; LEN],
    /// False for the default: no header yet.
    set: bool,
    /// The client's trace, continued: its `tracestate` goes with it.
    from_client: bool,
}

impl Default for TraceParent {
    fn default() -> Self {
        TraceParent {
            header: [0; LEN],
            set: false,
            from_client: false,
        }
    }
}

impl TraceParent {
    /// The client's header if it is a valid `traceparent` (W3C Trace Context §3.2): version
    /// `00` exactly as specified, or a later version whose first four fields parse (its
    /// extra fields are dropped, as the spec asks); ids not all zeros; lowercase hex.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut fields = header.split('-');
        let version = fields.next()?;
        let trace_id = fields.next()?;
        let parent_id = fields.next()?;
        let flags = fields.next()?;
        let valid = is_hex(version, 2)
            && version != "ff"
            && is_hex(trace_id, 32)
            && is_hex(parent_id, 16)
            && is_hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && parent_id.bytes().any(|b| b != b'0');
        if !valid || (version == "00" && fields.next().is_some()) {
            return None;
        }
        Some(TraceParent::written(true, |out| {
            write!(out, "{version}-{trace_id}-{parent_id}-{flags}")
        }))
    }

    /// A new trace: random ids, not sampled (the gateway records nothing of it).
    pub fn new_trace() -> TraceParent {
        let mut rng = rand::thread_rng();
        let trace_id: u128 = rng.gen_range(1..=u128::MAX);
        let parent_id: u64 = rng.gen_range(1..=u64::MAX);
        TraceParent::written(false, |out| {
            write!(out, "00-{trace_id:032x}-{parent_id:016x}-00")
        })
    }

    /// One whose 55 bytes `write` fills (its fields were checked or made to the length).
    fn written(
        from_client: bool,
        write: impl FnOnce(&mut &mut [u8]) -> std::io::Result<()>,
    ) -> Self {
        let mut header = [0; LEN];
        let mut out = &mut header[..];
        let filled = write(&mut out).is_ok() && out.is_empty();
        debug_assert!(filled, "a traceparent is 55 bytes");
        TraceParent {
            header,
            set: filled,
            from_client,
        }
    }

    /// The client's valid `traceparent`, or a new trace.
    pub fn for_call(header: Option<&str>) -> TraceParent {
        header
            .and_then(TraceParent::parse)
            .unwrap_or_else(TraceParent::new_trace)
    }

    pub fn as_str(&self) -> &str {
        if self.set {
            // Only ASCII hex and dashes are ever written.
            std::str::from_utf8(&self.header).unwrap_or_default()
        } else {
            ""
        }
    }

    /// Whether this continues the client's trace (so its `tracestate` is kept).
    pub fn is_from_client(&self) -> bool {
        self.from_client
    }

    /// The 32 hex digits that name the trace, for the access log (empty for none yet).
    pub fn trace_id(&self) -> &str {
        self.as_str().get(3..35).unwrap_or_default()
    }
}

fn is_hex(field: &str, len: usize) -> bool {
    field.len() == len
        && field
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_as_sent() {
        let parent = TraceParent::parse(VALID).unwrap();
        assert_eq!(parent.as_str(), VALID);
        assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn a_later_version_keeps_its_first_four_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        let parsed = TraceParent::parse(later).unwrap();
        assert_eq!(
            parsed.as_str(),
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(parsed.is_from_client());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_new_trace_is_valid_unsampled_and_new_each_time() {
        let first = TraceParent::new_trace();
        let reparsed = TraceParent::parse(first.as_str()).unwrap();
        assert_eq!(reparsed.as_str(), first.as_str());
        assert!(reparsed.is_from_client() && !first.is_from_client());
        assert!(first.as_str().ends_with("-00"));
        assert_ne!(first, TraceParent::new_trace());
        assert_eq!(TraceParent::for_call(Some("garbage")).as_str().len(), 55);
        assert_eq!(TraceParent::for_call(Some(VALID)).as_str(), VALID);
        assert_eq!(TraceParent::default().as_str(), "");
        assert_eq!(TraceParent::default().trace_id(), "");
    }
}
