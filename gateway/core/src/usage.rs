//! Reading what the worker reported: its `usage`, and whether it named the session.
//!
//! A worker is trusted for its answer, not for its arithmetic: a missing, negative,
//! fractional, inconsistent or absurd `usage` is never credited, and the reason is counted.
//! An answer with no `usage` costs nothing (the contract's rule); one whose `usage` is there
//! but wrong is *invalid*, and the gateway never lets it pass for free.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// More tokens than any single call could plausibly use.
pub const MAX_TOKENS_PER_CALL: u64 = 100_000_000;

/// Token counts of one call, as the worker reported them and we accepted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

/// Why a worker's `usage` was not credited; also the `reason` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageProblem {
    NotJson,
    /// No `usage` field (or `null`).
    Missing,
    /// `usage` is not an object, or lacks `input_tokens` / `output_tokens`.
    Malformed,
    NotAnInteger,
    Absurd,
    Inconsistent,
}

impl UsageProblem {
    pub const ALL: [UsageProblem; 6] = [
        UsageProblem::NotJson,
        UsageProblem::Missing,
        UsageProblem::Malformed,
        UsageProblem::NotAnInteger,
        UsageProblem::Absurd,
        UsageProblem::Inconsistent,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UsageProblem::NotJson => "not_json",
            UsageProblem::Missing => "missing",
            UsageProblem::Malformed => "malformed",
            UsageProblem::NotAnInteger => "not_an_integer",
            UsageProblem::Absurd => "absurd",
            UsageProblem::Inconsistent => "inconsistent",
        }
    }

    /// A `usage` the worker did send, but wrong: never a free call. An answer that is not a
    /// JSON object or has no `usage` simply carries none.
    pub fn is_invalid(self) -> bool {
        !matches!(self, UsageProblem::NotJson | UsageProblem::Missing)
    }
}

/// What the gateway reads from a worker's JSON answer: its usage, and whether it names the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerReading {
    pub usage: Result<Usage, UsageProblem>,
    pub session: SessionField,
    pub is_object: bool,
}

/// The answer's `session_id` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionField {
    /// A string: the worker named the session.
    Named,
    Absent,
    /// There, but `null` or not a string: the gateway puts the session's id in its place.
    NotAString,
}

#[derive(Deserialize)]
struct AnswerFields<'a> {
    usage: Option<Value>,
    /// Borrowed, not copied: only whether it is a string matters. `Some("null")` for an
    /// explicit `null`, `None` when the field is absent.
    #[serde(borrow, default, deserialize_with = "present")]
    session_id: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Reads `usage` and `session_id` from a worker's answer body without copying the rest.
pub fn read_answer(body: &[u8]) -> AnswerReading {
    let is_object = first_non_space(body) == Some(b'{');
    let not_json = AnswerReading {
        usage: Err(UsageProblem::NotJson),
        session: SessionField::Absent,
        is_object: false,
    };
    if !is_object {
        return not_json;
    }
    let Ok(fields) = serde_json::from_slice::<AnswerFields>(body) else {
        // An object that names `usage` but does not parse (cut short, `usage` twice) carries
        // a usage that is wrong, not none: never a free call.
        if contains(body, b"\"usage\"") {
            return AnswerReading {
                usage: Err(UsageProblem::Malformed),
                ..not_json
            };
        }
        return not_json;
    };
    AnswerReading {
        usage: match &fields.usage {
            None | Some(Value::Null) => Err(UsageProblem::Missing),
            Some(usage) => parse_usage(usage),
        },
        session: match fields.session_id {
            None => SessionField::Absent,
            Some(raw) if raw.get().starts_with('"') => SessionField::Named,
            Some(_) => SessionField::NotAString,
        },
        is_object: true,
    }
}

/// The body the client gets, when it differs from the worker's: a JSON object always names
/// its session, exactly once. `None`: the worker's body as it is.
pub fn client_body(body: &[u8], reading: &AnswerReading, session_id: &str) -> Option<Vec<u8>> {
    if !reading.is_object {
        return None;
    }
    match reading.session {
        SessionField::Named => None,
        SessionField::Absent => Some(with_session_id(body, session_id)),
        // Rare enough to rewrite whole: the field must be replaced, not named twice.
        SessionField::NotAString => {
            let mut object: serde_json::Map<String, Value> = serde_json::from_slice(body).ok()?;
            object.insert("session_id".into(), Value::String(session_id.into()));
            serde_json::to_vec(&object).ok()
        }
    }
}

/// Judges a `usage` object. `total_tokens` may be left out (then it is input + output); when
/// present it must equal input + output, since it drives the token bucket.
pub fn parse_usage(usage: &Value) -> Result<Usage, UsageProblem> {
    let Value::Object(fields) = usage else {
        return Err(UsageProblem::Malformed);
    };
    let count = |name: &str| -> Result<Option<u64>, UsageProblem> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= MAX_TOKENS_PER_CALL => Ok(Some(v)),
                Some(_) => Err(UsageProblem::Absurd),
                None => Err(UsageProblem::NotAnInteger),
            },
            Some(_) => Err(UsageProblem::NotAnInteger),
        }
    };
    let (Some(input_tokens), Some(output_tokens)) =
        (count("input_tokens")?, count("output_tokens")?)
    else {
        return Err(UsageProblem::Malformed);
    };
    let total = count("total_tokens")?;
    let sum = input_tokens + output_tokens;
    // The same cap whether or not the worker wrote the total out.
    if sum > MAX_TOKENS_PER_CALL {
        return Err(UsageProblem::Absurd);
    }
    match total {
        Some(total) if total != sum => Err(UsageProblem::Inconsistent),
        _ => Ok(Usage {
            input_tokens,
            output_tokens,
            total_tokens: sum,
        }),
    }
}

/// Returns the worker's JSON object with `"session_id": session_id` added as its last field.
/// The caller has checked that `body` is an object; `session_id` is already validated
/// (URL-safe characters only), so it needs no escaping.
pub fn with_session_id(body: &[u8], session_id: &str) -> Vec<u8> {
    let end = body.iter().rposition(|&b| b == b'}').unwrap_or(body.len());
    let inside = &body[..end];
    let empty = inside
        .iter()
        .rev()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    let mut out = Vec::with_capacity(body.len() + session_id.len() + 20);
    out.extend_from_slice(inside);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(b"\"session_id\":\"");
    out.extend_from_slice(session_id.as_bytes());
    out.extend_from_slice(b"\"}");
    out.extend_from_slice(&body[(end + 1).min(body.len())..]);
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn first_non_space(body: &[u8]) -> Option<u8> {
    body.iter().copied().find(|b| !b.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(i: u64, o: u64) -> Result<Usage, UsageProblem> {
        Ok(Usage {
            input_tokens: i,
            output_tokens: o,
            total_tokens: i + o,
        })
    }

    #[test]
    fn usage_table() {
        use UsageProblem::*;
        let cases: &[(&str, Result<Usage, UsageProblem>)] = &[
            (
                r#"{"usage":{"input_tokens":45,"output_tokens":32,"total_tokens":77}}"#,
                usage(45, 32),
            ),
            (
                r#"{"usage":{"input_tokens":45,"output_tokens":32}}"#,
                usage(45, 32),
            ),
            (
                r#"{"usage":{"input_tokens":0,"output_tokens":0,"total_tokens":0}}"#,
                usage(0, 0),
            ),
            (r#"{"response":"hi"}"#, Err(Missing)),
            (r#"{"usage":null}"#, Err(Missing)),
            (r#"{"usage":[1,2]}"#, Err(Malformed)),
            (r#"{"usage":"77"}"#, Err(Malformed)),
            (r#"{"usage":{"input_tokens":45}}"#, Err(Malformed)),
            (
                r#"{"usage":{"input_tokens":-5,"output_tokens":3}}"#,
                Err(NotAnInteger),
            ),
            (
                r#"{"usage":{"input_tokens":1.5,"output_tokens":3}}"#,
                Err(NotAnInteger),
            ),
            (
                r#"{"usage":{"input_tokens":"12","output_tokens":3}}"#,
                Err(NotAnInteger),
            ),
            (
                r#"{"usage":{"input_tokens":1e30,"output_tokens":3}}"#,
                Err(NotAnInteger),
            ),
            (
                r#"{"usage":{"input_tokens":100000001,"output_tokens":3}}"#,
                Err(Absurd),
            ),
            (
                r#"{"usage":{"input_tokens":1,"output_tokens":3,"total_tokens":5}}"#,
                Err(Inconsistent),
            ),
            (
                r#"[{"usage":{"input_tokens":1,"output_tokens":3}}]"#,
                Err(NotJson),
            ),
            (
                r#"{"usage":{"input_tokens":1,"output_tokens":3}"#,
                Err(Malformed),
            ),
            (
                r#"{"usage":{"input_tokens":1,"output_tokens":3},"usage":{}}"#,
                Err(Malformed),
            ),
            (r#"{"response":"cut sh"#, Err(NotJson)),
            ("", Err(NotJson)),
        ];
        for (body, expected) in cases {
            assert_eq!(read_answer(body.as_bytes()).usage, *expected, "{body}");
        }
    }

    #[test]
    fn session_presence() {
        let session = |body: &str| read_answer(body.as_bytes()).session;
        assert_eq!(
            session(r#"{"session_id":"s","usage":{}}"#),
            SessionField::Named
        );
        assert_eq!(
            session("{ \"session_id\" :\n  \"s\" }"),
            SessionField::Named
        );
        assert_eq!(session(r#"{"usage":{}}"#), SessionField::Absent);
        assert_eq!(session(r#"{"session_id":null}"#), SessionField::NotAString);
        assert_eq!(session(r#"{"session_id":7}"#), SessionField::NotAString);
    }

    #[test]
    fn a_session_id_that_is_not_a_string_is_replaced_not_repeated() {
        let body = br#"{"response":"hi","session_id":null}"#;
        let out = client_body(body, &read_answer(body), "sess_1").unwrap();
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"response": "hi", "session_id": "sess_1"})
        );
    }

    #[test]
    fn inserting_a_session_id_keeps_the_rest_byte_for_byte() {
        let cases = [
            (
                r#"{"response":"hi"}"#,
                r#"{"response":"hi","session_id":"sess_1"}"#,
            ),
            ("{ \"a\": 1 }\n", "{ \"a\": 1 ,\"session_id\":\"sess_1\"}\n"),
            ("{}", r#"{"session_id":"sess_1"}"#),
            ("{ \n }", "{ \n \"session_id\":\"sess_1\"}"),
            (r#"{"r":"}"}"#, r#"{"r":"}","session_id":"sess_1"}"#),
        ];
        for (body, expected) in cases {
            let out = with_session_id(body.as_bytes(), "sess_1");
            assert_eq!(String::from_utf8(out.clone()).unwrap(), expected);
            let parsed: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(parsed["session_id"], "sess_1");
        }
    }
}
