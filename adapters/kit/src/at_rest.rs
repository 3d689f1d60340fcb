//! Personal data at rest in an adapter's own files: sealed as the hub seals it, kept only as
//! long as it is needed, readable only by the adapter's user.
//!
//! A spooled rating carries the rater's name, ID number and phone; the hotline keeps the
//! applicant's phone per survey and the text of replies it could not read. All of it is sealed
//! with ChaCha20-Poly1305 ([`rating_hub::privacy::PiiKeys`], the hub's own code) under a key
//! named in `[at_rest] key`, bound to its row (the AEAD's associated data), so a blob copied
//! to another row does not open. Rows that are finished (delivered, answered, expired) are
//! deleted after `retention_days`. Every SQLite file the adapters create is mode 0600.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use rating_hub::privacy::{PiiKeys, Sealed};

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
}

impl Default for AtRestConfig {
    fn default() -> Self {
        Self {
            key: String::new(),
            retention_days: d_retention(),
        }
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
fn create_key(path: &Path) -> anyhow::Result<()> {
    PiiKeys::create_key_file(path)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("cannot create the sealing key {}: {e}", path.display()))
}

impl AtRest {
    /// Loads (or, when `key` is empty, creates beside `beside`) the sealing key.
    pub fn load(cfg: &AtRestConfig, beside: &str) -> anyhow::Result<Self> {
        let source = if cfg.key.is_empty() {
            let dir = Path::new(beside)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let path = dir.join("pii.key");
            create_key(&path)?;
            path.display().to_string()
        } else {
            cfg.key.clone()
        };
        let keys = PiiKeys::load("k1", &BTreeMap::from([("k1".to_string(), source)]))
            .map_err(|e| anyhow::anyhow!("[at_rest] key: {e}"))?;
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
}
