//! The `rating-hub` binary as an operator runs it: config from the environment, health and
//! reflection answering, SIGTERM stopping it cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// Starts the binary as a new user would — default config, working directory `dir` (so the
/// development PKI lands in dir/certs/dev) — on a free port; returns the child, its address
/// and its log lines.
pub struct SpawnedHub {
    pub child: HubProcess,
    pub url: String,
    /// Log lines up to and including the one announcing the address.
    pub early: Vec<String>,
    /// Later log lines.
    pub logs: mpsc::Receiver<String>,
}

/// A hub process, killed (SIGKILL) and reaped when dropped, so that a failing test leaves
/// none behind; otherwise a [`Child`].
pub struct HubProcess(Child);

impl std::ops::Deref for HubProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for HubProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Spawns the hub binary in `dir` (its backend the one under test) with `log_filter` and
/// extra `RATING_HUB__…` environment overrides; waits for it to log its address.
pub fn spawn_hub_with(dir: &std::path::Path, log_filter: &str, env: &[(&str, &str)]) -> SpawnedHub {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rating-hub"));
    if crate::pg::enabled() {
        cmd.env("RATING_HUB__STORAGE__URL", crate::pg::database_for(dir));
    }
    spawn(cmd, dir, log_filter, env)
}

/// Spawns the binary on its defaults whatever the backend under test (SQLite file).
pub fn spawn_hub_on_defaults(dir: &std::path::Path, log_filter: &str) -> SpawnedHub {
    spawn(
        Command::new(env!("CARGO_BIN_EXE_rating-hub")),
        dir,
        log_filter,
        &[],
    )
}

fn spawn(
    mut cmd: Command,
    dir: &std::path::Path,
    log_filter: &str,
    env: &[(&str, &str)],
) -> SpawnedHub {
    let mut child = cmd
        .arg("serve")
        .envs(env.iter().copied())
        .current_dir(dir)
        .env("RATING_HUB__SERVER__LISTEN", "127.0.0.1:0")
        .env("RATING_HUB__OPS__LISTEN", "127.0.0.1:0")
        .env("RATING_HUB__LOG__FILTER", log_filter)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rating-hub");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let pid = child.id();
    // The thread inherits the test's output capture: a failing test shows the hub's log.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("hub[{pid}] {line}");
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let mut early = Vec::new();
    while addr.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the hub logs its address within 60 s");
        addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .map(str::to_owned);
        early.push(line);
    }
    SpawnedHub {
        child: HubProcess(child),
        url: format!("https://{}", addr.unwrap()),
        early,
        logs: rx,
    }
}

/// An mTLS channel to a binary hub using its development PKI, as `dev-admin`.
pub async fn dev_admin_channel(dir: &std::path::Path, url: &str) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let pki = dir.join("certs/dev");
    let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read("dev-admin.pem"),
            read("dev-admin.key"),
        ))
        .domain_name("localhost");
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Sends `sig` (TERM, KILL, STOP, CONT…) to a hub process.
pub fn signal(child: &Child, sig: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{sig}");
}

/// Every log line still to come, up to the end of the process's output (the reader thread
/// reached EOF): reading before then can miss the last lines.
pub fn logs_to_eof(logs: &mpsc::Receiver<String>) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        match logs.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => out.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => return out,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the hub's output did not end"),
        }
    }
}

pub fn sigterm(child: &Child) {
    signal(child, "TERM");
}

pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("the hub did not exit within 30 s of SIGTERM");
}

#[tokio::test]
async fn binary_on_defaults_serves_mtls_health_and_reflection_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let SpawnedHub {
        mut child,
        url,
        early,
        logs,
    } = spawn_hub_on_defaults(dir.path(), "info");
    assert!(
        dir.path().join("certs/dev/ca.pem").exists(),
        "the development PKI was created"
    );
    assert!(
        dir.path().join("rating-hub.db").exists(),
        "the default database file"
    );
    let channel = dev_admin_channel(dir.path(), &url).await;
    let mut health = HealthClient::new(channel.clone());
    for service in [
        "",
        "ratinghub.v1.IngestService",
        "ratinghub.v1.QueryService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "ratinghub.v1.IngestService",
        "ratinghub.v1.QueryService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }

    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let rest = logs_to_eof(&logs);
    assert!(rest.iter().any(|l| l.contains("Stopped")), "{rest:?}");
    assert!(
        early.iter().any(|l| l.contains("DEVELOPMENT PKI")),
        "the development PKI is announced: {early:?}"
    );
}

#[test]
fn binary_refuses_an_unknown_setting_and_names_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
        .arg("serve")
        .env("RATING_HUB__SERVER__LISTN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listn"), "{err}");
}

#[test]
fn config_command_prints_the_documented_defaults() {
    let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
        .arg("config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, rating_hub::config::DEFAULT_CONFIG_TOML);
}

/// A load balancer's plain TCP port checks (or a scan) are refused in the TLS handshake: the
/// log says so at most once a second, with the count it held back, instead of one line per
/// connection (a 10-second burst of denials wrote 8 MB before).
#[tokio::test]
async fn a_burst_of_plain_tcp_probes_writes_a_line_a_second_not_one_each() {
    let dir = tempfile::tempdir().unwrap();
    let SpawnedHub {
        mut child,
        url,
        logs,
        ..
    } = spawn_hub_on_defaults(dir.path(), "info");
    let addr = url.trim_start_matches("https://").to_owned();
    let started = std::time::Instant::now();
    for _ in 0..200 {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
        let _ = tcp.shutdown().await;
    }
    // Every probe has been answered (refused) once a real client gets through.
    let channel = dev_admin_channel(dir.path(), &url).await;
    drop(channel);
    let elapsed = started.elapsed().as_secs_f64();
    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert!(status.success());
    let refused: Vec<String> = logs_to_eof(&logs)
        .into_iter()
        .filter(|l| l.contains("TLS handshake refused"))
        .collect();
    assert!(!refused.is_empty(), "the refusals are logged");
    assert!(
        refused.len() as f64 <= elapsed.ceil() + 1.0,
        "{} lines for 200 probes in {elapsed:.1} s: {refused:?}",
        refused.len()
    );
}

/// `rating-hub calendar show YEAR` says whether a year's days off are the State Council's or
/// provisional, so an operator can check the calendar (and a new notice) before it counts.
#[test]
fn calendar_show_says_whether_a_year_is_official_or_provisional() {
    let show = |year: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
            .args(["calendar", "show", year])
            .env_remove("RATING_HUB_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let y2026 = show("2026");
    assert!(y2026.starts_with("2026: official"), "{y2026}");
    assert!(
        y2026.contains("国办发明电〔2025〕7号") && y2026.contains("2026-02-14"),
        "{y2026}"
    );
    let y2027 = show("2027");
    assert!(y2027.starts_with("2027: PROVISIONAL"), "{y2027}");
    assert!(
        y2027.contains("2027-01-01") && y2027.contains("2027-02-05"),
        "{y2027}"
    );
}

/// `rating-hub certs …` as an operator types them (README, "Certificates"): a development
/// PKI, a client certificate for a principal, the list of what was issued, and revoking a
/// principal — which writes the CRL a running hub reads.
#[test]
fn certs_commands_issue_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
            .arg("certs")
            .args(args)
            .arg("--dir")
            .arg(&certs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "certs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["init"]);
    assert!(certs.join(rating_hub::pki::CA_CERT).exists());
    let issued = run(&["client", "--name", "km-dept"]);
    assert!(certs.join("km-dept.pem").exists() && certs.join("km-dept.key").exists());
    assert!(issued.contains("[principals.km-dept]"), "{issued}");
    let list = run(&["list"]);
    let line = list
        .lines()
        .find(|l| l.contains("km-dept"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(!line.contains("revoked"), "{line}");
    let crl_before = std::fs::read(certs.join(rating_hub::pki::CRL)).unwrap_or_default();
    let revoked = run(&["revoke", "--name", "km-dept"]);
    assert!(revoked.contains("revoked"), "{revoked}");
    let crl_after = std::fs::read(certs.join(rating_hub::pki::CRL)).unwrap();
    assert_ne!(
        crl_after, crl_before,
        "the CRL was written anew with the revocation"
    );
    let list = run(&["list"]);
    let line = list.lines().find(|l| l.contains("km-dept")).unwrap();
    assert!(line.contains("revoked"), "{line}");
    // Revoking a principal never issued a certificate is an error, not a silent no-op.
    let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
        .args(["certs", "revoke", "--name", "nobody", "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
}

/// "A PostgreSQL connection that does not verify the server's certificate … is warned of at
/// start" (README, Storage): a remote host without sslmode=verify-full gets the warning; a
/// loopback one does not. (Neither server exists: the warning comes before connecting.)
#[test]
fn an_unverified_remote_database_is_warned_of_at_start() {
    let start = |url: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
            .arg("serve")
            .current_dir(dir.path())
            .env("RATING_HUB__STORAGE__URL", url)
            .env("RATING_HUB__SERVER__LISTEN", "127.0.0.1:0")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(!out.status.success(), "no database there: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let remote = start("postgres://hub@db.invalid:5432/ratings");
    assert!(
        remote.contains("does not verify the server's certificate"),
        "{remote}"
    );
    let local = start("postgres://hub@127.0.0.1:1/ratings");
    assert!(
        !local.contains("does not verify the server's certificate"),
        "{local}"
    );
}

/// "Denials are logged": a call refused for a missing role, and one from a certificate that
/// names no registered principal, each leave a line naming the principal (the log read to
/// its end after the hub stopped).
#[tokio::test]
async fn denials_are_logged_with_the_principal() {
    use rating_hub::pb::v1 as pb;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let dir = tempfile::tempdir().unwrap();
    let SpawnedHub {
        mut child,
        url,
        early,
        logs,
    } = spawn_hub_with(
        dir.path(),
        "info",
        &[
            ("RATING_HUB__PRINCIPALS__READER__ROLES", "[\"read\"]"),
            ("RATING_HUB__PRINCIPALS__READER__ALL_REGIONS", "true"),
        ],
    );
    let pki = dir.path().join("certs/dev");
    for name in ["reader", "stranger"] {
        rating_hub::pki::issue_client(&pki, name, rating_hub::pki::Validity::days(1)).unwrap();
    }
    let channel = |name: &str| {
        let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")))
            .identity(Identity::from_pem(
                read(&format!("{name}.pem")),
                read(&format!("{name}.key")),
            ))
            .domain_name("localhost");
        Endpoint::from_shared(url.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
    };
    for name in ["reader", "stranger"] {
        let err = pb::ingest_service_client::IngestServiceClient::new(
            channel(name).connect().await.unwrap(),
        )
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: vec![crate::utils::rating("denied-1")],
        })
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{name}: {err:?}");
    }
    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert!(status.success());
    let mut all = early;
    all.extend(logs_to_eof(&logs));
    let text = all.join("\n");
    assert!(
        all.iter()
            .any(|l| l.contains("Denied: role missing.") && l.contains("reader")),
        "{text}"
    );
    assert!(
        all.iter().any(
            |l| l.contains("Denied: certificate names no registered principal.")
                && l.contains("stranger")
        ),
        "{text}"
    );
}

/// `rating-hub admin …` against a running hub, as an operator would type it (the
/// development admin's certificate from certs/dev): upstreams as a table and as JSON, pause and
/// resume, a range replay followed to its end, the attempt log, the PII access log, a reload;
/// and a clear error when the hub cannot be reached.
// Two workers: the admin command is waited for on one while the fake upstream, which the
// hub delivers to meanwhile, answers on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_command_operates_a_running_hub() {
    use crate::fake_upstream::FakeUpstream;
    use crate::utils::{IngestServiceClient, rating, submit};
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = fake.url();
    let env = [
        ("RATING_HUB__UPSTREAMS__FAKE__KIND", "grpc"),
        ("RATING_HUB__UPSTREAMS__FAKE__ENDPOINT", endpoint.as_str()),
        ("RATING_HUB__UPSTREAMS__FAKE__BATCH_SIZE", "10"),
    ];
    let SpawnedHub { mut child, url, .. } = spawn_hub_with(dir.path(), "info", &env);
    let admin = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
            .current_dir(dir.path())
            .args(["admin", "--url", &url])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&admin(&a)).unwrap()
    };
    let table = admin(&["upstreams"]);
    assert!(
        table.starts_with("upstream") && table.contains("fake"),
        "{table}"
    );
    assert_eq!(json(&["upstreams"])[0]["name"], "fake");
    json(&["pause", "fake"]);
    assert_eq!(json(&["upstreams"])[0]["paused"], true);
    json(&["resume", "fake"]);
    assert_eq!(json(&["upstreams"])[0]["paused"], false);

    let mut ingest = IngestServiceClient::new(dev_admin_channel(dir.path(), &url).await);
    submit(
        &mut ingest,
        (0..25).map(|i| rating(&format!("adm-{i}"))).collect(),
    )
    .await;
    fake.wait_until(std::time::Duration::from_secs(30), "25 delivered", |got| {
        got.len() == 25
    })
    .await;
    let replay = json(&["replay-range", "fake", "--from", "1", "--reason", "核对"]);
    assert_eq!(
        (replay["from"].as_u64(), replay["to"].as_u64()),
        (Some(1), Some(25))
    );
    assert!(!replay["done_at"].as_str().unwrap().is_empty(), "{replay}");
    fake.wait_until(
        std::time::Duration::from_secs(30),
        "all sent twice",
        |got| got.values().all(|n| *n == 2),
    )
    .await;
    let attempts = json(&["attempts", "fake", "--limit", "100"]);
    assert!(
        attempts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["replay_id"].as_u64() > Some(0))
    );
    assert!(admin(&["attempts", "fake"]).contains("delivered"));
    assert!(json(&["pii-log"]).is_array());
    assert!(json(&["reload"])["principals"].as_u64() >= Some(1));

    sigterm(&child);
    tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    // The hub is gone: the command says so and fails.
    let out = Command::new(env!("CARGO_BIN_EXE_rating-hub"))
        .current_dir(dir.path())
        .args(["admin", "--url", &url, "upstreams"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connecting to"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
