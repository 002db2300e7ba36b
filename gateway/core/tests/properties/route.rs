//! The route matcher (SPEC §1 `POST /v1/agents/{agent_id}/chat`): the path is matched exactly
//! as sent, so no near-miss (`..`, `%2f`, `//`, trailing junk, a fragment) may match.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use turnpike_core::route::{match_route, request_line_target, target_path, RouteMiss};

/// SPEC's `[A-Za-z0-9_-]`, spelled out.
const ID_ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

/// SPEC's `^ag_[A-Za-z0-9_-]{1,64}$`.
fn reference_is_agent_id(id: &str) -> bool {
    match id.strip_prefix("ag_") {
        Some(rest) => {
            let count = rest.chars().count();
            (1..=64).contains(&count) && rest.chars().all(|c| ID_ALPHABET.contains(c))
        }
        None => false,
    }
}

/// The agent a path names: exactly the five segments `""/v1/agents/{id}/chat`.
fn reference_chat_agent(path: &str) -> Option<&str> {
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["", "v1", "agents", id, "chat"] if reference_is_agent_id(id) => Some(id),
        _ => None,
    }
}

/// The agent a raw request target names: the query string is not part of the path; a
/// fragment (never sent by a client) or bytes that are not UTF-8 name nothing.
fn reference_target_agent(target: &[u8]) -> Option<&str> {
    if target.contains(&b'#') {
        return None;
    }
    let path_end = target
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(target.len());
    reference_chat_agent(std::str::from_utf8(&target[..path_end]).ok()?)
}

/// What the matcher decides for a raw target, as the gateway runs it.
fn matched_agent(target: &[u8]) -> Option<&str> {
    let path = target_path(target).ok()?;
    match_route("POST", path).ok().map(|route| route.agent_id)
}

fn agent_id() -> impl Strategy<Value = String> {
    "ag_[A-Za-z0-9_-]{1,64}"
}

fn chat_path(agent_id: &str) -> String {
    format!("/v1/agents/{agent_id}/chat")
}

/// One way a valid target can be bent; most make it a near-miss, a few (a query string,
/// a case change inside the id) leave it valid, and the reference must say which.
#[derive(Debug, Clone)]
enum Bend {
    InsertSegment(Index, String),
    DotSegment(Index, &'static str),
    PercentEncode(Index, bool),
    DoubleSlash(Index),
    Append(&'static str),
    Query(String),
    Fragment(String),
    FlipCase(Index),
    InsertByte(Index, u8),
    RemoveByte(Index),
    ReplaceByte(Index, u8),
    InsertChar(Index, char),
}

/// Bytes a path might smuggle: separators, dots, escapes, controls, non-ASCII, not UTF-8.
fn tricky_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        prop::sample::select(b"/.%?#;\\ \t\r\n\0~+=&@:!*'()[]$,".to_vec()),
        any::<u8>(),
    ]
}

fn bend() -> impl Strategy<Value = Bend> {
    prop_oneof![
        (any::<Index>(), "[a-z0-9_.]{0,6}").prop_map(|(at, s)| Bend::InsertSegment(at, s)),
        (any::<Index>(), prop::sample::select(vec![".", ".."]))
            .prop_map(|(at, d)| Bend::DotSegment(at, d)),
        (any::<Index>(), any::<bool>()).prop_map(|(at, upper)| Bend::PercentEncode(at, upper)),
        any::<Index>().prop_map(Bend::DoubleSlash),
        prop::sample::select(vec![
            "/", "//", "/.", "/..", "%2f", "%2F", ";x", "y", "%00", " "
        ])
        .prop_map(Bend::Append),
        "[a-z0-9=&%/#.]{0,10}".prop_map(Bend::Query),
        "[a-z0-9/.?]{0,8}".prop_map(Bend::Fragment),
        any::<Index>().prop_map(Bend::FlipCase),
        (any::<Index>(), tricky_byte()).prop_map(|(at, b)| Bend::InsertByte(at, b)),
        any::<Index>().prop_map(Bend::RemoveByte),
        (any::<Index>(), tricky_byte()).prop_map(|(at, b)| Bend::ReplaceByte(at, b)),
        (any::<Index>(), any::<char>()).prop_map(|(at, c)| Bend::InsertChar(at, c)),
    ]
}

impl Bend {
    fn apply(&self, target: &mut Vec<u8>) {
        // Positions index the gaps between bytes (0..=len) or the bytes themselves (0..len).
        let gap = |at: &Index, target: &Vec<u8>| at.index(target.len() + 1);
        let byte =
            |at: &Index, target: &Vec<u8>| (!target.is_empty()).then(|| at.index(target.len()));
        match self {
            Bend::InsertSegment(at, segment) => {
                let slashes: Vec<usize> = positions(target, b'/');
                if let Some(&slash) = slashes.get(at.index(slashes.len().max(1))) {
                    let insert = format!("/{segment}");
                    target.splice(slash..slash, insert.bytes());
                }
            }
            Bend::DotSegment(at, dots) => {
                let slashes = positions(target, b'/');
                if let Some(&slash) = slashes.get(at.index(slashes.len().max(1))) {
                    let insert = format!("/{dots}");
                    target.splice(slash..slash, insert.bytes());
                }
            }
            Bend::PercentEncode(at, upper) => {
                if let Some(i) = byte(at, target) {
                    let encoded = if *upper {
                        format!("%{:02X}", target[i])
                    } else {
                        format!("%{:02x}", target[i])
                    };
                    target.splice(i..=i, encoded.bytes());
                }
            }
            Bend::DoubleSlash(at) => {
                let slashes = positions(target, b'/');
                if let Some(&slash) = slashes.get(at.index(slashes.len().max(1))) {
                    target.insert(slash, b'/');
                }
            }
            Bend::Append(junk) => target.extend_from_slice(junk.as_bytes()),
            Bend::Query(query) => {
                target.push(b'?');
                target.extend_from_slice(query.as_bytes());
            }
            Bend::Fragment(fragment) => {
                target.push(b'#');
                target.extend_from_slice(fragment.as_bytes());
            }
            Bend::FlipCase(at) => {
                let letters: Vec<usize> = (0..target.len())
                    .filter(|&i| target[i].is_ascii_alphabetic())
                    .collect();
                if !letters.is_empty() {
                    let i = letters[at.index(letters.len())];
                    target[i] ^= 0x20;
                }
            }
            Bend::InsertByte(at, b) => {
                let i = gap(at, target);
                target.insert(i, *b);
            }
            Bend::RemoveByte(at) => {
                if let Some(i) = byte(at, target) {
                    target.remove(i);
                }
            }
            Bend::ReplaceByte(at, b) => {
                if let Some(i) = byte(at, target) {
                    target[i] = *b;
                }
            }
            Bend::InsertChar(at, c) => {
                let i = gap(at, target);
                let mut buffer = [0u8; 4];
                target.splice(i..i, c.encode_utf8(&mut buffer).bytes());
            }
        }
    }
}

fn positions(bytes: &[u8], wanted: u8) -> Vec<usize> {
    (0..bytes.len()).filter(|&i| bytes[i] == wanted).collect()
}

/// An HTTP method: the real ones, their case variants, and arbitrary tokens.
fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "post", "Post", "POST ",
            "",
        ])
        .prop_map(str::to_owned),
        "[A-Za-z]{1,8}",
        any::<String>(),
    ]
}

proptest! {
    /// Arbitrary bytes never panic, and what comes back is one space-free piece of the first
    /// line that is not empty.
    #[test]
    fn request_line_target_never_panics(head in vec(any::<u8>(), 0..200)) {
        let target = request_line_target(&head);
        let start = head.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(head.len());
        let first_line = head[start..].split(|&b| b == b'\n').next().unwrap_or_default();
        prop_assert!(!target.contains(&b' ') && !target.contains(&b'\n'));
        let (line, piece) = (first_line.as_ptr_range(), target.as_ptr_range());
        prop_assert!(target.is_empty() || (line.start <= piece.start && piece.end <= line.end));
    }

    /// A well-formed request line gives back its target byte for byte, whatever follows it.
    #[test]
    fn request_line_target_reads_the_target_as_sent(
        method in "[A-Z]{1,7}",
        target in vec(any::<u8>().prop_filter("SP and LF end the target", |&b| b != b' ' && b != b'\n'), 1..80),
        version in prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]),
        rest in vec(any::<u8>(), 0..80),
    ) {
        let head = [method.as_bytes(), b" ", &target, b" ", version.as_bytes(), b"\r\n", &rest].concat();
        prop_assert_eq!(request_line_target(&head), &target[..]);
    }

    /// Empty lines before the request line (RFC 9112 §2.2; Pingora's parser skips them and
    /// hands the gateway the raw head with them in, and `head.rs` lets them through) do not
    /// hide the target.
    ///
    /// Found by this property: the first line was read even when empty, so a stray CRLF
    /// before a valid call (RFC 9112 §2.2 allows it) made it 404.
    #[test]
    fn empty_lines_before_the_request_line_do_not_hide_the_target(
        empty_lines in vec(prop::sample::select(vec!["\r\n", "\n"]), 1..3),
        id in agent_id(),
    ) {
        let target = chat_path(&id);
        let head = format!("{}POST {target} HTTP/1.1\r\nHost: gateway\r\n\r\n", empty_lines.concat());
        prop_assert_eq!(request_line_target(head.as_bytes()), target.as_bytes());
    }

    /// Arbitrary bytes never panic `target_path`, and it agrees with the reference's reading.
    #[test]
    fn target_path_never_panics(target in vec(any::<u8>(), 0..120)) {
        let path = target_path(&target);
        if target.contains(&b'#') {
            prop_assert_eq!(path, Err(RouteMiss::NotFound));
        } else if let Ok(path) = path {
            prop_assert!(target.starts_with(path.as_bytes()));
            prop_assert!(!path.contains('?'));
        }
    }

    /// Arbitrary strings and methods never panic `match_route`; an id it returns is a slice of the path.
    #[test]
    fn match_route_never_panics(method in method(), path in any::<String>()) {
        if let Ok(route) = match_route(&method, &path) {
            prop_assert!(path.contains(route.agent_id));
        }
    }

    /// Every agent id of the grammar matches, with that id, behind any query string.
    #[test]
    fn valid_chat_targets_match_with_their_id(
        id in agent_id(),
        query in proptest::option::of("[A-Za-z0-9=&%/.:_-]{0,20}"),
    ) {
        let path = chat_path(&id);
        let target = match query {
            Some(query) => format!("{path}?{query}"),
            None => path.clone(),
        };
        let head = format!("POST {target} HTTP/1.1\r\nHost: gateway\r\n\r\n");
        prop_assert_eq!(target_path(request_line_target(head.as_bytes())), Ok(path.as_str()));
        prop_assert_eq!(match_route("POST", &path).map(|r| r.agent_id), Ok(id.as_str()));
    }

    /// Near-misses of a valid target: the matcher accepts exactly what the reference accepts,
    /// with the same id.
    #[test]
    fn bent_targets_match_only_when_the_reference_says_so(
        id in agent_id(),
        bends in vec(bend(), 1..4),
    ) {
        let mut target = chat_path(&id).into_bytes();
        for bend in &bends {
            bend.apply(&mut target);
        }
        prop_assert_eq!(
            matched_agent(&target),
            reference_target_agent(&target),
            "target {:?}",
            String::from_utf8_lossy(&target)
        );
    }

    /// Arbitrary ids (any string between the fixed parts) match exactly when they are in the grammar.
    #[test]
    fn only_ids_of_the_grammar_match(id in prop_oneof!["ag_[A-Za-z0-9_-]{0,70}", "[ -~]{0,70}", any::<String>()]) {
        let path = chat_path(&id);
        let expected = reference_is_agent_id(&id).then_some(id.as_str());
        prop_assert_eq!(matched_agent(path.as_bytes()), expected);
    }

    /// The method only matters once the path is the chat path: 404 elsewhere, 405 for a
    /// method other than (exactly, case-sensitively) `POST`.
    #[test]
    fn the_method_is_judged_after_the_path(
        method in method(),
        id in agent_id(),
        bends in vec(bend(), 0..2),
    ) {
        let mut target = chat_path(&id).into_bytes();
        for bend in &bends {
            bend.apply(&mut target);
        }
        let Ok(path) = std::str::from_utf8(&target) else { return Ok(()) };
        let expected = match reference_chat_agent(path) {
            None => Err(RouteMiss::NotFound),
            Some(_) if method != "POST" => Err(RouteMiss::MethodNotAllowed { allow: "POST" }),
            Some(id) => Ok(id),
        };
        prop_assert_eq!(match_route(&method, path).map(|r| r.agent_id), expected);
    }
}
