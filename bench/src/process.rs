//! The processes a run starts (the hub under test, baseline A) and the mTLS channels to them.

use super::*;

pub(crate) struct Child {
    pub(crate) child: tokio::process::Child,
    pub(crate) url: String,
}

impl Child {
    pub(crate) async fn spawn(mut cmd: tokio::process::Command) -> anyhow::Result<Self> {
        cmd.stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(a) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                {
                    return Ok::<_, anyhow::Error>(a.to_owned());
                }
            }
            anyhow::bail!("the process exited before announcing its address")
        })
        .await??;
        // RATING_BENCH_LOG=FILE keeps the process's later log lines (for profiling runs).
        let mut keep = match std::env::var_os("RATING_BENCH_LOG") {
            Some(path) => Some(tokio::fs::File::create(path).await?),
            None => None,
        };
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(f) = keep.as_mut() {
                    let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
        });
        Ok(Self {
            child,
            url: format!("https://{addr}"),
        })
    }

    /// Peak resident set size (VmHWM) in MiB.
    pub(crate) fn peak_rss_mib(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// Starts the hub in `work/name`, with the development certificates from `pki`.
pub(crate) async fn spawn_hub(
    bin: &Path,
    work: &Path,
    name: &str,
    pki: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<Child> {
    let dir = work.join(name);
    copy_dir(pki, &dir.join("certs/dev"))?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("serve").current_dir(&dir);
    for (k, v) in [
        ("RATING_HUB__SERVER__LISTEN", "127.0.0.1:0"),
        ("RATING_HUB__OPS__LISTEN", "127.0.0.1:0"),
        ("RATING_HUB__LOG__FILTER", "warn,rating_hub::server=info"),
        ("RATING_HUB__LIMITS__MAX_IN_FLIGHT", "100000"),
        ("RATING_HUB__LIMITS__REQUESTS_PER_SEC", "10000000"),
        ("RATING_HUB__LIMITS__REQUESTS_BURST", "10000000"),
        ("RATING_HUB__LIMITS__RATINGS_PER_SEC", "100000000"),
        ("RATING_HUB__LIMITS__RATINGS_BURST", "100000000"),
    ] {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env_remove("RUST_LOG");
    Child::spawn(cmd).await
}

/// Starts baseline A (this program's `echo` sub-command) with the certificates in `pki`.
pub(crate) async fn spawn_echo(pki: &Path) -> anyhow::Result<Child> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.arg("echo").arg("--pki").arg(pki);
    Child::spawn(cmd).await
}

/// `--env KEY=VALUE` arguments.
pub(crate) fn parse_env(env: &[String]) -> anyhow::Result<Vec<(&str, String)>> {
    env.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k, v.to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--env {kv:?}: expected KEY=VALUE"))
        })
        .collect()
}

pub(crate) async fn channels(pki: &Path, url: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let read = |f: &str| std::fs::read(pki.join(f));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(
            read("dev-admin.pem")?,
            read("dev-admin.key")?,
        ))
        .domain_name("localhost");
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Endpoint::from_shared(url.to_owned())?
                .tls_config(tls.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

pub(crate) fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}
