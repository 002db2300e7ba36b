//! The client's request body: judged in full before anything is spent, and rewritten for
//! the worker only where the gateway must add the `session_id` it created.

use serde::Deserialize;
use serde_json::Value;
use std::fmt;

use crate::ids::{is_session_id, new_session_id};

/// What the gateway needs from a valid chat request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    pub session_id: String,
    /// Whether the gateway made the session id (and so must add it to the forwarded body).
    pub session_created: bool,
}

#[derive(Deserialize)]
struct ChatFields {
    #[serde(default, deserialize_with = "present")]
    message: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    session_id: Option<Value>,
}

/// Why a chat body was refused (400 `invalid_request`); the message is the client's to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyProblem {
    /// The body could not be read off the connection.
    Unreadable,
    /// Both `Content-Length` and `Transfer-Encoding`: two framings a server behind could read
    /// differently (request smuggling), so neither is trusted.
    ConflictingFraming,
    NotAnObject,
    /// The JSON parser's own account of what is wrong, and where.
    NotJson(String),
    MessageMissing,
    MessageNotString,
    MessageEmpty,
    BadSessionId,
}

impl fmt::Display for BodyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyProblem::Unreadable => f.write_str("Could not read the request body"),
            BodyProblem::ConflictingFraming => {
                f.write_str("Send Content-Length or Transfer-Encoding, not both")
            }
            BodyProblem::NotAnObject => f.write_str("Request body must be a JSON object"),
            BodyProblem::NotJson(detail) => write!(f, "Request body is not valid JSON: {detail}"),
            BodyProblem::MessageMissing => f.write_str("'message' is required"),
            BodyProblem::MessageNotString => f.write_str("'message' must be a string"),
            BodyProblem::MessageEmpty => f.write_str("'message' must not be empty"),
            BodyProblem::BadSessionId => {
                f.write_str("'session_id' must match ^[A-Za-z0-9_.:-]{1,128}$")
            }
        }
    }
}

/// `Some` whenever the field is in the body, even as `null`, so `null` can be refused.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// `application/json`, with parameters such as `charset` allowed.
pub fn is_json_content_type(value: Option<&[u8]>) -> bool {
    let Some(value) = value else { return false };
    let media_type = value.split(|&b| b == b';').next().unwrap_or_default();
    media_type
        .trim_ascii()
        .eq_ignore_ascii_case(b"application/json")
}

/// Validates a chat body: a JSON object whose `message` is a non-empty string and whose
/// optional `session_id` is well formed. Other fields are left alone.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, BodyProblem> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(BodyProblem::NotAnObject);
    }
    let fields: ChatFields =
        serde_json::from_slice(body).map_err(|e| BodyProblem::NotJson(e.to_string()))?;
    match fields.message {
        Some(Value::String(message)) if !message.is_empty() => {}
        Some(Value::String(_)) => return Err(BodyProblem::MessageEmpty),
        Some(_) => return Err(BodyProblem::MessageNotString),
        None => return Err(BodyProblem::MessageMissing),
    }
    match fields.session_id {
        None => Ok(ChatRequest {
            session_id: new_session_id(),
            session_created: true,
        }),
        Some(Value::String(id)) if is_session_id(&id) => Ok(ChatRequest {
            session_id: id,
            session_created: false,
        }),
        Some(_) => Err(BodyProblem::BadSessionId),
    }
}

/// The body the worker receives: the client's bytes, with `"session_id"` added first when
/// the gateway created it (the client's body has no such field then).
pub fn forwarded_body(body: &[u8], chat: &ChatRequest) -> Option<Vec<u8>> {
    if !chat.session_created {
        return None;
    }
    let open = body.iter().position(|&b| b == b'{')?;
    let mut out = Vec::with_capacity(body.len() + chat.session_id.len() + 20);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(b"\"session_id\":\"");
    out.extend_from_slice(chat.session_id.as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(&body[open + 1..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/json;charset=UTF-8",
        ] {
            assert!(is_json_content_type(Some(ok.as_bytes())), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/jsonx",
            "application/x-www-form-urlencoded",
            "",
        ] {
            assert!(!is_json_content_type(Some(bad.as_bytes())), "{bad}");
        }
        assert!(!is_json_content_type(None));
    }

    #[test]
    fn body_table() {
        let ok = |body: &str| parse_chat(body.as_bytes()).is_ok();
        assert!(ok(r#"{"message":"hi"}"#));
        assert!(ok(
            r#"{"message":"hi","session_id":"sess_1","extra":[1,{"a":2}]}"#
        ));
        use BodyProblem::*;
        let too_long = format!(r#"{{"message":"hi","session_id":"{}"}}"#, "a".repeat(129));
        // The kind of problem each is; a `NotJson` carries the parser's own words.
        let cases: &[(&str, BodyProblem)] = &[
            ("", NotAnObject),
            ("not json", NotAnObject),
            ("[]", NotAnObject),
            (r#"["message"]"#, NotAnObject),
            (r#""message""#, NotAnObject),
            ("{}", MessageMissing),
            (r#"{"message":""}"#, MessageEmpty),
            (r#"{"message":5}"#, MessageNotString),
            (r#"{"message":null}"#, MessageNotString),
            (r#"{"message":"hi","session_id":"bad id"}"#, BadSessionId),
            (r#"{"message":"hi","session_id":5}"#, BadSessionId),
            (r#"{"message":"hi","session_id":null}"#, BadSessionId),
            (&too_long, BadSessionId),
            (r#"{"message":"hi"} trailing"#, NotJson(String::new())),
            (
                r#"{"message":"hi","message":"again"}"#,
                NotJson(String::new()),
            ),
        ];
        for (bad, expected) in cases {
            let problem = parse_chat(bad.as_bytes()).expect_err(bad);
            let same_kind = std::mem::discriminant(&problem) == std::mem::discriminant(expected);
            assert!(same_kind, "{bad}: {problem:?}, expected {expected:?}");
        }
    }

    #[test]
    fn session_ids_are_kept_or_created() {
        let kept = parse_chat(br#"{"message":"hi","session_id":"sess_a"}"#).unwrap();
        assert_eq!(kept.session_id, "sess_a");
        assert_eq!(forwarded_body(b"{}", &kept), None);
        let created = parse_chat(br#"{"message":"hi"}"#).unwrap();
        assert!(created.session_id.starts_with("sess_") && created.session_id.len() == 29);
        assert!(created.session_created);
        let body = forwarded_body(br#" {"message":"hi","n":1}"#, &created).unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["session_id"], created.session_id.as_str());
        assert_eq!(value["message"], "hi");
        assert_eq!(value["n"], 1);
    }
}
