//! Turnpike: an authenticating, rate-limiting, metering reverse proxy for agent backends.
//!
//! The decision core (`limits`, `admission`, `billing`, `metering`, `routing`, `request`,
//! `auth`) is plain Rust with no I/O; `store` holds shared state behind one trait; `proxy`
//! is the Pingora glue that runs a call through `intake`, `answer` and `outcome`.

pub mod admin;
pub mod admission;
pub mod answer;
pub mod auth;
pub mod billing;
pub mod cli;
pub mod config;
pub mod ctx;
pub mod demo;
pub mod error;
pub mod exchange;
pub mod headers;
pub mod intake;
pub mod limits;
pub mod logging;
pub mod metering;
pub mod metrics;
pub mod outcome;
pub mod policy_diff;
pub mod proxy;
pub mod reload;
pub mod reply;
pub mod request;
pub mod routing;
pub mod server;
pub mod state;
pub mod store;
pub mod upstream;
