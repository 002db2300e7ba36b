//! Property tests for the core's pure parsers: the route matcher, the `Authorization` key
//! parser, the chat body validator and the worker's `usage`. Each checks the parser against
//! a reference predicate written here from SPEC §1–§2, not copied from the implementation,
//! over valid inputs, generated near-misses and arbitrary bytes.
//!
//! One binary for all of them (one link, one run); default 256 cases per property.

mod body;
mod json;
mod keys;
mod route;
mod usage;
