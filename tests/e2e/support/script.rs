//! What the mock worker does with a call, as a typed script a test writes and the worker
//! reads back from the chat message. A message that starts with `worker:` must be a script
//! the worker fully understands: an unknown word or a bad number fails the test, instead of
//! falling back to a default answer. Any other message gets the default answer.

use std::fmt;

/// The marker that makes a message a script.
const MARKER: &str = "worker:";

/// How the answer's `usage` is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadUsage {
    /// -5 input tokens.
    Negative,
    /// Counts as strings.
    Strings,
    /// 200,000,000 input tokens: over the gateway's cap.
    Absurd,
    /// `total_tokens` one more than input + output.
    Inconsistent,
    /// No `usage` at all.
    Missing,
}

impl BadUsage {
    /// The ways a usage can be there but wrong (not counting [`BadUsage::Missing`]).
    pub const INVALID: [BadUsage; 4] = [
        BadUsage::Negative,
        BadUsage::Strings,
        BadUsage::Absurd,
        BadUsage::Inconsistent,
    ];

    fn word(self) -> &'static str {
        match self {
            BadUsage::Negative => "negative",
            BadUsage::Strings => "strings",
            BadUsage::Absurd => "absurd",
            BadUsage::Inconsistent => "inconsistent",
            BadUsage::Missing => "missing",
        }
    }
}

/// How the worker ends the exchange instead of answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Drops the connection without answering.
    Close,
    /// Writes bytes that are not HTTP and closes.
    Garbage,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Script {
    /// Reported token counts (default 45 / 32).
    pub usage: Option<(i64, i64)>,
    pub bad_usage: Option<BadUsage>,
    /// Seconds to wait before answering.
    pub sleep: Option<f64>,
    /// Waits at least 0.3 s: long enough for a call to be in flight while another arrives.
    pub hold: bool,
    pub status: Option<u16>,
    /// Leaves `session_id` out of the answer.
    pub no_session: bool,
    /// Pads the answer with this many bytes.
    pub padding: Option<usize>,
    /// Answers with `Connection: X-Worker-Hop`, `X-Worker-Hop`, `X-Worker-Kept` and `Server`.
    pub hop_header: bool,
    pub ending: Option<Ending>,
    /// Answers with a `text/event-stream` instead of JSON.
    pub stream: Option<StreamScript>,
}

/// A streamed answer: `events` text deltas `gap_ms` apart (the first names the session
/// unless `nosession`), then the usage event (left out under `badusage missing`, wrong
/// under another `badusage`), then `data: [DONE]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamScript {
    pub events: u32,
    pub gap_ms: u64,
    /// Every delta carries the running usage so far (cumulative, the output growing).
    pub running_usage: bool,
    /// After the deltas, sends nothing more and keeps the connection open.
    pub stall: bool,
    /// After `[DONE]`, keeps the answer open instead of ending it.
    pub linger: bool,
}

impl Script {
    pub fn usage(input: i64, output: i64) -> Self {
        Self::default().and_usage(input, output)
    }

    pub fn sleep(seconds: f64) -> Self {
        Self {
            sleep: Some(seconds),
            ..Self::default()
        }
    }

    pub fn status(status: u16) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    pub fn bad_usage(how: BadUsage) -> Self {
        Self {
            bad_usage: Some(how),
            ..Self::default()
        }
    }

    pub fn no_session() -> Self {
        Self {
            no_session: true,
            ..Self::default()
        }
    }

    pub fn padding(bytes: usize) -> Self {
        Self {
            padding: Some(bytes),
            ..Self::default()
        }
    }

    pub fn hop_header() -> Self {
        Self {
            hop_header: true,
            ..Self::default()
        }
    }

    pub fn close() -> Self {
        Self {
            ending: Some(Ending::Close),
            ..Self::default()
        }
    }

    pub fn garbage() -> Self {
        Self {
            ending: Some(Ending::Garbage),
            ..Self::default()
        }
    }

    pub fn stream(events: u32, gap_ms: u64) -> Self {
        Self {
            stream: Some(StreamScript {
                events,
                gap_ms,
                ..StreamScript::default()
            }),
            ..Self::default()
        }
    }

    /// Every delta of the stream carries the running usage.
    pub fn running_usage(mut self) -> Self {
        if let Some(stream) = self.stream.as_mut() {
            stream.running_usage = true;
        }
        self
    }

    /// The stream stays open after its `[DONE]`.
    pub fn linger(mut self) -> Self {
        if let Some(stream) = self.stream.as_mut() {
            stream.linger = true;
        }
        self
    }

    /// The stream stalls after its deltas.
    pub fn stall(mut self) -> Self {
        if let Some(stream) = self.stream.as_mut() {
            stream.stall = true;
        }
        self
    }

    pub fn and_no_session(mut self) -> Self {
        self.no_session = true;
        self
    }

    pub fn and_bad_usage(mut self, how: BadUsage) -> Self {
        self.bad_usage = Some(how);
        self
    }

    pub fn and_usage(mut self, input: i64, output: i64) -> Self {
        self.usage = Some((input, output));
        self
    }

    pub fn hold(mut self) -> Self {
        self.hold = true;
        self
    }

    /// Reads a message: `Ok(None)` for plain text, `Err` for a script with a word the worker
    /// does not know.
    pub fn parse(message: &str) -> Result<Option<Self>, String> {
        let Some(words) = message.trim_start().strip_prefix(MARKER) else {
            return Ok(None);
        };
        let mut words = words.split_whitespace();
        let mut script = Script::default();
        let number = |words: &mut std::str::SplitWhitespace, what: &str| {
            let word = words.next().ok_or(format!("{what}: a number is missing"))?;
            word.parse::<f64>()
                .map_err(|_| format!("{what}: '{word}' is not a number"))
        };
        while let Some(word) = words.next() {
            match word {
                "usage" => {
                    let input = number(&mut words, "usage")? as i64;
                    let output = number(&mut words, "usage")? as i64;
                    script.usage = Some((input, output));
                }
                "sleep" => script.sleep = Some(number(&mut words, "sleep")?),
                "status" => script.status = Some(number(&mut words, "status")? as u16),
                "padding" => script.padding = Some(number(&mut words, "padding")? as usize),
                "hold" => script.hold = true,
                "stream" => {
                    let events = number(&mut words, "stream")? as u32;
                    let gap_ms = number(&mut words, "stream")? as u64;
                    script.stream = Some(StreamScript {
                        events,
                        gap_ms,
                        ..StreamScript::default()
                    });
                }
                "runningusage" | "stall" | "linger" => {
                    let stream = script
                        .stream
                        .as_mut()
                        .ok_or(format!("{word}: only after 'stream'"))?;
                    match word {
                        "stall" => stream.stall = true,
                        "linger" => stream.linger = true,
                        _ => stream.running_usage = true,
                    }
                }
                "nosession" => script.no_session = true,
                "hopheader" => script.hop_header = true,
                "close" => script.ending = Some(Ending::Close),
                "garbage" => script.ending = Some(Ending::Garbage),
                "badusage" => {
                    let word = words.next();
                    let how = [BadUsage::Missing]
                        .into_iter()
                        .chain(BadUsage::INVALID)
                        .find(|how| Some(how.word()) == word);
                    script.bad_usage = Some(how.ok_or(format!("badusage: unknown kind {word:?}"))?);
                }
                unknown => return Err(format!("unknown word '{unknown}' in {message:?}")),
            }
        }
        Ok(Some(script))
    }
}

/// The message form: `worker: usage 3 4 hold`.
impl fmt::Display for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MARKER)?;
        if let Some((input, output)) = self.usage {
            write!(f, " usage {input} {output}")?;
        }
        if let Some(how) = self.bad_usage {
            write!(f, " badusage {}", how.word())?;
        }
        if let Some(seconds) = self.sleep {
            write!(f, " sleep {seconds}")?;
        }
        if self.hold {
            f.write_str(" hold")?;
        }
        if let Some(status) = self.status {
            write!(f, " status {status}")?;
        }
        if self.no_session {
            f.write_str(" nosession")?;
        }
        if let Some(bytes) = self.padding {
            write!(f, " padding {bytes}")?;
        }
        if self.hop_header {
            f.write_str(" hopheader")?;
        }
        if let Some(stream) = self.stream {
            write!(f, " stream {} {}", stream.events, stream.gap_ms)?;
            if stream.running_usage {
                f.write_str(" runningusage")?;
            }
            if stream.stall {
                f.write_str(" stall")?;
            }
            if stream.linger {
                f.write_str(" linger")?;
            }
        }
        match self.ending {
            Some(Ending::Close) => f.write_str(" close"),
            Some(Ending::Garbage) => f.write_str(" garbage"),
            None => Ok(()),
        }
    }
}

#[test]
fn scripts_read_back_as_written_and_unknown_words_are_refused() {
    let scripts = [
        Script::usage(3, 4).hold(),
        Script::sleep(1.2),
        Script::status(503),
        Script::bad_usage(BadUsage::Strings),
        Script::no_session(),
        Script::padding(1000),
        Script::hop_header(),
        Script::close(),
        Script::garbage(),
        Script::stream(3, 10)
            .running_usage()
            .stall()
            .and_usage(5, 6),
        Script::stream(1, 0).linger(),
        Script::default(),
    ];
    for script in scripts {
        assert_eq!(Script::parse(&script.to_string()), Ok(Some(script.clone())));
    }
    assert_eq!(Script::parse("What are your business hours?"), Ok(None));
    assert!(Script::parse("worker: usage 3").is_err());
    assert!(Script::parse("worker: sleeep 1").is_err());
    assert!(Script::parse("worker: badusage sideways").is_err());
}
