//! Which route a request line names, and where a call goes upstream. Pure string work:
//! the path is matched exactly as received, with no decoding or normalisation, so `..`,
//! `%2f`, `//` or trailing junk can never turn into a matching path.

use std::fmt;

use crate::ids::is_agent_id;

const PREFIX: &str = "/v1/agents/";
const SUFFIX: &str = "/chat";

/// The one public route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatRoute<'a> {
    pub agent_id: &'a str,
}

/// Why a request line names no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMiss {
    /// No such path (404).
    NotFound,
    /// The chat path with another method (405); `allow` is what it takes.
    MethodNotAllowed { allow: &'static str },
}

/// The request target of a raw HTTP/1 head (`POST <target> HTTP/1.1`), byte for byte, before
/// any parser tidied it (Pingora drops a fragment, for one).
pub fn request_line_target(head: &[u8]) -> &[u8] {
    // Empty lines may come before the request line (RFC 9112 §2.2); parsers skip them.
    let start = head
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(head.len());
    let line = head[start..]
        .split(|b| *b == b'\n')
        .next()
        .unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ').filter(|p| !p.is_empty());
    parts.next();
    parts.next().unwrap_or_default()
}

/// The path of a request target exactly as it came on the wire: everything before `?`.
/// A target with a fragment (`#`, which no client sends on the wire and which a parser
/// would silently drop) or bytes that are not UTF-8 names no path.
pub fn target_path(target: &[u8]) -> Result<&str, RouteMiss> {
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    if target.contains(&b'#') {
        return Err(RouteMiss::NotFound);
    }
    std::str::from_utf8(path).map_err(|_| RouteMiss::NotFound)
}

/// Matches `POST /v1/agents/{agent_id}/chat`; `path` excludes the query string.
/// A well-formed chat path with another method is a [`RouteMiss::MethodNotAllowed`].
pub fn match_route<'a>(method: &str, path: &'a str) -> Result<ChatRoute<'a>, RouteMiss> {
    let agent_id = path
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix(SUFFIX))
        .filter(|id| is_agent_id(id))
        .ok_or(RouteMiss::NotFound)?;
    if method != "POST" {
        return Err(RouteMiss::MethodNotAllowed { allow: "POST" });
    }
    Ok(ChatRoute { agent_id })
}

/// An upstream path, possibly naming `{agent_id}`; split once at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    before: String,
    /// The text after `{agent_id}`, when the template names it.
    after: Option<String>,
}

/// Why an upstream path template was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateProblem {
    NotAbsolute(String),
    Whitespace(String),
}

impl fmt::Display for TemplateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateProblem::NotAbsolute(t) => write!(f, "'{t}' must start with '/'"),
            TemplateProblem::Whitespace(t) => write!(f, "'{t}' contains whitespace"),
        }
    }
}

impl PathTemplate {
    pub fn parse(template: &str) -> Result<Self, TemplateProblem> {
        if !template.starts_with('/') {
            return Err(TemplateProblem::NotAbsolute(template.to_owned()));
        }
        if template
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(TemplateProblem::Whitespace(template.to_owned()));
        }
        let template = match template.split_once("{agent_id}") {
            Some((before, after)) => Self {
                before: before.to_owned(),
                after: Some(after.to_owned()),
            },
            None => Self {
                before: template.to_owned(),
                after: None,
            },
        };
        Ok(template)
    }

    /// The upstream path for one agent (agent ids are URL-safe, so nothing is escaped).
    pub fn render(&self, agent_id: &str) -> String {
        match &self.after {
            None => self.before.clone(),
            Some(after) => {
                let mut path =
                    String::with_capacity(self.before.len() + agent_id.len() + after.len());
                path.push_str(&self.before);
                path.push_str(agent_id);
                path.push_str(after);
                path
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_table() {
        let long = format!("/v1/agents/ag_{}/chat", "a".repeat(65));
        let max = format!("/v1/agents/ag_{}/chat", "a".repeat(64));
        let cases: &[(&str, &str, Result<&str, RouteMiss>)] = &[
            (
                "POST",
                "/v1/agents/ag_c47e7c97_b2f2/chat",
                Ok("ag_c47e7c97_b2f2"),
            ),
            ("POST", "/v1/agents/ag_a-b_C/chat", Ok("ag_a-b_C")),
            ("POST", &max, Ok(&max[11..max.len() - 5])),
            (
                "GET",
                "/v1/agents/ag_x/chat",
                Err(RouteMiss::MethodNotAllowed { allow: "POST" }),
            ),
            (
                "PUT",
                "/v1/agents/ag_x/chat",
                Err(RouteMiss::MethodNotAllowed { allow: "POST" }),
            ),
            ("POST", &long, Err(RouteMiss::NotFound)),
            ("POST", "/v1/agents/ag_/chat", Err(RouteMiss::NotFound)),
            ("POST", "/v1/agents/xx_a/chat", Err(RouteMiss::NotFound)),
            (
                "POST",
                "/v1/agents/../agents/ag_x/chat",
                Err(RouteMiss::NotFound),
            ),
            ("POST", "/v1/agents/ag_x%2fchat", Err(RouteMiss::NotFound)),
            ("POST", "/v1/agents/ag_x%2Fy/chat", Err(RouteMiss::NotFound)),
            ("POST", "/v1/agents/ag_x%00/chat", Err(RouteMiss::NotFound)),
            ("POST", "/v1/agents//ag_x/chat", Err(RouteMiss::NotFound)),
            ("POST", "//v1/agents/ag_x/chat", Err(RouteMiss::NotFound)),
            ("POST", "/v1/agents/ag_x/chat/", Err(RouteMiss::NotFound)),
            ("POST", "/v1/agents/ag_x/chatty", Err(RouteMiss::NotFound)),
            ("POST", "/v1/agents/ag_x/./chat", Err(RouteMiss::NotFound)),
            ("POST", "/v1/agents/ag_x/chat;x", Err(RouteMiss::NotFound)),
            ("GET", "/", Err(RouteMiss::NotFound)),
        ];
        for (method, path, expected) in cases {
            let got = match_route(method, path).map(|r| r.agent_id);
            assert_eq!(&got, expected, "{method} {path}");
        }
    }

    #[test]
    fn the_target_is_read_off_the_request_line() {
        let head = b"POST /v1/agents/ag_x/chat#frag HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(request_line_target(head), b"/v1/agents/ag_x/chat#frag");
        assert_eq!(request_line_target(b""), b"");
    }

    #[test]
    fn the_target_is_taken_as_sent() {
        let chat = "/v1/agents/ag_x/chat";
        assert_eq!(target_path(chat.as_bytes()), Ok(chat));
        assert_eq!(
            target_path(b"/v1/agents/ag_x/chat?a=1#b"),
            Err(RouteMiss::NotFound)
        );
        assert_eq!(target_path(b"/v1/agents/ag_x/chat?a=1"), Ok(chat));
        assert_eq!(
            target_path(b"/v1/agents/ag_x/chat#/../../admin"),
            Err(RouteMiss::NotFound)
        );
        assert_eq!(
            target_path(b"/v1/agents/ag_\xff/chat"),
            Err(RouteMiss::NotFound)
        );
    }

    #[test]
    fn path_templates() {
        let t = PathTemplate::parse("/internal/{agent_id}/invoke").unwrap();
        assert_eq!(t.render("ag_x"), "/internal/ag_x/invoke");
        assert_eq!(
            PathTemplate::parse("/chat").unwrap().render("ag_x"),
            "/chat"
        );
        assert!(PathTemplate::parse("chat").is_err());
        assert!(PathTemplate::parse("/a b").is_err());
    }
}
