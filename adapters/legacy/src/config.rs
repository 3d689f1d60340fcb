//! The adapter's configuration file (TOML). See adapters/README.md.

use serde::Deserialize;

use rating_hub_adapter_kit::{HubConnection, Mapping};

fn d_spool() -> String {
    "legacy-spool.db".into()
}
fn d_state() -> String {
    "legacy-state.db".into()
}
fn d_poll() -> u64 {
    10
}
fn d_encoding() -> String {
    "auto".into()
}
fn d_record() -> String {
    "record".into()
}
fn d_rows() -> usize {
    100_000
}
fn d_batch() -> u32 {
    500
}
fn d_settle() -> u64 {
    30
}
fn d_wm_type() -> String {
    "integer".into()
}

/// `[[folders]]`: a drop folder of CSV and XML files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderConfig {
    /// Names the source in keys and reports; keep it stable.
    pub name: String,
    pub path: String,
    /// "utf-8", "gbk", or "auto" (UTF-8 if the file is valid UTF-8, else GBK).
    #[serde(default = "d_encoding")]
    pub encoding: String,
    /// The XML element that holds one record; its child elements are the fields.
    #[serde(default = "d_record")]
    pub xml_record: String,
    /// Most rows handled per file per pass (a huge file is worked through over passes).
    #[serde(default = "d_rows")]
    pub rows_per_pass: usize,
    /// A file is taken once it has not changed for this many seconds: a file still being
    /// copied in (SMB, FTP) is left for a later pass. Ignored when `marker` is set.
    #[serde(default = "d_settle")]
    pub settle_secs: u64,
    /// When set (e.g. ".ok"), a file is taken only once `<file><marker>` exists beside it —
    /// for senders that write a marker file after the data. A sender that writes under
    /// another name (say `x.csv.part`) and renames needs neither: only `.csv` and `.xml`
    /// files are read.
    #[serde(default)]
    pub marker: String,
    pub mapping: Mapping,
}

/// `[[tables]]`: an intermediate database table read by a watermark column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub name: String,
    /// sqlx URL: sqlite://…, postgres://…, mysql://…
    pub url: String,
    pub table: String,
    /// A column that only grows: an auto-increment id or a sequence number ("integer"), a
    /// sortable text such as "2025-06-04 09:30:00" ("text"), or a date-time column —
    /// `timestamp`, `timestamptz`, `DATETIME`, `TIMESTAMP` ("timestamp"). Rows sharing a value
    /// are all read, whatever `batch` is.
    pub watermark: String,
    #[serde(default = "d_wm_type")]
    pub watermark_type: String,
    /// Columns that identify a row (its source key).
    pub key_columns: Vec<String>,
    /// Rows per query.
    #[serde(default = "d_batch")]
    pub batch: u32,
    /// Seconds the watermark waits behind the highest value read before it moves there: a
    /// row that commits late with a smaller value (concurrent inserts, a long transaction)
    /// is still read within this time. Rows inside the window are read again each pass and
    /// spooled once. 0: move at once (only for a table written by one writer in order).
    #[serde(default = "d_settle")]
    pub settle_secs: u64,
    pub mapping: Mapping,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyConfig {
    #[serde(default = "d_spool")]
    pub spool: String,
    #[serde(default = "d_state")]
    pub state: String,
    /// Seconds between passes over the folders and tables (0: only when asked).
    #[serde(default = "d_poll")]
    pub poll_secs: u64,
    pub hub: HubConnection,
    #[serde(default)]
    pub folders: Vec<FolderConfig>,
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// Sealing of personal data in the spool, and how long delivered ratings are kept.
    #[serde(default)]
    pub at_rest: rating_hub_adapter_kit::AtRestConfig,
}

fn identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

impl LegacyConfig {
    pub fn load(path: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
        let c: Self = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
        c.check()?;
        Ok(c)
    }

    pub fn check(&self) -> anyhow::Result<()> {
        for f in &self.folders {
            anyhow::ensure!(
                matches!(f.encoding.as_str(), "utf-8" | "gbk" | "auto"),
                "folders.{}: encoding must be utf-8, gbk or auto",
                f.name
            );
        }
        for t in &self.tables {
            // Names go into SQL: only plain identifiers.
            for id in std::iter::once(&t.table)
                .chain(std::iter::once(&t.watermark))
                .chain(&t.key_columns)
                .chain(t.mapping.fields.values())
            {
                anyhow::ensure!(
                    identifier(id),
                    "tables.{}: {id:?} is not a plain column or table name",
                    t.name
                );
                // The reader names what it selects rh__0, rh__1, …
                anyhow::ensure!(
                    !id.to_ascii_lowercase().starts_with("rh__"),
                    "tables.{}: {id:?}: names starting with rh__ are the reader's own",
                    t.name
                );
            }
            anyhow::ensure!(t.batch > 0, "tables.{}: batch must be at least 1", t.name);
            anyhow::ensure!(
                !t.key_columns.is_empty(),
                "tables.{}: key_columns is required",
                t.name
            );
            anyhow::ensure!(
                matches!(t.watermark_type.as_str(), "integer" | "text" | "timestamp"),
                "tables.{}: watermark_type must be integer, text or timestamp",
                t.name
            );
        }
        Ok(())
    }
}
