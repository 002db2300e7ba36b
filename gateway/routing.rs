//! Which route a request line names, and where a call goes upstream. Pure string work:
//! the path is matched exactly as received, with no decoding or normalisation, so `..`,
//! `%2f`, `//` or trailing junk can never turn into a matching path.

use crate::error::GatewayError;

const PREFIX: &str = "/v1/agents/";
const SUFFIX: &str = "/chat";

/// The one public route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatRoute<'a> {
    pub agent_id: &'a str,
}

/// Matches `POST /v1/agents/{agent_id}/chat`; `path` excludes the query string.
/// A well-formed chat path with another method is 405, anything else 404.
pub fn match_route<'a>(
    method: &http::Method,
    path: &'a str,
) -> Result<ChatRoute<'a>, GatewayError> {
    let agent_id = path
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix(SUFFIX))
        .filter(|id| is_agent_id(id))
        .ok_or(GatewayError::NotFound)?;
    if method != http::Method::POST {
        return Err(GatewayError::MethodNotAllowed { allow: "POST" });
    }
    Ok(ChatRoute { agent_id })
}

/// `^ag_[A-Za-z0-9_-]{1,64}$`
pub fn is_agent_id(id: &str) -> bool {
    id.strip_prefix("ag_").is_some_and(|rest| {
        (1..=64).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
}

/// `^[A-Za-z0-9_.:-]{1,128}$`: also what a sane client `X-Request-Id` looks like.
pub fn is_session_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// An upstream path, possibly naming `{agent_id}`; split once at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    before: String,
    /// The text after `{agent_id}`, when the template names it.
    after: Option<String>,
}

impl PathTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        if !template.starts_with('/') {
            return Err(format!("'{template}' must start with '/'"));
        }
        if template
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(format!("'{template}' contains whitespace"));
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
    use http::Method;

    #[test]
    fn route_table() {
        let long = format!("/v1/agents/ag_{}/chat", "a".repeat(65));
        let max = format!("/v1/agents/ag_{}/chat", "a".repeat(64));
        let cases: &[(&Method, &str, Result<&str, GatewayError>)] = &[
            (
                &Method::POST,
                "/v1/agents/ag_c47e7c97_b2f2/chat",
                Ok("ag_c47e7c97_b2f2"),
            ),
            (&Method::POST, "/v1/agents/ag_a-b_C/chat", Ok("ag_a-b_C")),
            (&Method::POST, &max, Ok(&max[11..max.len() - 5])),
            (
                &Method::GET,
                "/v1/agents/ag_x/chat",
                Err(GatewayError::MethodNotAllowed { allow: "POST" }),
            ),
            (
                &Method::PUT,
                "/v1/agents/ag_x/chat",
                Err(GatewayError::MethodNotAllowed { allow: "POST" }),
            ),
            (&Method::POST, &long, Err(GatewayError::NotFound)),
            (
                &Method::POST,
                "/v1/agents/ag_/chat",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents/xx_a/chat",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents/../agents/ag_x/chat",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents/ag_x%2fchat",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents/ag_x%2Fy/chat",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents/ag_x%00/chat",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents//ag_x/chat",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "//v1/agents/ag_x/chat",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents/ag_x/chat/",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents/ag_x/chatty",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents/ag_x/./chat",
                Err(GatewayError::NotFound),
            ),
            (
                &Method::POST,
                "/v1/agents/ag_x/chat;x",
                Err(GatewayError::NotFound),
            ),
            (&Method::GET, "/", Err(GatewayError::NotFound)),
        ];
        for (method, path, expected) in cases {
            let got = match_route(method, path).map(|r| r.agent_id);
            assert_eq!(&got, expected, "{method} {path}");
        }
    }

    #[test]
    fn session_ids() {
        assert!(is_session_id("sess_customer_jane_001"));
        assert!(is_session_id("a.b:c-d_e"));
        assert!(!is_session_id(""));
        assert!(!is_session_id("has space"));
        assert!(!is_session_id("quote\""));
        assert!(!is_session_id(&"a".repeat(129)));
        assert!(is_session_id(&"a".repeat(128)));
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
