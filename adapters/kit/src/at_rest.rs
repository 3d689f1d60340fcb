//! Personal data at rest in an adapter's own files: sealed as the hub seals it, kept only as
//! long as it is needed, readable only by the adapter's user.
//!
//! A spooled rating carries the rater's name, ID number and phone; the hotline keeps the
//! applicant's phone per survey and the text of replies it could not read. All of it is sealed
//! with ChaCha20-Poly1305, or SM4-GCM (`[at_rest] algorithm = "sm4-gcm"`, 国密), by the
//! hub's own code ([`rating_hub::privacy::PiiKeys`]) under a key named in `[at_rest] key`,
//! bound to its row (the AEAD's associated data), so a blob copied to another row does not
//! open. Each sealed value names its key (`k1`: ChaCha20-Poly1305, `s1`: SM4-GCM); values
//! sealed under the other algorithm's key before a switch stay readable while that key is
//! there (`previous_key`, or `pii.key` beside the spool). Rows that are finished (delivered, answered, expired) are
//! deleted after `retention_days`. Every SQLite file the adapters create is mode 0600.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use rating_hub::privacy::{Algorithm, PiiKeys, Sealed};

/// The first bytes of a sealed value: never the start of a protobuf message this project
/// writes (0x53 would be field 10 as a deprecated group) nor of readable text.
const MAGIC: &[u8] = b"S1\0";

fn d_retention() -> u64 {
    30
}

/// `[at_rest]` in an adapter's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtRestConfig {
    /// The sealing key: a file holding 64 hexadecimal characters, or `env:VARIABLE`. Empty:
    /// `pii.key` beside the spool, created (mode 0600) on first start. In production keep the
    /// key apart from the data (another volume, or the environment), so a copy of the
    /// database alone reveals nothing.
    #[serde(default)]
    pub key: String,
    /// Days a finished row (delivered rating, answered or expired survey, unmatched reply)
    /// is kept before it is deleted. 0 keeps them forever.
    #[serde(default = "d_retention")]
    pub retention_days: u64,
    /// What new values are sealed with: "chacha20-poly1305" (default; a 32-byte key) or
    /// "sm4-gcm" (GB/T 32907 in GCM, RFC 8998; a 16-byte key). With `key` empty, an SM4 key
    /// is `pii-sm4.key` beside the spool, created on first start.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// The other algorithm's key, kept so values sealed before a switch stay readable (a
    /// file or `env:VARIABLE`). With `key` empty, `pii.key` (ChaCha20-Poly1305) beside the
    /// spool is read when it is there.
    #[serde(default)]
    pub previous_key: String,
}

impl Default for AtRestConfig {
    fn default() -> Self {
        Self {
            key: String::new(),
            retention_days: d_retention(),
            algorithm: Algorithm::default(),
            previous_key: String::new(),
        }
    }
}

/// The key id a sealed value names for each algorithm.
fn key_id(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Sm4Gcm => "s1",
        Algorithm::Chacha20Poly1305 => "k1",
    }
}

fn other(algorithm: Algorithm) -> Algorithm {
    match algorithm {
        Algorithm::Sm4Gcm => Algorithm::Chacha20Poly1305,
        Algorithm::Chacha20Poly1305 => Algorithm::Sm4Gcm,
    }
}

fn default_key_file(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Sm4Gcm => "pii-sm4.key",
        Algorithm::Chacha20Poly1305 => "pii.key",
    }
}

/// The sealing key and the retention period.
pub struct AtRest {
    keys: PiiKeys,
    /// Microseconds a finished row is kept; `None`: forever.
    pub retention_micros: Option<i64>,
}

impl std::fmt::Debug for AtRest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtRest").field("keys", &self.keys).finish()
    }
}

/// Writes a fresh random key (mode 0600) at `path` unless a file is there: the hub's own
/// key creation, atomic against a second adapter starting at once and against a crash.
fn create_key(path: &Path, algorithm: Algorithm) -> anyhow::Result<()> {
    PiiKeys::create_key_file_for(path, algorithm)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("cannot create the sealing key {}: {e}", path.display()))
}

impl AtRest {
    /// Loads (or, when `key` is empty, creates beside `beside`) the sealing key.
    pub fn load(cfg: &AtRestConfig, beside: &str) -> anyhow::Result<Self> {
        let dir = Path::new(beside)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let (active, previous) = (cfg.algorithm, other(cfg.algorithm));
        let mut sources = BTreeMap::new();
        let mut algorithms = BTreeMap::new();
        let source = if cfg.key.is_empty() {
            let path = dir.join(default_key_file(active));
            create_key(&path, active)?;
            path.display().to_string()
        } else {
            cfg.key.clone()
        };
        sources.insert(key_id(active).to_string(), source);
        algorithms.insert(key_id(active).to_string(), active);
        let earlier = if !cfg.previous_key.is_empty() {
            Some(cfg.previous_key.clone())
        } else if cfg.key.is_empty() {
            let path = dir.join(default_key_file(previous));
            path.exists().then(|| path.display().to_string())
        } else {
            None
        };
        if let Some(source) = earlier {
            sources.insert(key_id(previous).to_string(), source);
            algorithms.insert(key_id(previous).to_string(), previous);
        }
        let keys = PiiKeys::load_with(key_id(active), &sources, &algorithms)
            .map_err(|e| anyhow::anyhow!("[at_rest] key ({}): {e}", active.as_str()))?;
        Ok(Self {
            keys,
            retention_micros: (cfg.retention_days > 0)
                .then(|| (cfg.retention_days as i64).saturating_mul(86_400_000_000)),
        })
    }

    /// Seals `plain`, bound to `row` (its key in its table).
    pub fn seal(&self, plain: &[u8], row: &[u8]) -> Vec<u8> {
        let s = self.keys.seal(plain, row);
        let mut out = Vec::with_capacity(MAGIC.len() + 1 + s.key_id.len() + s.blob.len());
        out.extend_from_slice(MAGIC);
        out.push(s.key_id.len() as u8);
        out.extend_from_slice(s.key_id.as_bytes());
        out.extend_from_slice(&s.blob);
        out
    }

    /// The key a sealed value names, when that key is not loaded (a value sealed before a
    /// switch of algorithm whose key is no longer configured). `None` for plain values,
    /// values whose key is loaded, and truncated ones (their opening says why).
    pub fn missing_key(&self, stored: &[u8]) -> Option<String> {
        let rest = stored.strip_prefix(MAGIC)?;
        let (&n, rest) = rest.split_first()?;
        let id = rest.get(..n as usize)?;
        // A damaged value names no key: its opening says what is wrong with it.
        if id.is_empty() || !id.iter().all(u8::is_ascii_alphanumeric) {
            return None;
        }
        let id = String::from_utf8_lossy(id).into_owned();
        (!self.keys.has_key(&id)).then_some(id)
    }

    /// Whether `stored` is sealed (a row written before sealing is not).
    pub fn is_sealed(stored: &[u8]) -> bool {
        stored.starts_with(MAGIC)
    }

    /// Opens what [`seal`](Self::seal) made for `row`; a value stored before sealing existed
    /// is returned as it is.
    pub fn open(&self, stored: &[u8], row: &[u8]) -> anyhow::Result<Vec<u8>> {
        let Some(rest) = stored.strip_prefix(MAGIC) else {
            return Ok(stored.to_vec());
        };
        let (&n, rest) = rest
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("a sealed value is truncated"))?;
        anyhow::ensure!(rest.len() >= n as usize, "a sealed value is truncated");
        let (id, blob) = rest.split_at(n as usize);
        let sealed = Sealed {
            key_id: String::from_utf8_lossy(id).into_owned(),
            blob: blob.to_vec(),
        };
        self.keys
            .open(&sealed, row)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The oldest time (µs) a finished row may carry at `now` and be kept.
    pub fn keep_after(&self, now: i64) -> Option<i64> {
        self.retention_micros.map(|r| now.saturating_sub(r))
    }
}

/// Creates `path` empty with mode 0600 if it is not there, and makes an existing one 0600:
/// SQLite gives its -wal and -shm files the database's mode.
pub fn private_file(path: &str) -> anyhow::Result<()> {
    let p = Path::new(path);
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(p)
        .map_err(|e| anyhow::anyhow!("cannot open {path}: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [
            path.to_string(),
            format!("{path}-wal"),
            format!("{path}-shm"),
        ] {
            if Path::new(&f).exists() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_for_its_row_and_plain_values_pass() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.db").display().to_string();
        let a = AtRest::load(&AtRestConfig::default(), &spool).unwrap();
        let key = dir.path().join("pii.key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let sealed = a.seal("张三 13800138000".as_bytes(), b"row-1");
        assert!(AtRest::is_sealed(&sealed));
        assert!(!String::from_utf8_lossy(&sealed).contains("13800138000"));
        assert_eq!(
            a.open(&sealed, b"row-1").unwrap(),
            "张三 13800138000".as_bytes()
        );
        assert!(a.open(&sealed, b"row-2").is_err(), "bound to its row");
        assert_eq!(a.open(b"plain", b"row-1").unwrap(), b"plain");
        // A second load reads the same key.
        let b = AtRest::load(&AtRestConfig::default(), &spool).unwrap();
        assert!(b.open(&sealed, b"row-1").is_ok());
    }

    /// Switched to SM4-GCM: new values are sealed under an SM4 key of their own (created
    /// 0600 beside the spool), name it, and open only for their row and untampered; values
    /// sealed with ChaCha20-Poly1305 before the switch still open. Without the earlier key,
    /// they are refused, not misread.
    #[test]
    fn a_switch_to_sm4_gcm_seals_new_values_and_reads_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.db").display().to_string();
        let chacha = AtRest::load(&AtRestConfig::default(), &spool).unwrap();
        let old = chacha.seal("李四 13900139000".as_bytes(), b"row-1");
        let cfg = AtRestConfig {
            algorithm: Algorithm::Sm4Gcm,
            ..AtRestConfig::default()
        };
        let sm4 = AtRest::load(&cfg, &spool).unwrap();
        let key = dir.path().join("pii-sm4.key");
        assert_eq!(
            std::fs::read_to_string(&key).unwrap().trim().len(),
            32,
            "a 16-byte key in hex"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let new = sm4.seal("王五 13700137000".as_bytes(), b"row-2");
        assert_eq!(&new[..MAGIC.len() + 3], b"S1\0\x02s1", "names the SM4 key");
        assert!(!String::from_utf8_lossy(&new).contains("13700137000"));
        assert_eq!(
            sm4.open(&new, b"row-2").unwrap(),
            "王五 13700137000".as_bytes()
        );
        assert!(sm4.open(&new, b"row-1").is_err(), "bound to its row");
        let mut tampered = new.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(
            sm4.open(&tampered, b"row-2").is_err(),
            "tampering is refused"
        );
        assert_eq!(
            sm4.open(&old, b"row-1").unwrap(),
            "李四 13900139000".as_bytes(),
            "values sealed before the switch stay readable"
        );
        // Named explicitly, with the earlier key elsewhere (here: gone).
        let elsewhere = tempfile::tempdir().unwrap();
        let explicit = AtRestConfig {
            key: key.display().to_string(),
            algorithm: Algorithm::Sm4Gcm,
            ..AtRestConfig::default()
        };
        let alone = AtRest::load(
            &explicit,
            &elsewhere.path().join("spool.db").display().to_string(),
        )
        .unwrap();
        assert!(alone.open(&new, b"row-2").is_ok());
        assert!(
            alone.open(&old, b"row-1").is_err(),
            "no earlier key: refused"
        );
        let with_previous = AtRestConfig {
            previous_key: dir.path().join("pii.key").display().to_string(),
            ..explicit
        };
        let both = AtRest::load(
            &with_previous,
            &elsewhere.path().join("spool.db").display().to_string(),
        )
        .unwrap();
        assert!(both.open(&old, b"row-1").is_ok());
        // A ChaCha key named as the SM4 key is refused by name.
        let wrong = AtRestConfig {
            key: dir.path().join("pii.key").display().to_string(),
            algorithm: Algorithm::Sm4Gcm,
            ..AtRestConfig::default()
        };
        let e = AtRest::load(&wrong, &spool).unwrap_err().to_string();
        assert!(e.contains("[at_rest] key (sm4-gcm)"), "{e}");
    }
}
