//! The event-stream reader (WHATWG HTML §9.2): whatever the line endings and however the
//! reads split the bytes, it yields exactly the events written, each with its own bytes,
//! its `data` lines joined and its `event` name, and loses no byte.

use proptest::collection::vec;
use proptest::prelude::*;
use turnpike_core::sse::{EventReader, Next};

/// One line of an event as a worker might write it.
#[derive(Debug, Clone)]
enum Line {
    Data(String),
    Name(String),
    Id(String),
    Comment(String),
    /// A field name without a colon: an empty value.
    Bare(&'static str),
}

/// A field value: any text without line breaks.
fn value() -> impl Strategy<Value = String> {
    "[^\r\n]{0,12}"
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        3 => value().prop_map(Line::Data),
        1 => value().prop_map(Line::Name),
        1 => value().prop_map(Line::Id),
        1 => value().prop_map(Line::Comment),
        1 => prop_oneof![Just("data"), Just("retry"), Just("event")].prop_map(Line::Bare),
    ]
}

fn terminator() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("\n"), Just("\r\n"), Just("\r")]
}

/// An event: its lines, each with its terminator, then the terminator of its blank line.
type Written = (Vec<(Line, &'static str)>, &'static str);

fn event() -> impl Strategy<Value = Written> {
    (vec((line(), terminator()), 0..5), terminator())
}

/// The bytes of one event, and what a reader must make of it (data, name).
fn write(event: &Written) -> (String, Option<String>, Option<String>) {
    let (lines, blank) = event;
    let mut text = String::new();
    let mut data: Option<String> = None;
    let mut name = None;
    for (line, end) in lines {
        match line {
            Line::Data(v) => {
                text.push_str(&format!("data: {v}"));
                data = Some(match data {
                    Some(d) => format!("{d}\n{v}"),
                    None => v.clone(),
                });
            }
            Line::Name(v) => {
                // Without a space after the colon: one the value starts with is dropped.
                text.push_str(&format!("event:{v}"));
                name = Some(v.strip_prefix(' ').unwrap_or(v).to_owned());
            }
            Line::Id(v) => text.push_str(&format!("id: {v}")),
            Line::Comment(v) => text.push_str(&format!(":{v}")),
            Line::Bare(field) => {
                text.push_str(field);
                match *field {
                    "data" => {
                        data = Some(match data {
                            Some(d) => format!("{d}\n"),
                            None => String::new(),
                        })
                    }
                    "event" => name = Some(String::new()),
                    _ => {}
                }
            }
        }
        text.push_str(end);
    }
    text.push_str(blank);
    (text, data, name)
}

/// A line ended by CR and then a blank line written as LF read as one CRLF: the writer's
/// own ambiguity (every reader sees it so). Such a blank line is written CRLF instead.
fn unambiguous(mut events: Vec<Written>) -> Vec<Written> {
    let mut last_was_cr = false;
    for (lines, blank) in events.iter_mut() {
        if let Some((_, end)) = lines.last() {
            last_was_cr = *end == "\r";
        }
        if last_was_cr && blank.starts_with('\n') {
            *blank = "\r\n";
        }
        last_was_cr = *blank == "\r";
    }
    events
}

proptest! {
    #[test]
    fn events_come_out_as_written_however_the_reads_split_them(
        events in vec(event(), 0..6).prop_map(unambiguous),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let written: Vec<_> = events.iter().map(write).collect();
        let stream: String = written.iter().map(|w| w.0.as_str()).collect();
        let bytes = stream.as_bytes();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        cuts.push(0);
        cuts.push(bytes.len());
        cuts.sort_unstable();

        let mut reader = EventReader::new();
        let mut got = Vec::new();
        for pair in cuts.windows(2) {
            reader.push(&bytes[pair[0]..pair[1]]);
            while let Next::Event(event) = reader.next_event() {
                got.push(event);
            }
        }
        let tail = reader.finish();
        // A CRLF cut after its CR: the CR ended the line at once, and the LF travels with
        // the next event's bytes (or stays behind at the end). Moved back, each event's
        // bytes are exactly what was written.
        let mut raws: Vec<Vec<u8>> = got.iter().map(|e| e.raw.to_vec()).collect();
        raws.push(tail.to_vec());
        for i in 1..raws.len() {
            if raws[i].first() == Some(&b'\n') && raws[i - 1].last() == Some(&b'\r')
                && written[i - 1].0.ends_with("\r\n")
            {
                raws[i].remove(0);
                raws[i - 1].push(b'\n');
            }
        }
        let tail = raws.pop().unwrap_or_default();
        prop_assert!(tail.is_empty(), "every event was whole: {:?}", tail);
        prop_assert_eq!(got.len(), written.len());
        for ((event, raw), (text, data, name)) in got.iter().zip(&raws).zip(&written) {
            prop_assert_eq!(&raw[..], text.as_bytes());
            prop_assert_eq!(&event.data, data);
            prop_assert_eq!(&event.name, name);
        }
    }

    #[test]
    fn no_byte_is_lost_or_invented(bytes in vec(any::<u8>(), 0..200), cut in any::<prop::sample::Index>()) {
        let cut = cut.index(bytes.len() + 1);
        let mut reader = EventReader::new();
        let mut out = Vec::new();
        for part in [&bytes[..cut], &bytes[cut..]] {
            reader.push(part);
            while let Next::Event(event) = reader.next_event() {
                out.extend_from_slice(&event.raw);
            }
        }
        out.extend_from_slice(&reader.finish());
        prop_assert_eq!(out, bytes);
    }
}
