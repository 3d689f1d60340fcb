//! The hub's one configuration loader: defaults (the same as `config.default.toml`), an
//! optional TOML file, then `RATING_HUB__SECTION__KEY` environment overrides. Unknown keys
//! are errors, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::auth::{DefaultQuotas, PrincipalConfig};
use crate::domain::IngestRules;
use crate::store::{PostgresOptions, SqliteOptions};

/// The documented default configuration, embedded so `rating-hub config` can print it.
/// The most calls `limits.max_in_flight` may admit at once (far beyond what one hub serves;
/// it keeps the slot arithmetic of a reload in range).
pub const MAX_IN_FLIGHT: usize = 1_000_000;

pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config.default.toml");

const ENV_PREFIX: &str = "RATING_HUB__";

/// The id of the development privacy key that `tls.dev_pki` provides.
pub const DEV_PII_KEY_ID: &str = "dev";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub privacy: PrivacyConfig,
    pub principals: BTreeMap<String, PrincipalConfig>,
    pub upstreams: BTreeMap<String, crate::relay::UpstreamConfig>,
    pub rules: RulesConfig,
    pub quality: QualityConfig,
    pub storage: StorageConfig,
    pub validation: ValidationConfig,
    pub log: LogConfig,
    pub ops: OpsConfig,
    pub public: crate::public::PublicConfig,
    pub alerts: crate::alerts::AlertsConfig,
    /// The verifiable rating log (`[log]` is the hub's own logging).
    pub rating_log: RatingLogConfig,
    /// The file the configuration was read from (with the environment over it): what a
    /// reload reads again.
    #[serde(skip)]
    pub source_file: Option<std::path::PathBuf>,
}

/// `[ops]`: the operations listener (Prometheus `/metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// Address of the operations listener; empty turns it off. Loopback unless `mtls`.
    pub listen: String,
    /// Serve it with mutual TLS (the hub's own certificate; each client presents one the
    /// hub's CA issued, naming a registered principal with the `ops` role): required for an
    /// address off loopback.
    pub mtls: bool,
    /// Days the delivery attempt log keeps each attempt (AdminService.ListAttempts).
    pub attempt_log_days: u32,
}

impl OpsConfig {
    /// The address to listen on, if any.
    pub fn addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.listen.trim().is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = self
            .listen
            .trim()
            .parse()
            .map_err(|_| format!("ops.listen: {:?} is not an address:port", self.listen))?;
        if !addr.ip().is_loopback() && !self.mtls {
            return Err(format!(
                "ops.listen: {addr} is not a loopback address; off loopback the operations \
                 listener needs ops.mtls = true (clients present certificates of principals \
                 with the ops role)"
            ));
        }
        Ok(Some(addr))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub dev_pki: bool,
    pub dev_pki_dir: PathBuf,
    pub cert: String,
    pub key: String,
    pub client_ca: String,
    pub crl_files: Vec<PathBuf>,
    pub handshake_timeout_secs: u64,
    pub insecure_plaintext: bool,
}

impl TlsConfig {
    fn or_dev(&self, value: &str, file: &str) -> Option<PathBuf> {
        if !value.is_empty() {
            Some(PathBuf::from(value))
        } else if self.dev_pki {
            Some(self.dev_pki_dir.join(file))
        } else {
            None
        }
    }

    /// The files the listener uses, or which setting is missing.
    pub fn files(&self) -> Result<crate::tls::TlsFiles, ConfigError> {
        let need = |v: Option<PathBuf>, name: &str| {
            v.ok_or_else(|| {
                ConfigError::Invalid(format!("tls.{name} must be set when tls.dev_pki is false"))
            })
        };
        let mut crls = self.crl_files.clone();
        if self.dev_pki {
            crls.push(self.dev_pki_dir.join(crate::pki::CRL));
        }
        Ok(crate::tls::TlsFiles {
            cert: need(self.or_dev(&self.cert, crate::pki::SERVER_CERT), "cert")?,
            key: need(self.or_dev(&self.key, crate::pki::SERVER_KEY), "key")?,
            client_ca: need(
                self.or_dev(&self.client_ca, crate::pki::CA_CERT),
                "client_ca",
            )?,
            crls,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityConfig {
    pub template_min: u32,
    pub template_window_secs: i64,
    pub device_burst: u32,
    pub device_window_secs: i64,
    pub phone_burst: u32,
    pub phone_window_secs: i64,
}

impl QualityConfig {
    pub fn thresholds(&self) -> crate::store::QualityThresholds {
        crate::store::QualityThresholds {
            template_min: self.template_min,
            template_window_secs: self.template_window_secs,
            device_burst: self.device_burst,
            device_window_secs: self.device_window_secs,
            phone_burst: self.phone_burst,
            phone_window_secs: self.phone_window_secs,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    pub tick_secs: u64,
    pub calendar_file: String,
    pub calendar_overrides: crate::rules::CalendarOverrides,
    pub profiles: BTreeMap<String, crate::rules::Profile>,
    pub regions: BTreeMap<String, String>,
}

impl RulesConfig {
    pub fn calendar(&self) -> Result<crate::rules::Calendar, ConfigError> {
        let cal = if self.calendar_file.is_empty() {
            crate::rules::Calendar::national()
        } else {
            let text = std::fs::read_to_string(&self.calendar_file).map_err(|source| {
                ConfigError::Read {
                    path: self.calendar_file.clone(),
                    source,
                }
            })?;
            crate::rules::Calendar::parse(&text)
                .map_err(|e| ConfigError::Invalid(format!("rules.calendar_file: {e}")))?
        };
        cal.with_overrides(&self.calendar_overrides)
            .map_err(|e| ConfigError::Invalid(format!("rules.calendar_overrides: {e}")))
    }

    pub fn profiles(&self) -> Result<crate::rules::Profiles, ConfigError> {
        crate::rules::Profiles::load(&self.profiles, &self.regions)
            .map_err(|e| ConfigError::Invalid(format!("rules: {e}")))
    }
}

/// `[rating_log]`: the Merkle tree over the feed (src/merkle.rs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatingLogConfig {
    /// sm3 (default) or sha256; fixed when a database's log is first written.
    pub hash: crate::merkle::HashAlg,
    /// The log key file that signs tree heads ("" with tls.dev_pki: a development key in
    /// the development PKI's directory; "" otherwise: heads are not signed).
    pub key: String,
    /// sm2 (with SM3) or ed25519.
    pub signature: crate::tree_head::SignatureAlg,
    /// A head is signed at least this often.
    pub sign_interval_secs: u64,
    /// Check the stored ratings against the log at start, in the background (a read of
    /// every rating: minutes at tens of millions).
    pub self_check: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_in_flight: usize,
    pub requests_per_sec: u32,
    pub requests_burst: u32,
    pub ratings_per_sec: u32,
    pub ratings_burst: u32,
    pub evidence_max_mb: u32,
}

impl LimitsConfig {
    pub fn quotas(&self) -> DefaultQuotas {
        DefaultQuotas {
            requests_per_sec: self.requests_per_sec,
            requests_burst: self.requests_burst,
            ratings_per_sec: self.ratings_per_sec,
            ratings_burst: self.ratings_burst,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    pub active_key: String,
    pub keys: BTreeMap<String, String>,
    /// Each key's algorithm, where it is not ChaCha20-Poly1305 (e.g. `sm4-gcm`).
    #[serde(default)]
    pub algorithms: BTreeMap<String, crate::privacy::Algorithm>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_batch: usize,
    pub max_message_bytes: usize,
    pub stream_window: usize,
    pub stream_window_bytes: usize,
    pub shutdown_grace_secs: u64,
    pub health_check_secs: u64,
    pub plaintext_source_system: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub url: String,
    pub synchronous: Synchronous,
    pub max_group_commit: usize,
    pub write_queue: usize,
    pub read_connections: u32,
    /// PostgreSQL only: how long a query waits for a read connection before it fails.
    pub read_wait_ms: u64,
    /// SQLite only: health is NOT_SERVING while the database's disk has less free space.
    pub min_free_mb: u64,
    /// PostgreSQL only: how long an instance's lease on an upstream lasts without renewal.
    pub lease_secs: u64,
    /// PostgreSQL only: this instance's name in relay leases ("" = host name and process id).
    pub instance: String,
}

impl StorageConfig {
    /// The database URL without its password, for logs and errors.
    pub fn display_url(&self) -> String {
        // Credentials may sit in the user info (`user:password@`, the password possibly
        // with an unescaped '@') or in the query (`?password=…`): keep neither.
        let url = self
            .url
            .split_once('?')
            .map_or(self.url.as_str(), |(u, _)| u);
        let shown = match url.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}@{host}")
                }
                None => url.to_owned(),
            },
            None => url.to_owned(),
        };
        if url.len() < self.url.len() {
            format!("{shown}?…")
        } else {
            shown
        }
    }

    /// This instance's name in relay leases.
    pub fn instance_name(&self) -> String {
        if !self.instance.is_empty() {
            return self.instance.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "hub".into());
        // The tail of a v7 UUID is random: two processes reusing a pid still differ.
        let tag = uuid::Uuid::now_v7().simple().to_string();
        format!("{host}-{}-{}", std::process::id(), &tag[24..])
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    pub clock_skew_secs: i64,
    pub require_reason_for_bad: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigError {
    /// The same error with URL credentials masked (a TOML error quotes the line it is about:
    /// `storage.url` carries the database password).
    fn redacted(self) -> Self {
        let r = |m: String| crate::api::redact_urls(&m);
        match self {
            ConfigError::Read { path, source } => ConfigError::Read { path, source },
            ConfigError::Parse { path, message } => ConfigError::Parse {
                path,
                message: r(message),
            },
            ConfigError::Env { var, reason } => ConfigError::Env {
                var,
                reason: r(reason),
            },
            ConfigError::Invalid(m) => ConfigError::Invalid(r(m)),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::from_layers(None, std::iter::empty()).expect("the embedded default config is valid")
    }
}

impl Config {
    /// Defaults, then the file (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match file {
            Some(p) => Some((
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?,
            )),
            None => None,
        };
        let mut config = Self::from_layers(
            text.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
            std::env::vars(),
        )
        .map_err(ConfigError::redacted)?;
        config.source_file = file.map(Path::to_path_buf);
        Ok(config)
    }

    /// Builds a config from an optional (name, TOML text) file layer and environment pairs.
    pub fn from_layers(
        file: Option<(&str, &str)>,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut merged: toml::Table =
            toml::from_str(DEFAULT_CONFIG_TOML).map_err(|e| ConfigError::Parse {
                path: "<embedded defaults>".into(),
                message: e.to_string(),
            })?;
        // Where each setting that is not a default came from, so an error can say which
        // file or environment variable to fix.
        let mut origins = Origins::default();
        if let Some((path, text)) = file {
            let layer: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.into(),
                message: e.to_string(),
            })?;
            origins.file(&layer, "", path);
            merge(&mut merged, layer);
        }
        for (var, value) in env {
            let Some(path) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            set_path(&mut merged, &keys, parse_env_value(&value)).map_err(|reason| {
                ConfigError::Env {
                    var: var.clone(),
                    reason,
                }
            })?;
            origins.set(keys.join("."), format!("environment variable {var}"));
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged))
            .map_err(|e| {
                let key = e.path().to_string();
                let message = e.into_inner().message().to_owned();
                // An unknown key is reported at its section: name the key itself.
                let key = match message.strip_prefix("unknown field `") {
                    Some(rest) => {
                        let field = rest.split('`').next().unwrap_or_default();
                        if key == "." {
                            field.to_owned()
                        } else {
                            format!("{key}.{field}")
                        }
                    }
                    None => key,
                };
                ConfigError::Invalid(origins.describe(&format!("{key}: {message}")))
            })?;
        config.check().map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(origins.describe(&m)),
            other => other,
        })?;
        // Named once: the relay's leases and the database sessions use the same name.
        config.storage.instance = config.storage.instance_name();
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let fail = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.server.max_batch == 0 || self.server.max_batch > crate::codec::BATCH_CEILING {
            return Err(ConfigError::Invalid(format!(
                "server.max_batch must be 1 to {}",
                crate::codec::BATCH_CEILING
            )));
        }
        if self.server.stream_window == 0 {
            return fail("server.stream_window must be at least 1");
        }
        if self.server.stream_window_bytes < 65_536 {
            return fail("server.stream_window_bytes must be at least 65536");
        }
        if self.storage.lease_secs < 2 {
            return fail("storage.lease_secs must be at least 2");
        }
        if self.storage.max_group_commit == 0 {
            return fail("storage.max_group_commit must be at least 1");
        }
        // A rating may be dated at most this far past the hub's clock. More than a day is
        // no clock skew; past the year 9999 the stores' date functions would not count it.
        if !(0..=86_400).contains(&self.validation.clock_skew_secs) {
            return fail("validation.clock_skew_secs must be between 0 and 86400 (a day)");
        }
        if self.ops.mtls && self.tls.insecure_plaintext {
            return fail("ops.mtls needs TLS; tls.insecure_plaintext turns it off");
        }
        if let Err(e) = self.ops.addr() {
            return fail(&e);
        }
        if !(1..=3650).contains(&self.ops.attempt_log_days) {
            return fail("ops.attempt_log_days must be 1 to 3650");
        }
        if let Err(e) = self.public.check() {
            return fail(&e);
        }
        if let Err(e) = self.alerts.check() {
            return fail(&e);
        }
        if !(1..=256).contains(&self.limits.evidence_max_mb) {
            return fail("limits.evidence_max_mb must be 1 to 256");
        }
        if self.limits.max_in_flight == 0 || self.limits.max_in_flight > MAX_IN_FLIGHT {
            return Err(ConfigError::Invalid(format!(
                "limits.max_in_flight must be 1 to {MAX_IN_FLIGHT}"
            )));
        }
        for (name, v) in [
            ("limits.requests_per_sec", self.limits.requests_per_sec),
            ("limits.requests_burst", self.limits.requests_burst),
            ("limits.ratings_per_sec", self.limits.ratings_per_sec),
            ("limits.ratings_burst", self.limits.ratings_burst),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.server.health_check_secs == 0 {
            return fail("server.health_check_secs must be at least 1");
        }
        if self.rules.tick_secs == 0 {
            return fail("rules.tick_secs must be at least 1");
        }
        self.rules.profiles()?;
        for (name, u) in &self.upstreams {
            u.check(name).map_err(ConfigError::Invalid)?;
        }
        if self.server.plaintext_source_system.trim().is_empty() {
            return fail("server.plaintext_source_system must not be empty");
        }
        Ok(())
    }

    /// The log key's file: the configured one, or the development key under `tls.dev_pki`.
    pub fn rating_log_key(&self) -> Option<std::path::PathBuf> {
        if !self.rating_log.key.is_empty() {
            return Some(self.rating_log.key.clone().into());
        }
        self.tls
            .dev_pki
            .then(|| self.tls.dev_pki_dir.join("log-dev.key"))
    }

    /// The privacy keys, with the development key added under `tls.dev_pki`.
    pub fn privacy_keys(&self) -> BTreeMap<String, String> {
        let mut keys = self.privacy.keys.clone();
        if self.tls.dev_pki {
            keys.entry(DEV_PII_KEY_ID.to_owned()).or_insert_with(|| {
                self.tls
                    .dev_pki_dir
                    .join("pii-dev.key")
                    .display()
                    .to_string()
            });
        }
        keys
    }

    pub fn ingest_rules(&self) -> IngestRules {
        IngestRules {
            clock_skew_secs: self.validation.clock_skew_secs,
            require_reason_for_bad: self.validation.require_reason_for_bad,
        }
    }

    pub fn postgres_options(&self) -> PostgresOptions {
        PostgresOptions {
            url: self.storage.url.clone(),
            max_group_commit: self.storage.max_group_commit,
            write_queue: self.storage.write_queue,
            read_connections: self.storage.read_connections,
            read_wait: std::time::Duration::from_millis(self.storage.read_wait_ms.max(1)),
            instance: self.storage.instance_name(),
            log_hash: self.rating_log.hash,
        }
    }

    pub fn sqlite_options(&self) -> SqliteOptions {
        SqliteOptions {
            path: self.storage.url.clone(),
            synchronous_full: self.storage.synchronous == Synchronous::Full,
            max_group_commit: self.storage.max_group_commit,
            write_queue: self.storage.write_queue,
            read_connections: self.storage.read_connections,
            min_free_bytes: self.storage.min_free_mb.saturating_mul(1 << 20),
            log_hash: self.rating_log.hash,
        }
    }
}

/// Which layer set each setting (dotted key → "config file …" or "environment variable …").
#[derive(Default)]
struct Origins(Vec<(String, String)>);

impl Origins {
    fn set(&mut self, key: String, origin: String) {
        self.0.retain(|(k, _)| k != &key);
        self.0.push((key, origin));
    }

    fn file(&mut self, table: &toml::Table, prefix: &str, path: &str) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(t) => self.file(t, &key, path),
                _ => self.set(key, format!("config file {path}")),
            }
        }
    }

    /// `message` (which starts with the setting's dotted key), with where that setting came
    /// from: the longest key of a layer that the message's key starts with, or that starts
    /// with it (a section named in the message whose key came from the layer).
    fn describe(&self, message: &str) -> String {
        let key = message
            .split(|c: char| c.is_whitespace() || c == ':')
            .next()
            .unwrap_or_default();
        let found = self
            .0
            .iter()
            .filter(|(k, _)| {
                k == key || key.starts_with(&format!("{k}.")) || k.starts_with(&format!("{key}."))
            })
            .max_by_key(|(k, _)| k.len());
        match found {
            Some((_, origin)) => format!("{message} (set by {origin})"),
            // A setting no layer set: its default is at fault.
            None if key.contains('.') && !key.contains('[') => {
                format!("{message} (the embedded default)")
            }
            // Not about one setting (a profile, an upstream): the message names what.
            None => message.to_owned(),
        }
    }
}

fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (k, v) in layer {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => merge(b, l),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    match keys {
        [] => Err("names no setting".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => match table
            .entry(first.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => set_path(t, rest, value),
            _ => Err(format!("{first} is a value, not a section")),
        },
    }
}

/// A TOML scalar or array when the text is one (`5`, `true`, `["a"]`), else the plain string.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

/// The settings only a restart puts in force, each with a form that changes when it does
/// (compared, never shown: some hold key paths or URLs with passwords).
pub fn restart_only(config: &Config) -> Vec<(&'static str, String)> {
    let s = &config.server;
    vec![
        ("server.listen", s.listen.to_string()),
        ("server.max_message_bytes", s.max_message_bytes.to_string()),
        (
            "server.shutdown_grace_secs",
            s.shutdown_grace_secs.to_string(),
        ),
        ("server.health_check_secs", s.health_check_secs.to_string()),
        (
            "server.plaintext_source_system",
            s.plaintext_source_system.clone(),
        ),
        ("tls", format!("{:?}", config.tls)),
        ("privacy", format!("{:?}", config.privacy)),
        // Without the instance name: made afresh at each load when none is configured (a
        // configured one that changes is not told apart from that).
        (
            "storage",
            format!(
                "{:?}",
                StorageConfig {
                    instance: String::new(),
                    ..config.storage.clone()
                }
            ),
        ),
        ("rules", format!("{:?}", config.rules)),
        ("log", format!("{:?}", config.log)),
        ("ops", format!("{:?}", config.ops)),
        ("public", format!("{:?}", config.public)),
        ("alerts", format!("{:?}", config.alerts)),
        ("rating_log", format!("{:?}", config.rating_log)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TOML error quotes the line it is about; the database password in `storage.url` is
    /// masked in it, at start as on reload.
    #[test]
    fn a_config_error_never_shows_a_url_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hub.toml");
        std::fs::write(
            &file,
            "[storage]\nurl = \"postgres://hub:s3cretpw@db.example:5432/hub\" oops\n",
        )
        .unwrap();
        let e = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(!e.contains("s3cretpw"), "{e}");
        assert!(e.contains("***"), "{e}");
    }

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn defaults_bind_loopback_and_are_durable() {
        let c = Config::default();
        assert!(c.server.listen.ip().is_loopback());
        assert_eq!(c.storage.synchronous, Synchronous::Full);
        assert!(
            !c.validation.require_reason_for_bad,
            "a 差评 without a reason is accepted by default"
        );
    }

    #[test]
    fn file_then_environment_override() {
        let c = Config::from_layers(
            Some((
                "t.toml",
                "[storage]\nurl = \"/tmp/x.db\"\n[server]\nmax_batch = 10\n",
            )),
            env(&[
                ("RATING_HUB__SERVER__MAX_BATCH", "20"),
                ("RATING_HUB__STORAGE__SYNCHRONOUS", "normal"),
                ("UNRELATED", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.storage.url, "/tmp/x.db");
        assert_eq!(c.server.max_batch, 20);
        assert_eq!(c.storage.synchronous, Synchronous::Normal);
    }

    #[test]
    fn a_clock_skew_outside_a_day_is_refused_by_name() {
        for skew in ["-1", "86401", "9223372036854775807"] {
            let err = Config::from_layers(
                None,
                env(&[("RATING_HUB__VALIDATION__CLOCK_SKEW_SECS", skew)]),
            )
            .unwrap_err();
            assert!(err.to_string().contains("clock_skew_secs"), "{skew}: {err}");
        }
        let c = Config::from_layers(
            None,
            env(&[("RATING_HUB__VALIDATION__CLOCK_SKEW_SECS", "86400")]),
        )
        .unwrap();
        assert_eq!(c.validation.clock_skew_secs, 86_400);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::from_layers(
            Some(("t.toml", "[server]\nlisten_addr = \"x\"\n")),
            env(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let err = Config::from_layers(None, env(&[("RATING_HUB__SERVER__NOPE", "1")])).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    /// What the public site publishes is checked when the hub starts: a site with no region,
    /// an unknown column or rule, off loopback without HTTPS, or half a certificate, is
    /// refused with the setting named.
    #[test]
    fn a_public_site_configured_wrongly_is_refused_with_the_setting_named() {
        for (setting, named) in [
            ("regions = []", "public.regions"),
            ("regions = [\"53x\"]", "public.regions"),
            (
                "regions = [\"53\"]\ncolumns = [\"phone\"]",
                "public.columns",
            ),
            ("regions = [\"53\"]\ncases = \"soon\"", "public.cases"),
            (
                "regions = [\"53\"]\nlisten = \"0.0.0.0:8480\"",
                "public.listen",
            ),
            (
                "regions = [\"53\"]\ntls_cert = \"c.pem\"",
                "public.tls_cert",
            ),
            (
                "regions = [\"53\"]\nrefresh_secs = 0",
                "public.refresh_secs",
            ),
        ] {
            let text = format!("[public]\nlisten = \"127.0.0.1:8480\"\n{setting}\n");
            let text = text.replacen(
                "listen = \"127.0.0.1:8480\"\n",
                "",
                usize::from(setting.contains("listen")),
            );
            let err = Config::from_layers(Some(("t.toml", &text)), env(&[])).unwrap_err();
            assert!(err.to_string().contains(named), "{setting}: {err}");
        }
        let ok = "[public]\nlisten = \"127.0.0.1:8480\"\nregions = [\"5301\"]\n";
        Config::from_layers(Some(("t.toml", ok)), env(&[])).unwrap();
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let err =
            Config::from_layers(None, env(&[("RATING_HUB__SERVER__MAX_BATCH", "0")])).unwrap_err();
        assert!(err.to_string().contains("server.max_batch"), "{err}");
    }

    #[test]
    fn errors_name_the_setting_and_the_file_or_variable_that_set_it() {
        let err = Config::from_layers(
            Some(("/etc/hub.toml", "[server]\nmax_batch = \"lots\"\n")),
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.max_batch"), "{err}");
        assert!(err.contains("config file /etc/hub.toml"), "{err}");

        let err = Config::from_layers(
            Some(("/etc/hub.toml", "[server]\nmax_batch = 5\n")),
            env(&[("RATING_HUB__SERVER__MAX_BATCH", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.max_batch"), "{err}");
        assert!(
            err.contains("environment variable RATING_HUB__SERVER__MAX_BATCH"),
            "the later layer set it: {err}"
        );

        let err = Config::from_layers(
            Some(("hub.toml", "[limits]\nrequests_per_sec = 0\n")),
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("limits.requests_per_sec"), "{err}");
        assert!(err.contains("config file hub.toml"), "{err}");

        let err = Config::from_layers(Some(("hub.toml", "[storage]\nurll = \"x\"\n")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("storage.urll"), "{err}");
        assert!(err.contains("config file hub.toml"), "{err}");
    }

    #[test]
    fn display_url_shows_no_password() {
        let shown = |url: &str| {
            let mut c = Config::from_layers(None, std::iter::empty()).unwrap();
            c.storage.url = url.into();
            c.storage.display_url()
        };
        assert_eq!(shown("hub.db"), "hub.db");
        assert_eq!(
            shown("postgres://hub:s3cret@db.example:5432/ratings"),
            "postgres://hub@db.example:5432/ratings"
        );
        assert_eq!(
            shown("postgres://hub:p@ss@db.example/ratings"),
            "postgres://hub@db.example/ratings"
        );
        assert_eq!(
            shown("postgresql://db.example/ratings?user=hub&password=s3cret"),
            "postgresql://db.example/ratings?…"
        );
    }
}
