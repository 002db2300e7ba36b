//! `turnpike demo` (SPEC §4) as a newcomer meets it: the `curl` line it prints works when it
//! is run the instant it is printed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::gateway::BINARY;
use crate::support::*;

/// The demo process, killed when dropped.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_printed_curl_line_works_the_instant_it_is_printed() {
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let mut demo = Demo(
        Command::new(BINARY)
            .args(["demo", "--listen", &addr(free_port())])
            .args([
                "--admin",
                &addr(free_port()),
                "--worker",
                &addr(free_port()),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnpike demo starts"),
    );
    // Lines as they come, read on a thread of their own: a demo that prints nothing fails
    // the test after a while instead of hanging it.
    let stdout = demo.0.stdout.take().unwrap();
    let (lines, printed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let until = Instant::now() + Duration::from_secs(30);
    let next_command = |starts: &str| {
        let mut curl = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let line = printed
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the demo printed its '{starts}' line within 30 s"));
            if curl.is_empty() && !line.trim_start().starts_with(starts) {
                continue;
            }
            let continues = line.ends_with('\\');
            curl.push(line);
            if !continues {
                return curl.join("\n");
            }
        }
    };
    let chat = next_command("curl -s http");
    let streamed = next_command("curl -sN http");
    // At once, as printed: no wait, no retry.
    let run = |command: &str| {
        let out = Command::new("sh")
            .args(["-c", command])
            .output()
            .expect("sh runs the curl line");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "curl failed: {text} {:?}", out.status);
        text
    };
    let text = run(&chat);
    let answer: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(answer["response"].is_string(), "{answer}");
    assert!(answer["usage"]["total_tokens"].is_u64(), "{answer}");
    // The streamed one: a word per event, the usage, then [DONE].
    let text = run(&streamed);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert!(data.len() > 3, "{text}");
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let usage: Value = serde_json::from_str(data[data.len() - 2]).unwrap();
    assert!(usage["usage"]["total_tokens"].is_u64(), "{text}");
}
