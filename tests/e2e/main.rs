//! End-to-end tests of the contract in SPEC.md: the real `turnpike` binary on loopback ports,
//! mock agent workers, plain HTTP. One file per behaviour; one test binary to keep linking cheap.
//!
//! Run: `cargo test --release --test e2e`.

mod support;

mod admin;
mod affinity;
mod balance;
mod check;
mod check_order;
mod cli;
mod corpus;
mod demo;
mod edge;
mod errors;
mod forwarding;
mod https_workers;
mod metering;
mod metrics;
mod openapi;
mod path_tricks;
mod prometheus;
mod proxy_headers;
mod rate_limits;
mod reload;
mod sessions;
mod shutdown;
mod slow_clients;
mod streaming;
mod tls;
mod tls_handshake;
mod upstream_failures;
