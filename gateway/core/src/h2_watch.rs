//! Which HTTP/2 requests named a `:path` with a fragment, read from the client's raw bytes.
//!
//! Over HTTP/2 the `h2` crate parses `:path` into an `http::Uri`, which drops a `#fragment`
//! without a word: `/v1/agents/ag_x/chat#junk` would reach the router as the chat path and
//! match, where the same target over HTTP/1.1 is refused (the route is matched on the raw
//! request line, [`crate::route::target_path`]). The gateway sees each HTTP/2 connection's
//! bytes before the `h2` crate does, so [`H2PathWatch`] follows them alongside it: it skips the
//! client preface, frames the stream, reassembles each header block (HEADERS, then
//! CONTINUATION until END_HEADERS; padding and priority fields stripped), decodes it with the
//! connection's one HPACK context in arrival order (as the `h2` crate does, so both dynamic
//! tables stay equal), and notes every request whose `:path` holds a `#`.
//!
//! It only observes: bytes pass through unchanged whatever it finds. It buffers little: frames
//! other than header blocks are skipped as they stream past, and a header block that arrives
//! whole in one read is decoded in place. Where it can no longer follow the connection (a
//! header block over [`MAX_HEADER_BLOCK`], a decoding error, framing the `h2` crate refuses
//! too) it says so once and for all, and the caller closes the connection or stops relying on
//! it.
//!
//! - [`hpack`]: the HPACK decoder (RFC 7541).
//! - [`huffman`]: HPACK's Huffman code.

mod frame;
pub mod hpack;
pub mod huffman;
mod table;

use std::fmt;
use std::mem;

use frame::{FrameHeader, CONTINUATION, FRAME_HEADER_LEN, HEADERS, PUSH_PROMISE};
use hpack::{HpackDecoder, HpackError, DEFAULT_HEADER_TABLE_SIZE};

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub const CLIENT_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The largest header block followed, padding of its frames included. The `h2` crate's own
/// limit is far larger (16 MiB); no request the gateway serves comes near this one.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// The reassembly buffer is kept between blocks up to this capacity, and freed above it.
const BLOCK_CAPACITY_KEPT: usize = 16 * 1024;

/// A request whose `:path` held a fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentPath {
    /// The stream the request opened.
    pub stream_id: u32,
    /// The `:path` up to its first `#`: the path and query the request reaches the gateway
    /// with. Bytes that are not UTF-8 are replaced (the `http` crate refuses such a path).
    pub path_before_fragment: String,
}

/// Why a watch can no longer follow its connection. Every case but the size limit is one the
/// `h2` crate answers by closing the connection too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchLost {
    /// The connection did not open with [`CLIENT_PREFACE`].
    NoPreface,
    /// A header block (padding included) over [`MAX_HEADER_BLOCK`].
    HeaderBlockTooLarge,
    /// A header block could not be decoded.
    Hpack(HpackError),
    /// A HEADERS frame too short for its own padding and priority fields.
    ShortHeadersFrame,
    /// A frame other than CONTINUATION on the same stream in the middle of a header block.
    ContinuationExpected,
    /// A CONTINUATION frame outside a header block.
    UnexpectedContinuation,
    /// A PUSH_PROMISE, which only a server may send (RFC 9113 §8.4).
    PushPromiseFromClient,
}

impl fmt::Display for WatchLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPreface => f.write_str("no HTTP/2 client preface"),
            Self::HeaderBlockTooLarge => write!(f, "header block over {MAX_HEADER_BLOCK} bytes"),
            Self::Hpack(problem) => write!(f, "HPACK: {problem}"),
            Self::ShortHeadersFrame => f.write_str("HEADERS frame shorter than its padding"),
            Self::ContinuationExpected => f.write_str("header block interrupted"),
            Self::UnexpectedContinuation => f.write_str("CONTINUATION outside a header block"),
            Self::PushPromiseFromClient => f.write_str("PUSH_PROMISE from a client"),
        }
    }
}

impl std::error::Error for WatchLost {}

/// Follows the client-to-server bytes of one HTTP/2 connection and notes the requests whose
/// `:path` holds a fragment. Feed it every byte the client sends, in order, however split.
#[derive(Debug)]
pub struct H2PathWatch {
    stage: Stage,
    /// A frame header that arrived split across reads.
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// The header block being reassembled, when it did not arrive whole in one read.
    block: Vec<u8>,
    /// The header block in progress, from its HEADERS frame until END_HEADERS.
    open_block: Option<OpenBlock>,
    decoder: HpackDecoder,
    /// The highest stream a request has opened; a later HEADERS on a stream at or below it is
    /// trailers (or refused by the `h2` crate), and opens nothing.
    last_opened: u32,
    findings: Vec<FragmentPath>,
    lost: Option<WatchLost>,
}

/// Where the watch is in the byte stream.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// This many bytes of the client preface have been seen.
    Preface(usize),
    /// Between frames, or inside a frame header (`header_len` bytes of it seen).
    FrameHeader,
    /// Inside the payload of a frame that is not part of a header block.
    Skip { remaining: usize },
    /// Inside a HEADERS or CONTINUATION payload that is being appended to `block`.
    Fragment {
        remaining: usize,
        /// Where this frame's payload starts in `block`.
        start: usize,
        frame: FrameHeader,
    },
}

#[derive(Debug, Clone, Copy)]
struct OpenBlock {
    stream_id: u32,
    /// Whether its HEADERS frame opened a request (its `:path` is the request's).
    opens_request: bool,
}

impl Default for H2PathWatch {
    fn default() -> Self {
        Self::new(DEFAULT_HEADER_TABLE_SIZE)
    }
}

impl H2PathWatch {
    /// A watch for a new connection whose server advertises `header_table_size` as its
    /// `SETTINGS_HEADER_TABLE_SIZE` (the `h2` crate's default is
    /// [`DEFAULT_HEADER_TABLE_SIZE`]). What the watch holds is bounded by that size (the
    /// dynamic table) and [`MAX_HEADER_BLOCK`] (one block being reassembled).
    pub fn new(header_table_size: usize) -> Self {
        Self {
            stage: Stage::Preface(0),
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            block: Vec::new(),
            open_block: None,
            decoder: HpackDecoder::new(header_table_size),
            last_opened: 0,
            findings: Vec::new(),
            lost: None,
        }
    }

    /// Follows the next bytes the client sent. Once it fails it fails for good, with the same
    /// reason, and ignores what follows; findings made before stay to be taken.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), WatchLost> {
        if let Some(lost) = self.lost {
            return Err(lost);
        }
        self.follow(bytes).inspect_err(|&lost| {
            self.lost = Some(lost);
            self.block = Vec::new();
            self.open_block = None;
        })
    }

    /// Whether any request with a fragment is waiting to be taken.
    pub fn has_findings(&self) -> bool {
        !self.findings.is_empty()
    }

    /// The requests with a fragment found since the last call, in the order they came.
    pub fn take_fragment_paths(&mut self) -> Vec<FragmentPath> {
        mem::take(&mut self.findings)
    }

    /// Why the watch stopped following the connection, if it has.
    pub fn lost(&self) -> Option<WatchLost> {
        self.lost
    }

    fn follow(&mut self, mut input: &[u8]) -> Result<(), WatchLost> {
        while !input.is_empty() {
            match self.stage {
                Stage::Preface(seen) => {
                    let expected = &CLIENT_PREFACE[seen..];
                    let taken = expected.len().min(input.len());
                    if input[..taken] != expected[..taken] {
                        return Err(WatchLost::NoPreface);
                    }
                    input = &input[taken..];
                    self.stage = match seen + taken {
                        all if all == CLIENT_PREFACE.len() => Stage::FrameHeader,
                        some => Stage::Preface(some),
                    };
                }
                Stage::FrameHeader => {
                    let mut header = [0; FRAME_HEADER_LEN];
                    if self.header_len == 0 && input.len() >= FRAME_HEADER_LEN {
                        header.copy_from_slice(&input[..FRAME_HEADER_LEN]);
                        input = &input[FRAME_HEADER_LEN..];
                    } else {
                        let taken = (FRAME_HEADER_LEN - self.header_len).min(input.len());
                        let end = self.header_len + taken;
                        self.header[self.header_len..end].copy_from_slice(&input[..taken]);
                        input = &input[taken..];
                        if end < FRAME_HEADER_LEN {
                            self.header_len = end;
                            continue;
                        }
                        self.header_len = 0;
                        header = self.header;
                    }
                    input = self.frame_begins(FrameHeader::parse(header), input)?;
                }
                Stage::Skip { remaining } => {
                    let taken = remaining.min(input.len());
                    input = &input[taken..];
                    self.stage = match remaining - taken {
                        0 => Stage::FrameHeader,
                        remaining => Stage::Skip { remaining },
                    };
                }
                Stage::Fragment {
                    remaining,
                    start,
                    frame,
                } => {
                    let taken = remaining.min(input.len());
                    self.block.extend_from_slice(&input[..taken]);
                    input = &input[taken..];
                    match remaining - taken {
                        0 => self.fragment_ends(start, frame)?,
                        remaining => {
                            self.stage = Stage::Fragment {
                                remaining,
                                start,
                                frame,
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Judges a frame from its header, and returns what is left of `input` (all of it, unless
    /// a whole header block was there and has been decoded in place).
    fn frame_begins<'a>(
        &mut self,
        frame: FrameHeader,
        input: &'a [u8],
    ) -> Result<&'a [u8], WatchLost> {
        match (frame.kind, self.open_block) {
            (PUSH_PROMISE, _) => return Err(WatchLost::PushPromiseFromClient),
            (HEADERS, None) => {
                // Client streams are odd and rise (RFC 9113 §5.1.1); a HEADERS on one already
                // opened is trailers.
                let opens_request = frame.stream_id % 2 == 1 && frame.stream_id > self.last_opened;
                if opens_request {
                    self.last_opened = frame.stream_id;
                }
                self.open_block = Some(OpenBlock {
                    stream_id: frame.stream_id,
                    opens_request,
                });
            }
            (CONTINUATION, Some(open)) if open.stream_id == frame.stream_id => {}
            (CONTINUATION, None) => return Err(WatchLost::UnexpectedContinuation),
            (_, Some(_)) => return Err(WatchLost::ContinuationExpected),
            (_, None) => {
                self.stage = match frame.length {
                    0 => Stage::FrameHeader,
                    remaining => Stage::Skip { remaining },
                };
                return Ok(input);
            }
        }
        if self.block.len() + frame.length > MAX_HEADER_BLOCK {
            return Err(WatchLost::HeaderBlockTooLarge);
        }
        if self.block.is_empty() && frame.ends_block() && input.len() >= frame.length {
            // The usual case: a whole block in one frame in one read, decoded where it lies.
            let (payload, rest) = input.split_at(frame.length);
            let fragment = frame.fragment(payload)?;
            self.stage = Stage::FrameHeader;
            self.decode_block(&payload[fragment])?;
            return Ok(rest);
        }
        let start = self.block.len();
        if frame.length == 0 {
            // Nothing more will arrive for this frame, so it ends here.
            self.fragment_ends(start, frame)?;
        } else {
            self.stage = Stage::Fragment {
                remaining: frame.length,
                start,
                frame,
            };
        }
        Ok(input)
    }

    /// A HEADERS or CONTINUATION payload is all in `block` from `start`: keeps only its
    /// fragment, and decodes the block if this frame ends it.
    fn fragment_ends(&mut self, start: usize, frame: FrameHeader) -> Result<(), WatchLost> {
        let fragment = frame.fragment(&self.block[start..])?;
        self.block.truncate(start + fragment.end);
        self.block.drain(start..start + fragment.start);
        self.stage = Stage::FrameHeader;
        if !frame.ends_block() {
            return Ok(());
        }
        let block = mem::take(&mut self.block);
        let decoded = self.decode_block(&block);
        if block.capacity() <= BLOCK_CAPACITY_KEPT {
            self.block = block;
            self.block.clear();
        }
        decoded
    }

    /// Decodes a whole header block, and notes its request if its `:path` has a fragment.
    fn decode_block(&mut self, block: &[u8]) -> Result<(), WatchLost> {
        let open = self
            .open_block
            .take()
            .ok_or(WatchLost::UnexpectedContinuation)?;
        let (mut path_seen, mut finding) = (false, None);
        self.decoder
            .decode(block, |name, value| {
                // The first `:path` is the one the `h2` crate takes (a second one makes the
                // request malformed and refused).
                if open.opens_request && !path_seen && name == b":path" {
                    path_seen = true;
                    if let Some(hash) = value.iter().position(|&byte| byte == b'#') {
                        finding = Some(String::from_utf8_lossy(&value[..hash]).into_owned());
                    }
                }
            })
            .map_err(WatchLost::Hpack)?;
        if let Some(path_before_fragment) = finding {
            self.findings.push(FragmentPath {
                stream_id: open.stream_id,
                path_before_fragment,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
