//! `rating-hub admin …`: the operator's commands over mTLS with the operator's certificate
//! (AdminService): upstreams, attempts, dead letters, replays, pause and resume, the PII access
//! log, reload. Human tables by default; `--json` for scripts (one JSON document on stdout).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use rating_hub::pb::v1 as pb;
use rating_hub::pb::v1::admin_service_client::AdminServiceClient;

#[derive(Args)]
pub struct Connection {
    /// The hub's address.
    #[arg(
        long,
        env = "RATING_HUB_URL",
        default_value = "https://127.0.0.1:50051"
    )]
    url: String,
    /// The operator's certificate and key (PEM); default: the development admin's, in
    /// certs/dev.
    #[arg(long, env = "RATING_HUB_ADMIN_CERT")]
    cert: Option<PathBuf>,
    #[arg(long, env = "RATING_HUB_ADMIN_KEY")]
    key: Option<PathBuf>,
    /// The CA the hub's certificate chains to; default certs/dev/ca.pem.
    #[arg(long, env = "RATING_HUB_CA")]
    ca: Option<PathBuf>,
    /// The name in the hub's certificate.
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// JSON on stdout instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

impl Connection {
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn json(&self) -> bool {
        self.json
    }
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Every upstream's delivery state.
    Upstreams,
    /// An upstream's delivery attempts, newest first.
    Attempts {
        upstream: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// An upstream's dead letters (open ones; --all for resolved too).
    DeadLetters {
        upstream: String,
        #[arg(long)]
        all: bool,
    },
    /// Sends an upstream's open dead letters again (or these ids).
    Replay {
        upstream: String,
        #[arg(long, value_delimiter = ',')]
        ids: Vec<u64>,
    },
    /// Sends an upstream a range of the feed again, with a progress line until it is done.
    ReplayRange {
        upstream: String,
        #[arg(long)]
        from: u64,
        /// The last feed position (inclusive); 0: the head now.
        #[arg(long, default_value_t = 0)]
        to: u64,
        #[arg(long)]
        reason: String,
        /// Return at once instead of following the replay.
        #[arg(long)]
        no_wait: bool,
    },
    /// Pauses delivery to an upstream.
    Pause { upstream: String },
    /// Resumes delivery to an upstream.
    Resume { upstream: String },
    /// The audit trail of unmasked personal-data reads.
    PiiLog {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Reads the hub's configuration file again (principals).
    Reload,
    /// Tree heads lower hubs reported, newest first, with what checking each found (the
    /// rating log alarms). `log verify --size N --root R` on the lower hub's database checks
    /// it against a head listed here.
    PeerHeads {
        /// One lower hub's principal.
        #[arg(long)]
        principal: Option<String>,
        /// Only the alarms.
        #[arg(long)]
        alarms: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// After an investigation: make a lower hub's reported head (by id; default the latest
    /// inconsistent one) the baseline its next heads must extend.
    Rebaseline {
        principal: String,
        #[arg(long, default_value_t = 0)]
        id: u64,
        #[arg(long)]
        reason: String,
        /// The head's size and root as listed (both): refused if the record changed since.
        #[arg(long, requires = "root")]
        size: Option<u64>,
        #[arg(long, requires = "size")]
        root: Option<String>,
    },
}

pub(crate) async fn channel(c: &Connection) -> anyhow::Result<Channel> {
    let dev = PathBuf::from("certs/dev");
    let cert = c
        .cert
        .clone()
        .unwrap_or_else(|| dev.join(format!("{}.pem", rating_hub::pki::DEV_ADMIN)));
    let key = c
        .key
        .clone()
        .unwrap_or_else(|| dev.join(format!("{}.key", rating_hub::pki::DEV_ADMIN)));
    let ca = c.ca.clone().unwrap_or_else(|| dev.join("ca.pem"));
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&ca, "CA")?))
        .identity(Identity::from_pem(
            read(&cert, "certificate")?,
            read(&key, "key")?,
        ))
        .domain_name(c.domain.clone());
    Endpoint::from_shared(c.url.clone())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", c.url))
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(rating_hub::time::micros_from_timestamp)
        .map(rating_hub::time::format_cst_micros)
        .unwrap_or_default()
}

/// Prints rows as an aligned table (CJK characters count double).
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let width = |s: &str| {
        s.chars()
            .map(|c| if (c as u32) > 0x2E80 { 2 } else { 1 })
            .sum::<usize>()
    };
    let mut widths: Vec<usize> = headers.iter().map(|h| width(h)).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            widths[i] = widths[i].max(width(cell)).min(60);
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let c: String = c.chars().take(60).collect();
                let pad = widths[i].saturating_sub(width(&c));
                format!("{c}{}", " ".repeat(pad))
            })
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn replay_json(r: &pb::RangeReplay) -> Value {
    json!({
        "id": r.id, "upstream": r.upstream, "from": r.from_feed_sequence, "to": r.to_feed_sequence,
        "next": r.next_feed_sequence, "requested_by": r.requested_by, "requested_at": time(&r.requested_at),
        "reason": r.reason, "done_at": time(&r.done_at),
    })
}

fn peer_head_json(h: &pb::PeerHead) -> Value {
    json!({
        "id": h.id, "principal": h.principal, "outcome": h.outcome, "tree_size": h.tree_size,
        "root_hash": hex::encode(&h.root_hash), "head_time": time(&h.head_time),
        "received_at": time(&h.received_at), "first_bad_position": h.first_bad_position,
        "detail": h.detail,
    })
}

pub async fn run(c: Connection, command: AdminCommand) -> anyhow::Result<()> {
    let mut admin = AdminServiceClient::new(channel(&c).await?);
    let out = |v: Value| println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    match command {
        AdminCommand::Upstreams => {
            let r = admin
                .list_upstreams(pb::ListUpstreamsRequest {})
                .await?
                .into_inner();
            if c.json {
                out(Value::Array(
                    r.upstreams
                        .iter()
                        .map(|u| {
                            json!({
                                "name": u.name, "endpoint": u.endpoint, "cursor": u.cursor,
                                "head": u.head_sequence, "lag_records": u.lag_records,
                                "lag_seconds": u.lag_seconds, "dead_letters": u.open_dead_letters,
                                "paused": u.paused, "last_error": u.last_error,
                            })
                        })
                        .collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> = r
                    .upstreams
                    .iter()
                    .map(|u| {
                        vec![
                            u.name.clone(),
                            if u.paused {
                                "paused".into()
                            } else {
                                "delivering".into()
                            },
                            u.lag_records.to_string(),
                            format!("{:.0}", u.lag_seconds),
                            u.open_dead_letters.to_string(),
                            u.last_error.clone(),
                        ]
                    })
                    .collect();
                table(
                    &["upstream", "state", "lag", "lag s", "dead", "last error"],
                    &rows,
                );
            }
        }
        AdminCommand::Attempts { upstream, limit } => {
            let r = admin
                .list_attempts(pb::ListAttemptsRequest {
                    upstream,
                    limit,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if c.json {
                out(Value::Array(
                    r.attempts
                        .iter()
                        .map(|a| {
                            json!({
                                "id": a.id, "at": time(&a.at), "first": a.first_feed_sequence,
                                "last": a.last_feed_sequence, "records": a.records,
                                "outcome": a.outcome, "detail": a.detail,
                                "duration_ms": a.duration_ms, "replay_id": a.replay_id,
                            })
                        })
                        .collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> = r
                    .attempts
                    .iter()
                    .map(|a| {
                        vec![
                            time(&a.at),
                            format!("{}–{}", a.first_feed_sequence, a.last_feed_sequence),
                            a.records.to_string(),
                            a.outcome.clone(),
                            format!("{} ms", a.duration_ms),
                            a.detail.clone(),
                        ]
                    })
                    .collect();
                table(
                    &["at", "feed", "records", "outcome", "took", "detail"],
                    &rows,
                );
            }
        }
        AdminCommand::DeadLetters { upstream, all } => {
            let r = admin
                .list_dead_letters(pb::ListDeadLettersRequest {
                    upstream,
                    include_resolved: all,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if c.json {
                out(Value::Array(
                    r.dead_letters
                        .iter()
                        .map(|d| {
                            json!({
                                "id": d.id, "feed": d.feed_sequence, "hub_id": d.hub_id,
                                "case_event": d.case_event_id, "update": d.update_seq,
                                "error": d.error, "attempts": d.attempts,
                                "created_at": time(&d.created_at), "resolved_at": time(&d.resolved_at),
                            })
                        })
                        .collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> = r
                    .dead_letters
                    .iter()
                    .map(|d| {
                        vec![
                            d.id.to_string(),
                            // A 办件 record's letter names its case event.
                            if d.case_event_id != 0 {
                                format!("办件 {}", d.case_event_id)
                            } else if d.update_seq != 0 {
                                format!("update {}", d.update_seq)
                            } else {
                                d.feed_sequence.to_string()
                            },
                            time(&d.created_at),
                            d.attempts.to_string(),
                            d.error.clone(),
                        ]
                    })
                    .collect();
                table(&["id", "feed", "since", "tries", "error"], &rows);
            }
        }
        AdminCommand::Replay { upstream, ids } => {
            let r = admin
                .replay_dead_letters(pb::ReplayDeadLettersRequest {
                    upstream,
                    all: ids.is_empty(),
                    ids,
                })
                .await?
                .into_inner();
            if c.json {
                out(json!({ "requested": r.requested }));
            } else {
                println!("{} dead letters will be sent again.", r.requested);
            }
        }
        AdminCommand::ReplayRange {
            upstream,
            from,
            to,
            reason,
            no_wait,
        } => {
            let r = admin
                .replay_range(pb::ReplayRangeRequest {
                    upstream: upstream.clone(),
                    from_feed_sequence: from,
                    to_feed_sequence: to,
                    reason,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .replay
                .context("no replay in the answer")?;
            let mut last = r.clone();
            if !no_wait {
                let total = (r.to_feed_sequence - r.from_feed_sequence + 1) as f64;
                loop {
                    let now = admin
                        .list_replays(pb::ListReplaysRequest {
                            upstream: upstream.clone(),
                        })
                        .await?
                        .into_inner()
                        .replays
                        .into_iter()
                        .find(|x| x.id == r.id)
                        .context("the replay is no longer listed")?;
                    let sent =
                        now.next_feed_sequence
                            .saturating_sub(now.from_feed_sequence) as f64;
                    if !c.json {
                        let filled = ((sent / total) * 30.0).round() as usize;
                        eprint!(
                            "\r[{}{}] {:>3.0}%  {}/{}",
                            "#".repeat(filled.min(30)),
                            " ".repeat(30 - filled.min(30)),
                            100.0 * sent / total,
                            sent as u64,
                            total as u64
                        );
                    }
                    last = now;
                    if last.done_at.is_some() {
                        if !c.json {
                            eprintln!();
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            if c.json {
                out(replay_json(&last));
            } else {
                println!(
                    "Replay {} of {}: feed {}–{}{}.",
                    last.id,
                    upstream,
                    last.from_feed_sequence,
                    last.to_feed_sequence,
                    match (
                        &last.done_at,
                        last.next_feed_sequence > last.to_feed_sequence
                    ) {
                        (Some(_), true) => ", done",
                        (Some(_), false) => ", cancelled",
                        (None, _) => ", under way",
                    }
                );
            }
        }
        AdminCommand::Pause { upstream } => {
            admin
                .pause_upstream(pb::PauseUpstreamRequest {
                    upstream: upstream.clone(),
                })
                .await?;
            if c.json {
                out(json!({ "upstream": upstream, "paused": true }));
            } else {
                println!("{upstream}: paused.");
            }
        }
        AdminCommand::Resume { upstream } => {
            admin
                .resume_upstream(pb::ResumeUpstreamRequest {
                    upstream: upstream.clone(),
                })
                .await?;
            if c.json {
                out(json!({ "upstream": upstream, "paused": false }));
            } else {
                println!("{upstream}: delivering.");
            }
        }
        AdminCommand::PiiLog { limit } => {
            let r = admin
                .list_pii_access(pb::ListPiiAccessRequest {
                    page_size: limit,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if c.json {
                out(Value::Array(
                    r.entries
                        .iter()
                        .map(|a| json!({ "at": time(&a.at), "principal": a.principal, "rpc": a.rpc, "hub_id": a.hub_id }))
                        .collect(),
                ));
            } else {
                let rows: Vec<Vec<String>> = r
                    .entries
                    .iter()
                    .map(|a| {
                        vec![
                            time(&a.at),
                            a.principal.clone(),
                            a.rpc.clone(),
                            a.hub_id.clone(),
                        ]
                    })
                    .collect();
                table(&["at", "principal", "rpc", "rating"], &rows);
            }
        }
        AdminCommand::PeerHeads {
            principal,
            alarms,
            limit,
        } => {
            let r = admin
                .list_peer_heads(pb::ListPeerHeadsRequest {
                    principal: principal.unwrap_or_default(),
                    alarms_only: alarms,
                    limit,
                })
                .await?
                .into_inner();
            if c.json {
                out(Value::Array(r.heads.iter().map(peer_head_json).collect()));
            } else {
                let rows: Vec<Vec<String>> = r
                    .heads
                    .iter()
                    .map(|h| {
                        vec![
                            h.id.to_string(),
                            h.principal.clone(),
                            h.outcome.clone(),
                            h.tree_size.to_string(),
                            hex::encode(&h.root_hash),
                            time(&h.head_time),
                            time(&h.received_at),
                            h.first_bad_position.to_string(),
                            h.detail.clone(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "id",
                        "peer",
                        "outcome",
                        "size",
                        "root",
                        "head time",
                        "received",
                        "first bad",
                        "detail",
                    ],
                    &rows,
                );
            }
        }
        AdminCommand::Rebaseline {
            principal,
            id,
            reason,
            size,
            root,
        } => {
            let root_hash = match &root {
                Some(r) => hex::decode(r.trim())
                    .map_err(|_| anyhow::anyhow!("--root: hexadecimal characters"))?,
                None => Vec::new(),
            };
            let r = admin
                .rebaseline_peer_head(pb::RebaselinePeerHeadRequest {
                    principal,
                    id,
                    reason,
                    tree_size: size.unwrap_or(0),
                    root_hash,
                })
                .await?
                .into_inner();
            let b = r.baseline.unwrap_or_default();
            if c.json {
                out(peer_head_json(&b));
            } else {
                println!(
                    "{}'s baseline is now its head of {} ratings (root {}); its next heads \
                     must extend it. Recorded as {}.",
                    b.principal,
                    b.tree_size,
                    hex::encode(&b.root_hash),
                    b.id
                );
            }
        }
        AdminCommand::Reload => {
            let r = admin
                .reload_config(pb::ReloadConfigRequest {})
                .await?
                .into_inner();
            if c.json {
                out(json!({
                    "principals": r.principals,
                    "added": r.added,
                    "removed": r.removed,
                    "upstreams_added": r.upstreams_added,
                    "upstreams_removed": r.upstreams_removed,
                    "upstreams_changed": r.upstreams_changed,
                    "limits_changed": r.limits_changed,
                    "restart_needed": r.restart_needed,
                    "warnings": r.warnings,
                }));
            } else {
                let list = |v: &[String]| {
                    if v.is_empty() {
                        "none".to_owned()
                    } else {
                        v.join(", ")
                    }
                };
                println!("Reloaded.");
                println!(
                    "  principals  {} in force; added: {}; removed: {}",
                    r.principals,
                    list(&r.added),
                    list(&r.removed)
                );
                println!(
                    "  upstreams   added: {}; removed: {}; restarted with new settings: {}",
                    list(&r.upstreams_added),
                    list(&r.upstreams_removed),
                    list(&r.upstreams_changed)
                );
                println!("  limits      changed: {}", list(&r.limits_changed));
                if !r.restart_needed.is_empty() {
                    println!(
                        "  not in force until a restart: {}",
                        list(&r.restart_needed)
                    );
                }
                for w in &r.warnings {
                    eprintln!("warning: {w}");
                }
            }
        }
    }
    Ok(())
}
