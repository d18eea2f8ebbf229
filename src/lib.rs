//! concord: a change-data-capture replication daemon that keeps business systems in
//! agreement. See ARCHITECTURE.md for the code map and the invariants every change
//! must keep:
//!
//! - `merge` does no I/O: no clock, no randomness, no state store.
//! - Only `connector` talks to external systems.
//! - A source position is acknowledged upstream only after the redb commit that
//!   records its effects.
//! - Every metric name lives in `metrics`.
//! - No secret or record value appears in a log line, a metric label, an error sent
//!   over HTTP, or a panic.

pub mod alloc;
pub mod bench;
pub mod bench_rest;
pub mod config;
pub mod connector;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod http;
pub mod mapping;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod plan;
pub mod sim;
pub mod state;
pub mod state_cli;
