//! API keys: parsing `Authorization`, hashing, and what a key may call.
//! The secret is hashed as soon as it is parsed and never stored, logged or forwarded.

use sha2::{Digest, Sha256};
use std::fmt;

use crate::ids::random_id;

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

    /// The same key, revoked.
    pub fn as_revoked(&self) -> std::sync::Arc<KeyRecord> {
        std::sync::Arc::new(KeyRecord {
            revoked: true,
            ..self.clone()
        })
    }
}

/// No `Authorization: Bearer <token>` a key could be read from: absent or garbled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoBearerToken;

/// Extracts the token of `Authorization: Bearer <token>` (scheme case-insensitive, exactly
/// one space, one token).
pub fn bearer_token(header: Option<&[u8]>) -> Result<&str, NoBearerToken> {
    let header = header.ok_or(NoBearerToken)?;
    let text = std::str::from_utf8(header).map_err(|_| NoBearerToken)?;
    let (scheme, token) = text.split_once(' ').ok_or(NoBearerToken)?;
    let well_formed = scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token.bytes().all(|b| b.is_ascii_graphic());
    if well_formed {
        Ok(token)
    } else {
        Err(NoBearerToken)
    }
}

/// Whether a token could be one of our keys at all; others are refused without a lookup.
///
/// A key in the generated form (46 base62 characters after `ak_`) must also carry a valid
/// checksum, so a mistyped or truncated generated key is refused without a store lookup.
pub fn looks_like_key(token: &str) -> bool {
    let Some(body) = token.strip_prefix("ak_") else {
        return false;
    };
    if body.len() == KEY_RANDOM_CHARS + KEY_CHECKSUM_CHARS && body.bytes().all(is_base62) {
        let (random, check) = body.split_at(KEY_RANDOM_CHARS);
        return checksum(random).as_bytes() == check.as_bytes();
    }
    !body.is_empty()
}

/// Random base62 characters in a generated key: 238 bits.
const KEY_RANDOM_CHARS: usize = 40;
/// Base62 digits of a generated key's checksum (62^6 > 2^32).
const KEY_CHECKSUM_CHARS: usize = 6;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn is_base62(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
}

/// The first 32 bits of SHA-256 of `random`, as six base62 digits.
fn checksum(random: &str) -> String {
    let digest = Sha256::digest(random.as_bytes());
    let mut n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) as u64;
    let mut digits = [b'0'; KEY_CHECKSUM_CHARS];
    for digit in digits.iter_mut().rev() {
        *digit = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&digits).into_owned()
}

/// A new client key: `ak_`, 40 random base62 characters and their 6-character checksum.
pub fn generate_key() -> String {
    let random = random_id("", KEY_RANDOM_CHARS);
    let check = checksum(&random);
    format!("ak_{random}{check}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_carry_a_checksum_that_catches_typos() {
        let key = generate_key();
        assert_eq!(key.len(), 3 + KEY_RANDOM_CHARS + KEY_CHECKSUM_CHARS);
        assert!(looks_like_key(&key));
        // Every single-character change of a generated key is caught before any lookup.
        let bytes = key.as_bytes();
        for at in 3..bytes.len() {
            let mut typo = bytes.to_vec();
            typo[at] = if bytes[at] == b'x' { b'y' } else { b'x' };
            let typo = String::from_utf8(typo).unwrap();
            assert!(!looks_like_key(&typo), "{typo}");
        }
        // Keys of any other shape (config keys chosen by operators) are looked up as before.
        for other in [
            "ak_123",
            "ak_0123456789abcdef0123456789abcdef",
            &key[..key.len() - 1],
        ] {
            assert!(looks_like_key(other), "{other}");
        }
        for refused in ["ak_", "sk_123", ""] {
            assert!(!looks_like_key(refused), "{refused}");
        }
    }

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
