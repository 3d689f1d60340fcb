//! Support for the test suites (the crate's own and tests/), not for the hub: where the
//! PostgreSQL test server is.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// The superuser URL of the PostgreSQL test server: `RATING_HUB_TEST_PG_URL` (scripts/test
/// starts a throwaway server and sets it), or else a server this process starts with
/// `scripts/pg` in a new temp directory on first use, which stops when the process exits.
pub fn pg_admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("RATING_HUB_TEST_PG_URL") {
            return url;
        }
        let dir = std::env::temp_dir().join(format!("rating-hub-pg-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir(&dir).expect("temp dir for the test PostgreSQL server");
        start_pg_server(&dir, &[])
    })
}

/// Starts a throwaway PostgreSQL server in `dir`/server with `scripts/pg start --fast` and
/// `options` (e.g. `--tls PKI`); it stops by itself when this process exits. Returns its
/// superuser URL.
pub fn start_pg_server(dir: &Path, options: &[&std::ffi::OsStr]) -> String {
    // The server runs as an unprivileged user, who must reach its directory.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("make the server's directory reachable");
    let out = Command::new(pg_script())
        .arg("start")
        .arg(dir.join("server"))
        .args(["--fast", "--watch", &std::process::id().to_string()])
        .args(options)
        .output()
        .expect("run scripts/pg");
    assert!(
        out.status.success(),
        "scripts/pg could not start a PostgreSQL server:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("scripts/pg prints a URL")
        .trim()
        .to_owned()
}

/// Stops the server `start_pg_server` started in `dir`.
pub fn stop_pg_server(dir: &Path) {
    let _ = Command::new(pg_script())
        .arg("stop")
        .arg(dir.join("server"))
        .output();
}

fn pg_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg")
}
