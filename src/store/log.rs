//! The rating log's leaves: each stored rating, every column of its row, in one canonical
//! byte string, hashed into the Merkle tree ([`crate::merkle`]) at its feed position as the
//! writer commits it. A leaf is recomputable from the database alone (no keys): the sealed
//! personal data is covered as sealed, so `rating-hub log verify` needs no privacy key and
//! finds a changed, removed or reordered row by its position.

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::merkle::{Frontier, Hash, HashAlg, Layout, Node};
use crate::store::chunk::Pending;

/// The columns a leaf covers, in leaf order (a SELECT list).
pub const LEAF_COLUMNS: &str = "feed_seq, hub_id, source_system, source_key, content_hash, level, \
     channel, target_kind, org_credit_code, region_code, item_code, staff_id, case_number, \
     rated_at, received_at, is_default, quality_flags, body, pii, pii_key_id, follow_up_of, \
     batch_id, theme_id, device_id, template_hash, phone_tag, visit_id";

/// One row's columns, borrowed from wherever they are.
pub struct LeafCols<'a> {
    pub feed_seq: i64,
    pub hub_id: &'a [u8],
    pub source_system: &'a str,
    pub source_key: &'a str,
    pub content_hash: &'a [u8],
    pub level: i64,
    pub channel: i64,
    pub target_kind: i64,
    pub org_credit_code: &'a str,
    pub region_code: &'a str,
    pub item_code: &'a str,
    pub staff_id: &'a str,
    pub case_number: &'a str,
    pub rated_at: i64,
    pub received_at: i64,
    pub is_default: bool,
    pub quality_flags: i64,
    pub body: &'a [u8],
    pub pii: Option<&'a [u8]>,
    pub pii_key_id: Option<&'a str>,
    pub follow_up_of: &'a str,
    pub batch_id: &'a str,
    pub theme_id: &'a str,
    pub device_id: &'a str,
    pub template_hash: Option<&'a [u8]>,
    pub phone_tag: Option<&'a [u8]>,
    pub visit_id: &'a str,
}

/// The version tag every leaf starts with: a change to the encoding is a new tag.
const LEAF_V1: &[u8] = b"rating-hub leaf v1\0";

impl LeafCols<'_> {
    /// The leaf's hash, the bytes fed to the hash as they are written (the writer hashes a
    /// leaf per rating: no copy of the body and sealed blob).
    pub fn hash(&self, alg: HashAlg) -> Hash {
        let mut h = alg.leaf_hasher();
        self.write(&mut |b| h.update(b));
        h.finish()
    }

    /// The canonical bytes, piece by piece, to `out`: the tag, then each column in order — integers as 8 bytes
    /// big-endian, booleans as one byte, text and blobs as a 4-byte big-endian length and
    /// the bytes, NULL as the length 0xFFFFFFFF.
    fn write(&self, out: &mut dyn FnMut(&[u8])) {
        out(LEAF_V1);
        let int = |out: &mut dyn FnMut(&[u8]), v: i64| out(&v.to_be_bytes());
        let bytes = |out: &mut dyn FnMut(&[u8]), v: Option<&[u8]>| match v {
            Some(b) => {
                out(&(b.len() as u32).to_be_bytes());
                out(b);
            }
            None => out(&u32::MAX.to_be_bytes()),
        };
        int(out, self.feed_seq);
        bytes(out, Some(self.hub_id));
        bytes(out, Some(self.source_system.as_bytes()));
        bytes(out, Some(self.source_key.as_bytes()));
        bytes(out, Some(self.content_hash));
        int(out, self.level);
        int(out, self.channel);
        int(out, self.target_kind);
        for t in [
            self.org_credit_code,
            self.region_code,
            self.item_code,
            self.staff_id,
            self.case_number,
        ] {
            bytes(out, Some(t.as_bytes()));
        }
        int(out, self.rated_at);
        int(out, self.received_at);
        out(&[u8::from(self.is_default)]);
        int(out, self.quality_flags);
        bytes(out, Some(self.body));
        bytes(out, self.pii);
        bytes(out, self.pii_key_id.map(str::as_bytes));
        for t in [
            self.follow_up_of,
            self.batch_id,
            self.theme_id,
            self.device_id,
        ] {
            bytes(out, Some(t.as_bytes()));
        }
        bytes(out, self.template_hash);
        bytes(out, self.phone_tag);
        bytes(out, Some(self.visit_id.as_bytes()));
    }

    /// The row of a rating the writer is inserting, as it will be stored.
    pub(crate) fn of_pending<'a>(p: &'a Pending<'_>, received_at: i64) -> LeafCols<'a> {
        let (item, r) = (p.item, &p.item.rating);
        LeafCols {
            feed_seq: p.seq as i64,
            hub_id: item.hub_id.as_bytes(),
            source_system: &item.source_system,
            source_key: &r.source_key,
            content_hash: &r.content_hash,
            level: i64::from(r.level as i32),
            channel: i64::from(r.channel as i32),
            target_kind: i64::from(r.target_kind as i32),
            org_credit_code: r.org_credit_code.as_str(),
            region_code: r.region_code.as_str(),
            item_code: &r.item_code,
            staff_id: &r.staff_id,
            case_number: &r.case_number,
            rated_at: r.rated_at_micros,
            received_at,
            is_default: r.is_default,
            quality_flags: p.flag_bits(),
            body: &item.body_bytes,
            pii: item.pii.as_ref().map(|s| s.blob.as_slice()),
            pii_key_id: item.pii.as_ref().map(|s| s.key_id.as_str()),
            follow_up_of: &r.body.follow_up_of,
            batch_id: &r.body.batch_id,
            theme_id: &r.body.theme_id,
            device_id: &r.body.device_id,
            template_hash: item.template_hash.as_ref().map(|h| h.as_slice()),
            phone_tag: item.phone_tag.as_ref().map(|h| h.as_slice()),
            visit_id: &r.body.visit_id,
        }
    }
}

/// A stored row read back for the log (backfill, verification).
#[derive(Debug, Clone)]
pub struct LeafRow {
    pub feed_seq: i64,
    pub hub_id: Vec<u8>,
    pub source_system: String,
    pub source_key: String,
    pub content_hash: Vec<u8>,
    pub level: i64,
    pub channel: i64,
    pub target_kind: i64,
    pub org_credit_code: String,
    pub region_code: String,
    pub item_code: String,
    pub staff_id: String,
    pub case_number: String,
    pub rated_at: i64,
    pub received_at: i64,
    pub is_default: bool,
    pub quality_flags: i64,
    pub body: Vec<u8>,
    pub pii: Option<Vec<u8>>,
    pub pii_key_id: Option<String>,
    pub follow_up_of: String,
    pub batch_id: String,
    pub theme_id: String,
    pub device_id: String,
    pub template_hash: Option<Vec<u8>>,
    pub phone_tag: Option<Vec<u8>>,
    pub visit_id: String,
}

impl LeafRow {
    /// Decodes a row selected with [`LEAF_COLUMNS`] (either backend).
    pub fn read<R: Row>(row: &R) -> Result<Self, sqlx::Error>
    where
        usize: ColumnIndex<R>,
        for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    {
        let text = |i: usize| row.try_get::<String, _>(i);
        let blob = |i: usize| row.try_get::<Vec<u8>, _>(i);
        let int = |i: usize| row.try_get::<i64, _>(i);
        // INTEGER on PostgreSQL is 4 bytes; SQLite's integers decode as either.
        let small = |i: usize| row.try_get::<i32, _>(i).map(i64::from);
        Ok(Self {
            feed_seq: int(0)?,
            hub_id: blob(1)?,
            source_system: text(2)?,
            source_key: text(3)?,
            content_hash: blob(4)?,
            level: small(5)?,
            channel: small(6)?,
            target_kind: small(7)?,
            org_credit_code: text(8)?,
            region_code: text(9)?,
            item_code: text(10)?,
            staff_id: text(11)?,
            case_number: text(12)?,
            rated_at: int(13)?,
            received_at: int(14)?,
            is_default: row.try_get::<bool, _>(15)?,
            quality_flags: int(16)?,
            body: blob(17)?,
            pii: row.try_get::<Option<Vec<u8>>, _>(18)?,
            pii_key_id: row.try_get::<Option<String>, _>(19)?,
            follow_up_of: text(20)?,
            batch_id: text(21)?,
            theme_id: text(22)?,
            device_id: text(23)?,
            template_hash: row.try_get::<Option<Vec<u8>>, _>(24)?,
            phone_tag: row.try_get::<Option<Vec<u8>>, _>(25)?,
            visit_id: text(26)?,
        })
    }

    pub fn cols(&self) -> LeafCols<'_> {
        LeafCols {
            feed_seq: self.feed_seq,
            hub_id: &self.hub_id,
            source_system: &self.source_system,
            source_key: &self.source_key,
            content_hash: &self.content_hash,
            level: self.level,
            channel: self.channel,
            target_kind: self.target_kind,
            org_credit_code: &self.org_credit_code,
            region_code: &self.region_code,
            item_code: &self.item_code,
            staff_id: &self.staff_id,
            case_number: &self.case_number,
            rated_at: self.rated_at,
            received_at: self.received_at,
            is_default: self.is_default,
            quality_flags: self.quality_flags,
            body: &self.body,
            pii: self.pii.as_deref(),
            pii_key_id: self.pii_key_id.as_deref(),
            follow_up_of: &self.follow_up_of,
            batch_id: &self.batch_id,
            theme_id: &self.theme_id,
            device_id: &self.device_id,
            template_hash: self.template_hash.as_deref(),
            phone_tag: self.phone_tag.as_deref(),
            visit_id: &self.visit_id,
        }
    }

    pub fn leaf_hash(&self, alg: HashAlg) -> Hash {
        self.cols().hash(alg)
    }
}

/// The leaves a group's ratings add, in feed order, as the chunk writer inserts them.
pub struct LogAppend {
    pub alg: HashAlg,
    pub layout: Layout,
    pub leaves: Vec<Hash>,
}

impl LogAppend {
    pub fn new(alg: HashAlg, layout: Layout) -> Self {
        Self {
            alg,
            layout,
            leaves: Vec::new(),
        }
    }

    /// The nodes to store that the group's leaves complete on top of `frontier` (advanced
    /// with them).
    pub fn nodes(&self, frontier: &mut Frontier) -> Vec<Node> {
        self.leaves
            .iter()
            .flat_map(|l| self.layout.kept(frontier.append(*l)))
            .collect()
    }
}

/// The layout a database's log is stored in (`log_meta.node_stride`).
pub fn check_layout(stride: i64) -> Result<Layout, String> {
    Layout::from_stride(stride).ok_or_else(|| {
        format!(
            "the database's rating log names node_stride {stride}, which this hub cannot read \
             (1 or 4)"
        )
    })
}

/// The nodes whose presence shows the layout a log of `size` leaves is stored in: the first
/// node of each of levels 1 to 4 the tree has (a point read each).
pub fn layout_probes(size: u64) -> Vec<(u32, u64)> {
    (1..=4).filter(|l| size >> l > 0).map(|l| (l, 0)).collect()
}

/// Whether the nodes stored among [`layout_probes`] are those `layout` stores. What this
/// catches is a log whose layout was changed behind the hub (the hub would read levels that
/// were never written, or read a dense log as sparse and write it so), and the first node
/// of a level removed or forged; `rating-hub log verify` checks every node.
pub fn check_stored_levels(
    layout: Layout,
    size: u64,
    stored: &std::collections::HashMap<(u32, u64), Hash>,
) -> Result<(), String> {
    for (level, idx) in layout_probes(size) {
        let (has, due) = (stored.contains_key(&(level, idx)), layout.stores(level));
        if has != due {
            return Err(format!(
                "the rating log {} at level {level}, and its layout (log_meta.node_stride {}) \
                 {} that level: nodes were added to or removed from the log, or its layout \
                 changed, behind the hub (rating-hub log verify)",
                if has { "stores a node" } else { "has no node" },
                layout.stride(),
                if due { "stores" } else { "leaves out" },
            ));
        }
    }
    Ok(())
}

/// Why the stored log does not match the stored ratings, or cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The first feed position whose row is missing, changed or out of place.
    pub position: u64,
    pub what: String,
}

/// The database's log hash cannot change: a setting that disagrees is refused by name.
pub fn check_alg(stored: &str, configured: HashAlg) -> Result<HashAlg, String> {
    match HashAlg::parse(stored) {
        Some(a) if a == configured => Ok(a),
        Some(a) => Err(format!(
            "the database's rating log hashes with {}, and rating_log.hash says {}: a log's \
             hash cannot change (set it back, or start a new database)",
            a.as_str(),
            configured.as_str()
        )),
        None => Err(format!(
            "the database's rating log names an unknown hash {stored:?}"
        )),
    }
}

/// What the log may still be written for at start: the leaves a database from before the
/// log is owed, and nothing else. `size` leaves stored, `head` ratings, `backfill_to` the
/// head when the log was created. `Ok(n)`: write the log up to `n`.
pub fn backfill_target(size: u64, head: u64, backfill_to: u64) -> Result<u64, String> {
    if size > head {
        return Err(format!(
            "the rating log has {size} leaves and the feed only {head} ratings: ratings were \
             removed from the database (rating-hub log verify names the first)"
        ));
    }
    if head > size.max(backfill_to) {
        return Err(format!(
            "feed positions {}..={head} have no leaves in the rating log: they were written \
             around the hub (rating-hub log verify names the first)",
            size.max(backfill_to) + 1
        ));
    }
    Ok(backfill_to.min(head))
}
