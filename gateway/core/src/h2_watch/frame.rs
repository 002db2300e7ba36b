//! HTTP/2 frame headers and the header block fragment a HEADERS or CONTINUATION frame
//! carries (RFC 9113 §4.1, §6.2, §6.10): what the watch needs of the framing, nothing more.

use std::ops::Range;

use super::WatchLost;

pub(super) const FRAME_HEADER_LEN: usize = 9;

// The frame types the watch tells apart; it skips all others.
pub(super) const HEADERS: u8 = 0x1;
pub(super) const PUSH_PROMISE: u8 = 0x5;
pub(super) const CONTINUATION: u8 = 0x9;

// The flags of HEADERS (all three) and CONTINUATION (END_HEADERS only).
pub(super) const END_HEADERS: u8 = 0x4;
pub(super) const PADDED: u8 = 0x8;
pub(super) const PRIORITY: u8 = 0x20;
/// A HEADERS frame's stream dependency and weight, when PRIORITY is set.
pub(super) const PRIORITY_FIELDS_LEN: usize = 5;

/// A frame's 9-byte header.
#[derive(Debug, Clone, Copy)]
pub(super) struct FrameHeader {
    pub(super) length: usize,
    pub(super) kind: u8,
    pub(super) flags: u8,
    pub(super) stream_id: u32,
}

impl FrameHeader {
    pub(super) fn parse(bytes: [u8; FRAME_HEADER_LEN]) -> Self {
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = bytes;
        Self {
            length: usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2),
            kind,
            flags,
            // The top bit is reserved and ignored (RFC 9113 §4.1).
            stream_id: u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff,
        }
    }

    pub(super) fn ends_block(&self) -> bool {
        self.flags & END_HEADERS != 0
    }

    /// The header block fragment within this frame's `payload`: all of a CONTINUATION's,
    /// a HEADERS frame's less its pad length, priority fields and padding (RFC 9113 §6.2).
    pub(super) fn fragment(&self, payload: &[u8]) -> Result<Range<usize>, WatchLost> {
        if self.kind == CONTINUATION {
            return Ok(0..payload.len());
        }
        let (mut start, mut padding) = (0, 0);
        if self.flags & PADDED != 0 {
            padding = usize::from(*payload.first().ok_or(WatchLost::ShortHeadersFrame)?);
            start = 1;
        }
        if self.flags & PRIORITY != 0 {
            start += PRIORITY_FIELDS_LEN;
        }
        match payload.len().checked_sub(padding) {
            Some(end) if end >= start => Ok(start..end),
            _ => Err(WatchLost::ShortHeadersFrame),
        }
    }
}
