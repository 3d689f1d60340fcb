//! Durable storage: one [`Store`] trait, one implementation per backend.
//!
//! Contract every backend keeps:
//! - an insert is acknowledged only after its transaction committed;
//! - concurrent inserts are group-committed by one writer;
//! - (source system, source key) identifies a rating: same content → `Duplicate`, different
//!   content → `Conflict`, never an overwrite;
//! - ratings are append-only, and each committed rating gets the next gapless feed sequence.

pub mod sqlite;

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use crate::domain::{ValidCase, ValidRating};
use crate::pb::v1 as pb;

pub use sqlite::{SqliteOptions, SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is shutting down")]
    ShuttingDown,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// A rating ready to be written: parsed, with its hub id and source system.
#[derive(Debug, Clone)]
pub struct NewRating {
    pub hub_id: Uuid,
    pub source_system: String,
    pub rating: ValidRating,
    /// `rating.body`, protobuf-encoded.
    pub body_bytes: Vec<u8>,
}

/// A case event ready to be written.
#[derive(Debug, Clone)]
pub struct NewCaseEvent {
    pub source_system: String,
    pub case: ValidCase,
}

/// What the store did with one rating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    Accepted { hub_id: Uuid, feed_seq: u64 },
    Duplicate { hub_id: Uuid, feed_seq: u64 },
    Conflict { hub_id: Uuid, feed_seq: u64 },
}

/// What the store did with one case event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseOutcome {
    Accepted,
    Duplicate,
    Conflict,
}

/// A rating as stored, with the hub's own fields filled in.
#[derive(Debug, Clone)]
pub struct StoredRating {
    pub feed_seq: u64,
    pub rating: pb::Rating,
}

/// Which ratings to read; empty fields do not filter. Built from the API's `RatingFilter`
/// after validation (region prefix is digits only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RatingQuery {
    pub org_credit_code: Option<String>,
    pub region_prefix: Option<String>,
    pub item_code: Option<String>,
    pub staff_id: Option<String>,
    pub case_number: Option<String>,
    pub source_system: Option<String>,
    pub channels: Vec<i32>,
    pub levels: Vec<i32>,
    pub rated_from_micros: Option<i64>,
    pub rated_until_micros: Option<i64>,
}

/// Dimensions statistics can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsDimension {
    Region,
    Organization,
    Item,
    Staff,
    Channel,
    Day,
    Month,
}

/// Counts for one group. `key` has one value per requested dimension.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsRow {
    pub key: Vec<String>,
    pub total: u64,
    /// Counts per level, index 0 = 非常满意 … 4 = 非常不满意.
    pub per_level: [u64; 5],
    pub default_ratings: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes ratings through the group-commit writer; returns one outcome per item, in order,
    /// after the transaction that holds them committed.
    async fn insert_ratings(&self, items: Vec<NewRating>)
    -> Result<Vec<InsertOutcome>, StoreError>;

    /// Writes case events through the group-commit writer.
    async fn insert_cases(&self, items: Vec<NewCaseEvent>) -> Result<Vec<CaseOutcome>, StoreError>;

    async fn get_rating(&self, hub_id: Uuid) -> Result<Option<StoredRating>, StoreError>;

    /// Ratings matching `query` with feed sequence > `after_seq`, in feed order, at most `limit`.
    async fn list_ratings(
        &self,
        query: &RatingQuery,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredRating>, StoreError>;

    async fn stats(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<StatsRow>, StoreError>;

    /// The highest committed feed sequence, updated after every commit (relay and sync wake on it).
    fn feed_head(&self) -> watch::Receiver<u64>;

    /// Finishes every queued write, then stops the writer and closes connections.
    async fn close(&self);
}

impl NewRating {
    /// Encodes the body here, on the caller's task, so the single writer only writes bytes.
    pub fn new(hub_id: Uuid, source_system: String, rating: ValidRating) -> Self {
        use prost::Message;
        let body_bytes = rating.body.encode_to_vec();
        Self {
            hub_id,
            source_system,
            rating,
            body_bytes,
        }
    }
}
