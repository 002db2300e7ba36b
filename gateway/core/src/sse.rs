//! Server-sent events as a worker streams them (the WHATWG `text/event-stream` format): the
//! stream cut into whole events as its bytes arrive, however the reads split it, and each
//! event's fields read. The relay forwards every event's bytes exactly as the worker wrote
//! them; the fields are only read, for `usage` and `session_id`.
//!
//! A line ends with CRLF, LF or CR; an event ends with an empty line. Lines starting with
//! `:` are comments. `data` lines add up, joined with `\n`. A CR that is the last byte read
//! ends its line at once; a LF that follows it in the next read is the rest of that line
//! ending (and is passed on with the next event's bytes). A byte-order mark that starts the
//! stream is not part of its first field.

use bytes::{Bytes, BytesMut};

use crate::usage::{read_answer, SessionField, Usage, UsageProblem};

/// One whole event: its bytes as they came, and the fields the gateway reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Every byte of the event, its blank line included.
    pub raw: Bytes,
    /// The `event` field, when there is one.
    pub name: Option<String>,
    /// The `data` lines joined with `\n`; `None` when the event has no `data` line.
    pub data: Option<String>,
}

/// Cuts a byte stream into events, holding at most one event's bytes.
#[derive(Debug, Default)]
pub struct EventReader {
    buf: BytesMut,
    /// Where the line under scan starts: the bytes before it are whole lines of the event
    /// being read, so a new read resumes there rather than at the event's start.
    line_start: usize,
    /// The last line ended with a CR read last: a LF that comes next belongs to it.
    after_cr: bool,
    /// No event has been cut yet: a byte-order mark may start the stream.
    at_start: bool,
}

/// What the bytes read so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Event(Event),
    /// No whole event yet.
    NeedMore,
}

impl EventReader {
    pub fn new() -> Self {
        Self {
            at_start: true,
            ..Self::default()
        }
    }

    /// Adds bytes read from the worker.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet a whole event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next whole event, if the bytes pushed so far hold one.
    pub fn next_event(&mut self) -> Next {
        let mut at = self.line_start;
        if self.after_cr {
            let Some(&next) = self.buf.get(at) else {
                return Next::NeedMore;
            };
            self.after_cr = false;
            if next == b'\n' {
                at += 1;
                self.line_start = at;
            }
        }
        loop {
            let Some(offset) = self.buf[at..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                self.line_start = at;
                return Next::NeedMore;
            };
            let end_of_line = at + offset;
            let terminator = match self.buf[end_of_line] {
                b'\n' => 1,
                _ => match self.buf.get(end_of_line + 1) {
                    Some(b'\n') => 2,
                    Some(_) => 1,
                    // A CR last: its line has ended, whatever comes next.
                    None => {
                        self.after_cr = true;
                        1
                    }
                },
            };
            let empty_line = end_of_line == at;
            at = end_of_line + terminator;
            if empty_line {
                self.line_start = 0;
                let raw = self.buf.split_to(at).freeze();
                let bom = std::mem::take(&mut self.at_start) && raw.starts_with(BOM);
                return Next::Event(read_fields(raw, if bom { BOM.len() } else { 0 }));
            }
        }
    }

    /// At the stream's end: the bytes of an event it never finished (dropped by a client's
    /// parser, as by this one), to be passed on as they are.
    pub fn finish(&mut self) -> Bytes {
        self.line_start = 0;
        self.buf.split().freeze()
    }
}

/// The UTF-8 byte-order mark.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The fields of one whole event, read from `skip` on.
fn read_fields(raw: Bytes, skip: usize) -> Event {
    let mut name = None;
    let mut data: Option<String> = None;
    for line in lines(&raw[skip..]) {
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => match &mut data {
                Some(joined) => {
                    joined.push('\n');
                    joined.push_str(&value);
                }
                None => data = Some(value.into_owned()),
            },
            b"event" => name = Some(value.into_owned()),
            _ => {}
        }
    }
    Event { raw, name, data }
}

/// The lines of a whole event, without their terminators.
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = raw;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .unwrap_or(rest.len());
        let line = &rest[..end];
        let terminator = match rest.get(end) {
            Some(b'\r') if rest.get(end + 1) == Some(&b'\n') => 2,
            Some(_) => 1,
            None => 0,
        };
        rest = &rest[end + terminator..];
        Some(line)
    })
}

/// What a stream's events have told the gateway so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamReading {
    /// The last valid `usage` any event carried: cumulative, as workers report it.
    pub running: Option<Usage>,
    /// A `usage` that was there but wrong: the stream is then never a free call.
    pub invalid: Option<UsageProblem>,
    /// Events read.
    pub events: u64,
}

/// What one event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventNews {
    /// The event carried a valid `usage`, now the running usage.
    pub usage: bool,
    /// The event carried a `usage` that is wrong.
    pub invalid: Option<UsageProblem>,
    /// The event's data is a JSON object with a `session_id` string.
    pub names_session: bool,
}

impl StreamReading {
    /// Reads one event's `usage` and `session_id`; `[DONE]` and data that is not a JSON
    /// object carry neither.
    pub fn read(&mut self, event: &Event) -> EventNews {
        self.events += 1;
        let Some(data) = event.data.as_deref() else {
            return EventNews::default();
        };
        let reading = read_answer(data.as_bytes());
        let mut news = EventNews {
            names_session: reading.session == SessionField::Named,
            ..EventNews::default()
        };
        match reading.usage {
            Ok(usage) => {
                self.running = Some(usage);
                news.usage = true;
            }
            Err(problem) if problem.is_invalid() => {
                self.invalid = Some(problem);
                news.invalid = Some(problem);
            }
            Err(_) => {}
        }
        news
    }
}

/// The event that tells a client its session when the worker's first event did not.
pub fn session_event(session_id: &str) -> Bytes {
    // Session ids are validated URL-safe characters: no escaping needed.
    Bytes::from(format!(
        "event: session\ndata: {{\"session_id\": \"{session_id}\"}}\n\n"
    ))
}

/// The event that ends a stream the gateway cut off, carrying the contract's error body.
pub fn error_event(body: &str) -> Bytes {
    Bytes::from(format!("event: error\ndata: {body}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&str]) -> (Vec<Event>, Bytes) {
        let mut reader = EventReader::new();
        let mut out = Vec::new();
        for chunk in chunks {
            reader.push(chunk.as_bytes());
            while let Next::Event(event) = reader.next_event() {
                out.push(event);
            }
        }
        (out, reader.finish())
    }

    #[test]
    fn data_lines_join_with_newlines_and_comments_are_skipped() {
        let (got, rest) = events(&[": hi\ndata: a\ndata:b\nevent: delta\nid: 7\n\n"]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data.as_deref(), Some("a\nb"));
        assert_eq!(got[0].name.as_deref(), Some("delta"));
        assert!(rest.is_empty());
    }

    #[test]
    fn crlf_lf_and_cr_all_end_lines_even_split_across_reads() {
        let (got, _) = events(&["data: 1\r", "\n\r", "\ndata: 2\r\rdata: 3\n\n"]);
        let data: Vec<_> = got.iter().map(|e| e.data.clone().unwrap()).collect();
        assert_eq!(data, ["1", "2", "3"]);
        assert_eq!(&got[0].raw[..], b"data: 1\r\n\r");
        assert_eq!(&got[1].raw[..], b"\ndata: 2\r\r", "a CRLF cut after its CR");
    }

    #[test]
    fn a_cr_read_last_ends_its_line_at_once_and_a_lf_after_it_joins_it() {
        let (got, rest) = events(&["data: 1\r\r", "\ndata: 2\r", "\n\r", "\n"]);
        let data: Vec<_> = got.iter().map(|e| e.data.clone().unwrap()).collect();
        assert_eq!(data, ["1", "2"]);
        assert_eq!(
            &rest[..],
            b"\n",
            "the last LF stays behind, passed on at the end"
        );
        let (got, _) = events(&["data: 3\r", "\r"]);
        assert_eq!(
            got[0].data.as_deref(),
            Some("3"),
            "dispatched before any next read"
        );
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_field() {
        let (got, _) = events(&["\u{feff}data: a\n\n\u{feff}data: b\n\n"]);
        assert_eq!(got[0].data.as_deref(), Some("a"));
        assert_eq!(got[1].data, None, "only the stream's first");
    }

    #[test]
    fn an_unfinished_event_is_held_and_handed_back_at_the_end() {
        let (got, rest) = events(&["data: 1\n\ndata: 2\n"]);
        assert_eq!(got.len(), 1);
        assert_eq!(&rest[..], b"data: 2\n");
    }

    #[test]
    fn an_empty_data_field_is_data() {
        let (got, _) = events(&["data\n\n", "event: ping\n\n"]);
        assert_eq!(got[0].data.as_deref(), Some(""));
        assert_eq!(got[1].data, None);
    }

    #[test]
    fn the_last_valid_usage_is_the_running_usage() {
        let (got, _) = events(&[
            "data: {\"delta\": \"a\", \"session_id\": \"s1\"}\n\n",
            "data: {\"usage\": {\"input_tokens\": 2, \"output_tokens\": 1}}\n\n",
            "data: {\"usage\": {\"input_tokens\": 2, \"output_tokens\": 5, \"total_tokens\": 7}}\n\n",
            "data: [DONE]\n\n",
        ]);
        let mut reading = StreamReading::default();
        let news: Vec<_> = got.iter().map(|e| reading.read(e)).collect();
        assert!(news[0].names_session && !news[0].usage);
        assert!(news[1].usage && news[2].usage && !news[3].usage);
        assert_eq!(reading.running.map(|u| u.total_tokens), Some(7));
        assert_eq!(reading.invalid, None);
        assert_eq!(reading.events, 4);
    }

    #[test]
    fn a_wrong_usage_is_remembered() {
        let (got, _) =
            events(&["data: {\"usage\": {\"input_tokens\": -1, \"output_tokens\": 1}}\n\n"]);
        let mut reading = StreamReading::default();
        let news = reading.read(&got[0]);
        assert_eq!(news.invalid, Some(UsageProblem::NotAnInteger));
        assert_eq!(reading.invalid, Some(UsageProblem::NotAnInteger));
        assert_eq!(reading.running, None);
    }
}
