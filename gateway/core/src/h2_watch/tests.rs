//! The watch fed a realistic client connection at every split point, and fed the framing
//! and decoding errors that make it give up.

use super::frame::*;
use super::*;

const SETTINGS: u8 = 0x4;
const DATA: u8 = 0x0;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    let mut bytes = vec![length[1], length[2], length[3], kind, flags];
    bytes.extend_from_slice(&stream_id.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// An HPACK integer (RFC 7541 §5.1) in the low `prefix_bits` of a first byte that carries
/// `pattern` above them.
fn integer(out: &mut Vec<u8>, pattern: u8, prefix_bits: u32, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(pattern | value as u8);
        return;
    }
    out.push(pattern | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push(0x80 | (rest % 128) as u8);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A Huffman-coded string literal.
fn huffman_string(out: &mut Vec<u8>, text: &str) {
    let (mut coded, mut bits, mut held) = (Vec::new(), 0u64, 0u32);
    for byte in text.bytes() {
        let (code, length) = huffman::code(byte);
        bits = bits << length | u64::from(code);
        held += length;
        while held >= 8 {
            held -= 8;
            coded.push((bits >> held) as u8);
        }
    }
    if held > 0 {
        coded.push((bits << (8 - held)) as u8 | (0xff >> held));
    }
    integer(out, 0x80, 7, coded.len());
    out.extend_from_slice(&coded);
}

fn raw_string(out: &mut Vec<u8>, text: &str) {
    integer(out, 0x00, 7, text.len());
    out.extend_from_slice(text.as_bytes());
}

/// A literal field with incremental indexing whose name is static entry `name_index`.
fn indexed_literal(out: &mut Vec<u8>, name_index: usize, value: &str) {
    integer(out, 0x40, 6, name_index);
    huffman_string(out, value);
}

/// A POST to `path`, its fields Huffman-coded and added to the dynamic table.
fn request_block(path: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x87]; // :method POST, :scheme https
    indexed_literal(&mut block, 1, "gw.example"); // :authority
    indexed_literal(&mut block, 4, path); // :path
    indexed_literal(&mut block, 31, "application/json"); // content-type
    block
}

/// A HEADERS frame with padding and priority fields around `fragment`.
fn padded_headers(flags: u8, stream_id: u32, fragment: &[u8], padding: u8) -> Vec<u8> {
    let mut payload = vec![padding, 0x80, 0, 0, 0, 15];
    payload.extend_from_slice(fragment);
    payload.extend(std::iter::repeat_n(0, usize::from(padding)));
    frame(HEADERS, flags | PADDED | PRIORITY, stream_id, &payload)
}

/// What a client sends on one connection: the preface, SETTINGS and WINDOW_UPDATE, then
/// requests with and without fragments, bodies and pings between them, trailers.
fn connection() -> (Vec<u8>, Vec<FragmentPath>) {
    let mut bytes = CLIENT_PREFACE.to_vec();
    bytes.extend(frame(
        SETTINGS,
        0,
        0,
        &[0, 2, 0, 0, 0, 0, 0, 4, 0, 0x10, 0, 0],
    ));
    bytes.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0x0f, 0, 1]));

    // Stream 1: a fragment, the block split between HEADERS (padded, with priority) and
    // CONTINUATION in the middle of the Huffman-coded `:path`.
    let block = request_block("/v1/agents/ag_x/chat#junk");
    let (first, second) = block.split_at(12);
    bytes.extend(padded_headers(0, 1, first, 3));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 1, second));
    bytes.extend(frame(DATA, END_STREAM, 1, b"{\"messages\":[]}"));

    // Stream 3: the same request from the dynamic table alone (newest first: content-type
    // 62, :path 63, :authority 64).
    bytes.extend(frame(
        HEADERS,
        END_HEADERS | PADDED,
        3,
        &[2, 0x83, 0x87, 0xc0, 0xbf, 0xbe, 0, 0],
    ));
    bytes.extend(frame(PING, 0, 0, &[7; 8]));
    bytes.extend(frame(DATA, 0, 3, &[b'x'; 40]));

    // Stream 5: no fragment; its trailers add a `:path` with one to the table, which is
    // decoded (to keep the table) and not reported (trailers open no request).
    let mut clean = vec![0x83, 0x87, 0xc0];
    integer(&mut clean, 0x00, 4, 4);
    huffman_string(&mut clean, "/v1/agents/ag_y/chat?x=1");
    bytes.extend(frame(HEADERS, END_HEADERS, 5, &clean));
    bytes.extend(frame(DATA, 0, 3, &[b'y'; 10]));
    let mut trailers = Vec::new();
    integer(&mut trailers, 0x40, 6, 4);
    raw_string(&mut trailers, "/trail#er");
    bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &trailers));
    bytes.extend(frame(DATA, END_STREAM, 3, b""));

    // Stream 7: the trailers' `:path` (now 62; :authority is 65), by index, in a block split
    // over three frames, one of them empty.
    let block = [0x83, 0x87, 0xc1, 0xbe];
    bytes.extend(frame(HEADERS, 0, 7, &block[..1]));
    bytes.extend(frame(CONTINUATION, 0, 7, b""));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 7, &block[1..]));
    bytes.extend(frame(DATA, END_STREAM, 7, b"{}"));

    let expected = [
        (1, "/v1/agents/ag_x/chat"),
        (3, "/v1/agents/ag_x/chat"),
        (7, "/trail"),
    ]
    .map(|(stream_id, path)| FragmentPath {
        stream_id,
        path_before_fragment: path.to_string(),
    });
    (bytes, expected.to_vec())
}

fn watch_in_pieces(pieces: &[&[u8]]) -> Vec<FragmentPath> {
    let mut watch = H2PathWatch::default();
    let mut found = Vec::new();
    for piece in pieces {
        watch.feed(piece).unwrap();
        found.extend(watch.take_fragment_paths());
    }
    assert!(!watch.has_findings());
    found
}

#[test]
fn a_connection_whole_finds_each_fragment_once() {
    let (bytes, expected) = connection();
    assert_eq!(watch_in_pieces(&[&bytes]), expected);
}

#[test]
fn a_connection_split_anywhere_finds_the_same() {
    let (bytes, expected) = connection();
    for first in 0..=bytes.len() {
        let (head, tail) = bytes.split_at(first);
        assert_eq!(watch_in_pieces(&[head, tail]), expected, "split at {first}");
        for second in first..=tail.len() {
            let (middle, end) = bytes[first..].split_at(second - first);
            assert_eq!(watch_in_pieces(&[head, middle, end]), expected);
        }
    }
    let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(watch_in_pieces(&bytewise), expected);
}

#[test]
fn findings_are_reported_as_soon_as_their_block_ends() {
    let mut bytes = CLIENT_PREFACE.to_vec();
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &request_block("/a#b")));
    let mut watch = H2PathWatch::default();
    watch.feed(&bytes[..bytes.len() - 1]).unwrap();
    assert!(!watch.has_findings());
    watch.feed(&bytes[bytes.len() - 1..]).unwrap();
    assert!(watch.has_findings());
    assert_eq!(watch.take_fragment_paths()[0].path_before_fragment, "/a");
    assert!(!watch.has_findings());
}

#[test]
fn whole_blocks_and_other_frames_are_not_buffered() {
    let mut bytes = CLIENT_PREFACE.to_vec();
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &request_block("/a#b")));
    let mut watch = H2PathWatch::default();
    watch.feed(&bytes).unwrap();
    // A megabyte of body, in reads of 16 KiB, streams past.
    let data = frame(DATA, 0, 1, &vec![0; 1 << 20]);
    for read in data.chunks(16 * 1024) {
        watch.feed(read).unwrap();
    }
    watch
        .feed(&frame(HEADERS, END_HEADERS, 3, &request_block("/c#d")))
        .unwrap();
    assert_eq!(watch.block.capacity(), 0);
    assert_eq!(watch.take_fragment_paths().len(), 2);
}

#[test]
fn only_a_request_opening_headers_frame_is_reported() {
    let mut bytes = CLIENT_PREFACE.to_vec();
    // Stream 0 and even streams open no request (the h2 crate refuses them).
    bytes.extend(frame(HEADERS, END_HEADERS, 0, &request_block("/zero#x")));
    bytes.extend(frame(HEADERS, END_HEADERS, 2, &request_block("/even#x")));
    bytes.extend(frame(HEADERS, END_HEADERS, 5, &request_block("/five")));
    // A stream below the highest opened is not a new request.
    bytes.extend(frame(HEADERS, END_HEADERS, 3, &request_block("/three#x")));
    bytes.extend(frame(HEADERS, END_HEADERS, 5, &request_block("/again#x")));
    // Only the first `:path` counts.
    let mut two_paths = request_block("/first");
    indexed_literal(&mut two_paths, 4, "/second#x");
    bytes.extend(frame(HEADERS, END_HEADERS, 7, &two_paths));
    assert_eq!(watch_in_pieces(&[&bytes]), vec![]);
}

#[test]
fn a_larger_settings_table_size_is_honoured() {
    let mut bytes = CLIENT_PREFACE.to_vec();
    // A dynamic table size update to 8192 (31 + 97 + 63 * 128), then a request.
    let mut block = vec![0x3f, 0xe1, 0x3f];
    block.extend(request_block("/a#b"));
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &block));
    let mut watch = H2PathWatch::new(8192);
    assert_eq!(watch.feed(&bytes), Ok(()));
    assert!(watch.has_findings());
    let mut watch = H2PathWatch::default();
    assert_eq!(
        watch.feed(&bytes),
        Err(WatchLost::Hpack(HpackError::TableSizeOverLimit {
            requested: 8192,
            limit: 4096
        }))
    );
}

/// Feeds the preface and then `frames` (whole, then a byte at a time), expecting the watch
/// to give up for `reason`.
fn lost_for(frames: &[u8], reason: WatchLost) {
    let mut bytes = CLIENT_PREFACE.to_vec();
    bytes.extend_from_slice(frames);
    let mut watch = H2PathWatch::default();
    assert_eq!(watch.feed(&bytes), Err(reason));
    // For good, whatever follows.
    assert_eq!(watch.feed(CLIENT_PREFACE), Err(reason));
    assert_eq!(watch.lost(), Some(reason));
    let mut watch = H2PathWatch::default();
    let first_error = bytes.chunks(1).find_map(|byte| watch.feed(byte).err());
    assert_eq!(first_error, Some(reason));
}

#[test]
fn a_connection_without_the_preface_is_lost() {
    let mut watch = H2PathWatch::default();
    assert_eq!(watch.feed(b"PRI * HTTP/2.0\r\n"), Ok(()));
    assert_eq!(watch.feed(b"\r\nSM\r\n\n"), Err(WatchLost::NoPreface));
    let mut watch = H2PathWatch::default();
    assert_eq!(
        watch.feed(b"POST /v1/agents/ag_x/chat HTTP/1.1\r\n"),
        Err(WatchLost::NoPreface)
    );
}

#[test]
fn a_header_block_over_the_limit_is_lost() {
    // One frame announcing more than the limit is refused before its payload arrives.
    let header = &frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_HEADER_BLOCK + 1])[..9];
    lost_for(header, WatchLost::HeaderBlockTooLarge);
    // So is a block that grows past it frame by frame.
    let chunk = vec![0; MAX_HEADER_BLOCK / 2];
    let mut frames = frame(HEADERS, 0, 1, &chunk);
    frames.extend(frame(CONTINUATION, 0, 1, &chunk));
    frames.extend(frame(CONTINUATION, END_HEADERS, 1, &[0]));
    lost_for(&frames, WatchLost::HeaderBlockTooLarge);
}

#[test]
fn a_block_that_does_not_decode_is_lost() {
    lost_for(
        &frame(HEADERS, END_HEADERS, 1, &[0x82, 0x80]),
        WatchLost::Hpack(HpackError::BadIndex(0)),
    );
    let mut frames = frame(HEADERS, 0, 1, &[0x82, 0x44]);
    frames.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x05, b'/']));
    lost_for(&frames, WatchLost::Hpack(HpackError::Truncated));
}

#[test]
fn framing_the_h2_crate_refuses_is_lost() {
    // Padding longer than the frame, or no room for the pad length or priority fields.
    lost_for(
        &frame(HEADERS, END_HEADERS | PADDED, 1, &[4, 0x82, 0, 0]),
        WatchLost::ShortHeadersFrame,
    );
    lost_for(
        &frame(HEADERS, END_HEADERS | PADDED, 1, &[]),
        WatchLost::ShortHeadersFrame,
    );
    lost_for(
        &frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0, 0]),
        WatchLost::ShortHeadersFrame,
    );
    let mut interrupted = frame(HEADERS, 0, 1, &[0x82]);
    interrupted.extend(frame(DATA, 0, 1, b"x"));
    lost_for(&interrupted, WatchLost::ContinuationExpected);
    let mut other_stream = frame(HEADERS, 0, 1, &[0x82]);
    other_stream.extend(frame(CONTINUATION, END_HEADERS, 3, &[0x84]));
    lost_for(&other_stream, WatchLost::ContinuationExpected);
    lost_for(
        &frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
        WatchLost::UnexpectedContinuation,
    );
    lost_for(
        &frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82]),
        WatchLost::PushPromiseFromClient,
    );
}

#[test]
fn findings_before_the_loss_can_still_be_taken() {
    let mut bytes = CLIENT_PREFACE.to_vec();
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &request_block("/a#b")));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
    let mut watch = H2PathWatch::default();
    assert_eq!(watch.feed(&bytes), Err(WatchLost::UnexpectedContinuation));
    assert_eq!(watch.take_fragment_paths().len(), 1);
}

#[test]
fn the_padded_flag_on_a_continuation_means_nothing() {
    // PADDED and PRIORITY are HEADERS flags; a CONTINUATION's payload is all fragment.
    let mut bytes = CLIENT_PREFACE.to_vec();
    let block = request_block("/a#b");
    bytes.extend(frame(HEADERS, 0, 1, &block[..3]));
    bytes.extend(frame(
        CONTINUATION,
        END_HEADERS | PADDED | PRIORITY,
        1,
        &block[3..],
    ));
    assert_eq!(watch_in_pieces(&[&bytes]).len(), 1);
}
