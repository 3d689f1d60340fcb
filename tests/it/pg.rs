//! The PostgreSQL side of the test harness.
//!
//! The shared integration tests run on SQLite by default and on PostgreSQL when
//! `RATING_HUB_TEST_BACKEND=postgres` (scripts/test runs both). The server is the one at
//! `RATING_HUB_TEST_PG_URL` (a superuser URL; scripts/test starts a throwaway one), or else one
//! this process starts with `scripts/pg` in a temp directory and that stops when it exits.
//! Every hub directory gets its own database, created on first use and kept for restarts.

use std::path::Path;

use sqlx::Connection;

/// Whether the shared tests run on PostgreSQL.
pub fn enabled() -> bool {
    std::env::var("RATING_HUB_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// The superuser URL of the test server, starting one on first use if none was given.
pub fn admin_url() -> &'static str {
    rating_hub::testing::pg_admin_url()
}

/// A new, empty database on the test server; returns its URL.
pub fn new_database() -> String {
    let admin = admin_url();
    let name = format!("hub_{}", uuid::Uuid::now_v7().simple());
    admin_exec(&format!("CREATE DATABASE {name}"));
    let base = admin.rsplit_once('/').expect("URL with a database").0;
    format!("{base}/{name}")
}

/// The database URL of a hub directory: created on first use, the same after a restart.
pub fn database_for(dir: &Path) -> String {
    let file = dir.join("postgres-url");
    if let Ok(url) = std::fs::read_to_string(&file) {
        return url;
    }
    let url = new_database();
    std::fs::write(&file, &url).unwrap();
    url
}

/// The storage URL a hub in `dir` uses on the backend under test.
pub fn storage_url(dir: &Path) -> String {
    if enabled() {
        database_for(dir)
    } else {
        dir.join("hub.db").display().to_string()
    }
}

/// Runs SQL on the test server as its superuser (on the `postgres` database).
pub fn admin_exec(sql: &str) -> Vec<String> {
    exec(admin_url(), sql)
}

/// Runs SQL on the database at `url`; returns the first column of each row as text. Its own
/// runtime on its own thread: callable from sync and async tests alike.
pub fn exec(url: &str, sql: &str) -> Vec<String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let mut conn = sqlx::PgConnection::connect(&url)
                    .await
                    .expect("connect to the test PostgreSQL server");
                use sqlx::Row;
                sqlx::query(&sql)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.try_get::<String, _>(0).unwrap_or_default())
                    .collect()
            })
    })
    .join()
    .unwrap()
}

/// Where the server keeps the database of a hub directory, when the server is on this
/// machine and its files are readable: the database's own files and the write-ahead log.
pub fn files_of(dir: &Path) -> Option<Vec<std::path::PathBuf>> {
    admin_exec("CHECKPOINT");
    let url = std::fs::read_to_string(dir.join("postgres-url")).ok()?;
    let name = url.rsplit_once('/')?.1.to_owned();
    let data = std::path::PathBuf::from(admin_exec("SHOW data_directory").pop()?);
    let oid = admin_exec(&format!(
        "SELECT oid::text FROM pg_database WHERE datname = '{name}'"
    ))
    .pop()?;
    let files = vec![data.join("base").join(oid), data.join("pg_wal")];
    files
        .iter()
        .all(|f| std::fs::read_dir(f).is_ok())
        .then_some(files)
}

/// A PostgreSQL server of a test's own that also serves TLS, with the server certificate of
/// the PKI in `pki` (`scripts/pg start --tls`). Stopped when dropped.
pub struct TlsServer {
    dir: std::path::PathBuf,
    /// The superuser URL, without TLS parameters.
    pub url: String,
}

impl TlsServer {
    pub fn start(dir: &Path, pki: &Path) -> Self {
        let url = rating_hub::testing::start_pg_server(dir, &["--tls".as_ref(), pki.as_os_str()]);
        Self {
            dir: dir.to_owned(),
            url,
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        rating_hub::testing::stop_pg_server(&self.dir);
    }
}

/// Runs SQL (several statements allowed) on the database of the hub in `dir`, whichever the
/// backend under test: a test's way to reach under the hub (a trigger that makes a write
/// fail, as a full disk or a dropped connection would). Returns nothing.
/// Reads from a hub's own database (SQLite file or PostgreSQL): the first column of each
/// row, as text.
pub fn query_on_hub(dir: &Path, sql: &str) -> Vec<String> {
    if enabled() {
        return exec(&database_for(dir), sql);
    }
    let (path, sql) = (dir.join("hub.db"), sql.to_owned());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                use sqlx::{ConnectOptions, Row};
                let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .read_only(true)
                    .connect()
                    .await
                    .unwrap();
                sqlx::query(&sql)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.try_get::<String, _>(0).unwrap_or_default())
                    .collect()
            })
    })
    .join()
    .unwrap()
}

pub fn exec_on_hub(dir: &Path, sql: &str) {
    try_exec_on_hub(dir, sql).unwrap();
}

/// As [`exec_on_hub`], returning the database's error (what a trigger said, say).
pub fn try_exec_on_hub(dir: &Path, sql: &str) -> Result<(), String> {
    let (pg, sql) = (enabled(), sql.to_owned());
    let target = if pg {
        database_for(dir)
    } else {
        dir.join("hub.db").display().to_string()
    };
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                if pg {
                    let mut conn = sqlx::PgConnection::connect(&target).await.unwrap();
                    sqlx::raw_sql(&sql)
                        .execute(&mut conn)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    let options = sqlx::sqlite::SqliteConnectOptions::new()
                        .filename(&target)
                        .busy_timeout(std::time::Duration::from_secs(30));
                    let mut conn = sqlx::SqliteConnection::connect_with(&options)
                        .await
                        .unwrap();
                    sqlx::raw_sql(&sql)
                        .execute(&mut conn)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            })
    })
    .join()
    .unwrap()
}

/// Makes every write of the hub in `dir` that moves an upstream's delivery cursor fail
/// (`on`), or work again, with a trigger that raises an error while a switch row says so.
/// Writes that leave the cursor alone (lease renewals, pause and resume) go through. (The
/// state row exists from the hub's start, so cursor writes are updates.)
pub fn fail_cursor_writes(dir: &Path, on: bool) {
    let flag = i32::from(on);
    if enabled() {
        exec_on_hub(
            dir,
            &format!(
                "CREATE TABLE IF NOT EXISTS test_fail_cursor (on_ INT NOT NULL); \
                 DELETE FROM test_fail_cursor; INSERT INTO test_fail_cursor VALUES ({flag}); \
                 CREATE OR REPLACE FUNCTION test_fail_cursor() RETURNS trigger AS $$ BEGIN \
                   IF (SELECT on_ FROM test_fail_cursor) = 1 \
                      AND NEW.cursor IS DISTINCT FROM OLD.cursor THEN \
                     RAISE EXCEPTION 'test: writes to upstream_state fail'; END IF; \
                   RETURN NEW; END $$ LANGUAGE plpgsql; \
                 CREATE OR REPLACE TRIGGER test_fail_cursor BEFORE UPDATE ON upstream_state \
                   FOR EACH ROW EXECUTE FUNCTION test_fail_cursor();"
            ),
        );
    } else {
        exec_on_hub(
            dir,
            &format!(
                "CREATE TABLE IF NOT EXISTS test_fail_cursor (on_ INT NOT NULL); \
                 DELETE FROM test_fail_cursor; INSERT INTO test_fail_cursor VALUES ({flag}); \
                 CREATE TRIGGER IF NOT EXISTS test_fail_cursor BEFORE UPDATE ON upstream_state \
                   WHEN (SELECT on_ FROM test_fail_cursor) = 1 AND NEW.cursor IS NOT OLD.cursor \
                   BEGIN SELECT RAISE(ABORT, 'test: writes to upstream_state fail'); END;"
            ),
        );
    }
}
