//! rating-hub: a gRPC interoperability hub for 政务服务“好差评” ratings.
//!
//! Data flows one way: `api` (the gRPC edge) → `domain` (parsing and rules, no I/O) →
//! `store` (durable commit) → feed. See DESIGN.md in the shared docs and docs/ in this repo.

#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod auth;
pub mod clock;
pub mod codec;
pub mod config;
pub mod domain;
pub mod gm;
pub mod merkle;
pub mod metrics;
pub mod pb;
pub mod pki;
pub mod privacy;
pub mod public;
pub mod relay;
pub mod rules;
pub mod server;
pub mod status;
pub mod store;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;
pub mod time;
pub mod tls;
pub mod tree_head;
