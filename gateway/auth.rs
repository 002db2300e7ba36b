//! API keys: parsing `Authorization`, hashing, and what a key may call.
//! The secret is hashed as soon as it is parsed and never stored, logged or forwarded.

use sha2::{Digest, Sha256};
use std::fmt;

use crate::error::GatewayError;

/// Longest bearer token accepted; anything longer is garbled.
const MAX_TOKEN_LEN: usize = 256;

/// SHA-256 of a full `ak_` key: the only form in which a key is stored or compared.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// Parses 64 lowercase or uppercase hex digits.
    pub fn from_hex(hex_digits: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.to_hex())
    }
}

/// Which agents a key may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentScope {
    All,
    Only(Vec<String>),
}

impl AgentScope {
    pub fn allows(&self, agent: &str) -> bool {
        match self {
            AgentScope::All => true,
            AgentScope::Only(agents) => agents.iter().any(|a| a == agent),
        }
    }
}

/// A key as the store knows it: public id, owner and permissions, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub account: String,
    pub agents: AgentScope,
    pub policy: String,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
    pub revoked: bool,
}

impl KeyRecord {
    /// Whether the key may be used at `now_unix` (seconds).
    pub fn is_live(&self, now_unix: i64) -> bool {
        !self.revoked && self.expires_at.is_none_or(|at| now_unix < at)
    }
}

/// Extracts the token of `Authorization: Bearer <token>` (scheme case-insensitive, exactly
/// one space, one token). Anything else is `missing_api_key`.
pub fn bearer_token(header: Option<&[u8]>) -> Result<&str, GatewayError> {
    let header = header.ok_or(GatewayError::MissingApiKey)?;
    let text = std::str::from_utf8(header).map_err(|_| GatewayError::MissingApiKey)?;
    let (scheme, token) = text.split_once(' ').ok_or(GatewayError::MissingApiKey)?;
    let well_formed = scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token.bytes().all(|b| b.is_ascii_graphic());
    if well_formed {
        Ok(token)
    } else {
        Err(GatewayError::MissingApiKey)
    }
}

/// Whether a token could be one of our keys at all; others are refused without a lookup.
pub fn looks_like_key(token: &str) -> bool {
    token.starts_with("ak_") && token.len() > 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing_table() {
        let cases: &[(Option<&str>, Option<&str>)] = &[
            (Some("Bearer ak_123"), Some("ak_123")),
            (Some("bearer ak_123"), Some("ak_123")),
            (Some("BEARER ak_123"), Some("ak_123")),
            (None, None),
            (Some(""), None),
            (Some("Bearer"), None),
            (Some("Bearer "), None),
            (Some("Bearer  ak_123"), None),
            (Some("Bearer ak_1 ak_2"), None),
            (Some("Basic ak_123"), None),
            (Some("Bearerak_123"), None),
            (Some("Bearer ak_\u{e9}"), None),
        ];
        for (header, expected) in cases {
            let got = bearer_token(header.map(str::as_bytes)).ok();
            assert_eq!(got, *expected, "{header:?}");
        }
        let too_long = format!("Bearer ak_{}", "x".repeat(300));
        assert!(bearer_token(Some(too_long.as_bytes())).is_err());
    }

    #[test]
    fn hashes_match_the_documented_form() {
        let hash = KeyHash::of("ak_test");
        let hex_form = hash.to_hex();
        assert_eq!(hex_form.len(), 64);
        assert_eq!(KeyHash::from_hex(&hex_form), Some(hash));
        assert_eq!(KeyHash::from_hex(&hex_form.to_uppercase()), Some(hash));
        assert_eq!(KeyHash::from_hex("abc"), None);
        assert_eq!(
            KeyHash::of("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn scope_and_liveness() {
        let key = KeyRecord {
            id: "k".into(),
            account: "a".into(),
            agents: AgentScope::Only(vec!["ag_a".into()]),
            policy: "p".into(),
            expires_at: Some(100),
            revoked: false,
        };
        assert!(key.agents.allows("ag_a"));
        assert!(!key.agents.allows("ag_b"));
        assert!(AgentScope::All.allows("ag_b"));
        assert!(key.is_live(99));
        assert!(!key.is_live(100));
        assert!(!KeyRecord {
            revoked: true,
            expires_at: None,
            ..key
        }
        .is_live(0));
    }
}
