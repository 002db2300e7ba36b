//! Property tests for the core's pure parsers: the route matcher, the `Authorization` key
//! parser, the chat body validator, the worker's `usage`, and the HTTP/2 `:path` watch with
//! its HPACK decoder. Each checks the parser against a reference written here (predicates
//! from SPEC §1–§2; an HPACK encoder from RFC 7541), not copied from the implementation,
//! over valid inputs, generated near-misses and arbitrary bytes.
//!
//! One binary for all of them (one link, one run); default 256 cases per property.

mod body;
mod h2_watch;
mod hpack_encoder;
mod json;
mod keys;
mod route;
mod sse;
mod usage;
