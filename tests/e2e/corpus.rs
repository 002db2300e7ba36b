//! The raw-bytes corpus under `tests/fixtures/http/` (its README gives the format): request
//! smuggling variants, malformed framing, pipelining and upgrades, each sent as one
//! connection's bytes. Whatever the gateway answers, the worker receives exactly the calls
//! answered 2xx, each a well-formed chat call, and nothing hidden inside another request.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

const BODY: &str = r#"{"message":"corpus ok"}"#;

struct Case {
    name: String,
    /// The statuses the connection must get, in order; empty: closed without an answer.
    expect: Vec<u16>,
    bytes: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/http");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/http")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "http"))
        .collect();
    files.sort();
    files.iter().map(|path| read_case(path)).collect()
}

/// Reads one fixture: `# expect:` from its comments, the rest unescaped (placeholders are
/// filled in by [`fill`]).
fn read_case(path: &Path) -> Case {
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).unwrap();
    let mut expect = None;
    let mut raw = String::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix('#') {
            if let Some(statuses) = comment.trim().strip_prefix("expect:") {
                let statuses = statuses.trim();
                expect = Some(if statuses == "closed" {
                    Vec::new()
                } else {
                    statuses
                        .split_whitespace()
                        .map(|s| {
                            s.parse()
                                .unwrap_or_else(|_| panic!("{name}: bad status {s}"))
                        })
                        .collect()
                });
            }
        } else {
            raw.push_str(line);
        }
    }
    Case {
        expect: expect.unwrap_or_else(|| panic!("{name}: no '# expect:' line")),
        bytes: unescape(&raw, &name),
        name,
    }
}

fn unescape(text: &str, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        out.push(match chars.next() {
            Some('r') => b'\r',
            Some('n') => b'\n',
            Some('t') => b'\t',
            Some('0') => 0,
            Some('\\') => b'\\',
            other => panic!("{name}: unknown escape \\{other:?}"),
        });
    }
    out
}

/// The placeholders, for this gateway.
fn fill(bytes: &[u8], gw: &TestGateway) -> Vec<u8> {
    let smuggled = format!(
        "POST {} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 22\r\n\r\n{{\"message\":\"SMUGGLED\"}}",
        chat_path(AGENT),
        gw.jane()
    );
    let text = String::from_utf8_lossy(bytes)
        .replace("{SMUGGLED}", &smuggled)
        .replace("{PATH}", &chat_path(AGENT))
        .replace("{KEY}", gw.jane())
        .replace("{BODY}", BODY)
        .replace("{LEN}", &BODY.len().to_string());
    // The fixtures are ASCII apart from escapes, which `from_utf8_lossy` keeps.
    text.into_bytes()
}

/// How long a connection that got every answer it expects, the last a success, is watched
/// for one more (it may stay open for the next request).
const QUIET: Duration = Duration::from_millis(500);

/// What a connection's bytes got: the statuses, and whether the gateway then closed it.
struct Answers {
    statuses: Vec<u16>,
    closed: bool,
}

/// Sends one connection's bytes and reads every answer until the gateway closes the
/// connection, or, once the `expected` answers are in and the last was a success, until it
/// stays quiet for [`QUIET`]. After a refusal the connection must close, within the read
/// timeout: whatever followed is never read as a request. The client does not half-close: a
/// client that closes its side before its answer has gone away (SPEC §2).
fn answers(gw: &TestGateway, bytes: &[u8], name: &str, expected: usize) -> Answers {
    let stream = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let _ = writer.write_all(bytes);
    let mut reader = BufReader::new(stream);
    let mut statuses = Vec::new();
    loop {
        let last_refused = statuses.last().is_some_and(|s| *s >= 400);
        let wait = if statuses.len() < expected || last_refused {
            Duration::from_secs(15)
        } else {
            QUIET
        };
        reader.get_ref().set_read_timeout(Some(wait)).unwrap();
        match reader.fill_buf() {
            Ok([]) => {
                return Answers {
                    statuses,
                    closed: true,
                }
            }
            Err(_) => {
                return Answers {
                    statuses,
                    closed: false,
                }
            }
            Ok(_) => {}
        }
        let reply = raw::read_response(&mut reader, format!("{name} #{}", statuses.len()));
        statuses.push(reply.status);
    }
}

#[test]
fn every_fixture_gets_its_answers_and_the_worker_only_the_calls_served() {
    let cases = cases();
    assert!(cases.len() >= 15, "fixtures missing");
    let w = Worker::start("w1");
    let gw = TestGateway::builder().worker(&w).start();
    let mut problems = Vec::new();
    for case in &cases {
        let before = w.count();
        let Answers {
            statuses: got,
            closed,
        } = answers(&gw, &fill(&case.bytes, &gw), &case.name, case.expect.len());
        let served = got.iter().filter(|s| (200..300).contains(*s)).count();
        if got.last().is_some_and(|s| *s >= 400) && !closed {
            problems.push(format!(
                "{}: the connection stayed open after {got:?}",
                case.name
            ));
        }
        // The worker may still be finishing the last call it was sent.
        let seen = wait_for_count(&w, before + served) - before;
        if got != case.expect {
            problems.push(format!(
                "{}: got {got:?}, expected {:?}",
                case.name, case.expect
            ));
        }
        if seen != served {
            problems.push(format!(
                "{}: the worker received {seen} calls, {served} were answered 2xx",
                case.name
            ));
        }
        for call in &w.seen()[before..] {
            let ok = call.method == "POST"
                && call.path == format!("/internal/{AGENT}/invoke")
                && call.body["message"] == "corpus ok"
                && !call.raw_body.contains("SMUGGLED");
            if !ok {
                problems.push(format!(
                    "{}: the worker received {} {} {}",
                    case.name, call.method, call.path, call.raw_body
                ));
            }
            if call.header("upgrade").is_some() || call.header("http2-settings").is_some() {
                problems.push(format!("{}: an upgrade reached the worker", case.name));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Waits (briefly) until the worker has seen `count` calls; returns what it has seen.
fn wait_for_count(w: &Worker, count: usize) -> usize {
    for _ in 0..50 {
        if w.count() >= count {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A moment more, so a call that should not have arrived has had time to.
    std::thread::sleep(Duration::from_millis(50));
    w.count()
}
