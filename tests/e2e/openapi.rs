//! `docs/openapi.yaml` is kept true: a running gateway is driven through every operation it
//! documents and most statuses, and each answer must be documented for its path, method and
//! status, with the documented media type, headers and body schema.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};

use crate::support::*;

/// The document, as JSON.
fn document() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(pointer) => resolve(
            doc,
            doc.pointer(&pointer[1..]).expect("a $ref that resolves"),
        ),
        None => node,
    }
}

/// The JSON Schema keywords the document uses; anything else it would use is unchecked.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    let mut fail = |what: String| problems.push(format!("{at}: {what}"));
    if let Some(types) = schema.get("type") {
        let allowed: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let fits =
            allowed.contains(&actual) || (actual == "integer" && allowed.contains(&"number"));
        if !fits {
            fail(format!("{value} is not of type {types}"));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            fail(format!("{value} is not one of {options:?}"));
        }
    }
    if let Some(constant) = schema.get("const") {
        if constant != value {
            fail(format!("{value} is not {constant}"));
        }
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n < min {
            fail(format!("{n} is below {min}"));
        }
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let fitting = options
            .iter()
            .filter(|option| {
                let mut sub = Vec::new();
                validate(doc, option, value, at, &mut sub);
                sub.is_empty()
            })
            .count();
        if fitting != 1 {
            fail(format!(
                "{value} fits {fitting} of the oneOf options, not one"
            ));
        }
    }
    if let (Some(items), Value::Array(list)) = (schema.get("items"), value) {
        for (i, item) in list.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{i}]"), problems);
        }
    }
    let Value::Object(object) = value else { return };
    for name in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = name.as_str().unwrap();
        if !object.contains_key(name) {
            problems.push(format!("{at}: required field {name} is missing"));
        }
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    for (name, field) in object {
        let at = format!("{at}.{name}");
        match (
            properties.and_then(|p| p.get(name)),
            schema.get("additionalProperties"),
        ) {
            (Some(property), _) => validate(doc, property, field, &at, problems),
            (None, Some(Value::Bool(false))) => problems.push(format!("{at}: not documented")),
            (None, Some(extra)) if extra.is_object() => validate(doc, extra, field, &at, problems),
            (None, _) => {}
        }
    }
}

/// The documented path template `path` matches (`/admin/keys/{id}` for `/admin/keys/k1`).
fn template<'a>(doc: &'a Value, path: &str) -> Option<&'a str> {
    let path = path.split('?').next().unwrap();
    let segments: Vec<&str> = path.split('/').collect();
    doc["paths"]
        .as_object()?
        .keys()
        .map(String::as_str)
        .find(|t| {
            let parts: Vec<&str> = t.split('/').collect();
            parts.len() == segments.len()
                && parts
                    .iter()
                    .zip(&segments)
                    .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()))
        })
}

/// Checks one answer against the document; returns the operation it exercised.
fn conforms(doc: &Value, method: &str, path: &str, reply: &Reply) -> (String, String) {
    let template = template(doc, path).unwrap_or_else(|| panic!("{path} is not documented"));
    let operation = &doc["paths"][template][method.to_lowercase()];
    assert!(
        operation.is_object(),
        "{method} {template} is not documented"
    );
    let status = reply.status.to_string();
    let response = resolve(doc, &operation["responses"][&status]);
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which is not documented: {}",
        reply.body
    );
    for name in response["headers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(n, _)| n)
    {
        assert!(
            reply.header(name).is_some(),
            "{method} {path} {status}: documented header {name} is missing"
        );
    }
    let content = response["content"].as_object().expect("documented content");
    let media = reply.header("content-type").unwrap_or_default();
    let (documented, body_schema) = content
        .iter()
        .find(|(m, _)| media.starts_with(m.as_str()))
        .unwrap_or_else(|| {
            panic!("{method} {path} {status}: content type {media} is not documented")
        });
    if documented == "application/json" {
        let body: Value = serde_json::from_str(&reply.body)
            .unwrap_or_else(|e| panic!("{method} {path} {status}: not JSON ({e}): {}", reply.body));
        let mut problems = Vec::new();
        validate(doc, &body_schema["schema"], &body, "body", &mut problems);
        assert!(
            problems.is_empty(),
            "{method} {path} {status}: {problems:?}\n{body}"
        );
    }
    (method.to_owned(), template.to_owned())
}

#[test]
fn every_answer_is_as_documented_and_every_operation_is_exercised() {
    let doc = document();
    let w = Worker::start("w1");
    let gw = TestGateway::builder()
        .worker(&w)
        .timeout("1s")
        .max_body_bytes(1024)
        .policy(
            "standard",
            json!({"requests": {"rate": 1, "per": "1h", "burst": 3}}),
        )
        .account_balance("acct_bob", 0)
        .start();
    let mut seen = BTreeSet::new();
    let mut check = |method: &str, path: &str, reply: Reply| {
        seen.insert(conforms(&doc, method, path, &reply));
    };
    let chat = chat_path(AGENT);
    let auth = format!("Bearer {}", gw.jane());
    let json_type = ("Content-Type", "application/json");

    // The data plane, through most of the error table.
    check("POST", &chat, gw.chat(AGENT, gw.jane(), "hi"));
    check(
        "POST",
        &chat,
        gw.post_json_bytes(&chat, gw.jane(), b"{not json"),
    );
    check("POST", &chat, gw.call(AGENT).message("hi").send());
    check("POST", &chat, gw.chat(AGENT, gw.bob(), "hi"));
    check(
        "POST",
        &chat_path("ag_nobody"),
        gw.chat("ag_nobody", gw.jane(), "hi"),
    );
    check(
        "POST",
        &chat,
        gw.raw_request("GET", &chat, &[("Authorization", &auth)], b""),
    );
    let big = format!(r#"{{"message": "{}"}}"#, "x".repeat(2000));
    check(
        "POST",
        &chat,
        gw.post_json_bytes(&chat, gw.jane(), big.as_bytes()),
    );
    check(
        "POST",
        &chat,
        gw.post_bytes(
            &chat,
            &[("Authorization", &auth), ("Content-Type", "text/plain")],
            b"hi",
        ),
    );
    let padding = "x".repeat(20 * 1024);
    check(
        "POST",
        &chat,
        gw.raw_request(
            "POST",
            &chat,
            &[("Authorization", &auth), json_type, ("X-Pad", &padding)],
            br#"{"message":"hi"}"#,
        ),
    );
    check("POST", &chat, gw.chat(AGENT, gw.jane(), Script::garbage()));
    check("POST", &chat, gw.chat(AGENT, gw.jane(), Script::sleep(2.0)));
    let limited = gw.chat(AGENT, gw.jane(), "hi");
    assert_eq!(limited.status, 429, "{}", limited.body);
    check("POST", &chat, limited);

    // Health, readiness, metrics.
    for path in ["/healthz", "/readyz", "/metrics"] {
        check("GET", path, gw.open_get(path));
    }

    // The admin API.
    let new_key =
        json!({"account": "acct_jane", "agents": "*", "policy": "standard", "id": "key_doc"});
    let created = gw.admin_post("/admin/keys", &new_key);
    let secret = created.json()["key"].as_str().unwrap().to_string();
    assert!(
        secret.len() == 49 && secret[3..].bytes().all(|b| b.is_ascii_alphanumeric()),
        "{secret}"
    );
    check("POST", "/admin/keys", created);
    check(
        "POST",
        "/admin/keys",
        gw.admin_post("/admin/keys", &new_key),
    );
    check(
        "POST",
        "/admin/keys",
        gw.admin_post("/admin/keys", &json!({"account": "acct_jane"})),
    );
    check(
        "POST",
        "/admin/keys",
        gw.admin_call("POST", "/admin/keys", None, Some(&new_key)),
    );
    check(
        "GET",
        "/admin/keys/key_doc",
        gw.admin_get("/admin/keys/key_doc"),
    );
    check("GET", "/admin/keys/nope", gw.admin_get("/admin/keys/nope"));
    check(
        "DELETE",
        "/admin/keys/key_doc",
        gw.admin_delete("/admin/keys/key_doc"),
    );
    check(
        "DELETE",
        "/admin/keys/nope",
        gw.admin_delete("/admin/keys/nope"),
    );
    let balance = "/admin/accounts/acct_jane/balance";
    check("GET", balance, gw.admin_get(balance));
    check(
        "GET",
        "/admin/accounts/nobody/balance",
        gw.admin_get("/admin/accounts/nobody/balance"),
    );
    check("POST", balance, gw.admin_post(balance, &json!({"add": 5})));
    check(
        "POST",
        balance,
        gw.admin_post(balance, &json!({"add": 5, "set": 1})),
    );
    check(
        "GET",
        "/admin/usage",
        gw.admin_get("/admin/usage?account=acct_jane"),
    );
    check("GET", "/admin/policies", gw.admin_get("/admin/policies"));
    check(
        "POST",
        "/admin/reload",
        gw.admin_post("/admin/reload", &json!({})),
    );
    gw.files
        .write_policies_text("policies:\n  standard:\n    requests: {rate: 0, per: 1s}\n");
    check(
        "POST",
        "/admin/reload",
        gw.admin_post("/admin/reload", &json!({})),
    );

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| m.as_str() != "parameters")
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let missed: Vec<_> = documented.difference(&seen).collect();
    assert!(
        missed.is_empty(),
        "documented but never exercised: {missed:?}"
    );
}

#[test]
fn the_validator_finds_what_is_not_documented() {
    let doc = document();
    let mut problems = Vec::new();
    let schema = json!({"$ref": "#/components/schemas/Balance"});
    validate(
        &doc,
        &schema,
        &json!({"account": "a", "balance": 1, "reserved": 0}),
        "b",
        &mut problems,
    );
    assert!(problems.is_empty(), "{problems:?}");
    for wrong in [
        json!({"account": "a", "balance": 1}),
        json!({"account": "a", "balance": "1", "reserved": 0}),
        json!({"account": "a", "balance": 1, "reserved": -1}),
        json!({"account": "a", "balance": 1, "reserved": 0, "extra": true}),
    ] {
        let mut problems = Vec::new();
        validate(&doc, &schema, &wrong, "b", &mut problems);
        assert!(!problems.is_empty(), "{wrong} passed");
    }
}
