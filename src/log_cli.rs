//! `rating-hub log …`: the rating log's key, its offline verification, and following a hub's
//! signed heads as a platform would (src/merkle.rs, src/tree_head.rs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use rating_hub::config::Config;
use rating_hub::pb::v1 as pb;
use rating_hub::store::verify::Expected;
use rating_hub::tree_head::{PublicKey, TreeHead};

#[derive(Subcommand)]
pub enum LogCommand {
    /// Print the log key's public half (what an upper hub or a platform registers to check
    /// this hub's tree heads), or with --new write a fresh key file.
    Key {
        /// TOML config file naming the key (rating_log.key, rating_log.signature).
        #[arg(long, short, env = "RATING_HUB_CONFIG")]
        config: Option<PathBuf>,
        /// Write a fresh key to this file (mode 0600; never replaces one) instead.
        #[arg(long)]
        new: Option<PathBuf>,
        /// With --new: sm2 (default) or ed25519.
        #[arg(long, default_value = "sm2")]
        signature: String,
    },
    /// Recompute the database's rating log from its ratings, read-only (the hub may run),
    /// and compare it with the stored log: exits 1 naming the first feed position that does
    /// not verify (a rating changed, removed or written around the hub).
    Verify {
        /// TOML config file naming the database (storage.url).
        #[arg(long, short, env = "RATING_HUB_CONFIG")]
        config: Option<PathBuf>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
        /// With --root: a tree size recorded earlier (a signed head, an upstream's copy)…
        #[arg(long, requires = "root")]
        size: Option<u64>,
        /// …and its root (hex): the tree recomputed from the ratings must have it.
        #[arg(long, requires = "size", conflicts_with = "head")]
        root: Option<String>,
        /// A head file (`rating-hub log head` writes one): the tree of its size recomputed
        /// from the ratings must have its root. (A head an upper hub accepted, listed by
        /// `rating-hub admin peer-heads` there: use --size and --root.)
        #[arg(long, conflicts_with = "size")]
        head: Option<PathBuf>,
        /// With --head: the hub's public log key (as `rating-hub log key` prints it); the
        /// head's signature must verify under it before its root is trusted.
        #[arg(long, requires = "head")]
        log_key: Option<String>,
        /// With --head and no --log-key: use the file's size and root without checking its
        /// signature (the report says so).
        #[arg(long, requires = "head", conflicts_with = "log_key")]
        unsigned: bool,
    },
    /// Follow a hub's log as a pulling platform or an auditor does: fetch its signed tree
    /// head (SyncService.GetTreeHead, with a certificate that may pull), check the signature
    /// against the hub's public log key and, given the head accepted last time (--state),
    /// that the new head extends it (GetConsistencyProof): nothing stored before was
    /// changed, removed or reordered. The state file is replaced only when every check
    /// passes. Exits 1 when a check fails.
    Head {
        #[command(flatten)]
        connection: crate::admin_cli::Connection,
        /// The hub's public log key, as `rating-hub log key` prints it (sm2:… or ed25519:…).
        #[arg(long)]
        log_key: String,
        /// The head accepted last time: read when it exists, replaced when the new one passes.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Also check these ratings (hub ids) are in the new head's tree (GetInclusionProof).
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// Ask the hub to sign its current head now instead of its latest signed one.
        #[arg(long)]
        fresh: bool,
    },
}

fn log_key(config: Option<PathBuf>, new: Option<PathBuf>, signature: String) -> anyhow::Result<()> {
    use rating_hub::tree_head::{SignatureAlg, SigningKey};
    if let Some(path) = new {
        let alg = SignatureAlg::parse(&signature)
            .ok_or_else(|| anyhow::anyhow!("--signature {signature:?}: sm2 or ed25519"))?;
        let text = SigningKey::generate(alg);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts
            .open(&path)
            .with_context(|| format!("{} (a key is never replaced)", path.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
        let key = SigningKey::parse(alg, &text).map_err(anyhow::Error::msg)?;
        println!("Wrote a {} log key to {}.", alg.as_str(), path.display());
        println!("public key: {}", key.public().to_text());
        return Ok(());
    }
    let config = Config::load(config.as_deref())?;
    let path = config.rating_log_key().ok_or_else(|| {
        anyhow::anyhow!(
            "rating_log.key is not set (and tls.dev_pki is off): the hub has no log key"
        )
    })?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let key = SigningKey::parse(config.rating_log.signature, &text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let public = key.public();
    println!("{}", public.to_text());
    eprintln!(
        "key id (SM3 of the public key): {}",
        hex::encode(public.key_id())
    );
    Ok(())
}

pub async fn run(command: LogCommand) -> anyhow::Result<ExitCode> {
    match command {
        LogCommand::Key {
            config,
            new,
            signature,
        } => {
            log_key(config, new, signature)?;
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Head {
            connection,
            log_key,
            state,
            include,
            fresh,
        } => head(connection, &log_key, state, &include, fresh).await,
        LogCommand::Verify {
            config,
            json,
            size,
            root,
            head,
            log_key,
            unsigned,
        } => {
            if head.is_some() && log_key.is_none() && !unsigned {
                anyhow::bail!(
                    "--head needs --log-key (the hub's public log key, to check the head's \
                     signature), or --unsigned to use it unchecked"
                );
            }
            let mut signature_verified = None;
            let (expected, head) = match (size, root, head) {
                (Some(size), Some(root), _) => (
                    Some(Expected {
                        size,
                        root: hex::decode(root.trim())
                            .ok()
                            .and_then(|r| r.try_into().ok())
                            .ok_or_else(|| {
                                anyhow::anyhow!("--root: 64 hexadecimal characters (32 bytes)")
                            })?,
                    }),
                    None,
                ),
                (_, _, Some(path)) => {
                    let head = read_head(&path)?;
                    check_signature(&head, log_key.as_deref(), &path)?;
                    signature_verified = Some(log_key.is_some());
                    (
                        Some(Expected {
                            size: head.size,
                            root: head.root,
                        }),
                        Some(head),
                    )
                }
                _ => (None, None),
            };
            verify(config, json, expected, head, signature_verified).await
        }
    }
}

/// A head file, read and parsed; the error names the file and the field.
fn read_head(path: &Path) -> anyhow::Result<TreeHead> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON head file", path.display()))?;
    TreeHead::from_json(&v).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// With a key: the head's signature must verify. Without one (--unsigned), the head is
/// used unchecked, and the output says so.
fn check_signature(head: &TreeHead, key: Option<&str>, path: &Path) -> anyhow::Result<()> {
    match key {
        Some(text) => {
            let key =
                PublicKey::parse(text.trim()).map_err(|e| anyhow::anyhow!("--log-key: {e}"))?;
            if !head.verify(&key) {
                anyhow::bail!(
                    "{}: the head's signature does not verify under the key given (a head \
                     edited after signing, or another hub's): its root is not trusted",
                    path.display()
                );
            }
        }
        None => eprintln!(
            "note: {} is used without checking its signature (--unsigned)",
            path.display()
        ),
    }
    Ok(())
}

async fn verify(
    config: Option<PathBuf>,
    json: bool,
    expected: Option<Expected>,
    head: Option<TreeHead>,
    signature_verified: Option<bool>,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config.as_deref())?;
    let mut db = rating_hub::store::verify::Db::open(&config.storage.url)
        .await
        .with_context(|| format!("opening {}", config.storage.display_url()))?;
    let started = std::time::Instant::now();
    let mut last = std::time::Instant::now();
    let report = rating_hub::store::verify::verify(&mut db, expected, |n| {
        if !json && last.elapsed() >= std::time::Duration::from_secs(2) {
            eprintln!("… {n} ratings checked");
            last = std::time::Instant::now();
        }
    })
    .await?;
    db.close().await;
    // The reasons a head's root is not found, in words.
    let head_problem = match (&head, expected) {
        (Some(h), _) if h.hash != report.hash => Some(format!(
            "the head hashes with {} and this database's log with {}: it is another log's",
            h.hash.as_str(),
            report.hash.as_str()
        )),
        (_, Some(e)) if e.size > report.ratings => Some(format!(
            "the database holds {} ratings and the head {}: ratings at the feed's end were \
             removed",
            report.ratings, e.size
        )),
        _ => None,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "hash": report.hash.as_str(),
                "ratings": report.ratings,
                "leaves": report.leaves,
                "size": report.size,
                "root": hex::encode(report.root),
                "ok": report.ok(),
                "first_bad_position": report.first_bad.as_ref().map(|b| b.0),
                "reason": report.first_bad.as_ref().map(|b| b.1.clone()),
                "expected_root_matches": report.expected_ok,
                "expected_size": expected.map(|e| e.size),
                "head_time": head.as_ref().map(|h| rating_hub::time::format_cst_micros(h.timestamp_micros)),
                "head_problem": head_problem,
                "head_signature_verified": signature_verified,
            })
        );
    } else {
        println!(
            "{} ratings stored, {} in the log ({}); checked in {:.1} s.",
            report.ratings,
            report.leaves,
            report.hash.as_str(),
            started.elapsed().as_secs_f64()
        );
        match &report.first_bad {
            None => println!(
                "OK: every rating matches its leaf; root at size {} = {}",
                report.size,
                hex::encode(report.root)
            ),
            Some((position, why)) => println!(
                "MISMATCH at feed position {position}: {why}. The ratings verify up to \
                 position {} (root {}).",
                position.saturating_sub(1).min(report.size),
                hex::encode(report.root)
            ),
        }
        match (report.expected_ok, expected) {
            (Some(true), Some(e)) => println!("The tree of {} ratings has the root given.", e.size),
            (Some(false), Some(e)) => match &head_problem {
                Some(why) => println!("MISMATCH: {why}."),
                None => println!(
                    "MISMATCH: the tree of {} ratings recomputed now does not have the root \
                     given: ratings among the first {} were changed, removed or reordered \
                     since{}.",
                    e.size,
                    e.size,
                    head.as_ref()
                        .map(|h| format!(
                            " the head of {}",
                            rating_hub::time::format_cst_micros(h.timestamp_micros)
                        ))
                        .unwrap_or_default()
                ),
            },
            _ => {}
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `rating-hub log head`: the checks a platform makes on a hub's log, each named in the
/// output; the state file moves to the new head only when all pass.
async fn head(
    connection: crate::admin_cli::Connection,
    log_key: &str,
    state: Option<PathBuf>,
    include: &[String],
    fresh: bool,
) -> anyhow::Result<ExitCode> {
    use rating_hub::merkle::{Hash, verify_consistency, verify_inclusion};
    use rating_hub::pb::v1::sync_service_client::SyncServiceClient;
    let key = PublicKey::parse(log_key.trim()).map_err(|e| anyhow::anyhow!("--log-key: {e}"))?;
    let json = connection.json();
    let previous = match &state {
        Some(p) => match std::fs::metadata(p) {
            Ok(_) => Some(read_head(p)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("--state {}", p.display())),
        },
        None => None,
    };

    let url = connection.url().to_owned();
    let mut sync = SyncServiceClient::new(crate::admin_cli::channel(&connection).await?);
    let status = |what: &str, s: tonic::Status| {
        anyhow::anyhow!("{what} from {url}: {:?}: {}", s.code(), s.message())
    };
    let answer = sync
        .get_tree_head(pb::GetTreeHeadRequest { fresh })
        .await
        .map_err(|s| status("GetTreeHead", s))?
        .into_inner();
    let head = answer
        .tree_head
        .as_ref()
        .and_then(TreeHead::from_pb)
        .ok_or_else(|| anyhow::anyhow!("{url} answered a tree head that cannot be read"))?;
    let mut passed: Vec<String> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    // The kept head is checked too: a state file edited (or another hub's) is no baseline.
    let previous = match previous {
        Some(prev) if !prev.verify(&key) => {
            failed.push(
                "the kept head's signature does not verify under the key given (the state \
                 file was edited, or is another hub's): it is no baseline"
                    .into(),
            );
            None
        }
        p => p,
    };
    if head.verify(&key) {
        passed.push(format!("signed by {}", hex::encode(key.key_id())));
    } else if head.signature_alg.is_none() {
        failed.push("the head is not signed (the hub has no log key)".into());
    } else {
        failed.push("the head's signature does not verify under the key given".into());
    }
    if let Some(prev) = &previous {
        if head.timestamp_micros < prev.timestamp_micros {
            failed.push(format!(
                "the head is dated {}, before the head kept ({}): an old head served again",
                rating_hub::time::format_cst_micros(head.timestamp_micros),
                rating_hub::time::format_cst_micros(prev.timestamp_micros)
            ));
        }
        if prev.hash != head.hash {
            failed.push(format!(
                "the head hashes with {} and the head accepted before with {}",
                head.hash.as_str(),
                prev.hash.as_str()
            ));
        } else if head.size < prev.size {
            failed.push(format!(
                "the head has {} ratings, fewer than the {} of the head accepted before: \
                 ratings from position {} on were removed",
                head.size,
                prev.size,
                head.size + 1
            ));
        } else if head.size == prev.size {
            if head.root == prev.root {
                passed.push(format!("unchanged since the head of {} ratings", prev.size));
            } else {
                failed.push(format!(
                    "the head of {} ratings has another root than the head of the same size \
                     accepted before: ratings were changed, removed or reordered",
                    head.size
                ));
            }
        } else if prev.size == 0 {
            passed.push("extends the empty head accepted before".into());
        } else {
            let proof = sync
                .get_consistency_proof(pb::GetConsistencyProofRequest {
                    first: prev.size,
                    second: head.size,
                })
                .await
                .map_err(|s| status("GetConsistencyProof", s))?
                .into_inner();
            let hashes: Option<Vec<Hash>> = proof
                .proof
                .iter()
                .map(|h| h.clone().try_into().ok())
                .collect();
            if hashes.is_some_and(|p| {
                verify_consistency(head.hash, prev.size, head.size, &prev.root, &head.root, &p)
            }) {
                passed.push(format!(
                    "extends the head of {} ratings accepted before",
                    prev.size
                ));
            } else {
                failed.push(format!(
                    "NOT CONSISTENT: the head of {} ratings does not extend the head of {} \
                     accepted before: ratings among the first {} were changed, removed or \
                     reordered",
                    head.size, prev.size, prev.size
                ));
            }
        }
    }
    for id in include {
        let answer = sync
            .get_inclusion_proof(pb::GetInclusionProofRequest {
                leaf: Some(pb::get_inclusion_proof_request::Leaf::HubId(id.clone())),
                tree_size: head.size,
            })
            .await;
        match answer {
            Err(s) if s.code() == tonic::Code::NotFound => failed.push(format!(
                "rating {id} is not in the log (or not in this certificate's scope)"
            )),
            Err(s) => return Err(status("GetInclusionProof", s)),
            Ok(p) => {
                let p = p.into_inner();
                let leaf: Option<Hash> = p.leaf_hash.clone().try_into().ok();
                let path: Option<Vec<Hash>> = p
                    .audit_path
                    .iter()
                    .map(|h| h.clone().try_into().ok())
                    .collect();
                let ok = match (leaf, path) {
                    (Some(leaf), Some(path)) => {
                        p.feed_sequence > 0
                            && verify_inclusion(
                                head.hash,
                                p.feed_sequence - 1,
                                head.size,
                                &leaf,
                                &path,
                                &head.root,
                            )
                    }
                    _ => false,
                };
                if ok {
                    // What this shows: the hub placed the rating at that position in the
                    // head's tree. The leaf is the hub's stored row, which a platform cannot
                    // recompute; a later change to it breaks consistency with this head.
                    passed.push(format!(
                        "rating {id} is in the tree, at position {}",
                        p.feed_sequence
                    ));
                } else {
                    failed.push(format!(
                        "rating {id}: its inclusion proof does not verify against the head"
                    ));
                }
            }
        }
    }
    let ok = failed.is_empty();
    if ok && let Some(path) = &state {
        write_atomically(path, &head.to_json())?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": ok,
                "head": head.to_json(),
                "previous_size": previous.as_ref().map(|p| p.size),
                "passed": passed,
                "failed": failed,
                "state_updated": ok && state.is_some(),
            })
        );
    } else {
        println!(
            "{url}: a head of {} ratings, {} ({}), root {}",
            head.size,
            rating_hub::time::format_cst_micros(head.timestamp_micros),
            head.hash.as_str(),
            hex::encode(head.root)
        );
        for p in &passed {
            println!("  ok: {p}");
        }
        for f in &failed {
            println!("  FAILED: {f}");
        }
        match (&state, ok) {
            (Some(path), true) => println!("Accepted; {} now holds it.", path.display()),
            (Some(path), false) => println!(
                "Not accepted; {} still holds the head accepted before.",
                path.display()
            ),
            (None, _) => {}
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Replaces `path` with `value` whole or not at all: a temporary file beside it, synced,
/// renamed over it, the directory synced.
fn write_atomically(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("--state {}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, format!("{value:#}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("replacing {}", path.display()));
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
