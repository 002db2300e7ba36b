//! The chat body validator (SPEC §1): a JSON object, `message` a non-empty string,
//! `session_id` optional and `^[A-Za-z0-9_.:-]{1,128}$`, other fields forwarded unchanged.

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Map, Value};
use turnpike_core::body::{forwarded_body, is_json_content_type, parse_chat, BodyProblem};

use crate::json::{self, WrittenKeys};

/// SPEC's `[A-Za-z0-9_.:-]`, spelled out.
const SESSION_ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-";
/// URL-safe characters, of which a created session id is made after `sess_`.
const URL_SAFE: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

fn reference_is_session_id(id: &str) -> bool {
    (1..=128).contains(&id.chars().count()) && id.chars().all(|c| SESSION_ALPHABET.contains(c))
}

/// What SPEC says of a body, read as a JSON value: the client's session id, a created one
/// (`None`), or the name of the 400's reason.
fn reference_verdict(body: &Value) -> Result<Option<&str>, &'static str> {
    let Value::Object(fields) = body else {
        return Err("NotAnObject");
    };
    match fields.get("message") {
        None => return Err("MessageMissing"),
        Some(Value::String(message)) if message.is_empty() => return Err("MessageEmpty"),
        Some(Value::String(_)) => {}
        Some(_) => return Err("MessageNotString"),
    }
    match fields.get("session_id") {
        None => Ok(None),
        Some(Value::String(id)) if reference_is_session_id(id) => Ok(Some(id)),
        Some(_) => Err("BadSessionId"),
    }
}

fn problem_name(problem: &BodyProblem) -> &'static str {
    match problem {
        BodyProblem::Unreadable => "Unreadable",
        BodyProblem::ConflictingFraming => "ConflictingFraming",
        BodyProblem::NotAnObject => "NotAnObject",
        BodyProblem::NotJson(_) => "NotJson",
        BodyProblem::MessageMissing => "MessageMissing",
        BodyProblem::MessageNotString => "MessageNotString",
        BodyProblem::MessageEmpty => "MessageEmpty",
        BodyProblem::BadSessionId => "BadSessionId",
    }
}

/// The validator's verdict in the reference's terms.
fn verdict(body: &[u8]) -> Result<Option<String>, &'static str> {
    match parse_chat(body) {
        Ok(chat) if chat.session_created => {
            let rest = chat.session_id.strip_prefix("sess_");
            let well_made =
                rest.is_some_and(|r| r.len() >= 22 && r.chars().all(|c| URL_SAFE.contains(c)));
            assert!(well_made, "created session id {:?}", chat.session_id);
            Ok(None)
        }
        Ok(chat) => Ok(Some(chat.session_id)),
        Err(problem) => Err(problem_name(&problem)),
    }
}

/// A `message` field: absent, empty, a good string, or any JSON value at all.
fn message() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Value::from(""))),
        4 => any::<String>().prop_filter("non-empty", |m| !m.is_empty()).prop_map(|m| Some(Value::from(m))),
        2 => json::value().prop_map(Some),
    ]
}

/// A `session_id` field: absent, in the grammar, any string, or any JSON value.
fn session_id() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        2 => Just(None),
        3 => "[A-Za-z0-9_.:-]{1,128}".prop_map(|id| Some(Value::from(id))),
        1 => "[A-Za-z0-9_.:-]{129,140}".prop_map(|id| Some(Value::from(id))),
        1 => any::<String>().prop_map(|id| Some(Value::from(id))),
        1 => json::value().prop_map(Some),
    ]
}

/// A chat-shaped object: the two judged fields in any state, plus any other fields.
fn chat_object() -> impl Strategy<Value = Map<String, Value>> {
    (
        message(),
        session_id(),
        json::object_without(&["message", "session_id"]),
    )
        .prop_map(|(message, session_id, mut fields)| {
            if let Some(message) = message {
                fields.insert("message".into(), message);
            }
            if let Some(session_id) = session_id {
                fields.insert("session_id".into(), session_id);
            }
            fields
        })
}

proptest! {
    /// Arbitrary bytes never panic; whatever is accepted is, read independently, a JSON object
    /// with a non-empty string `message` and a valid `session_id` if any.
    #[test]
    fn arbitrary_bytes_never_panic(body in prop_oneof![
        vec(any::<u8>(), 0..200),
        "[ \t]{0,2}\\{[ -~]{0,40}\\}".prop_map(String::into_bytes),
    ]) {
        if let Ok(chat) = parse_chat(&body) {
            let value: Value = serde_json::from_slice(&body).expect("accepted bodies are JSON");
            let expected = reference_verdict(&value);
            prop_assert!(expected.is_ok(), "accepted {:?}", String::from_utf8_lossy(&body));
            prop_assert_eq!(expected.unwrap().is_none(), chat.session_created);
        }
        let object_like = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if !object_like {
            prop_assert_eq!(parse_chat(&body), Err(BodyProblem::NotAnObject));
        }
    }

    /// Any JSON value at all (mostly not chat-shaped) gets the reference's verdict.
    #[test]
    fn arbitrary_json_gets_the_reference_verdict(body in json::value(), layout in json::layout()) {
        let bytes = layout.write(&body);
        let expected = reference_verdict(&body).map(|id| id.map(str::to_owned));
        prop_assert_eq!(verdict(&bytes), expected);
    }

    /// Chat-shaped objects, valid and not: accepted exactly when SPEC says, refused for the
    /// reason SPEC's order gives (the message before the session id), the client's id kept.
    #[test]
    fn chat_objects_get_the_reference_verdict(fields in chat_object(), layout in json::layout()) {
        let body = Value::Object(fields);
        let bytes = layout.write(&body);
        let expected = reference_verdict(&body).map(|id| id.map(str::to_owned));
        prop_assert_eq!(verdict(&bytes), expected, "body {}", body);
    }

    /// A `message` or `session_id` written twice is refused: the gateway and the worker
    /// might believe different copies.
    #[test]
    fn duplicated_judged_fields_are_refused(
        fields in chat_object(),
        twice in prop::sample::select(vec!["message", "session_id"]),
        copy in json::value(),
    ) {
        prop_assume!(fields.contains_key(twice));
        let written = serde_json::to_string(&Value::Object(fields)).expect("serialises");
        let copy = serde_json::to_string(&copy).expect("serialises");
        let body = format!("{{\"{twice}\":{copy},{}", &written[1..]);
        prop_assert_eq!(verdict(body.as_bytes()), Err("NotJson"), "body {}", body);
    }

    /// When the gateway creates the session id, the worker's body is the client's object plus
    /// exactly one `session_id`; when the client sent one, the body goes unchanged.
    #[test]
    fn the_forwarded_body_adds_only_the_created_session_id(
        fields in chat_object(),
        layout in json::layout(),
    ) {
        let body = Value::Object(fields);
        let bytes = layout.write(&body);
        let Ok(chat) = parse_chat(&bytes) else { return Ok(()) };
        let forwarded = forwarded_body(&bytes, &chat);
        if !chat.session_created {
            prop_assert_eq!(forwarded, None);
            return Ok(());
        }
        let forwarded = forwarded.expect("a created session id is forwarded");
        let mut expected: Value = serde_json::from_slice(&bytes).expect("accepted bodies are JSON");
        expected["session_id"] = Value::from(chat.session_id.as_str());
        let got: Value = serde_json::from_slice(&forwarded).expect("the forwarded body is JSON");
        prop_assert_eq!(got, expected);
        let keys: WrittenKeys = serde_json::from_slice(&forwarded).expect("an object");
        prop_assert_eq!(keys.0.iter().filter(|k| *k == "session_id").count(), 1);
    }

    /// `application/json` in any case, with optional spaces and parameters, is JSON; arbitrary
    /// bytes never panic.
    #[test]
    fn json_content_types(
        case in vec(any::<bool>(), 16),
        space in "[ \t]{0,2}",
        parameter in proptest::option::of("[a-z]{1,8}=[A-Za-z0-9-]{1,8}"),
        arbitrary in vec(any::<u8>(), 0..40),
    ) {
        let media: String = "application/json"
            .chars()
            .zip(case)
            .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
            .collect();
        let value = match parameter {
            Some(parameter) => format!("{space}{media}{space};{space}{parameter}"),
            None => format!("{space}{media}{space}"),
        };
        prop_assert!(is_json_content_type(Some(value.as_bytes())), "{}", value);
        let _ = is_json_content_type(Some(&arbitrary));
    }
}
