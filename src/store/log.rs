//! The rating log's leaves: each stored rating, every column of its row, in one canonical
//! byte string, hashed into the Merkle tree ([`crate::merkle`]) at its feed position as the
//! writer commits it. A leaf is recomputable from the database alone (no keys): the sealed
//! personal data is covered as sealed, so `rating-hub log verify` needs no privacy key and
//! finds a changed, removed or reordered row by its position.

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::merkle::{Frontier, Hash, HashAlg, LEAVES_PER_ROW, Layout, Node};
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
    pub(crate) fn of_pending<'a>(p: &Pending<'a>, received_at: i64) -> LeafCols<'a> {
        let item: &'a crate::store::NewRating = p.item;
        let r = &item.rating;
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

/// The leaves a group's ratings add, in feed order, as the chunk writer inserts them: their
/// rows first, hashed by [`LogAppend::hash_rows`] (or [`LogAppend::nodes`]).
pub struct LogAppend<'a> {
    pub alg: HashAlg,
    pub layout: Layout,
    /// The rows inserted and not yet hashed.
    pub rows: Vec<LeafCols<'a>>,
    leaves: Vec<Hash>,
}

impl<'a> LogAppend<'a> {
    pub fn new(alg: HashAlg, layout: Layout) -> Self {
        Self {
            alg,
            layout,
            rows: Vec::new(),
            leaves: Vec::new(),
        }
    }

    /// Whether the group added no leaf.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.leaves.is_empty()
    }

    /// Hashes the rows inserted so far into leaves (the most CPU the log costs the writer:
    /// each whole row, about 600 bytes).
    pub fn hash_rows(&mut self) {
        let alg = self.alg;
        self.leaves
            .extend(self.rows.drain(..).map(|row| row.hash(alg)));
    }

    /// The nodes to store that the group's leaves complete on top of `frontier` (advanced
    /// with them).
    pub fn nodes(&mut self, frontier: &mut Frontier) -> Vec<Node> {
        self.hash_rows();
        self.leaves
            .iter()
            .flat_map(|l| self.layout.kept(frontier.append(*l)))
            .collect()
    }
}

/// The layout a database's log is stored in (`log_meta.node_stride`, `packed_leaves`).
pub fn check_layout(stride: i64, packed: bool) -> Result<Layout, String> {
    Layout::from_meta(stride, packed).ok_or_else(|| {
        format!(
            "the database's rating log names node_stride {stride} with packed_leaves {}, \
             which this hub cannot read (node_stride 1 or 4; packed leaves with 4 only)",
            i32::from(packed)
        )
    })
}

/// A query for how many leaves a log stored in `layout` has (the end of its last leaf row,
/// or its highest leaf index + 1).
pub fn size_sql(layout: Layout) -> &'static str {
    if layout.packs_leaves() {
        "SELECT COALESCE((SELECT CAST(first + length(hashes) / 32 AS BIGINT) FROM log_leaves \
         ORDER BY first DESC LIMIT 1), 0)"
    } else {
        "SELECT COALESCE(MAX(idx) + 1, 0) FROM log_nodes WHERE level = 0"
    }
}

/// A query for the first leaf index in the table `layout` does not keep leaves in (NULL:
/// none).
pub fn stray_leaves_sql(layout: Layout) -> &'static str {
    if layout.packs_leaves() {
        "SELECT CAST(MIN(idx) AS BIGINT) FROM log_nodes WHERE level = 0"
    } else {
        "SELECT CAST(MIN(first) AS BIGINT) FROM log_leaves"
    }
}

/// Refuses a log whose leaves are in the table its layout does not keep them in (the
/// layout's flag changed, or leaves written, behind the hub): the hub would read one table
/// and the other would go unchecked.
pub fn check_leaf_table(layout: Layout, stray: Option<i64>) -> Result<(), String> {
    let Some(stray) = stray else {
        return Ok(());
    };
    let (keeps, other) = if layout.packs_leaves() {
        ("log_leaves", "log_nodes")
    } else {
        ("log_nodes", "log_leaves")
    };
    Err(format!(
        "the rating log keeps its leaves in {keeps} (log_meta.packed_leaves {}) and {other} \
         holds leaves too, from feed position {}: they were written, or the layout changed, \
         behind the hub (rating-hub log verify)",
        i32::from(layout.packs_leaves()),
        stray.saturating_add(1)
    ))
}

/// Adds a packed row's leaves to `out`; a leaf two rows hold is refused (the hub writes each
/// once).
pub fn add_packed_leaves(
    out: &mut std::collections::HashMap<(u32, u64), Hash>,
    first: i64,
    hashes: &[u8],
) -> Result<(), String> {
    for (i, h) in unpack_leaves(first, hashes)? {
        if out.insert((0, i), h).is_some() {
            return Err(format!(
                "the rating log's leaf for feed position {} is stored in two log_leaves rows: \
                 written behind the hub (rating-hub log verify)",
                i + 1
            ));
        }
    }
    Ok(())
}

/// A `log_leaves` row: the leaves from index `first` on, their hashes end to end.
pub type LeafRun = (u64, Vec<u8>);

/// Splits nodes to store into the packed leaf rows and the `log_nodes` rows (`layout`
/// packs leaves; otherwise every node is a `log_nodes` row). Consecutive leaves share a row,
/// up to [`LEAVES_PER_ROW`] and never across an aligned run of that many.
pub fn split_leaves(layout: Layout, nodes: Vec<Node>) -> (Vec<LeafRun>, Vec<Node>) {
    if !layout.packs_leaves() {
        return (Vec::new(), nodes);
    }
    let mut runs: Vec<LeafRun> = Vec::new();
    let mut others = Vec::new();
    for (level, idx, hash) in nodes {
        if level != 0 {
            others.push((level, idx, hash));
            continue;
        }
        match runs.last_mut() {
            Some((first, hashes))
                if *first + (hashes.len() / 32) as u64 == idx
                    && !idx.is_multiple_of(LEAVES_PER_ROW) =>
            {
                hashes.extend_from_slice(&hash)
            }
            _ => runs.push((idx, hash.to_vec())),
        }
    }
    (runs, others)
}

/// The leaves of a stored `log_leaves` row, by index; an error names what is wrong with a
/// row the hub never writes (empty, not whole hashes, spanning two runs).
pub fn unpack_leaves(first: i64, hashes: &[u8]) -> Result<Vec<(u64, Hash)>, String> {
    let n = (hashes.len() / 32) as u64;
    let bad = |why: &str| {
        Err(format!(
            "the rating log's leaf row from feed position {} {why}",
            first.saturating_add(1)
        ))
    };
    if first < 0 || hashes.is_empty() || !hashes.len().is_multiple_of(32) {
        return bad("is not whole 32-byte leaf hashes at a feed position");
    }
    let first = first as u64;
    if first / LEAVES_PER_ROW != (first + n - 1) / LEAVES_PER_ROW {
        return bad(&format!(
            "spans two runs of {LEAVES_PER_ROW} leaves: the hub never writes such a row"
        ));
    }
    Ok(hashes
        .chunks_exact(32)
        .enumerate()
        .map(|(k, h)| (first + k as u64, h.try_into().expect("32 bytes")))
        .collect())
}

/// The `first` ranges of the `log_leaves` rows that may hold leaves `idxs`: their aligned
/// runs, adjacent runs merged.
pub fn leaf_row_ranges(idxs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<u64> = idxs.into_iter().map(|i| i / LEAVES_PER_ROW).collect();
    runs.sort_unstable();
    runs.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in runs {
        let (lo, hi) = (r * LEAVES_PER_ROW, (r + 1) * LEAVES_PER_ROW - 1);
        match out.last_mut() {
            Some(last) if last.1 + 1 == lo => last.1 = hi,
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The nodes whose presence shows the layout a log of `size` leaves is stored in: the first
/// node of each of levels 1 to 4 the tree has (a point read each), and the last leaf (with
/// packed leaves, its run: a row forged over the log's end that overlaps the last rows is
/// refused by name before the size it gave is used; one past them gives a size the feed
/// does not have, and is refused for that).
pub fn layout_probes(size: u64) -> Vec<(u32, u64)> {
    let mut probes: Vec<(u32, u64)> = (1..=4).filter(|l| size >> l > 0).map(|l| (l, 0)).collect();
    if size > 0 {
        probes.push((0, size - 1));
    }
    probes
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(i: u64) -> Node {
        (0, i, [i as u8; 32])
    }

    /// A group's leaves become rows of consecutive leaves, never across an aligned run of
    /// 32, and read back whole; the other levels stay nodes.
    #[test]
    fn packed_leaves_split_by_aligned_runs_and_read_back() {
        let mut nodes: Vec<Node> = (30..100).map(leaf).collect();
        nodes.push((4, 2, [9; 32]));
        let (runs, others) = split_leaves(Layout::PACKED, nodes.clone());
        let spans: Vec<(u64, usize)> = runs.iter().map(|(f, h)| (*f, h.len() / 32)).collect();
        assert_eq!(spans, [(30, 2), (32, 32), (64, 32), (96, 4)]);
        assert_eq!(others, [(4, 2, [9; 32])]);
        let back: Vec<Node> = runs
            .iter()
            .flat_map(|(f, h)| unpack_leaves(*f as i64, h).unwrap())
            .map(|(i, h)| (0, i, h))
            .collect();
        assert_eq!(back, nodes[..70]);
        // A gap starts a new row; without packing every node stays a node.
        let (runs, _) = split_leaves(Layout::PACKED, vec![leaf(1), leaf(3)]);
        assert_eq!(runs.len(), 2);
        let (runs, others) = split_leaves(Layout::SPARSE, nodes.clone());
        assert!(runs.is_empty());
        assert_eq!(others, nodes);
    }

    #[test]
    fn a_leaf_row_the_hub_never_writes_is_named() {
        for (first, len) in [(0, 0), (0, 31), (-1, 32), (31, 64), (16, 32 * 17)] {
            let e = unpack_leaves(first, &vec![0; len]).unwrap_err();
            assert!(
                e.contains(&format!("from feed position {}", first + 1)),
                "{e}"
            );
        }
        assert_eq!(unpack_leaves(16, &[0; 32 * 16]).unwrap().len(), 16);
    }

    #[test]
    fn leaf_rows_are_looked_up_by_their_runs() {
        assert_eq!(leaf_row_ranges([]), []);
        assert_eq!(leaf_row_ranges([5, 0, 31]), [(0, 31)]);
        assert_eq!(leaf_row_ranges([5, 40, 100]), [(0, 63), (96, 127)]);
    }
}
