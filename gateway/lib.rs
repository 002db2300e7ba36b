//! Turnpike: an authenticating, rate-limiting, metering reverse proxy for agent backends.
//!
//! The decision core is its own crate, `turnpike_core` (plain Rust, no I/O). This crate is
//! the rest, in layers. A module may use only the modules listed before it in `LAYERS`
//! (`gateway/layers.rs`, the same order as here), and no modules, at any depth, name each
//! other in a circle; the tests there hold every `crate::` and `super::` path to that:
//!
//! 1. `clock`, `headers`, `lifecycle`, `logging`, `metrics`, `policy_diff`: leaves; `tls`: the
//!    listeners' live certificates and the workers' CA bundles (on `metrics` only);
//!    `h2_paths`: HTTP/2 paths whose fragment the `h2` crate dropped, noted per connection.
//! 2. `config`: the files operators write, compiled into runtime types.
//! 3. `error`: every error a client can see, rendered one way.
//! 4. `store`: shared state behind the `Store` traits (embedded, Redis).
//! 5. `upstream`: pools, the worker's request head, the worker exchange.
//! 6. `services`: what every call shares (the config snapshot, the store, metrics).
//! 7. `pipeline`: one call as a pipeline of values; `proxy`: the Pingora glue over it;
//!    `edge`: the HTTP/1 front door that reads each head before Pingora parses it.
//! 8. `reload`, `admin`: config reloads and the admin API.
//! 9. `demo`, `drain`, `server`, `cli`: the demo worker, the drain on a stop signal, the
//!    server's assembly, the command line.
//!
//! `docs/architecture.md` walks one call through them.

pub mod clock;
pub mod h2_paths;
pub mod headers;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod policy_diff;
pub mod tls;

pub mod config;

pub mod error;

pub mod store;

pub mod upstream;

pub mod services;

pub mod edge;
pub mod pipeline;
pub mod proxy;

pub mod admin;
pub mod reload;

pub mod cli;
pub mod demo;
pub mod drain;
pub mod server;

#[cfg(test)]
mod layers;
