//! Reading what the worker reported: its `usage`, and whether it named the session.
//!
//! A worker is trusted for its answer, not for its arithmetic: a missing, negative,
//! fractional, inconsistent or absurd `usage` is never credited, and the reason is counted.

use serde::de::IgnoredAny;
use serde::Deserialize;
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
    Missing,
    NotAnInteger,
    Absurd,
    Inconsistent,
}

impl UsageProblem {
    pub fn label(self) -> &'static str {
        match self {
            UsageProblem::NotJson => "not_json",
            UsageProblem::Missing => "missing",
            UsageProblem::NotAnInteger => "not_an_integer",
            UsageProblem::Absurd => "absurd",
            UsageProblem::Inconsistent => "inconsistent",
        }
    }
}

/// What the gateway reads from a worker's JSON answer: its usage, and whether it names the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerReading {
    pub usage: Result<Usage, UsageProblem>,
    /// Whether the answer is a JSON object that already carries `session_id`.
    pub has_session_id: bool,
    pub is_object: bool,
}

#[derive(Deserialize)]
struct AnswerFields {
    usage: Option<Value>,
    session_id: Option<IgnoredAny>,
}

/// Reads `usage` and `session_id` from a worker's answer body without copying the rest.
pub fn read_answer(body: &[u8]) -> AnswerReading {
    let is_object = first_non_space(body) == Some(b'{');
    let not_json = AnswerReading {
        usage: Err(UsageProblem::NotJson),
        has_session_id: false,
        is_object: false,
    };
    if !is_object {
        return not_json;
    }
    let Ok(fields) = serde_json::from_slice::<AnswerFields>(body) else {
        return not_json;
    };
    AnswerReading {
        usage: fields
            .usage
            .as_ref()
            .map_or(Err(UsageProblem::Missing), parse_usage),
        has_session_id: fields.session_id.is_some(),
        is_object: true,
    }
}

/// Judges a `usage` object. `total_tokens` may be left out (then it is input + output); when
/// present it must equal input + output, since it drives the token bucket.
pub fn parse_usage(usage: &Value) -> Result<Usage, UsageProblem> {
    let Value::Object(fields) = usage else {
        return Err(UsageProblem::Missing);
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
        return Err(UsageProblem::Missing);
    };
    let sum = input_tokens + output_tokens;
    match count("total_tokens")? {
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
            (r#"{"usage":[1,2]}"#, Err(Missing)),
            (r#"{"usage":{"input_tokens":45}}"#, Err(Missing)),
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
                Err(NotJson),
            ),
            ("", Err(NotJson)),
        ];
        for (body, expected) in cases {
            assert_eq!(read_answer(body.as_bytes()).usage, *expected, "{body}");
        }
    }

    #[test]
    fn session_presence() {
        assert!(read_answer(br#"{"session_id":"s","usage":{}}"#).has_session_id);
        assert!(!read_answer(br#"{"usage":{}}"#).has_session_id);
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
