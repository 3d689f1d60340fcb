//! Issue #22: the rating log — a Merkle tree over the feed written with every commit —
//! and `rating-hub log verify`, which recomputes it from the stored ratings and names the
//! first feed position that does not match.

use std::path::Path;
use std::process::Command;

use rating_hub::pb::v1 as pb;
use serde_json::Value;

use crate::pg::{exec_on_hub, query_on_hub};
use crate::utils::*;

/// Runs `rating-hub log verify --json` on the database `config` names (or, without one, on
/// the binary's defaults in `dir`); its exit status and report.
fn verify(dir: &Path, config: Option<&Path>) -> (bool, Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rating-hub"));
    cmd.current_dir(dir).args(["log", "verify", "--json"]);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    } else if crate::pg::enabled() {
        cmd.env("RATING_HUB__STORAGE__URL", crate::pg::database_for(dir));
    }
    let out = cmd.env_remove("RATING_HUB_CONFIG").output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "a JSON report: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.success(), report["ok"] == true, "{report}");
    (out.status.success(), report)
}

pub(crate) fn verify_hub(hub_dir: &Path) -> (bool, Value) {
    verify(hub_dir, Some(&hub_dir.join("hub.toml")))
}

fn stored_ratings(dir: &Path) -> u64 {
    query_on_hub(dir, "SELECT CAST(COUNT(*) AS TEXT) FROM ratings")[0]
        .parse()
        .unwrap()
}

/// SQL that lifts the append-only guard on `ratings`, as someone with the database file (or
/// a superuser) could.
fn drop_guard() -> &'static str {
    if crate::pg::enabled() {
        "DROP TRIGGER ratings_append_only ON ratings;"
    } else {
        "DROP TRIGGER ratings_append_only_update; DROP TRIGGER ratings_append_only_delete;"
    }
}

/// The same for `log_nodes`, `log_leaves` and `log_meta`.
fn lift_log_guard() -> &'static str {
    if crate::pg::enabled() {
        "DROP TRIGGER IF EXISTS log_nodes_append_only ON log_nodes; \
         DROP TRIGGER IF EXISTS log_leaves_append_only ON log_leaves; \
         DROP TRIGGER IF EXISTS log_leaves_no_overlap ON log_leaves; \
         DROP TRIGGER IF EXISTS log_meta_fixed ON log_meta; \
         DROP TRIGGER IF EXISTS log_meta_fixed_truncate ON log_meta;"
    } else {
        "DROP TRIGGER IF EXISTS log_nodes_append_only_update; \
         DROP TRIGGER IF EXISTS log_nodes_append_only_delete; \
         DROP TRIGGER IF EXISTS log_leaves_append_only_update; \
         DROP TRIGGER IF EXISTS log_leaves_append_only_delete; \
         DROP TRIGGER IF EXISTS log_leaves_no_overlap; \
         DROP TRIGGER IF EXISTS log_meta_fixed_update; DROP TRIGGER IF EXISTS log_meta_fixed_delete;"
    }
}

/// Runs each of `statements` on the hub's database: each must be refused, with an error
/// naming `why` (any case).
fn refused_sql<S: AsRef<str>>(dir: &Path, statements: impl IntoIterator<Item = S>, why: &str) {
    for sql in statements {
        let sql = sql.as_ref();
        let refused = crate::pg::try_exec_on_hub(dir, sql).expect_err(sql);
        assert!(
            refused.to_lowercase().contains(why),
            "{sql}: {refused} (expected {why})"
        );
    }
}

/// Restarts `stopped`, which must be refused with an error naming each of `why`; the
/// stopped hub back.
async fn refused_start(stopped: StoppedHub, why: &[&str]) -> StoppedHub {
    match stopped.try_restart_with(|b| b).await {
        Ok(_) => panic!("the hub must not start: {why:?}"),
        Err((e, stopped)) => {
            let e = format!("{e:#}");
            assert!(why.iter().all(|w| e.contains(w)), "{why:?}: {e}");
            stopped
        }
    }
}

/// `batches` calls of `size` new ratings each, keyed `{tag}{batch}-{i}`.
async fn submit_batches(hub: &TestHub, tag: &str, batches: usize, size: usize) {
    let mut ingest = hub.ingest().await;
    for b in 0..batches {
        submit(
            &mut ingest,
            (0..size)
                .map(|i| rating(&format!("{tag}{b}-{i}")))
                .collect(),
        )
        .await;
    }
}

/// Accepted, duplicate, conflicting and refused ratings, unary and streamed, across a
/// restart: the log covers exactly the stored ratings, and verify recomputes the same tree.
#[tokio::test]
async fn every_commit_extends_the_log_and_verify_recomputes_it() {
    use tokio_stream::StreamExt;
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let batch: Vec<pb::Rating> = (0..40).map(|i| rating(&format!("a{i}"))).collect();
    submit(&mut ingest, batch.clone()).await;
    let again = submit(&mut ingest, batch[..10].to_vec()).await;
    assert!(again.iter().all(|r| outcome(r) == pb::Outcome::Duplicate));
    let mut conflicting = rating("a3");
    conflicting.level = pb::Level::Dissatisfied as i32;
    conflicting.text = "改了".into();
    let mut invalid = rating("bad");
    invalid.org_credit_code.clear();
    let mixed = submit(&mut ingest, vec![conflicting, invalid, rating("b1")]).await;
    assert_eq!(
        mixed.iter().map(outcome).collect::<Vec<_>>(),
        [
            pb::Outcome::Conflict,
            pb::Outcome::Invalid,
            pb::Outcome::Accepted
        ]
    );
    let stream = tokio_stream::iter((0..30).map(|i| pb::StreamRatingsRequest {
        rating: Some(rating(&format!("s{i}"))),
    }));
    let acks: Vec<_> = ingest
        .stream_ratings(stream)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(acks.len(), 30);
    let (ok, first) = verify_hub(hub.dir.path());
    assert!(ok, "{first}");
    assert_eq!(first["size"], 71, "{first}");
    assert_eq!(first["ratings"], 71);
    assert_eq!(first["hash"], "sm3");

    let hub = hub.stop().await.restart().await;
    submit(&mut hub.ingest().await, vec![rating("c1"), rating("c2")]).await;
    let (ok, second) = verify_hub(hub.dir.path());
    assert!(ok, "{second}");
    assert_eq!(second["size"], 73);
    assert_ne!(second["root"], first["root"]);
    hub.stop().await;
}

/// A rating's level edited in the database and another rating deleted, the append-only
/// guard dropped first: verify names the edited one's position; a deletion alone is named
/// at its own position; and a SQLite hub whose last ratings were deleted refuses to start
/// rather than hand their positions out again.
#[tokio::test]
async fn a_changed_or_removed_rating_is_found_at_its_position() {
    let hub = TestHub::start().await;
    let all: Vec<pb::Rating> = (1..=20).map(|i| rating(&format!("t{i}"))).collect();
    submit(&mut hub.ingest().await, all.clone()).await;
    let (ok, clean) = verify_hub(hub.dir.path());
    assert!(ok, "{clean}");
    let stopped = hub.stop().await;
    let dir = stopped.dir.path();
    exec_on_hub(
        dir,
        &format!(
            "{} UPDATE ratings SET level = level % 5 + 1 WHERE feed_seq = 7; \
             DELETE FROM ratings WHERE feed_seq = 12;",
            drop_guard()
        ),
    );
    let (ok, report) = verify_hub(dir);
    assert!(!ok);
    assert_eq!(report["first_bad_position"], 7, "{report}");
    assert!(
        report["reason"].as_str().unwrap().contains("changed"),
        "{report}"
    );
    assert_eq!(report["size"], 6, "it verifies up to the position before");

    // Deleted alone, in a second hub.
    let hub = TestHub::start().await;
    submit(&mut hub.ingest().await, all.clone()).await;
    let stopped = hub.stop().await;
    exec_on_hub(
        stopped.dir.path(),
        &format!("{} DELETE FROM ratings WHERE feed_seq = 12;", drop_guard()),
    );
    let (ok, report) = verify_hub(stopped.dir.path());
    assert!(!ok);
    assert_eq!(report["first_bad_position"], 12, "{report}");
    assert!(
        report["reason"].as_str().unwrap().contains("removed"),
        "{report}"
    );
    // The hub still starts (the feed's end is intact) and its log goes on; verify still
    // names position 12.
    let hub = stopped.restart().await;
    submit(&mut hub.ingest().await, vec![rating("t21")]).await;
    let (_, report) = verify_hub(hub.dir.path());
    assert_eq!(report["first_bad_position"], 12, "{report}");

    // The last ratings deleted: the hub refuses to start, naming the way to find them.
    let stopped = hub.stop().await;
    exec_on_hub(
        stopped.dir.path(),
        "DELETE FROM ratings WHERE feed_seq >= 20;",
    );
    let (_, report) = verify_hub(stopped.dir.path());
    assert_eq!(report["first_bad_position"], 12, "{report}");
    assert_eq!(report["leaves"], 21, "{report}");
    match stopped.try_restart().await {
        // PostgreSQL keeps the feed's head in a row of its own: the positions are not
        // handed out again, and the hub goes on (verify still names the first removal).
        Ok(hub) if crate::pg::enabled() => {
            submit(&mut hub.ingest().await, vec![rating("t22")]).await;
            let (_, report) = verify_hub(hub.dir.path());
            assert_eq!(report["first_bad_position"], 12, "{report}");
            hub.stop().await;
        }
        // SQLite's head is its last row: the positions would be given to new ratings.
        Ok(_) => panic!("a hub whose last ratings were removed must not start"),
        Err(e) => {
            let err = format!("{e:#}");
            assert!(err.contains("rating-hub log verify"), "{err}");
        }
    }
}

/// A database from before the log (its log tables emptied here): the hub writes the log for
/// every stored rating when it starts, batch by batch, and the tree is the one the writer
/// had built.
#[tokio::test]
async fn the_log_is_written_for_ratings_stored_before_it() {
    let hub = TestHub::start().await;
    // More than one batch of the start's writing (2,000 rows a batch).
    submit_batches(&hub, "o", 5, 420).await;
    let (_, before) = verify_hub(hub.dir.path());
    let stopped = hub.stop().await;
    let lift = lift_log_guard();
    exec_on_hub(
        stopped.dir.path(),
        &format!("{lift} DELETE FROM log_leaves; DELETE FROM log_nodes; DELETE FROM log_meta;"),
    );
    let hub = stopped.restart().await;
    let (ok, after) = verify_hub(hub.dir.path());
    assert!(ok, "{after}");
    assert_eq!(
        (after["size"].clone(), after["root"].clone()),
        (before["size"].clone(), before["root"].clone())
    );
    assert_eq!(stored_ratings(hub.dir.path()), 2100);
    hub.stop().await;
}

/// No false alarms: the hub binary killed with SIGKILL twenty times while ratings stream in;
/// every acknowledged rating is stored and the log verifies over all of them.
#[tokio::test]
async fn twenty_kills_under_load_leave_a_log_that_verifies() {
    use crate::binary::{SpawnedHub, dev_admin_channel, sigterm, spawn_hub_with, wait_exit};
    use std::collections::HashSet;
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashSet<String> = HashSet::new();
    let mut n = 0usize;
    for cycle in 0..20 {
        let SpawnedHub { mut child, url, .. } = spawn_hub_with(dir.path(), "info", &[]);
        let mut ingest = IngestServiceClient::new(dev_admin_channel(dir.path(), &url).await);
        // Load: batches back to back until the kill; acks counted as they come.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let load = tokio::spawn(async move {
            for b in 0.. {
                let batch: Vec<pb::Rating> = (0..25)
                    .map(|i| rating(&format!("k{cycle}-{b}-{i}")))
                    .collect();
                match ingest
                    .submit_ratings(pb::SubmitRatingsRequest { ratings: batch })
                    .await
                {
                    Ok(r) => {
                        for r in r.into_inner().results {
                            if tx.send(r.hub_id).is_err() {
                                return;
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        // Killed once this cycle's load is under way (at least two batches acknowledged).
        for _ in 0..50 {
            let id = rx.recv().await.expect("the load runs until the kill");
            acked.insert(id);
            n += 1;
        }
        crate::binary::signal(&child, "KILL");
        let _ = tokio::task::spawn_blocking(move || wait_exit(&mut child)).await;
        let _ = load.await;
        while let Ok(id) = rx.try_recv() {
            acked.insert(id);
            n += 1;
        }
    }
    assert_eq!(acked.len(), n, "every ack names a new rating");
    let SpawnedHub { mut child, url, .. } = spawn_hub_with(dir.path(), "info", &[]);
    let mut query = rating_hub::pb::v1::query_service_client::QueryServiceClient::new(
        dev_admin_channel(dir.path(), &url).await,
    );
    for id in &acked {
        query
            .get_rating(pb::GetRatingRequest { hub_id: id.clone() })
            .await
            .expect("an acknowledged rating is stored");
    }
    sigterm(&child);
    let _ = tokio::task::spawn_blocking(move || wait_exit(&mut child)).await;
    let (ok, report) = verify(dir.path(), None);
    assert!(ok, "{report}");
    assert!(
        report["size"].as_u64().unwrap() >= acked.len() as u64,
        "{report}"
    );
    assert_eq!(report["size"], report["ratings"]);
}

/// Asks the hub for a fresh head and checks, against it, the inclusion proof of every
/// position and consistency proofs from several sizes; returns the head's root.
async fn every_proof_verifies(hub: &TestHub, size: u64) -> String {
    use rating_hub::merkle::{HashAlg, verify_consistency, verify_inclusion};
    let mut sync = crate::relay::SyncServiceClient::new(hub.channel_as("tester").await);
    let head = sync
        .get_tree_head(pb::GetTreeHeadRequest { fresh: true })
        .await
        .unwrap()
        .into_inner()
        .tree_head
        .unwrap();
    assert_eq!(head.tree_size, size);
    let root: [u8; 32] = head.root_hash.clone().try_into().unwrap();
    let hashes = |v: &[Vec<u8>]| -> Vec<[u8; 32]> {
        v.iter().map(|h| h.clone().try_into().unwrap()).collect()
    };
    for seq in 1..=size {
        let p = sync
            .get_inclusion_proof(pb::GetInclusionProofRequest {
                leaf: Some(pb::get_inclusion_proof_request::Leaf::FeedSequence(seq)),
                tree_size: size,
            })
            .await
            .unwrap()
            .into_inner();
        let leaf: [u8; 32] = p.leaf_hash.clone().try_into().unwrap();
        assert!(
            verify_inclusion(
                HashAlg::Sm3,
                seq - 1,
                size,
                &leaf,
                &hashes(&p.audit_path),
                &root
            ),
            "position {seq} of {size}"
        );
    }
    for first in [1, 7, 16, 17, 64, size / 2, size - 1] {
        let p = sync
            .get_consistency_proof(pb::GetConsistencyProofRequest {
                first,
                second: size,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.second_root, head.root_hash);
        let first_root: [u8; 32] = p.first_root.clone().try_into().unwrap();
        assert!(
            verify_consistency(
                HashAlg::Sm3,
                first,
                size,
                &first_root,
                &root,
                &hashes(&p.proof)
            ),
            "{first} to {size}"
        );
    }
    hex::encode(&head.root_hash)
}

/// The stored log: its nodes (each packed leaf counted as one), the levels `log_nodes`
/// holds, and the `log_leaves` rows.
fn stored_nodes(dir: &Path) -> (u64, Vec<u32>, u64) {
    let one = |sql: &str| -> u64 { query_on_hub(dir, sql)[0].parse().unwrap() };
    let nodes = one("SELECT CAST(COUNT(*) AS TEXT) FROM log_nodes")
        + one("SELECT CAST(COALESCE(SUM(length(hashes) / 32), 0) AS TEXT) FROM log_leaves");
    let levels = query_on_hub(
        dir,
        "SELECT CAST(level AS TEXT) FROM log_nodes GROUP BY level ORDER BY level",
    )
    .iter()
    .map(|l| l.parse().unwrap())
    .collect();
    (
        nodes,
        levels,
        one("SELECT CAST(COUNT(*) AS TEXT) FROM log_leaves"),
    )
}

/// A new log packs its leaves (up to 32 a row, `log_leaves`) and stores every fourth level
/// above them; logs from before keep their leaves as `log_nodes` rows, with every fourth
/// level or every level, and go on doing so. All give the same tree: the same root for the
/// same ratings, every inclusion and consistency proof verifying, and `log verify`
/// accounting for exactly the nodes each layout stores.
#[tokio::test]
async fn a_log_stored_packed_sparse_or_dense_proves_the_same_tree() {
    use rating_hub::merkle::Layout;
    let hub = TestHub::start().await;
    submit_batches(&hub, "l", 3, 100).await;
    let (nodes, levels, leaf_rows) = stored_nodes(hub.dir.path());
    assert_eq!(nodes, Layout::PACKED.nodes_due(300));
    assert_eq!(levels, [4, 8]);
    // Three groups of 100: at most five rows each (runs of 32), at least ten in all.
    assert!((10..=15).contains(&leaf_rows), "{leaf_rows} leaf rows");
    let packed_root = every_proof_verifies(&hub, 300).await;
    let (ok, report) = verify_hub(hub.dir.path());
    assert!(ok, "{report}");
    assert_eq!(report["root"], packed_root);

    // log_meta, layout included, cannot be changed; nor can a leaf row.
    let stopped = hub.stop().await;
    refused_sql(
        stopped.dir.path(),
        [
            "UPDATE log_meta SET node_stride = 1;",
            "UPDATE log_meta SET packed_leaves = NOT packed_leaves;",
            "DELETE FROM log_meta;",
            "UPDATE log_leaves SET first = first + 1 WHERE first = 0;",
            "DELETE FROM log_leaves;",
        ],
        "append-only",
    );
    // Nor may a leaf row overlap another (positions 41 and 42 held twice).
    refused_sql(
        stopped.dir.path(),
        ["INSERT INTO log_leaves (first, hashes) \
          SELECT 40, substr(hashes, 1, 64) FROM log_leaves WHERE first = 32;"],
        "overlap",
    );
    // On PostgreSQL TRUNCATE fires no row trigger: every append-only table refuses it.
    if crate::pg::enabled() {
        let tables = [
            "ratings",
            "log_nodes",
            "log_leaves",
            "log_meta",
            "service_case_events",
            "bad_rating_case_entries",
            "evidence_blobs",
            "case_evidence",
            "pii_access",
            "rating_exclusions",
        ];
        refused_sql(
            stopped.dir.path(),
            tables.map(|t| format!("TRUNCATE {t} CASCADE;")),
            "append-only",
        );
    }
    // An exclusion (a rating taken out of the counts) cannot be changed or withdrawn either.
    exec_on_hub(
        stopped.dir.path(),
        "INSERT INTO rating_exclusions (hub_id, reason, case_id, at) \
         SELECT hub_id, 1, 0, 0 FROM ratings WHERE feed_seq = 1;",
    );
    refused_sql(
        stopped.dir.path(),
        [
            "UPDATE rating_exclusions SET reason = 2;",
            "DELETE FROM rating_exclusions;",
        ],
        "append-only",
    );
    // A node forged at a level the layout leaves out (the append-only guard allows INSERT):
    // verify names the level, and the hub does not start on it.
    exec_on_hub(
        stopped.dir.path(),
        "INSERT INTO log_nodes (level, idx, hash) \
         SELECT 1, 0, hash FROM log_nodes WHERE level = 4 AND idx = 0;",
    );
    let (ok, report) = verify_hub(stopped.dir.path());
    assert!(!ok);
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("level 1: 1 stored, 0 due"),
        "{report}"
    );
    let stopped = refused_start(stopped, &["stores a node at level 1"]).await;
    // Leaves forged into the table a packed log does not keep leaves in (one at index −1,
    // outside the feed): verify and the start name both tables.
    exec_on_hub(
        stopped.dir.path(),
        &format!(
            "{} DELETE FROM log_nodes WHERE level = 1; INSERT INTO log_nodes (level, idx, hash) \
             SELECT 0, 0, hash FROM log_nodes WHERE level = 4 AND idx = 0; \
             INSERT INTO log_nodes (level, idx, hash) \
             SELECT 0, -1, hash FROM log_nodes WHERE level = 4 AND idx = 0;",
            lift_log_guard()
        ),
    );
    let (ok, report) = verify_hub(stopped.dir.path());
    assert!(!ok);
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("keeps its leaves in log_leaves (log_meta.packed_leaves 1) and log_nodes holds leaves too, from feed position 0"),
        "{report}"
    );
    let stopped = refused_start(stopped, &["log_leaves", "log_nodes holds leaves"]).await;
    // Rows the hub never writes are refused by the table: empty, part of a hash, more than
    // a run, across two runs.
    let forged = [
        "SELECT 300, substr(hashes, 1, 0)",
        "SELECT 300, substr(hashes, 1, 31)",
        "SELECT 320, hashes || hashes",
        "SELECT 31, substr(hashes, 1, 64)",
    ];
    refused_sql(
        stopped.dir.path(),
        forged.map(|f| {
            format!("INSERT INTO log_leaves (first, hashes) {f} FROM log_leaves WHERE first = 0;")
        }),
        "check",
    );
    // A leaf row overlapping another (positions 41 and 42 stored twice): a proof that reads
    // them fails rather than use either, and verify names the first.
    exec_on_hub(
        stopped.dir.path(),
        &format!(
            "{} DELETE FROM log_nodes WHERE level = 0; INSERT INTO log_leaves (first, hashes) \
             SELECT 40, substr(hashes, 1, 64) FROM log_leaves WHERE first = 32;",
            lift_log_guard()
        ),
    );
    let (ok, report) = verify_hub(stopped.dir.path());
    assert!(!ok);
    assert_eq!(report["first_bad_position"], 41, "{report}");
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("two log_leaves rows"),
        "{report}"
    );
    let hub = stopped.restart().await;
    let mut sync = crate::relay::SyncServiceClient::new(hub.channel_as("tester").await);
    for (seq, ok) in [(1, true), (33, false), (42, false), (65, true)] {
        let proof = sync
            .get_inclusion_proof(pb::GetInclusionProofRequest {
                leaf: Some(pb::get_inclusion_proof_request::Leaf::FeedSequence(seq)),
                tree_size: 300,
            })
            .await;
        assert_eq!(proof.is_ok(), ok, "{seq}: {proof:?}");
        if let Err(status) = proof {
            // The hub's storage failure (logged with the position), not a bad request.
            assert_eq!(status.code(), tonic::Code::Internal, "{seq}: {status:?}");
        }
    }
    let stopped = hub.stop().await;
    // A row forged over the log's end (positions 296.., the last row's 289..=300): the
    // start names the position two rows hold rather than the size the forged row gives.
    exec_on_hub(
        stopped.dir.path(),
        "DELETE FROM log_leaves WHERE first = 40; INSERT INTO log_leaves (first, hashes) \
         SELECT 295, substr(hashes, 1, 32) FROM log_leaves WHERE first = 288;",
    );
    let stopped = refused_start(stopped, &["feed position 296", "two log_leaves rows"]).await;
    exec_on_hub(
        stopped.dir.path(),
        "DELETE FROM log_leaves WHERE first = 295;",
    );
    // And a level it keeps without its first node.
    exec_on_hub(
        stopped.dir.path(),
        &format!(
            "{} DELETE FROM log_nodes WHERE level = 4 AND idx = 0;",
            lift_log_guard()
        ),
    );
    let stopped = refused_start(stopped, &["has no node at level 4"]).await;

    // The same ratings' log as hubs from before wrote it: every fourth level with the
    // leaves in log_nodes, then every level; each goes on in its layout.
    let (mut stopped, mut root, mut size) = (stopped, packed_root, 300);
    for (layout, stride, levels) in [
        (Layout::SPARSE, 4, vec![0, 4, 8]),
        (Layout::DENSE, 1, (0..=8).collect()),
    ] {
        exec_on_hub(
            stopped.dir.path(),
            &format!(
                "{} DELETE FROM log_leaves; DELETE FROM log_nodes; DELETE FROM log_meta; \
                 INSERT INTO log_meta (id, hash_alg, backfill_to, node_stride, packed_leaves) \
                 VALUES (1, 'sm3', {size}, {stride}, {});",
                lift_log_guard(),
                if crate::pg::enabled() { "false" } else { "0" }
            ),
        );
        let hub = stopped.restart().await;
        assert_eq!(
            stored_nodes(hub.dir.path()),
            (layout.nodes_due(size), levels, 0)
        );
        assert_eq!(every_proof_verifies(&hub, size).await, root);
        submit(
            &mut hub.ingest().await,
            (0..37).map(|i| rating(&format!("m{stride}-{i}"))).collect(),
        )
        .await;
        size += 37;
        assert_eq!(stored_nodes(hub.dir.path()).0, layout.nodes_due(size));
        root = every_proof_verifies(&hub, size).await;
        let (ok, report) = verify_hub(hub.dir.path());
        assert!(ok, "{report}");
        assert_eq!(report["root"], root);
        stopped = hub.stop().await;
        if layout == Layout::SPARSE {
            // A packed flag set on a log whose leaves are in log_nodes: refused by name.
            exec_on_hub(
                stopped.dir.path(),
                &format!(
                    "{} UPDATE log_meta SET packed_leaves = {};",
                    lift_log_guard(),
                    if crate::pg::enabled() { "true" } else { "1" }
                ),
            );
            let (ok, report) = verify_hub(stopped.dir.path());
            assert!(!ok);
            assert_eq!(report["first_bad_position"], 1, "{report}");
            stopped = refused_start(stopped, &["log_nodes holds leaves"]).await;
        }
    }
    assert_eq!(size, 374);
    let hub = stopped.restart().await;
    let dense_root = root;

    // The layout cannot be changed behind the hub: log_meta refuses it, and with its guard
    // lifted, the start and verify both refuse what the stored levels contradict.
    let stopped = hub.stop().await;
    let dir = stopped.dir.path().to_owned();
    // A stride this hub cannot read is refused by the table.
    refused_sql(
        &dir,
        [format!(
            "{} UPDATE log_meta SET node_stride = 2;",
            lift_log_guard()
        )],
        "check",
    );
    exec_on_hub(
        &dir,
        &format!("{} UPDATE log_meta SET node_stride = 4;", lift_log_guard()),
    );
    let (ok, report) = verify_hub(&dir);
    assert!(!ok);
    assert!(
        report["reason"]
            .as_str()
            .unwrap()
            .contains("level 1: 187 stored, 0 due"),
        "{report}"
    );
    let stopped = refused_start(stopped, &["level 1", "node_stride 4"]).await;

    // `log verify` of a new version on a database its hub has not migrated yet: a log
    // without node_stride stores every level, and without packed_leaves keeps its leaves in
    // log_nodes.
    exec_on_hub(
        &dir,
        "UPDATE log_meta SET node_stride = 1; ALTER TABLE log_meta DROP COLUMN node_stride; \
         ALTER TABLE log_meta DROP COLUMN packed_leaves; DROP TABLE log_leaves;",
    );
    let (ok, report) = verify_hub(&dir);
    assert!(ok, "{report}");
    assert_eq!(report["root"], dense_root);

    // That database as a hub from before the layouts left it (the migrations not applied):
    // the migrations keep its log dense with its leaves in log_nodes, and the hub goes on
    // writing every level.
    let versions = if crate::pg::enabled() {
        "11, 13"
    } else {
        "14, 16"
    };
    exec_on_hub(
        &dir,
        &format!("DELETE FROM _sqlx_migrations WHERE version IN ({versions});"),
    );
    let hub = match stopped.try_restart_with(|b| b).await {
        Ok(hub) => hub,
        Err((e, _)) => panic!("the hub starts on the migrated database: {e:#}"),
    };
    submit_batches(&hub, "n", 1, 20).await;
    assert_eq!(
        stored_nodes(hub.dir.path()),
        (Layout::DENSE.nodes_due(394), (0..=8).collect(), 0)
    );
    assert_eq!(
        query_on_hub(
            hub.dir.path(),
            "SELECT CAST(node_stride AS TEXT) || ' ' || CAST(packed_leaves AS TEXT) FROM log_meta"
        ),
        [if crate::pg::enabled() {
            "1 false"
        } else {
            "1 0"
        }]
    );
    every_proof_verifies(&hub, 394).await;
    let (ok, report) = verify_hub(hub.dir.path());
    assert!(ok, "{report}");
    hub.stop().await;
}

/// The log itself rewritten: an inner node changed is named by the positions it covers; a
/// log rebuilt whole from edited ratings (its tables emptied, so the hub writes it again at
/// start) verifies on its own, and is caught by the root recorded before (`--size --root`).
#[tokio::test]
async fn a_rewritten_log_is_caught_by_its_nodes_or_by_a_root_recorded_before() {
    let hub = TestHub::start().await;
    submit(
        &mut hub.ingest().await,
        (1..=40).map(|i| rating(&format!("r{i}"))).collect(),
    )
    .await;
    let (_, before) = verify_hub(hub.dir.path());
    let root_before = before["root"].as_str().unwrap().to_owned();
    // `log verify --size 40 --root <root before>` on a hub's database: the report.
    let against_root_before = |dir: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
            .args(["log", "verify", "--json", "--size", "40", "--root"])
            .arg(&root_before)
            .arg("--config")
            .arg(dir.join("hub.toml"))
            .env_remove("RATING_HUB_CONFIG")
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out.status.success(), report["ok"] == true, "{report}");
        report
    };
    assert_eq!(
        against_root_before(hub.dir.path())["expected_root_matches"],
        true
    );
    let stopped = hub.stop().await;
    let dir = stopped.dir.path().to_owned();
    let lift = lift_log_guard();
    // Level 4 (the first stored above the leaves), index 1: the subtree over positions
    // 17..=32.
    exec_on_hub(
        &dir,
        &format!(
            "{lift} UPDATE log_nodes SET hash = (SELECT hash FROM log_nodes WHERE level = 4 \
             AND idx = 0) WHERE level = 4 AND idx = 1;"
        ),
    );
    let (ok, report) = verify_hub(&dir);
    assert!(!ok);
    assert_eq!(report["first_bad_position"], 17, "{report}");
    assert!(
        report["reason"].as_str().unwrap().contains("17..=32"),
        "{report}"
    );

    // Rating 7 edited and the whole log rebuilt from the edited ratings.
    exec_on_hub(
        &dir,
        &format!(
            "{} {} UPDATE ratings SET level = level % 5 + 1 WHERE feed_seq = 7; \
             DELETE FROM log_leaves; DELETE FROM log_nodes; DELETE FROM log_meta;",
            drop_guard(),
            lift
        ),
    );
    let hub = stopped.restart().await;
    let (ok, rebuilt) = verify_hub(hub.dir.path());
    assert!(ok, "a consistent rewrite verifies on its own: {rebuilt}");
    assert_ne!(rebuilt["root"], before["root"]);
    let report = against_root_before(hub.dir.path());
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["expected_root_matches"], false, "{report}");
    hub.stop().await;
}

/// A rating inserted at the feed's end behind the hub's back (the triggers allow INSERT):
/// the hub refuses to start rather than take it into the log; a database's hash cannot be
/// changed by the configuration either.
#[tokio::test]
async fn a_rating_written_around_the_hub_or_another_hash_stops_the_start() {
    let hub = TestHub::start().await;
    submit(
        &mut hub.ingest().await,
        (1..=5).map(|i| rating(&format!("w{i}"))).collect(),
    )
    .await;
    let stopped = hub.stop().await;
    let refused = match stopped
        .try_restart_with(|b| b.set("rating_log.hash", "\"sha256\""))
        .await
    {
        Ok(_) => panic!("a hub configured with another hash than its log's must not start"),
        Err((e, stopped)) => {
            let e = format!("{e:#}");
            assert!(e.contains("rating_log.hash") && e.contains("sm3"), "{e}");
            stopped
        }
    };
    let cols = rating_hub::store::log::LEAF_COLUMNS;
    let (new_id, bump) = if crate::pg::enabled() {
        (
            "uuid_send(gen_random_uuid())",
            "UPDATE feed_head SET head = 6 WHERE id = 1;",
        )
    } else {
        ("randomblob(16)", "")
    };
    let select = cols
        .replacen("feed_seq", "6", 1)
        .replacen("hub_id", new_id, 1)
        .replacen("source_key", "source_key || 'x'", 1);
    exec_on_hub(
        refused.dir.path(),
        &format!(
            "INSERT INTO ratings ({cols}) SELECT {select} FROM ratings WHERE feed_seq = 5; {bump}"
        ),
    );
    let (ok, report) = verify_hub(refused.dir.path());
    assert!(!ok);
    assert_eq!(report["first_bad_position"], 6, "{report}");
    match refused.try_restart().await {
        Ok(_) => panic!("a rating written around the hub must not be taken into the log"),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains("written around the hub"), "{e}");
        }
    }
}

/// Issue #22: signed tree heads and proofs through SyncService. The head verifies under the
/// key `rating-hub log key` prints and has the root `log verify` recomputes; every stored
/// rating's inclusion proof (by feed position, and by hub id) verifies against it; the head
/// taken after 10 ratings is consistent with the later one; a rating outside the caller's
/// scope is not found, and sizes outside the log are refused.
#[tokio::test]
async fn signed_heads_and_proofs_verify_against_the_log() {
    use rating_hub::merkle::{HashAlg, verify_consistency, verify_inclusion};
    use rating_hub::tree_head::{PublicKey, SignatureAlg, SigningKey, TreeHead};
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("log.key");
    std::fs::write(&key_file, SigningKey::generate(SignatureAlg::Sm2)).unwrap();
    let other_org = org(2);
    let hub = HubBuilder::new()
        .set("rating_log.key", &format!("\"{}\"", key_file.display()))
        .principal(
            "city-puller",
            &["pull"],
            TestScope::Orgs(std::slice::from_ref(&other_org)),
        )
        .start_in_dir(dir)
        .await;
    let mut sync = crate::relay::SyncServiceClient::new(hub.channel_as("tester").await);
    let mut ingest = hub.ingest().await;
    let first: Vec<pb::Rating> = (0..10).map(|i| rating(&format!("h{i}"))).collect();
    let early_ids: Vec<String> = submit(&mut ingest, first)
        .await
        .into_iter()
        .map(|r| r.hub_id)
        .collect();
    let early = sync
        .get_tree_head(pb::GetTreeHeadRequest { fresh: true })
        .await
        .unwrap()
        .into_inner()
        .tree_head
        .unwrap();
    assert_eq!(early.tree_size, 10);
    submit(
        &mut ingest,
        (10..33).map(|i| rating(&format!("h{i}"))).collect(),
    )
    .await;
    let head = sync
        .get_tree_head(pb::GetTreeHeadRequest { fresh: true })
        .await
        .unwrap()
        .into_inner()
        .tree_head
        .unwrap();
    assert_eq!(head.tree_size, 33);
    assert_eq!(head.signature_algorithm, "sm2-sm3");

    // The public key as the operator exports it.
    let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
        .args(["log", "key", "--config"])
        .arg(hub.dir.path().join("hub.toml"))
        .env_remove("RATING_HUB_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let public = PublicKey::parse(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let parsed = TreeHead::from_pb(&head).unwrap();
    assert!(
        parsed.verify(&public),
        "the head verifies under the exported key"
    );
    let (_, offline) = verify_hub(hub.dir.path());
    assert_eq!(offline["root"], hex::encode(&head.root_hash));

    let root: [u8; 32] = head.root_hash.clone().try_into().unwrap();
    for seq in 1..=33u64 {
        let p = sync
            .get_inclusion_proof(pb::GetInclusionProofRequest {
                leaf: Some(pb::get_inclusion_proof_request::Leaf::FeedSequence(seq)),
                tree_size: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((p.feed_sequence, p.tree_size), (seq, 33));
        let path: Vec<[u8; 32]> = p
            .audit_path
            .iter()
            .map(|h| h.clone().try_into().unwrap())
            .collect();
        let leaf: [u8; 32] = p.leaf_hash.clone().try_into().unwrap();
        assert!(
            verify_inclusion(HashAlg::Sm3, seq - 1, 33, &leaf, &path, &root),
            "position {seq}"
        );
    }
    let by_id = sync
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            leaf: Some(pb::get_inclusion_proof_request::Leaf::HubId(
                early_ids[3].clone(),
            )),
            tree_size: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((by_id.feed_sequence, by_id.tree_size), (4, 10));
    assert_eq!(by_id.root_hash, early.root_hash);

    let c = sync
        .get_consistency_proof(pb::GetConsistencyProofRequest {
            first: 10,
            second: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.first, c.second), (10, 33));
    assert_eq!(c.first_root, early.root_hash);
    let proof: Vec<[u8; 32]> = c
        .proof
        .iter()
        .map(|h| h.clone().try_into().unwrap())
        .collect();
    let early_root: [u8; 32] = early.root_hash.clone().try_into().unwrap();
    assert!(verify_consistency(
        HashAlg::Sm3,
        10,
        33,
        &early_root,
        &root,
        &proof
    ));

    // Scoped like Pull: the city puller sees no rating of organisation 1.
    let mut city = crate::relay::SyncServiceClient::new(hub.channel_as("city-puller").await);
    for leaf in [
        pb::get_inclusion_proof_request::Leaf::FeedSequence(4),
        pb::get_inclusion_proof_request::Leaf::HubId(early_ids[3].clone()),
    ] {
        let err = city
            .get_inclusion_proof(pb::GetInclusionProofRequest {
                leaf: Some(leaf),
                tree_size: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    }
    let err = sync
        .get_consistency_proof(pb::GetConsistencyProofRequest {
            first: 0,
            second: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = sync
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            leaf: Some(pb::get_inclusion_proof_request::Leaf::FeedSequence(3)),
            tree_size: 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    hub.stop().await;
}

/// A log of `n` leaves drawn from `tag`, as a lower hub would hold it: its root, and its
/// nodes for proofs.
pub(crate) type Nodes = std::collections::HashMap<(u32, u64), [u8; 32]>;

pub(crate) fn tree(tag: &str, n: u64) -> ([u8; 32], Nodes) {
    use rating_hub::merkle::{Frontier, HashAlg};
    let alg = HashAlg::Sm3;
    let mut f = Frontier::empty(alg);
    let mut nodes = std::collections::HashMap::new();
    for i in 0..n {
        for (l, idx, h) in f.append(alg.leaf(format!("{tag}{i}").as_bytes())) {
            nodes.insert((l, idx), h);
        }
    }
    (f.root(), nodes)
}

/// A head of that log signed by `by`.
pub(crate) fn head(
    size: u64,
    root: [u8; 32],
    time: i64,
    by: &rating_hub::tree_head::SigningKey,
) -> rating_hub::tree_head::TreeHead {
    let mut h = rating_hub::tree_head::TreeHead {
        size,
        root,
        timestamp_micros: time,
        hash: rating_hub::merkle::HashAlg::Sm3,
        signature_alg: None,
        signature: Vec::new(),
        key_id: Vec::new(),
    };
    h.sign(by).unwrap();
    h
}

/// A lower hub's report of `h` with its proof from the head of `from` ratings.
pub(crate) fn report(
    h: rating_hub::tree_head::TreeHead,
    from: u64,
    proof: Vec<[u8; 32]>,
) -> pb::ReportTreeHeadRequest {
    pb::ReportTreeHeadRequest {
        tree_head: Some(h.to_pb()),
        from_size: from,
        consistency_proof: proof.iter().map(|p| p.to_vec()).collect(),
        ..Default::default()
    }
}

/// A fresh Ed25519 log key, as a lower hub's.
pub(crate) fn new_log_key() -> rating_hub::tree_head::SigningKey {
    use rating_hub::tree_head::{SignatureAlg, SigningKey};
    SigningKey::parse(
        SignatureAlg::Ed25519,
        &SigningKey::generate(SignatureAlg::Ed25519),
    )
    .unwrap()
}

/// `builder` with `city-hub`, a lower hub relaying with `key` registered as its log key.
pub(crate) fn with_city_hub(
    builder: HubBuilder,
    key: &rating_hub::tree_head::SigningKey,
) -> HubBuilder {
    builder
        .principal("city-hub", &["submit", "relay"], TestScope::National)
        .set(
            "principals.city-hub.log_key",
            &format!("\"{}\"", key.public().to_text()),
        )
}

pub(crate) fn an_hour_ago() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
        - 3_600_000_000
}

pub(crate) async fn peer_heads(hub: &TestHub, alarms_only: bool) -> Vec<pb::PeerHead> {
    crate::security::AdminServiceClient::new(hub.channel_as("tester").await)
        .list_peer_heads(pb::ListPeerHeadsRequest {
            principal: "city-hub".into(),
            alarms_only,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .heads
}

/// Issue #22's tamper case: a city hub relays to a province hub, which checks each of the
/// city's tree heads against the city's registered log key and the last head it accepted.
/// The city's database is then edited while it is stopped (a level changed, a rating
/// deleted): the restarted city's self-check finds the first changed position, the same one
/// `rating-hub log verify` finds, and the province records an alarm naming the city and
/// that position. The city's log then rebuilt whole from the edited ratings: the province
/// finds its next head inconsistent with the one it accepted. Ratings keep flowing
/// throughout, and before the tampering there is no alarm.
#[tokio::test]
async fn a_city_hubs_tampered_database_raises_an_alarm_at_the_province() {
    use rating_hub::tree_head::{SignatureAlg, SigningKey};
    let city_dir = tempfile::tempdir().unwrap();
    let key_file = city_dir.path().join("log.key");
    let key_text = SigningKey::generate(SignatureAlg::Sm2);
    std::fs::write(&key_file, &key_text).unwrap();
    let public = SigningKey::parse(SignatureAlg::Sm2, &key_text)
        .unwrap()
        .public()
        .to_text();
    let province = HubBuilder::new()
        .principal("city-hub", &["submit", "relay"], TestScope::National)
        .set("principals.city-hub.log_key", &format!("\"{public}\""))
        .start()
        .await;
    let cert = province.client_files("city-hub");
    let ca = province.pki_dir().join(rating_hub::pki::CA_CERT);
    let q = |p: &Path| format!("\"{}\"", p.display());
    let city = crate::relay::upstream(HubBuilder::new(), "province", &province.url())
        .set("upstreams.province.ca", &q(&ca))
        .set("upstreams.province.cert", &q(&cert.cert))
        .set("upstreams.province.key", &q(&cert.key))
        .set("upstreams.province.tls_domain", "\"localhost\"")
        .set("rating_log.key", &q(&key_file))
        .set("rating_log.sign_interval_secs", "1")
        .start_in_dir(city_dir)
        .await;
    submit(
        &mut city.ingest().await,
        (1..=20).map(|i| rating(&format!("c{i}"))).collect(),
    )
    .await;
    crate::fake_upstream::eventually(
        std::time::Duration::from_secs(30),
        "the province to accept the city's head of 20",
        || async {
            peer_heads(&province, false)
                .await
                .iter()
                .any(|h| h.outcome == "accepted" && h.tree_size == 20)
        },
    )
    .await;
    assert_eq!(
        peer_heads(&province, true).await,
        Vec::new(),
        "no false alarm"
    );

    // The city's database edited while it is stopped.
    let stopped = city.stop().await;
    exec_on_hub(
        stopped.dir.path(),
        &format!(
            "{} UPDATE ratings SET level = level % 5 + 1 WHERE feed_seq = 7; \
             DELETE FROM ratings WHERE feed_seq = 12;",
            drop_guard()
        ),
    );
    let (_, offline) = verify_hub(stopped.dir.path());
    assert_eq!(offline["first_bad_position"], 7, "{offline}");
    let city = stopped.restart().await;
    submit(&mut city.ingest().await, vec![rating("c21")]).await;
    crate::fake_upstream::eventually(
        std::time::Duration::from_secs(30),
        "the province to record the city's self-check alarm",
        || async {
            peer_heads(&province, true)
                .await
                .iter()
                .any(|h| h.outcome == "self_check" && h.first_bad_position == 7)
        },
    )
    .await;

    // The gap filled with a forged rating and the city's log rebuilt whole from the edited
    // ratings (its log tables emptied: the hub writes them again at start).
    let stopped = city.stop().await;
    let lift = lift_log_guard();
    let cols = rating_hub::store::log::LEAF_COLUMNS;
    let new_id = if crate::pg::enabled() {
        "uuid_send(gen_random_uuid())"
    } else {
        "randomblob(16)"
    };
    let forged = cols
        .replacen("feed_seq", "12", 1)
        .replacen("hub_id", new_id, 1)
        .replacen("source_key", "source_key || 'x'", 1);
    exec_on_hub(
        stopped.dir.path(),
        &format!(
            "{lift} INSERT INTO ratings ({cols}) SELECT {forged} FROM ratings WHERE feed_seq = 13; \
             DELETE FROM log_leaves; DELETE FROM log_nodes; DELETE FROM log_meta;"
        ),
    );
    let city = stopped.restart().await;
    crate::fake_upstream::eventually(
        std::time::Duration::from_secs(30),
        "the province to find the rebuilt log inconsistent",
        || async {
            peer_heads(&province, true)
                .await
                .iter()
                .any(|h| h.outcome == "inconsistent" && h.principal == "city-hub")
        },
    )
    .await;
    // Ingest from the city goes on: its ratings still arrive.
    let late = submit(&mut city.ingest().await, vec![rating("c22")]).await;
    let id = late[0].hub_id.clone();
    crate::fake_upstream::eventually(
        std::time::Duration::from_secs(30),
        "the city's rating at the province",
        || {
            let id = id.clone();
            let province = &province;
            async move {
                province
                    .query()
                    .await
                    .get_rating(pb::GetRatingRequest { hub_id: id })
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    city.stop().await;
    province.stop().await;
}

/// The province's checks, driven directly: a head signed by another key is bad_signature; a
/// relay principal with no registered key is refused; an older, smaller head (a replay, or
/// another instance's) is stale and raises nothing; a head extending the accepted one is
/// accepted; a head that does not is inconsistent, recorded once however often it comes;
/// only an admin lists the findings. In scope, an inclusion proof is served.
#[tokio::test]
async fn the_province_checks_each_head_and_records_each_finding_once() {
    use rating_hub::merkle::{HashAlg, Prover};
    let (key, stranger) = (new_log_key(), new_log_key());
    let province = with_city_hub(HubBuilder::new(), &key)
        .principal("keyless-hub", &["submit", "relay"], TestScope::National)
        .principal("reader", &["read"], TestScope::National)
        .start()
        .await;
    let alg = HashAlg::Sm3;
    let mut city = IngestServiceClient::new(province.channel_as("city-hub").await);
    let t = an_hour_ago();
    let (r5, _) = tree("a", 5);
    let first = city
        .report_tree_head(report(head(5, r5, t, &key), 0, vec![]))
        .await
        .unwrap()
        .into_inner();
    assert!(first.accepted && first.accepted_size == 5, "{first:?}");
    for _ in 0..2 {
        let bad = city
            .report_tree_head(report(head(6, r5, t + 1, &stranger), 5, vec![]))
            .await
            .unwrap()
            .into_inner();
        assert!(
            !bad.accepted && bad.problem.starts_with("bad_signature"),
            "{bad:?}"
        );
    }
    let stale = city
        .report_tree_head(report(head(3, tree("a", 3).0, t - 10, &key), 5, vec![]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !stale.accepted && stale.problem.starts_with("stale"),
        "{stale:?}"
    );
    let (r8, nodes8) = tree("a", 8);
    let proof = Prover {
        alg,
        nodes: &nodes8,
    }
    .consistency(5, 8)
    .unwrap();
    let next = city
        .report_tree_head(report(head(8, r8, t + 2, &key), 5, proof))
        .await
        .unwrap()
        .into_inner();
    assert!(next.accepted && next.accepted_size == 8, "{next:?}");
    // A rewritten log: its own proof from 8, which does not hold for the accepted root.
    let (r10, nodes10) = tree("b", 10);
    let proof = Prover {
        alg,
        nodes: &nodes10,
    }
    .consistency(8, 10)
    .unwrap();
    for i in 0..3 {
        let forked = city
            .report_tree_head(report(head(10, r10, t + 3 + i, &key), 8, proof.clone()))
            .await
            .unwrap()
            .into_inner();
        assert!(
            !forked.accepted && forked.problem.starts_with("inconsistent"),
            "{forked:?}"
        );
    }
    // A proof longer than any real one (here about 4 MB of repeated hashes) is refused
    // before any of it is hashed.
    let err = city
        .report_tree_head(report(head(10, r10, t + 9, &key), 8, vec![r10; 110_000]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // After the accepted head of 8, a badly signed head is a finding again (recorded once
    // more), and a head dated far ahead of the province's clock is one of its own.
    for _ in 0..2 {
        let bad = city
            .report_tree_head(report(head(11, r10, t + 20, &stranger), 8, vec![]))
            .await
            .unwrap()
            .into_inner();
        assert!(bad.problem.starts_with("bad_signature"), "{bad:?}");
    }
    let ahead = t + 3_600_000_000 + 3_600_000_000;
    let future = city
        .report_tree_head(report(head(10, r10, ahead, &key), 8, vec![]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !future.accepted && future.problem.starts_with("future_time"),
        "{future:?}"
    );
    let alarms = peer_heads(&province, true).await;
    let outcomes: Vec<&str> = alarms.iter().map(|h| h.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        [
            "future_time",
            "bad_signature",
            "inconsistent",
            "bad_signature"
        ],
        "each finding once between accepted heads: {alarms:?}"
    );
    let accepted: Vec<u64> = peer_heads(&province, false)
        .await
        .iter()
        .filter(|h| h.outcome == "accepted")
        .map(|h| h.tree_size)
        .collect();
    assert_eq!(accepted, [8, 5]);
    // A newer, smaller head reported from 0 (a lower hub restarted after its database was
    // restored from an older backup): a removal, not a request to prove from 8.
    let shrunk = city
        .report_tree_head(report(head(6, tree("a", 6).0, t + 30, &key), 0, vec![]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !shrunk.accepted
            && shrunk.problem.starts_with("inconsistent")
            && shrunk.problem.contains("from 7 on were removed"),
        "{shrunk:?}"
    );

    let err = IngestServiceClient::new(province.channel_as("keyless-hub").await)
        .report_tree_head(report(head(1, tree("k", 1).0, t, &key), 0, vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err = crate::security::AdminServiceClient::new(province.channel_as("reader").await)
        .list_peer_heads(pb::ListPeerHeadsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // In scope, a proof is served (the scope test above only shows refusals).
    let ids = submit(&mut province.ingest().await, vec![rating("p1")]).await;
    let p = crate::relay::SyncServiceClient::new(province.channel_as("tester").await)
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            leaf: Some(pb::get_inclusion_proof_request::Leaf::HubId(
                ids[0].hub_id.clone(),
            )),
            tree_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.feed_sequence, 1);
    province.stop().await;
}

/// After an alarm is investigated, an operator makes the lower hub's rewritten log the
/// baseline (`rating-hub admin rebaseline`): its next heads are checked against it and
/// accepted, the finding before stays listed, and the re-baseline is recorded with who
/// made it and why. A reason is required; only an admin may; a head that was never
/// signature-checked cannot become the baseline. Each lower hub with a registered key has
/// a last-accepted gauge from the start (the absence alert's input), moved by each
/// accepted head.
#[tokio::test]
async fn an_operator_rebaselines_a_lower_hub_after_an_investigation() {
    use rating_hub::merkle::{HashAlg, Prover};
    let (key, stranger) = (new_log_key(), new_log_key());
    let province = with_city_hub(HubBuilder::new(), &key)
        .principal("keyless-hub", &["submit", "relay"], TestScope::National)
        .principal("reader", &["read"], TestScope::National)
        .start()
        .await;
    let gauge = |samples: &crate::metrics::Samples, peer: &str| {
        samples
            .get(&(
                "rating_hub_log_peer_head_timestamp_seconds".to_owned(),
                vec![("peer".to_owned(), peer.to_owned())],
            ))
            .copied()
    };
    let before = an_hour_ago() as f64 / 1e6 + 3600.0;
    let (_, samples) = crate::metrics::scrape(&province).await;
    let started = gauge(&samples, "city-hub").expect("a gauge for a lower hub with a key");
    assert!(started > 1e9 && started <= before + 1.0, "{started}");
    assert_eq!(
        gauge(&samples, "keyless-hub"),
        None,
        "no key: no heads expected"
    );

    let alg = HashAlg::Sm3;
    let t = an_hour_ago();
    let mut city = IngestServiceClient::new(province.channel_as("city-hub").await);
    let send = async |city: &mut IngestServiceClient<_>, r| {
        city.report_tree_head(r).await.unwrap().into_inner()
    };
    let (r5, _) = tree("a", 5);
    assert!(
        send(&mut city, report(head(5, r5, t, &key), 0, vec![]))
            .await
            .accepted
    );
    // A badly signed head cannot become the baseline.
    let bad = send(&mut city, report(head(6, r5, t + 1, &stranger), 5, vec![])).await;
    assert!(bad.problem.starts_with("bad_signature"), "{bad:?}");
    // The city's log rewritten: its head of 10 does not extend the accepted 5.
    let (r10, nodes10) = tree("b", 10);
    let proof = |first, second| {
        Prover {
            alg,
            nodes: &nodes10,
        }
        .consistency(first, second)
        .unwrap()
    };
    let forked = send(
        &mut city,
        report(head(10, r10, t + 2, &key), 5, proof(5, 10)),
    )
    .await;
    assert!(forked.problem.starts_with("inconsistent"), "{forked:?}");

    let hub_dir = province.dir.path().to_owned();
    let tester = province.client_files("tester");
    let reader = province.client_files("reader");
    let admin = |who: &rating_hub::pki::IssuedPair, args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rating-hub"));
        cmd.args(["admin", "--json", "--url", &province.url(), "--cert"])
            .arg(&who.cert)
            .arg("--key")
            .arg(&who.key)
            .arg("--ca")
            .arg(hub_dir.join("pki").join(rating_hub::pki::CA_CERT))
            .args(args);
        cmd
    };
    let listed = output(admin(&tester, &["peer-heads", "--principal", "city-hub"])).await;
    assert!(listed.status.success(), "{listed:?}");
    let listed: Vec<Value> = serde_json::from_slice(&listed.stdout).unwrap();
    let bad_id = listed
        .iter()
        .find(|h| h["outcome"] == "bad_signature")
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let refused = output(admin(&tester, &["rebaseline", "city-hub", "--reason", " "])).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("reason"),
        "{refused:?}"
    );
    let refused = output(admin(
        &tester,
        &[
            "rebaseline",
            "city-hub",
            "--id",
            &bad_id.to_string(),
            "--reason",
            "x",
        ],
    ))
    .await;
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("bad_signature"),
        "{refused:?}"
    );
    let refused = output(admin(&reader, &["rebaseline", "city-hub", "--reason", "x"])).await;
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("lacks the admin role"),
        "{refused:?}"
    );
    // A name that never reported a head is not found (nor locked for).
    let refused = output(admin(&tester, &["rebaseline", "nobody", "--reason", "x"])).await;
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("has reported no tree heads"),
        "{refused:?}"
    );
    // The head as listed: a size or root that is not the record's is refused.
    let r10_hex = hex::encode(r10);
    let stale = output(admin(
        &tester,
        &[
            "rebaseline",
            "city-hub",
            "--reason",
            "x",
            "--size",
            "9",
            "--root",
            &r10_hex,
        ],
    ))
    .await;
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("list it again"),
        "{stale:?}"
    );
    let done = output(admin(
        &tester,
        &[
            "rebaseline",
            "city-hub",
            "--reason",
            "restored from the 11-29 backup; ticket 4711",
            "--size",
            "10",
            "--root",
            &r10_hex,
        ],
    ))
    .await;
    assert!(done.status.success(), "{done:?}");
    let baseline: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(baseline["outcome"], "rebaselined", "{baseline}");
    assert_eq!(baseline["tree_size"], 10, "{baseline}");
    assert_eq!(baseline["root_hash"], hex::encode(r10), "{baseline}");
    assert!(
        baseline["detail"]
            .as_str()
            .unwrap()
            .contains("by tester: restored"),
        "{baseline}"
    );
    // Nothing inconsistent since: a second re-baseline needs a head named.
    let again = output(admin(
        &tester,
        &["rebaseline", "city-hub", "--reason", "again"],
    ))
    .await;
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no inconsistent head since"),
        "{again:?}"
    );

    // The city's next heads extend the new baseline: a report still proving from 5 is told
    // the size to prove from, and the proof from 10 is accepted.
    let (r12, nodes12) = tree("b", 12);
    let proof12 = Prover {
        alg,
        nodes: &nodes12,
    }
    .consistency(10, 12)
    .unwrap();
    let moved = send(&mut city, report(head(12, r12, t + 3, &key), 5, vec![])).await;
    assert!(!moved.accepted && moved.accepted_size == 10, "{moved:?}");
    // Heads dated an hour ago left the gauge at the province's start; a head signed now
    // moves it to the head's time.
    let (_, samples) = crate::metrics::scrape(&province).await;
    assert_eq!(gauge(&samples, "city-hub"), Some(started));
    let signed_now = an_hour_ago() + 3_600_000_000;
    let next = send(
        &mut city,
        report(head(12, r12, signed_now, &key), 10, proof12),
    )
    .await;
    assert!(next.accepted && next.accepted_size == 12, "{next:?}");
    let (_, samples) = crate::metrics::scrape(&province).await;
    assert_eq!(
        gauge(&samples, "city-hub"),
        Some((signed_now / 1_000_000) as f64)
    );
    // Within the hour, the next accepted head advances that record instead of adding one.
    let before_14 = peer_heads(&province, false).await;
    assert_eq!(
        (before_14[0].outcome.as_str(), before_14[0].tree_size),
        ("accepted", 12)
    );
    let (r14, nodes14) = tree("b", 14);
    let proof14 = Prover {
        alg,
        nodes: &nodes14,
    }
    .consistency(12, 14)
    .unwrap();
    let next = send(
        &mut city,
        report(head(14, r14, signed_now + 1, &key), 12, proof14),
    )
    .await;
    assert!(next.accepted && next.accepted_size == 14, "{next:?}");
    let after_14 = peer_heads(&province, false).await;
    assert_eq!(after_14.len(), before_14.len(), "{after_14:?}");
    assert_eq!(
        (
            after_14[0].id,
            after_14[0].tree_size,
            &after_14[0].root_hash
        ),
        (before_14[0].id, 14, &r14.to_vec())
    );
    assert_eq!(
        after_14[0].received_at, before_14[0].received_at,
        "the record keeps the time it was made: one record spans at most the hour"
    );
    // A lasting self-check failure reported with each accepted head is one finding, and the
    // accepted record still advances past it.
    let self_check = |size: u64, from: u64, time: i64| {
        let (root, nodes) = tree("b", size);
        let proof = Prover { alg, nodes: &nodes }
            .consistency(from, size)
            .unwrap();
        pb::ReportTreeHeadRequest {
            self_check_first_bad: 3,
            self_check_reason: "level changed".into(),
            ..report(head(size, root, time, &key), from, proof)
        }
    };
    for (size, from, time) in [(16, 14, signed_now + 2), (18, 16, signed_now + 3)] {
        let r = send(&mut city, self_check(size, from, time)).await;
        assert!(r.accepted, "{r:?}");
    }
    let heads = peer_heads(&province, false).await;
    let self_checks = heads.iter().filter(|h| h.outcome == "self_check").count();
    assert_eq!(self_checks, 1, "{heads:?}");
    let newest_accepted = heads.iter().find(|h| h.outcome == "accepted").unwrap();
    assert_eq!(
        (newest_accepted.id, newest_accepted.tree_size),
        (before_14[0].id, 18),
        "{heads:?}"
    );
    // A head older than the baseline's cannot become the baseline.
    let old_id = peer_heads(&province, false)
        .await
        .iter()
        .find(|h| h.outcome == "accepted" && h.tree_size == 5)
        .unwrap()
        .id;
    let back = output(admin(
        &tester,
        &[
            "rebaseline",
            "city-hub",
            "--id",
            &old_id.to_string(),
            "--reason",
            "x",
        ],
    ))
    .await;
    assert!(
        String::from_utf8_lossy(&back.stderr).contains("before the current baseline"),
        "{back:?}"
    );

    let alarms: Vec<String> = peer_heads(&province, true)
        .await
        .into_iter()
        .map(|h| h.outcome)
        .collect();
    assert_eq!(
        alarms,
        ["self_check", "inconsistent", "bad_signature"],
        "the findings stay"
    );
    province.stop().await;
}

/// A pulling platform follows the hub's signed heads with `rating-hub log head`: each head
/// verifies under the exported key and extends the one accepted before (and a rating it
/// pulled is in the tree); a head under another key is refused. After the hub's database is
/// edited and its log rebuilt whole, the next head is NOT CONSISTENT with the one the
/// platform kept, which stays in its state file; `rating-hub log verify --head` with that
/// file finds the database no longer has its root, and refuses a head file edited after
/// signing.
#[tokio::test]
async fn a_platform_following_signed_heads_catches_a_rewritten_log() {
    use rating_hub::tree_head::{SignatureAlg, SigningKey};
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("log.key");
    std::fs::write(&key_file, SigningKey::generate(SignatureAlg::Sm2)).unwrap();
    let hub = HubBuilder::new()
        .set("rating_log.key", &format!("\"{}\"", key_file.display()))
        .principal("platform", &["pull"], TestScope::National)
        .start_in_dir(dir)
        .await;
    let public = {
        let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
            .args(["log", "key", "--config"])
            .arg(hub.dir.path().join("hub.toml"))
            .env_remove("RATING_HUB_CONFIG")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let other_key = SigningKey::parse(SignatureAlg::Sm2, &SigningKey::generate(SignatureAlg::Sm2))
        .unwrap()
        .public()
        .to_text();
    let state = hub.dir.path().join("platform-head.json");
    let follow = |hub: &TestHub, key: &str, extra: &[&str]| -> Command {
        let platform = hub.client_files("platform");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rating-hub"));
        cmd.args([
            "log",
            "head",
            "--json",
            "--fresh",
            "--url",
            &hub.url(),
            "--cert",
        ])
        .arg(&platform.cert)
        .arg("--key")
        .arg(&platform.key)
        .arg("--ca")
        .arg(hub.pki_dir().join(rating_hub::pki::CA_CERT))
        .args(["--log-key", key, "--state"])
        .arg(&state)
        .args(extra);
        cmd
    };
    let parse = |out: std::process::Output| -> (bool, Value) {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
        assert_eq!(out.status.success(), v["ok"] == true, "{v}");
        (out.status.success(), v)
    };
    let kept =
        || -> Value { serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap() };
    let verify_head = |hub_dir: &Path, file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_rating-hub"))
            .args(["log", "verify", "--json", "--log-key", &public, "--head"])
            .arg(file)
            .arg("--config")
            .arg(hub_dir.join("hub.toml"))
            .env_remove("RATING_HUB_CONFIG")
            .output()
            .unwrap()
    };

    let mut ingest = hub.ingest().await;
    submit(
        &mut ingest,
        (0..10).map(|i| rating(&format!("f{i}"))).collect(),
    )
    .await;
    let (ok, first) = parse(output(follow(&hub, &public, &[])).await);
    assert!(ok, "{first}");
    assert_eq!(first["head"]["tree_size"], 10);
    assert_eq!(kept()["tree_size"], 10);
    let later = submit(
        &mut ingest,
        (10..15).map(|i| rating(&format!("f{i}"))).collect(),
    )
    .await;
    let (ok, second) = parse(output(follow(&hub, &public, &["--include", &later[2].hub_id])).await);
    assert!(ok, "{second}");
    let passed = second["passed"].to_string();
    assert!(passed.contains("extends the head of 10"), "{second}");
    assert!(passed.contains("at position 13"), "{second}");
    submit(&mut ingest, vec![rating("f-more")]).await;
    let (ok, wrong) = parse(output(follow(&hub, &other_key, &[])).await);
    assert!(
        !ok && wrong["failed"].to_string().contains("signature"),
        "{wrong}"
    );
    assert_eq!(
        kept()["tree_size"],
        15,
        "a refused head does not replace the kept one"
    );
    let out = verify_head(hub.dir.path(), &state);
    assert!(out.status.success(), "{out:?}");
    let kept_root = kept()["root_hash"].clone();

    // The database edited and its log rebuilt whole from the edited ratings.
    drop(ingest);
    let stopped = hub.stop().await;
    exec_on_hub(
        stopped.dir.path(),
        &format!(
            "{} {} UPDATE ratings SET level = level % 5 + 1 WHERE feed_seq = 7; \
             DELETE FROM log_leaves; DELETE FROM log_nodes; DELETE FROM log_meta;",
            drop_guard(),
            lift_log_guard()
        ),
    );
    let hub = stopped.restart().await;
    submit(&mut hub.ingest().await, vec![rating("f15")]).await;
    let (ok, caught) = parse(output(follow(&hub, &public, &[])).await);
    assert!(!ok, "{caught}");
    assert!(
        caught["failed"].to_string().contains("NOT CONSISTENT"),
        "{caught}"
    );
    assert_eq!(
        kept()["root_hash"],
        kept_root,
        "the platform keeps the head it trusted"
    );
    let out = verify_head(hub.dir.path(), &state);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["expected_root_matches"], false, "{report}");
    // A head file edited after signing is not trusted.
    let mut forged = kept();
    forged["tree_size"] = 14.into();
    let forged_file = hub.dir.path().join("forged-head.json");
    std::fs::write(&forged_file, forged.to_string()).unwrap();
    let out = verify_head(hub.dir.path(), &forged_file);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signature does not verify"),
        "{out:?}"
    );
    // Without a key, a head file is used only when asked for by name, and says so.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rating-hub"));
    cmd.args(["log", "verify", "--json", "--head"])
        .arg(&forged_file)
        .arg("--config")
        .arg(hub.dir.path().join("hub.toml"))
        .env_remove("RATING_HUB_CONFIG");
    let out = output(cmd).await;
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--unsigned"),
        "{out:?}"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rating-hub"));
    cmd.args(["log", "verify", "--json", "--unsigned", "--head"])
        .arg(&forged_file)
        .arg("--config")
        .arg(hub.dir.path().join("hub.toml"))
        .env_remove("RATING_HUB_CONFIG");
    let out = output(cmd).await;
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["head_signature_verified"], false, "{report}");
    hub.stop().await;
}

/// A command's output, run off the test's runtime (the hub under test serves on it).
async fn output(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}
