//! Bytes on disk per stored rating (#23), on SQLite and, given a server, PostgreSQL: a hub
//! filled with the province's ratings (`stats::fill`: 40 organisations, 10 districts, five
//! channels, 90 days), stopped, then every table and index measured — SQLite's `dbstat`
//! pages, PostgreSQL's `pg_table_size` (heap, TOAST, free-space and visibility maps) and
//! `pg_relation_size` of each index — and reported per rating, with and without the
//! indexes. `rating-bench disk --ratings N [--pg-url URL]`.

use super::*;

/// One table or index.
struct Relation {
    name: String,
    /// The table it belongs to (itself for a table).
    table: String,
    index: bool,
    bytes: i64,
}

/// A row of the queries below: name, table, whether an index, bytes.
impl From<(String, String, bool, i64)> for Relation {
    fn from((name, table, index, bytes): (String, String, bool, i64)) -> Self {
        Relation {
            name,
            table,
            index,
            bytes,
        }
    }
}

pub(crate) async fn disk_probe(
    hub_bin: &Path,
    ratings: u64,
    pg_url: Option<&str>,
) -> anyhow::Result<()> {
    let hub_bin = &hub_bin.canonicalize()?;
    let work = std::env::temp_dir().join(format!("rating-bench-disk-{}", std::process::id()));
    let pki = work.join("certs/dev");
    rating_hub::pki::init_dev(&pki)?;
    let mut backends: Vec<(&str, Option<String>)> = vec![("SQLite", None)];
    if let Some(admin) = pg_url {
        backends.push((
            "PostgreSQL",
            Some(create_database(admin, "bench_disk").await?),
        ));
    }
    for (backend, db) in backends {
        let name = format!("hub-{}", backend.to_lowercase());
        let env: Vec<(&str, String)> = db
            .iter()
            .map(|u| ("RATING_HUB__STORAGE__URL", u.clone()))
            .collect();
        let hub = spawn_hub(hub_bin, &work, &name, &pki, &env).await?;
        let ch = channels(&pki, &hub.url, 4).await?;
        let started = Instant::now();
        stats::fill(&ch, 0, ratings, stats::ORGS).await?;
        eprintln!(
            "{backend}: {ratings} ratings in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        hub.stop().await;
        let relations = match &db {
            None => sqlite_relations(&work.join(&name).join("rating-hub.db")).await?,
            Some(url) => postgres_relations(url).await?,
        };
        report(backend, ratings, &relations);
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// SQLite: each b-tree's pages (`dbstat`), with the table an index belongs to.
async fn sqlite_relations(db: &Path) -> anyhow::Result<Vec<Relation>> {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await?;
    let rows: Vec<(String, String, bool, i64)> = sqlx::query_as(
        "SELECT d.name, COALESCE(m.tbl_name, d.name), COALESCE(m.type = 'index', 0), \
         SUM(d.pgsize) FROM dbstat d LEFT JOIN sqlite_master m ON m.name = d.name \
         GROUP BY d.name",
    )
    .fetch_all(&mut conn)
    .await?;
    let file: i64 = sqlx::query_scalar(
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
    )
    .fetch_one(&mut conn)
    .await?;
    let mut out: Vec<Relation> = rows.into_iter().map(Relation::from).collect();
    // Free pages and the file's header: in the file, in no b-tree.
    let used: i64 = out.iter().map(|r| r.bytes).sum();
    out.push(Relation {
        name: "(free pages)".into(),
        table: "(free pages)".into(),
        index: false,
        bytes: file - used,
    });
    Ok(out)
}

/// PostgreSQL: each table of the hub's schema with its TOAST and maps, and each index.
async fn postgres_relations(url: &str) -> anyhow::Result<Vec<Relation>> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let rows: Vec<(String, String, bool, i64)> = sqlx::query_as(
        "SELECT c.relname::text, COALESCE(t.relname, c.relname)::text, c.relkind = 'i', \
         CASE WHEN c.relkind = 'i' THEN pg_relation_size(c.oid) ELSE pg_table_size(c.oid) END \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_index i ON i.indexrelid = c.oid \
         LEFT JOIN pg_class t ON t.oid = i.indrelid \
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'i')",
    )
    .fetch_all(&mut conn)
    .await?;
    let _ = conn.close().await;
    Ok(rows.into_iter().map(Relation::from).collect())
}

/// Prints, per rating: `ratings` and its indexes one by one, the rating log, the
/// statistics' counts, the rest, and the totals with and without the indexes.
fn report(backend: &str, ratings: u64, relations: &[Relation]) {
    let per = |b: i64| b as f64 / ratings as f64;
    let sum = |f: &dyn Fn(&Relation) -> bool| {
        relations
            .iter()
            .filter(|r| f(r))
            .map(|r| r.bytes)
            .sum::<i64>()
    };
    println!("\n{backend}, {ratings} ratings stored\n");
    println!("| table or index | bytes | bytes per rating |");
    println!("|---|---|---|");
    let mut ratings_rel: Vec<&Relation> =
        relations.iter().filter(|r| r.table == "ratings").collect();
    ratings_rel.sort_by_key(|r| (r.index, -r.bytes));
    for r in ratings_rel {
        let what = if r.index {
            format!("index {}", r.name)
        } else {
            "ratings (the rows)".into()
        };
        println!("| {what} | {} | {:.0} |", r.bytes, per(r.bytes));
    }
    const COUNTS: [&str; 6] = [
        "rating_counts",
        "rating_counts_month",
        "rating_counts_quarter",
        "case_counts",
        "case_counts_month",
        "case_counts_quarter",
    ];
    for (what, tables) in [
        (
            "rating log (log_leaves, log_nodes)",
            &["log_leaves", "log_nodes"][..],
        ),
        ("statistics' counts", &COUNTS[..]),
    ] {
        let b = sum(&|r| tables.contains(&r.table.as_str()));
        println!("| {what}, with indexes | {b} | {:.0} |", per(b));
    }
    let rest = sum(&|r| {
        !["ratings", "log_leaves", "log_nodes"].contains(&r.table.as_str())
            && !COUNTS.contains(&r.table.as_str())
    });
    println!(
        "| everything else (cases, relay, audit, free pages) | {rest} | {:.0} |",
        per(rest)
    );
    let tables = sum(&|r| !r.index);
    let all = sum(&|_| true);
    println!(
        "| **all, without indexes** | {tables} | **{:.0}** |",
        per(tables)
    );
    println!("| **all, with indexes** | {all} | **{:.0}** |", per(all));
}
