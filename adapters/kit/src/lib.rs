//! What every rating-hub adapter shares:
//! - [`HubConnection`]: the hub's generated client over mTLS;
//! - [`Spool`]: a durable local queue — an adapter acknowledges its source only after the
//!   rating is in the spool, and [`Forwarder`] drains it to the hub with retries, so the hub
//!   being unreachable never loses or refuses a source's rating;
//! - [`source_key`]: deterministic source keys, so re-reading the same input never duplicates;
//! - [`AtRest`]: personal data sealed in the adapters' own files, pruned when finished;
//! - [`Metrics`]: counters without personal data;
//! - [`CallbackAuth`]: signed callbacks (HMAC-SHA256 over timestamp, route and body, each
//!   once), served over TLS when configured, from allowed addresses ([`listen`]).

#![forbid(unsafe_code)]

pub mod at_rest;
pub mod auth;
pub mod client;
pub mod keys;
pub mod listen;
pub mod mapping;
pub mod metrics;
pub mod runtime;
pub mod spool;
#[cfg(feature = "testing")]
pub mod testing;

pub use at_rest::{AtRest, AtRestConfig};
pub use auth::{CallbackAuth, CallbackAuthConfig};
pub use client::HubConnection;
pub use keys::source_key;
pub use mapping::Mapping;
pub use metrics::Metrics;
pub use spool::{Forwarder, Spool, SpoolCounts, Spooled};
