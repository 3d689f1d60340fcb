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
        // The server runs as an unprivileged user, who must reach its directory.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("make the server's directory reachable");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg");
        let out = Command::new(script)
            .arg("start")
            .arg(dir.join("server"))
            .args(["--fast", "--watch", &std::process::id().to_string()])
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
    })
}
