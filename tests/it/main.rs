//! Integration tests: the real hub on loopback (port 0) with a real SQLite file in a temp
//! directory — or, with `RATING_HUB_TEST_BACKEND=postgres`, a real PostgreSQL database
//! (pg.rs) — driven through the generated tonic clients.

mod binary;
mod clients;
mod cluster;
mod conformance;
mod evidence;
mod fake_upstream;
mod gate;
mod gateway;
mod http_json;
mod ingest;
mod metrics;
mod pg;
mod privacy;
mod promises;
mod public;
mod query;
mod rating_log;
mod relay;
mod restart;
mod rules;
mod security;
mod store;
mod utils;
mod validation;
