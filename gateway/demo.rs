//! `turnpike demo`: the gateway on the embedded store in front of a built-in agent worker,
//! with a fresh key, so a newcomer can make a real call with nothing else installed.

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use turnpike_core::ids::random_id;
use turnpike_core::keys::{generate_key, KeyHash};

const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");
const DEMO_POLICIES: [(&str, &str); 2] = [
    ("tiers.yaml", include_str!("../policies/tiers.yaml")),
    ("agents.yaml", include_str!("../policies/agents.yaml")),
];
/// Conversations the demo worker remembers before it starts forgetting.
const MAX_SESSIONS: usize = 10_000;
/// A streamed answer's pace: a word this often, as a model writes.
const WORD_GAP: Duration = Duration::from_millis(60);

/// Where the demo listens.
pub struct DemoAddrs {
    pub listen: String,
    pub admin: String,
    pub worker: String,
}

/// What the demo needs to start: a config on disk and the secrets to print.
pub struct DemoSetup {
    pub config_path: PathBuf,
    pub key: String,
    pub admin_token: String,
    pub addrs: DemoAddrs,
}

/// Writes the demo config, with a fresh key and admin token, into a temporary directory.
pub fn prepare(addrs: DemoAddrs) -> std::io::Result<DemoSetup> {
    let key = generate_key();
    let admin_token = random_id("adm_", 32);
    let dir = std::env::temp_dir().join(format!("turnpike-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies"))?;
    let config = DEMO_CONFIG
        .replace("{{KEY_SHA256}}", &KeyHash::of(&key).to_hex())
        .replace(
            "{{ADMIN_TOKEN_SHA256}}",
            &KeyHash::of(&admin_token).to_hex(),
        )
        .replace("{{LISTEN}}", &addrs.listen)
        .replace("{{ADMIN_LISTEN}}", &addrs.admin)
        .replace("{{WORKER}}", &addrs.worker);
    let config_path = dir.join("turnpike.yaml");
    std::fs::write(&config_path, config)?;
    for (name, text) in DEMO_POLICIES {
        std::fs::write(dir.join("policies").join(name), text)?;
    }
    Ok(DemoSetup {
        config_path,
        key,
        admin_token,
        addrs,
    })
}

/// The welcome text with a `curl` line that works against the running demo.
pub fn instructions(setup: &DemoSetup) -> String {
    let DemoAddrs {
        listen,
        admin,
        worker,
    } = &setup.addrs;
    format!(
        "Turnpike demo is running: gateway on http://{listen}, admin on http://{admin}, demo worker on {worker}.\n\
         \n\
         API key (shown once):  {key}\n\
         Admin token:           {admin_token}\n\
         \n\
         Try it:\n\
         \n  curl -s http://{listen}/v1/agents/ag_demo_support/chat \\\n    \
         -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n    \
         -d '{{\"message\": \"What are your business hours?\"}}'\n\
         \nStreamed, word by word (the demo worker streams when the body says \"stream\": true):\n\
         \n  curl -sN http://{listen}/v1/agents/ag_demo_support/chat \\\n    \
         -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n    \
         -d '{{\"message\": \"Tell me about refunds\", \"stream\": true}}'\n\
         \n  curl -s http://{admin}/admin/accounts/acct_demo/balance -H 'Authorization: Bearer {admin_token}'\n\
         \n  curl -s http://{admin}/metrics | grep turnpike_\n\
         \nPress Ctrl-C to stop.\n",
        key = setup.key,
        admin_token = setup.admin_token,
    )
}

/// Prints `text` once every one of `addrs` accepts connections, so the `curl` lines in it
/// work the moment they are printed (Pingora binds its listeners after `run` starts).
pub fn announce_when_listening(text: String, addrs: Vec<String>) -> Box<dyn ServiceWithDependents> {
    Box::new(background_service(
        "demo announcement",
        Announcement { text, addrs },
    ))
}

struct Announcement {
    text: String,
    addrs: Vec<String>,
}

#[async_trait]
impl BackgroundService for Announcement {
    async fn start(&self, shutdown: ShutdownWatch) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut all = true;
            for addr in &self.addrs {
                if tokio::net::TcpStream::connect(addr.as_str()).await.is_err() {
                    all = false;
                    break;
                }
            }
            if all {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{}", self.text);
                let _ = stdout.flush();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The built-in worker service, on `addr`.
pub fn worker_service(addr: &str) -> Service<DemoWorker> {
    let mut service = Service::new("turnpike demo worker".to_owned(), DemoWorker::default());
    service.add_tcp(addr);
    service
}

/// A toy agent: answers every message plausibly, remembers each conversation by
/// `session_id`, and reports token usage the way real workers do. Asked for
/// `"stream": true`, it streams its answer a word at a time as server-sent events, the
/// usage in the last event before `[DONE]`.
#[derive(Default)]
pub struct DemoWorker {
    conversations: Mutex<HashMap<String, Vec<String>>>,
}

#[async_trait]
impl HttpServerApp for DemoWorker {
    async fn process_new_http(
        self: &Arc<Self>,
        mut http: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        if !matches!(http.read_request().await, Ok(true)) {
            return None;
        }
        http.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = http.read_request_body().await {
            body.extend_from_slice(&chunk);
        }
        let request: Value = serde_json::from_slice(&body).unwrap_or_default();
        let message = request["message"].as_str().unwrap_or_default().to_owned();
        let session_id = request["session_id"]
            .as_str()
            .unwrap_or("sess_demo")
            .to_owned();
        let (reply, context_words) = self.reply(&session_id, &message);
        let usage = usage(context_words, &reply);
        let answered = if request["stream"] == Value::Bool(true) {
            stream_answer(&mut http, &reply, &session_id, usage).await
        } else {
            let answer = json!({"response": reply, "session_id": session_id, "usage": usage});
            json_answer(&mut http, &answer).await
        };
        if answered.is_err() {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&http);
        let reusable = http.finish().await.ok().flatten()?;
        Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
    }
}

async fn json_answer(http: &mut ServerSession, answer: &Value) -> pingora::Result<()> {
    let bytes = serde_json::to_vec(answer).unwrap_or_default();
    let mut head = ResponseHeader::build(200, Some(2))?;
    head.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    head.insert_header(http::header::CONTENT_LENGTH, bytes.len())?;
    http.write_response_header(Box::new(head)).await?;
    http.write_response_body(bytes.into(), true).await
}

/// The reply a word per event, the first naming the session, then the usage and `[DONE]`.
async fn stream_answer(
    http: &mut ServerSession,
    reply: &str,
    session_id: &str,
    usage: Value,
) -> pingora::Result<()> {
    let mut head = ResponseHeader::build(200, Some(3))?;
    head.insert_header(http::header::CONTENT_TYPE, "text/event-stream")?;
    head.insert_header(http::header::CACHE_CONTROL, "no-cache")?;
    head.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
    http.write_response_header(Box::new(head)).await?;
    let event = |data: &Value| Bytes::from(format!("data: {data}\n\n"));
    for (i, word) in reply.split_inclusive(' ').enumerate() {
        let mut delta = json!({ "delta": word });
        if i == 0 {
            delta["session_id"] = Value::from(session_id);
        }
        http.write_response_body(event(&delta), false).await?;
        tokio::time::sleep(WORD_GAP).await;
    }
    http.write_response_body(event(&json!({ "usage": usage })), false)
        .await?;
    http.write_response_body(Bytes::from_static(b"data: [DONE]\n\n"), true)
        .await
}

impl DemoWorker {
    /// The answer to `message`, and how many words of context the "model" read.
    fn reply(&self, session_id: &str, message: &str) -> (String, usize) {
        let mut conversations = self.conversations.lock();
        if conversations.len() >= MAX_SESSIONS && !conversations.contains_key(session_id) {
            conversations.clear();
        }
        let history = conversations.entry(session_id.to_owned()).or_default();
        history.push(message.to_owned());
        let context_words: usize = history.iter().map(|m| m.split_whitespace().count()).sum();
        let turn = history.len();
        let reply = match turn {
            1 => format!("Thanks for reaching out! You asked: \"{message}\". Our support team is available 9am-5pm, Monday to Friday."),
            _ => format!(
                "Turn {turn} of our conversation. Earlier you said \"{}\"; now: \"{message}\". Anything else I can help with?",
                history[turn - 2]
            ),
        };
        (reply, context_words)
    }
}

/// Roughly four characters, or three quarters of a word, per token.
fn usage(context_words: usize, reply: &str) -> Value {
    let input = (context_words * 4).div_ceil(3) as u64 + 12;
    let output = reply.len().div_ceil(4) as u64;
    json!({"input_tokens": input, "output_tokens": output, "total_tokens": input + output})
}
