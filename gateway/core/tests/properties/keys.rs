//! The key parser (SPEC §1: `Authorization: Bearer ak_...`, scheme case-insensitive, exactly
//! one space-separated token), as the gateway runs it: `bearer_token`, then `looks_like_key`.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use sha2::{Digest, Sha256};
use turnpike_core::keys::{bearer_token, generate_key, looks_like_key};

/// The module's documented bound on a token; SPEC sets none, a bound is only prudence.
const MAX_TOKEN_BYTES: usize = 256;
const BASE62: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The token of a header in the one accepted form: the six letters of `bearer` in any case,
/// one space, then 1 to 256 visible ASCII characters (so no space: exactly one token).
fn reference_bearer(header: &[u8]) -> Option<&str> {
    if header.len() < 8 || !header[..6].eq_ignore_ascii_case(b"bearer") || header[6] != b' ' {
        return None;
    }
    let token = &header[7..];
    let visible = token.iter().all(|&b| (0x21..=0x7e).contains(&b));
    if token.len() > MAX_TOKEN_BYTES || !visible {
        return None;
    }
    std::str::from_utf8(token).ok()
}

/// The documented checksum of a generated key: the first 32 bits of SHA-256 of the random
/// part, big-endian, as six base62 digits.
fn reference_checksum(random: &str) -> String {
    let digest = Sha256::digest(random.as_bytes());
    let mut n = u64::from(u32::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3],
    ]));
    let mut digits = Vec::new();
    for _ in 0..6 {
        digits.push(BASE62.as_bytes()[(n % 62) as usize]);
        n /= 62;
    }
    digits.reverse();
    String::from_utf8(digits).expect("base62 is ASCII")
}

/// Whether a token may be one of our keys: `ak_` and something; in the generated shape
/// (46 base62 characters) only with its checksum.
fn reference_is_key(token: &str) -> bool {
    let Some(body) = token.strip_prefix("ak_") else {
        return false;
    };
    let generated_shape = body.len() == 46 && body.chars().all(|c| BASE62.contains(c));
    if generated_shape {
        return reference_checksum(&body[..40]) == body[40..];
    }
    !body.is_empty()
}

/// The key a header carries, as the gateway reads it.
fn parsed_key(header: &[u8]) -> Option<&str> {
    bearer_token(Some(header))
        .ok()
        .filter(|t| looks_like_key(t))
}

fn scheme() -> impl Strategy<Value = String> {
    vec(any::<bool>(), 6).prop_map(|upper| {
        "bearer"
            .chars()
            .zip(upper)
            .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// `ak_` and visible ASCII, within the bound.
fn key_token() -> impl Strategy<Value = String> {
    vec(0x21u8..=0x7e, 1..=MAX_TOKEN_BYTES - 3)
        .prop_map(|body| format!("ak_{}", String::from_utf8(body).expect("ASCII")))
}

fn generated_key() -> impl Strategy<Value = String> {
    "[0-9A-Za-z]{40}".prop_map(|random| format!("ak_{random}{}", reference_checksum(&random)))
}

/// One way a good header can go wrong (or, for a case change in the scheme, stay good).
#[derive(Debug, Clone)]
enum Garble {
    Lead(&'static str),
    Trail(&'static str),
    Separator(&'static str),
    Scheme(&'static str),
    SecondToken(String),
    Pad(usize),
    InsertByte(Index, u8),
    RemoveByte(Index),
    ReplaceByte(Index, u8),
    FlipCase(Index),
}

fn whitespace() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        " ", "  ", "\t", "\r", "\n", "\r\n", "\u{a0}", "\0", ",",
    ])
}

fn garble() -> impl Strategy<Value = Garble> {
    let byte = prop_oneof![
        prop::sample::select(b" \t\r\n\0\x7f,;=\"".to_vec()),
        any::<u8>()
    ];
    prop_oneof![
        whitespace().prop_map(Garble::Lead),
        whitespace().prop_map(Garble::Trail),
        prop_oneof![whitespace(), prop::sample::select(vec!["", ":", "=", ": "])]
            .prop_map(Garble::Separator),
        prop::sample::select(vec![
            "Basic", "Token", "Bearer:", "Bearerx", "Bear", "", "Bearer ", "ak", "Beаrer"
        ])
        .prop_map(Garble::Scheme),
        "[ -~]{0,8}".prop_map(Garble::SecondToken),
        (0usize..8).prop_map(Garble::Pad),
        (any::<Index>(), byte.clone()).prop_map(|(at, b)| Garble::InsertByte(at, b)),
        any::<Index>().prop_map(Garble::RemoveByte),
        (any::<Index>(), byte).prop_map(|(at, b)| Garble::ReplaceByte(at, b)),
        any::<Index>().prop_map(Garble::FlipCase),
    ]
}

/// A header as its three parts, so a garble can aim at one of them.
#[derive(Debug, Clone)]
struct Header {
    scheme: Vec<u8>,
    separator: Vec<u8>,
    token: Vec<u8>,
}

impl Header {
    fn bytes(&self) -> Vec<u8> {
        [&self.scheme[..], &self.separator, &self.token].concat()
    }

    fn garble(&mut self, garble: &Garble) {
        match garble {
            Garble::Lead(ws) => self.scheme = [ws.as_bytes(), &self.scheme].concat(),
            Garble::Trail(ws) => self.token.extend_from_slice(ws.as_bytes()),
            Garble::Separator(sep) => self.separator = sep.as_bytes().to_vec(),
            Garble::Scheme(scheme) => self.scheme = scheme.as_bytes().to_vec(),
            Garble::SecondToken(second) => {
                self.token.push(b' ');
                self.token.extend_from_slice(second.as_bytes());
            }
            // Around the documented bound: 254..=261 bytes of token.
            Garble::Pad(extra) => {
                let missing = (MAX_TOKEN_BYTES - 2 + extra).saturating_sub(self.token.len());
                self.token.extend(std::iter::repeat_n(b'x', missing));
            }
            Garble::InsertByte(at, b) => {
                let i = at.index(self.token.len() + 1);
                self.token.insert(i, *b);
            }
            Garble::RemoveByte(at) if !self.token.is_empty() => {
                let i = at.index(self.token.len());
                self.token.remove(i);
            }
            Garble::ReplaceByte(at, b) if !self.token.is_empty() => {
                let i = at.index(self.token.len());
                self.token[i] = *b;
            }
            Garble::RemoveByte(_) | Garble::ReplaceByte(..) => {}
            Garble::FlipCase(at) => {
                let i = at.index(self.scheme.len().max(1));
                if let Some(b) = self.scheme.get_mut(i) {
                    if b.is_ascii_alphabetic() {
                        *b ^= 0x20;
                    }
                }
            }
        }
    }
}

proptest! {
    /// Arbitrary bytes never panic either step; an accepted token is a tail of the header.
    #[test]
    fn arbitrary_headers_never_panic(header in vec(any::<u8>(), 0..300)) {
        if let Ok(token) = bearer_token(Some(&header)) {
            prop_assert!(header.ends_with(token.as_bytes()));
            let _ = looks_like_key(token);
        }
        let _ = looks_like_key(&String::from_utf8_lossy(&header));
    }

    /// `Bearer ak_...` with the scheme in any case and one space is read back token for token.
    #[test]
    fn valid_headers_give_their_key(scheme in scheme(), token in prop_oneof![key_token(), generated_key()]) {
        let header = format!("{scheme} {token}");
        prop_assert_eq!(bearer_token(Some(header.as_bytes())), Ok(token.as_str()));
        prop_assert_eq!(looks_like_key(&token), reference_is_key(&token));
    }

    /// Garbled headers: accepted exactly when the reference accepts them, with the same key.
    #[test]
    fn garbled_headers_are_refused_unless_the_reference_accepts(
        scheme in scheme(),
        token in prop_oneof![key_token(), generated_key()],
        garbles in vec(garble(), 1..4),
    ) {
        let mut header = Header { scheme: scheme.into_bytes(), separator: b" ".to_vec(), token: token.into_bytes() };
        for garble in &garbles {
            header.garble(garble);
        }
        let header = header.bytes();
        let expected = reference_bearer(&header).filter(|t| reference_is_key(t));
        prop_assert_eq!(parsed_key(&header), expected, "header {:?}", String::from_utf8_lossy(&header));
        prop_assert_eq!(bearer_token(Some(&header)).ok(), reference_bearer(&header));
    }

    /// A one-character typo in a generated key (base62 for base62, anywhere after `ak_`)
    /// is refused before any lookup, and the untouched key is accepted.
    #[test]
    fn typos_in_generated_keys_are_refused(key in generated_key(), at in 3usize..49, with in "[0-9A-Za-z]") {
        prop_assert!(looks_like_key(&key));
        prop_assume!(key[at..=at] != with);
        let typo = format!("{}{with}{}", &key[..at], &key[at + 1..]);
        prop_assert!(!looks_like_key(&typo), "{}", typo);
    }

    /// The module's own generated keys carry the documented checksum (so the reference above
    /// is the module's rule, not a guess).
    #[test]
    fn generated_keys_follow_the_documented_checksum(_round in 0..4u8) {
        let key = generate_key();
        prop_assert_eq!(key.len(), 49);
        prop_assert_eq!(reference_checksum(&key[3..43]), &key[43..]);
    }
}
