//! The HPACK decoder and the HTTP/2 `:path` watch: arbitrary bytes never panic either, header
//! lists written by the encoder here (every representation, raw and Huffman strings, table
//! size updates) decode back to themselves with equal dynamic tables, and a generated client
//! connection fed in arbitrary pieces yields exactly the requests whose `:path` has a `#`.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use turnpike_core::h2_watch::hpack::{HpackDecoder, DEFAULT_HEADER_TABLE_SIZE};
use turnpike_core::h2_watch::{huffman, FragmentPath, H2PathWatch, CLIENT_PREFACE};

use crate::hpack_encoder::{huffman_code, Choice, Encoder, Representation, STATIC_SAMPLE};

type Field = (Vec<u8>, Vec<u8>, Choice);

fn name() -> impl Strategy<Value = Vec<u8>> {
    let static_names: Vec<&str> = STATIC_SAMPLE.iter().map(|(_, name, _)| *name).collect();
    prop_oneof![
        3 => select(static_names).prop_map(|name| name.as_bytes().to_vec()),
        2 => select(vec!["x-a", "x-b", "x-request-id"]).prop_map(|name| name.as_bytes().to_vec()),
        2 => "[a-z0-9-]{1,12}".prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..20),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => select(vec!["", "GET", "/", "https", "gzip, deflate", "v1"])
            .prop_map(|value| value.as_bytes().to_vec()),
        3 => "[ -~]{0,30}".prop_map(String::into_bytes),
        2 => vec(any::<u8>(), 0..40),
        // Long enough for multi-byte lengths and for evictions.
        1 => vec(any::<u8>(), 100..300),
    ]
}

fn choice() -> impl Strategy<Value = Choice> {
    let representations = vec![
        Representation::Indexed,
        Representation::Incremental,
        Representation::WithoutIndexing,
        Representation::NeverIndexed,
    ];
    (
        select(representations),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(representation, name_by_index, huffman_name, huffman_value)| Choice {
                representation,
                name_by_index,
                huffman_name,
                huffman_value,
            },
        )
}

fn field() -> impl Strategy<Value = Field> {
    (name(), value(), choice())
}

/// A block: maybe a table size update first, then fields.
fn block() -> impl Strategy<Value = (Option<usize>, Vec<Field>)> {
    let update = prop_oneof![
        4 => Just(None),
        1 => select(vec![0, 64, 256, 1000, DEFAULT_HEADER_TABLE_SIZE]).prop_map(Some),
    ];
    (update, vec(field(), 0..12))
}

/// A header list as owned (name, value) pairs.
type FieldList = Vec<(Vec<u8>, Vec<u8>)>;

fn decode(decoder: &mut HpackDecoder, block: &[u8]) -> Result<FieldList, String> {
    let mut fields = Vec::new();
    decoder
        .decode(block, |name, value| {
            fields.push((name.to_vec(), value.to_vec()))
        })
        .map(|()| fields)
        .map_err(|problem| problem.to_string())
}

/// `bytes` in pieces cut at the `cuts`.
fn pieces(bytes: &[u8], cuts: &[Index]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    at.push(bytes.len());
    let mut start = 0;
    at.into_iter()
        .map(|end| {
            let piece = bytes[start..end].to_vec();
            start = end;
            piece
        })
        .collect()
}

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    let mut bytes = vec![length[1], length[2], length[3], kind, flags];
    bytes.extend_from_slice(&stream_id.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A request on the wire: its `:path`, other fields, how its block is cut into frames, the
/// HEADERS frame's padding and priority, body frames after it, and maybe trailers.
#[derive(Debug, Clone)]
struct Request {
    path: String,
    path_choice: Choice,
    fields: Vec<Field>,
    cuts: Vec<Index>,
    padding: Option<u8>,
    priority: bool,
    body_frames: Vec<Vec<u8>>,
    trailers: Vec<Field>,
}

fn request() -> impl Strategy<Value = Request> {
    let path = "/[a-z0-9/_.?=-]{0,24}(#[ -~]{0,10})?";
    (
        (
            path,
            choice(),
            vec(field(), 0..4),
            vec(any::<Index>(), 0..3),
        ),
        (
            proptest::option::of(any::<u8>()),
            any::<bool>(),
            vec(vec(any::<u8>(), 0..64), 0..3),
            vec(field(), 0..2),
        ),
    )
        .prop_map(
            |((path, path_choice, fields, cuts), (padding, priority, body_frames, trailers))| {
                Request {
                    path,
                    path_choice,
                    fields,
                    cuts,
                    padding,
                    priority,
                    body_frames,
                    trailers,
                }
            },
        )
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A header block as HEADERS (with the request's padding and priority) and CONTINUATIONs.
fn header_frames(out: &mut Vec<u8>, stream_id: u32, block: &[u8], request: &Request) {
    let fragments = pieces(block, &request.cuts);
    let last = fragments.len() - 1;
    for (number, fragment) in fragments.iter().enumerate() {
        let mut flags = if number == last { END_HEADERS } else { 0 };
        if number > 0 {
            out.extend(frame(CONTINUATION, flags, stream_id, fragment));
            continue;
        }
        let mut payload = Vec::new();
        if let Some(padding) = request.padding {
            flags |= PADDED;
            payload.push(padding);
        }
        if request.priority {
            flags |= PRIORITY;
            payload.extend_from_slice(&[0, 0, 0, 0, 200]);
        }
        payload.extend_from_slice(fragment);
        payload.extend(std::iter::repeat_n(
            0,
            usize::from(request.padding.unwrap_or(0)),
        ));
        out.extend(frame(HEADERS, flags, stream_id, &payload));
    }
}

/// A client connection carrying `requests` on streams 1, 3, 5…, and the findings it should
/// give.
fn connection(requests: &[Request]) -> (Vec<u8>, Vec<FragmentPath>) {
    let mut encoder = Encoder::new(DEFAULT_HEADER_TABLE_SIZE);
    let mut bytes = CLIENT_PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    let mut expected = Vec::new();
    for (number, request) in requests.iter().enumerate() {
        let stream_id = 2 * number as u32 + 1;
        let mut block = Vec::new();
        let post = Choice {
            representation: Representation::Indexed,
            ..Choice::TYPICAL
        };
        encoder.field(&mut block, b":method", b"POST", post);
        encoder.field(&mut block, b":scheme", b"https", post);
        encoder.field(
            &mut block,
            b":path",
            request.path.as_bytes(),
            request.path_choice,
        );
        encoder.field(&mut block, b":authority", b"gw.example", Choice::TYPICAL);
        for (name, value, choice) in &request.fields {
            encoder.field(&mut block, name, value, *choice);
        }
        header_frames(&mut bytes, stream_id, &block, request);
        if let Some((before, _)) = request.path.split_once('#') {
            expected.push(FragmentPath {
                stream_id,
                path_before_fragment: before.to_string(),
            });
        }
        for body in &request.body_frames {
            bytes.extend(frame(DATA, 0, stream_id, body));
        }
        if request.trailers.is_empty() {
            bytes.extend(frame(DATA, END_STREAM, stream_id, b""));
            continue;
        }
        // Trailers: decoded to keep the table, and a `:path` in them is never a request's.
        let mut block = Vec::new();
        encoder.field(&mut block, b":path", b"/trailer#x", Choice::TYPICAL);
        for (name, value, choice) in &request.trailers {
            encoder.field(&mut block, name, value, *choice);
        }
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, &block));
    }
    (bytes, expected)
}

/// Frames of any type, flags, stream and payload.
fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![select(vec![0u8, 1, 4, 6, 8, 9]), any::<u8>()],
        any::<u8>(),
        0u32..8,
        vec(any::<u8>(), 0..40),
    )
        .prop_map(|(kind, flags, stream_id, payload)| frame(kind, flags, stream_id, &payload))
}

proptest! {
    /// Blocks of arbitrary bytes, one after another on one decoder, never panic, and never
    /// leave the table over its limit.
    #[test]
    fn the_decoder_never_panics(
        limit in prop_oneof![Just(DEFAULT_HEADER_TABLE_SIZE), 0usize..300],
        blocks in vec(vec(any::<u8>(), 0..200), 1..5),
    ) {
        let mut decoder = HpackDecoder::new(limit);
        for block in &blocks {
            let _ = decode(&mut decoder, block);
            prop_assert!(decoder.table_size() <= decoder.table_capacity());
            prop_assert!(decoder.table_capacity() <= limit);
        }
    }

    /// A valid block cut short or with one byte changed is decoded or refused, never a panic.
    #[test]
    fn damaged_blocks_never_panic(
        (update, fields) in block(),
        cut in any::<Index>(),
        change in any::<Index>(),
        byte in any::<u8>(),
    ) {
        let mut encoder = Encoder::new(DEFAULT_HEADER_TABLE_SIZE);
        let mut bytes = Vec::new();
        if let Some(capacity) = update {
            encoder.size_update(&mut bytes, capacity);
        }
        for (name, value, choice) in &fields {
            encoder.field(&mut bytes, name, value, *choice);
        }
        let _ = decode(&mut HpackDecoder::default(), &bytes[..cut.index(bytes.len() + 1)]);
        if !bytes.is_empty() {
            let at = change.index(bytes.len());
            bytes[at] = byte;
            let _ = decode(&mut HpackDecoder::default(), &bytes);
        }
    }

    /// Header lists written in every representation decode back to themselves, block after
    /// block, and the decoder's dynamic table stays the encoder's.
    #[test]
    fn encoded_header_lists_decode_to_themselves(blocks in vec(block(), 1..6)) {
        let mut encoder = Encoder::new(DEFAULT_HEADER_TABLE_SIZE);
        let mut decoder = HpackDecoder::default();
        for (update, fields) in &blocks {
            let mut bytes = Vec::new();
            if let Some(capacity) = update {
                encoder.size_update(&mut bytes, *capacity);
            }
            for (name, value, choice) in fields {
                encoder.field(&mut bytes, name, value, *choice);
            }
            let expected: Vec<_> = fields.iter().map(|(n, v, _)| (n.clone(), v.clone())).collect();
            prop_assert_eq!(decode(&mut decoder, &bytes), Ok(expected));
            let table: Vec<_> = decoder
                .table_entries()
                .map(|(name, value)| (name.to_vec(), value.to_vec()))
                .collect();
            prop_assert_eq!(table, encoder.entries());
            prop_assert_eq!(decoder.table_size(), encoder.size());
        }
    }

    /// Any bytes Huffman-code and decode back; arbitrary bytes decode or are refused, and never
    /// to more than 8/5 of their length.
    #[test]
    fn huffman_strings_round_trip(text in vec(any::<u8>(), 0..100), noise in vec(any::<u8>(), 0..60)) {
        let mut decoded = Vec::new();
        prop_assert_eq!(huffman::decode(&huffman_code(&text), &mut decoded), Ok(()));
        prop_assert_eq!(decoded, text);
        let mut decoded = Vec::new();
        let _ = huffman::decode(&noise, &mut decoded);
        prop_assert!(decoded.len() <= noise.len() * 8 / 5);
    }

    /// Arbitrary bytes, with or without the preface, or arbitrary frames after it, in any
    /// pieces, never panic; once the watch fails it keeps failing the same way.
    #[test]
    fn the_watch_never_panics(
        preface in any::<bool>(),
        noise in prop_oneof![
            vec(any::<u8>(), 0..300),
            vec(any_frame(), 0..8).prop_map(|frames| frames.concat()),
        ],
        cuts in vec(any::<Index>(), 0..6),
    ) {
        let mut bytes = if preface { CLIENT_PREFACE.to_vec() } else { Vec::new() };
        bytes.extend(noise);
        let mut watch = H2PathWatch::default();
        let mut lost = None;
        for piece in pieces(&bytes, &cuts) {
            let result = watch.feed(&piece);
            if let Some(reason) = lost {
                prop_assert_eq!(result, Err(reason));
            }
            lost = result.err();
            let _ = watch.take_fragment_paths();
        }
        prop_assert_eq!(watch.lost(), lost);
    }

    /// A client connection of generated requests, in any pieces, yields exactly the requests
    /// whose `:path` has a `#`, in order, each with its path before the `#`.
    #[test]
    fn the_watch_finds_exactly_the_fragment_paths(
        requests in vec(request(), 1..6),
        cuts in vec(any::<Index>(), 0..10),
    ) {
        let (bytes, expected) = connection(&requests);
        let mut watch = H2PathWatch::default();
        let mut found = Vec::new();
        for piece in pieces(&bytes, &cuts) {
            prop_assert_eq!(watch.feed(&piece), Ok(()));
            found.extend(watch.take_fragment_paths());
        }
        prop_assert_eq!(found, expected);
    }
}
