//! The 12345 hotline adapter.
//!
//! - Pulls the hub's invitations (`SyncService.ListInvitations`: completed, unrated cases due a
//!   reminder), opens a survey for each with its own reply code, and sends the invitation SMS
//!   through the configured gateway.
//! - Receives SMS replies (the gateway's JSON-array MO callback, or a plain form post) and IVR
//!   key results, matches each to its survey by reply code or survey reference — never by phone
//!   alone — reads the level (`reply.rs`), spools the rating durably and only then answers the
//!   gateway. Replies to unknown, expired or already answered surveys are kept with a reason.
//! - Forwards the spool to the hub (kit `Forwarder`), riding out hub outages.
//!
//! Logs and metrics carry codes and counts, never phone numbers or names.

#![forbid(unsafe_code)]

pub mod config;
pub mod reply;
pub mod server;
pub mod surveys;

pub use config::HotlineConfig;
pub use server::{Hotline, start};
