//! The shapes ids must have, and new random ones.

use rand::distributions::Alphanumeric;
use rand::Rng;

/// `^ag_[A-Za-z0-9_-]{1,64}$`
pub fn is_agent_id(id: &str) -> bool {
    id.strip_prefix("ag_").is_some_and(|rest| {
        (1..=64).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
}

/// `^[A-Za-z0-9_.:-]{1,128}$`: a session id, and also what a sane client `X-Request-Id` and
/// an admin-chosen key id look like.
pub fn is_session_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// `sess_` and 24 random URL-safe characters.
pub fn new_session_id() -> String {
    random_id("sess_", 24)
}

/// A request id for a call whose client sent none (or none sane).
pub fn new_request_id() -> String {
    random_id("req_", 24)
}

/// The gateway's own id of one call, unique per call (a client may reuse its request id).
pub fn new_call_id() -> String {
    random_id("call_", 20)
}

/// `prefix` followed by `len` random alphanumeric characters.
pub fn random_id(prefix: &str, len: usize) -> String {
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    id.extend(
        rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(len)
            .map(char::from),
    );
    id
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn new_ids_have_their_prefix_and_length() {
        let session = new_session_id();
        assert!(session.starts_with("sess_") && session.len() == 29);
        assert_ne!(new_session_id(), session);
        assert!(new_call_id().starts_with("call_"));
        assert!(is_session_id(&new_request_id()));
    }
}
