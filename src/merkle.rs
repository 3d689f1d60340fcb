//! The Merkle tree over the feed (RFC 9162 §2.1): leaf and node hashing, the tree's right
//! edge kept as new leaves arrive, roots, and inclusion and consistency proofs with their
//! verification. SM3 by default, SHA-256 selectable.
//!
//! Nodes are named by level and index: the complete subtree at level `l`, index `i` covers
//! leaves `i·2^l .. (i+1)·2^l`. Complete subtrees are stored as they complete (the store's
//! `log_leaves` and `log_nodes`): the leaves and every fourth level above them ([`Layout`]),
//! so any root or proof is a few dozen stored nodes combined, never a rescan.

use sha2::Digest;

pub type Hash = [u8; 32];

/// The hash function of a tree (fixed for a database's life: stored with it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashAlg {
    /// GB/T 32905.
    #[default]
    Sm3,
    Sha256,
}

impl HashAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            HashAlg::Sm3 => "sm3",
            HashAlg::Sha256 => "sha256",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sm3" => Some(HashAlg::Sm3),
            "sha256" => Some(HashAlg::Sha256),
            _ => None,
        }
    }

    fn hash(self, parts: &[&[u8]]) -> Hash {
        // sm3 and sha2 implement different major versions of `digest`.
        match self {
            HashAlg::Sm3 => {
                use sm3::Digest as _;
                let mut d = sm3::Sm3::new();
                for p in parts {
                    d.update(p);
                }
                d.finalize().as_slice().try_into().expect("32-byte digest")
            }
            HashAlg::Sha256 => {
                let mut d = sha2::Sha256::new();
                for p in parts {
                    d.update(p);
                }
                d.finalize().into()
            }
        }
    }

    /// The root of the empty tree: the hash of nothing.
    pub fn empty(self) -> Hash {
        self.hash(&[])
    }

    /// HASH(0x00 ‖ leaf).
    pub fn leaf(self, leaf: &[u8]) -> Hash {
        self.hash(&[&[0], leaf])
    }

    /// A leaf hash fed piece by piece (no copy of the leaf's bytes): the same as
    /// [`HashAlg::leaf`] over the pieces joined.
    pub fn leaf_hasher(self) -> LeafHasher {
        use sm3::Digest as _;
        let mut h = match self {
            HashAlg::Sm3 => LeafHasher::Sm3(sm3::Sm3::new()),
            HashAlg::Sha256 => LeafHasher::Sha256(sha2::Sha256::new()),
        };
        h.update(&[0]);
        h
    }

    /// HASH(0x01 ‖ left ‖ right).
    pub fn node(self, left: &Hash, right: &Hash) -> Hash {
        self.hash(&[&[1], left, right])
    }
}

/// See [`HashAlg::leaf_hasher`].
pub enum LeafHasher {
    Sm3(sm3::Sm3),
    Sha256(sha2::Sha256),
}

impl LeafHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            LeafHasher::Sm3(d) => sm3::Digest::update(d, bytes),
            LeafHasher::Sha256(d) => Digest::update(d, bytes),
        }
    }

    pub fn finish(self) -> Hash {
        match self {
            LeafHasher::Sm3(d) => sm3::Digest::finalize(d)
                .as_slice()
                .try_into()
                .expect("32-byte digest"),
            LeafHasher::Sha256(d) => d.finalize().into(),
        }
    }
}

/// A stored node: (level, index, hash).
pub type Node = (u32, u64, Hash);

/// The complete subtrees of a tree of `size` leaves, left to right: (level, index). These
/// are the nodes a new leaf may combine with, and the ones its root is made of.
pub fn frontier_positions(size: u64) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut start = 0u64;
    for level in (0..64).rev() {
        if size & (1 << level) != 0 {
            out.push((level, start >> level));
            start += 1 << level;
        }
    }
    out
}

/// The right edge of a tree: its complete subtrees, left to right (one per set bit of the
/// size, largest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontier {
    pub alg: HashAlg,
    pub size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    pub fn empty(alg: HashAlg) -> Self {
        Self {
            alg,
            size: 0,
            nodes: Vec::new(),
        }
    }

    /// The frontier of a tree of `size` leaves from its nodes at [`frontier_positions`].
    pub fn from_nodes(alg: HashAlg, size: u64, nodes: Vec<Hash>) -> Option<Self> {
        (nodes.len() == size.count_ones() as usize).then_some(Self { alg, size, nodes })
    }

    /// Adds a leaf (its leaf hash); returns the nodes it completes, the leaf first.
    pub fn append(&mut self, leaf_hash: Hash) -> Vec<Node> {
        let mut out = vec![(0, self.size, leaf_hash)];
        let (mut node, mut level, mut index) = (leaf_hash, 0u32, self.size);
        while index & 1 == 1 {
            let left = self.nodes.pop().expect("an odd index has a left sibling");
            node = self.alg.node(&left, &node);
            level += 1;
            index >>= 1;
            out.push((level, index, node));
        }
        self.nodes.push(node);
        self.size += 1;
        out
    }

    /// The tree's root (RFC 9162's MTH).
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(last) = it.next() else {
            return self.alg.empty();
        };
        it.fold(*last, |right, left| self.alg.node(left, &right))
    }
}

/// Which levels of the tree a database stores (`log_meta.node_stride`): every `stride`-th
/// level from the leaves. Stride 1 stores every complete subtree (about two nodes per
/// rating: the first logs); stride 4, every later log's, stores the leaves and levels 4, 8,
/// 12, … (about 1.07 nodes per rating). A node between stored levels is
/// recomputed from the at most 2^(stride − 1) stored nodes under it, so a proof or the right
/// edge still reads a few dozen rows in one query. The leaves are always stored: `rating-hub
/// log verify` names a changed rating by its own position.
///
/// Where the leaves are kept is the layout's other half (`log_meta.packed_leaves`): a log
/// created since 2026-12-01 packs them, up to [`LEAVES_PER_ROW`] consecutive leaf hashes per
/// `log_leaves` row (about group size ÷ 32 + 1 rows per commit group instead of one row
/// per rating: a few per hundred ratings under load); an older log keeps them as level-0 rows of
/// `log_nodes`. Which table holds them changes nothing here: level 0 is stored either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    stride: u32,
    packed: bool,
}

/// Leaves per `log_leaves` row at most; a row never spans two aligned runs of this many
/// positions, so the rows holding a leaf are found from its run alone.
pub const LEAVES_PER_ROW: u64 = 32;

impl Layout {
    /// Every level, the leaves in `log_nodes` (logs written before the sparse layout).
    pub const DENSE: Layout = Layout {
        stride: 1,
        packed: false,
    };
    /// Every fourth level, the leaves in `log_nodes` (logs written before packed leaves).
    pub const SPARSE: Layout = Layout {
        stride: 4,
        packed: false,
    };
    /// A new log's layout: every fourth level, the leaves packed in `log_leaves`.
    pub const PACKED: Layout = Layout {
        stride: 4,
        packed: true,
    };

    /// The layout `log_meta` names (node_stride, packed_leaves): the three this hub writes.
    pub fn from_meta(stride: i64, packed: bool) -> Option<Self> {
        [Self::DENSE, Self::SPARSE, Self::PACKED]
            .into_iter()
            .find(|l| i64::from(l.stride) == stride && l.packed == packed)
    }

    pub fn stride(self) -> u32 {
        self.stride
    }

    /// Whether the leaves are kept packed in `log_leaves` rather than in `log_nodes`.
    pub fn packs_leaves(self) -> bool {
        self.packed
    }

    /// Whether nodes of `level` are stored.
    pub fn stores(self, level: u32) -> bool {
        level.is_multiple_of(self.stride)
    }

    /// The nodes of those that are stored.
    pub fn kept(self, nodes: impl IntoIterator<Item = Node>) -> impl Iterator<Item = Node> {
        nodes.into_iter().filter(move |n| self.stores(n.0))
    }

    /// The stored level under node `(level, index)`, and the range of its indices there.
    fn under(self, level: u32, index: u64) -> (u32, std::ops::Range<u64>) {
        let up = level % self.stride;
        let base = level - up;
        (base, index << up..(index + 1) << up)
    }

    /// The stored nodes `want` are made of, each once.
    pub fn sources(self, want: &[(u32, u64)]) -> Vec<(u32, u64)> {
        let mut out: Vec<(u32, u64)> = want
            .iter()
            .flat_map(|&(l, i)| {
                let (base, range) = self.under(l, i);
                range.map(move |j| (base, j))
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The nodes of `want`, each combined from its stored nodes in `stored` (see
    /// [`Layout::sources`]); a node any of whose stored nodes is absent is absent.
    pub fn combine(
        self,
        alg: HashAlg,
        want: &[(u32, u64)],
        stored: &std::collections::HashMap<(u32, u64), Hash>,
    ) -> std::collections::HashMap<(u32, u64), Hash> {
        let mut out = std::collections::HashMap::with_capacity(want.len());
        'want: for &(l, i) in want {
            let (base, range) = self.under(l, i);
            let mut row = Vec::with_capacity((range.end - range.start) as usize);
            for j in range {
                match stored.get(&(base, j)) {
                    Some(h) => row.push(*h),
                    None => continue 'want,
                }
            }
            while row.len() > 1 {
                row = row.chunks(2).map(|p| alg.node(&p[0], &p[1])).collect();
            }
            out.insert((l, i), row[0]);
        }
        out
    }

    /// How many nodes a log of `size` leaves stores.
    pub fn nodes_due(self, size: u64) -> u64 {
        (0..64).filter(|l| self.stores(*l)).map(|l| size >> l).sum()
    }
}

/// Stored complete subtrees, by (level, index).
pub trait Nodes {
    fn node(&self, level: u32, index: u64) -> Option<Hash>;
}

impl Nodes for std::collections::HashMap<(u32, u64), Hash> {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        self.get(&(level, index)).copied()
    }
}

/// Why a proof cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("{0}")]
    Range(String),
    #[error("stored node {0}/{1} is missing")]
    Missing(u32, u64),
}

fn largest_power_below(n: u64) -> u64 {
    debug_assert!(n > 1);
    1 << (63 - (n - 1).leading_zeros())
}

/// Computes roots and proofs over stored nodes (RFC 9162 §2.1.1, §2.1.3.1, §2.1.4.1).
pub struct Prover<'a, N: Nodes + ?Sized> {
    pub alg: HashAlg,
    pub nodes: &'a N,
}

impl<N: Nodes + ?Sized> Prover<'_, N> {
    /// MTH of leaves `start..end` (a range the RFC's recursion produces: `start` aligned to
    /// every power of two below `end - start`).
    pub fn subtree(&self, start: u64, end: u64) -> Result<Hash, ProofError> {
        let n = end - start;
        if n == 0 {
            return Ok(self.alg.empty());
        }
        if n.is_power_of_two() && start.is_multiple_of(n) {
            let level = n.trailing_zeros();
            return self
                .nodes
                .node(level, start >> level)
                .ok_or(ProofError::Missing(level, start >> level));
        }
        let k = largest_power_below(n);
        Ok(self.alg.node(
            &self.subtree(start, start + k)?,
            &self.subtree(start + k, end)?,
        ))
    }

    /// The root of the first `size` leaves.
    pub fn root(&self, size: u64) -> Result<Hash, ProofError> {
        self.subtree(0, size)
    }

    /// The audit path of leaf `index` in the tree of `size` leaves.
    pub fn inclusion(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        if index >= size {
            return Err(ProofError::Range(format!(
                "leaf {index} is not in a tree of {size}"
            )));
        }
        let mut path = Vec::new();
        self.path(index, 0, size, &mut path)?;
        Ok(path)
    }

    fn path(&self, m: u64, start: u64, end: u64, out: &mut Vec<Hash>) -> Result<(), ProofError> {
        let n = end - start;
        if n <= 1 {
            return Ok(());
        }
        let k = largest_power_below(n);
        if m < k {
            self.path(m, start, start + k, out)?;
            out.push(self.subtree(start + k, end)?);
        } else {
            self.path(m - k, start + k, end, out)?;
            out.push(self.subtree(start, start + k)?);
        }
        Ok(())
    }

    /// The consistency proof from the tree of `first` leaves to that of `second`.
    pub fn consistency(&self, first: u64, second: u64) -> Result<Vec<Hash>, ProofError> {
        if first == 0 || first > second {
            return Err(ProofError::Range(format!(
                "no consistency proof from {first} to {second} leaves (0 < first ≤ second)"
            )));
        }
        let mut out = Vec::new();
        if first < second {
            self.subproof(first, 0, second, true, &mut out)?;
        }
        Ok(out)
    }

    fn subproof(
        &self,
        m: u64,
        start: u64,
        end: u64,
        whole: bool,
        out: &mut Vec<Hash>,
    ) -> Result<(), ProofError> {
        let n = end - start;
        if m == n {
            if !whole {
                out.push(self.subtree(start, end)?);
            }
            return Ok(());
        }
        let k = largest_power_below(n);
        if m <= k {
            self.subproof(m, start, start + k, whole, out)?;
            out.push(self.subtree(start + k, end)?);
        } else {
            self.subproof(m - k, start + k, end, false, out)?;
            out.push(self.subtree(start, start + k)?);
        }
        Ok(())
    }
}

/// The nodes a computation reads, to fetch them in one query first: runs `f` over a source
/// that records what is asked and answers zeros.
pub fn nodes_read<T>(alg: HashAlg, f: impl FnOnce(&Prover<'_, dyn Nodes>) -> T) -> Vec<(u32, u64)> {
    let recorder = Recorder::default();
    f(&Prover {
        alg,
        nodes: &recorder as &dyn Nodes,
    });
    recorder.asked()
}

/// See [`nodes_read`].
#[derive(Default)]
pub struct Recorder(std::cell::RefCell<Vec<(u32, u64)>>);

impl Recorder {
    /// What was asked, each once, in order.
    pub fn asked(self) -> Vec<(u32, u64)> {
        let mut v = self.0.into_inner();
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl Nodes for Recorder {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        self.0.borrow_mut().push((level, index));
        Some([0; 32])
    }
}

/// Whether `path` proves leaf `index` (with `leaf_hash`) in the tree of `size` leaves whose
/// root is `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    alg: HashAlg,
    index: u64,
    size: u64,
    leaf_hash: &Hash,
    path: &[Hash],
    root: &Hash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode, mut r) = (index, size - 1, *leaf_hash);
    for p in path {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = alg.node(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = alg.node(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Whether `proof` shows the tree of `second` leaves with root `second_root` extends the
/// tree of `first` leaves with root `first_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    alg: HashAlg,
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let Some((head, rest)) = path.split_first() else {
        return false;
    };
    let (mut fnode, mut snode) = (first - 1, second - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*head, *head);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = alg.node(c, &fr);
            sr = alg.node(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = alg.node(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *first_root && sr == *second_root
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// RFC 9162's MTH, straight from its definition: the reference the rest is checked on.
    fn mth(alg: HashAlg, leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => alg.empty(),
            1 => leaves[0],
            n => {
                let k = largest_power_below(n as u64) as usize;
                alg.node(&mth(alg, &leaves[..k]), &mth(alg, &leaves[k..]))
            }
        }
    }

    fn tree(alg: HashAlg, leaves: &[Hash]) -> (Frontier, HashMap<(u32, u64), Hash>) {
        let mut f = Frontier::empty(alg);
        let mut nodes = HashMap::new();
        for l in leaves {
            for (level, index, h) in f.append(*l) {
                assert!(nodes.insert((level, index), h).is_none(), "a node twice");
            }
        }
        (f, nodes)
    }

    fn unhex(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// The Certificate Transparency reference tree (RFC 6962's test data, SHA-256).
    #[test]
    fn sha256_trees_match_the_certificate_transparency_vectors() {
        let alg = HashAlg::Sha256;
        let data = [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ];
        let roots = [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let leaves: Vec<Hash> = data
            .iter()
            .map(|d| alg.leaf(&hex::decode(d).unwrap()))
            .collect();
        let mut f = Frontier::empty(alg);
        assert_eq!(f.root(), unhex(roots[0]));
        for (n, l) in leaves.iter().enumerate() {
            f.append(*l);
            assert_eq!(f.root(), unhex(roots[n + 1]), "size {}", n + 1);
        }
        let (_, nodes) = tree(alg, &leaves);
        let p = Prover { alg, nodes: &nodes };
        assert_eq!(
            p.inclusion(0, 8).unwrap(),
            [
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ]
            .map(unhex)
        );
        assert_eq!(
            p.inclusion(5, 8).unwrap(),
            [
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ]
            .map(unhex)
        );
    }

    /// For every tree size up to 70, on both hashes: the frontier's root, the stored nodes'
    /// roots of every earlier size, every leaf's inclusion proof and every consistency proof
    /// agree with the definition and verify; a changed leaf, root or proof does not.
    #[test]
    fn every_root_and_proof_agrees_with_the_definition_and_verifies() {
        for alg in [HashAlg::Sm3, HashAlg::Sha256] {
            let leaves: Vec<Hash> = (0..70u32).map(|i| alg.leaf(&i.to_be_bytes())).collect();
            let (f, nodes) = tree(alg, &leaves);
            assert_eq!(f.root(), mth(alg, &leaves));
            let p = Prover { alg, nodes: &nodes };
            for n in 1..=leaves.len() as u64 {
                let root = mth(alg, &leaves[..n as usize]);
                assert_eq!(p.root(n).unwrap(), root, "size {n}");
                let front: Vec<Hash> = frontier_positions(n)
                    .into_iter()
                    .map(|(l, i)| nodes[&(l, i)])
                    .collect();
                assert_eq!(Frontier::from_nodes(alg, n, front).unwrap().root(), root);
                for m in 0..n {
                    let path = p.inclusion(m, n).unwrap();
                    let leaf = &leaves[m as usize];
                    assert!(
                        verify_inclusion(alg, m, n, leaf, &path, &root),
                        "{m} in {n}"
                    );
                    let other = alg.leaf(b"changed");
                    assert!(!verify_inclusion(alg, m, n, &other, &path, &root));
                    if let Some((first, rest)) = path.split_first() {
                        let mut bad = vec![alg.leaf(first)];
                        bad.extend_from_slice(rest);
                        assert!(!verify_inclusion(alg, m, n, leaf, &bad, &root));
                    }
                }
                for m in 1..=n {
                    let proof = p.consistency(m, n).unwrap();
                    let first = mth(alg, &leaves[..m as usize]);
                    assert!(
                        verify_consistency(alg, m, n, &first, &root, &proof),
                        "{m} → {n}"
                    );
                    let wrong = alg.leaf(b"rewritten");
                    assert!(!verify_consistency(alg, m, n, &wrong, &root, &proof));
                    if m < n {
                        assert!(!verify_consistency(alg, m, n, &first, &wrong, &proof));
                    }
                }
            }
            // A tree whose leaf 17 was changed is not consistent with the first one.
            let mut changed = leaves.clone();
            changed[17] = alg.leaf(b"level edited");
            let (_, nodes2) = tree(alg, &changed);
            let p2 = Prover {
                alg,
                nodes: &nodes2,
            };
            let proof = p2.consistency(40, 70).unwrap();
            assert!(!verify_consistency(
                alg,
                40,
                70,
                &mth(alg, &leaves[..40]),
                &mth(alg, &changed),
                &proof
            ));
        }
    }

    #[test]
    fn a_leaf_fed_in_pieces_hashes_as_the_pieces_joined() {
        for alg in [HashAlg::Sm3, HashAlg::Sha256] {
            let pieces: [&[u8]; 4] = [b"rating", b"", &[0, 1, 2], &[7; 300]];
            let mut h = alg.leaf_hasher();
            for p in pieces {
                h.update(p);
            }
            assert_eq!(h.finish(), alg.leaf(&pieces.concat()), "{alg:?}");
        }
    }

    #[test]
    fn a_sparse_layout_gives_the_same_nodes_roots_and_proofs_as_every_level() {
        let alg = HashAlg::Sha256;
        let leaves: Vec<Hash> = (0..300u32).map(|i| alg.leaf(&i.to_be_bytes())).collect();
        for stride in [1, 2, 3, 4, 5, 8] {
            let layout = Layout {
                stride,
                packed: false,
            };
            for n in [1u64, 2, 3, 15, 16, 17, 31, 64, 255, 256, 257, 300] {
                let (f, dense) = tree(alg, &leaves[..n as usize]);
                let stored: HashMap<(u32, u64), Hash> = layout
                    .kept(dense.iter().map(|(&(l, i), &h)| (l, i, h)))
                    .map(|(l, i, h)| ((l, i), h))
                    .collect();
                assert_eq!(stored.len() as u64, layout.nodes_due(n), "{stride} {n}");
                // Every complete subtree, stored or not, combines to its hash.
                let all: Vec<(u32, u64)> = dense.keys().copied().collect();
                let sources = layout.sources(&all);
                assert!(sources.iter().all(|(l, _)| layout.stores(*l)));
                assert_eq!(layout.combine(alg, &all, &stored), dense, "{stride} {n}");
                let front = frontier_positions(n);
                let edge = layout.combine(alg, &front, &stored);
                let edge = front.iter().map(|k| edge[k]).collect();
                assert_eq!(Frontier::from_nodes(alg, n, edge).unwrap(), f);
                // Proofs over the combined nodes are the proofs over every level.
                let sparse = |want: &[(u32, u64)]| layout.combine(alg, want, &stored);
                let m = n / 3;
                let want = nodes_read(alg, |p| p.inclusion(m, n).unwrap());
                let p = Prover {
                    alg,
                    nodes: &sparse(&want),
                };
                let d = Prover { alg, nodes: &dense };
                assert_eq!(p.inclusion(m, n).unwrap(), d.inclusion(m, n).unwrap());
                if m > 0 {
                    let want = nodes_read(alg, |p| p.consistency(m, n).unwrap());
                    let p = Prover {
                        alg,
                        nodes: &sparse(&want),
                    };
                    assert_eq!(p.consistency(m, n).unwrap(), d.consistency(m, n).unwrap());
                }
            }
        }
        // A node whose stored nodes are not all there is absent, not wrong.
        let layout = Layout::SPARSE;
        let (_, dense) = tree(alg, &leaves[..16]);
        let mut stored: HashMap<(u32, u64), Hash> = dense
            .iter()
            .filter(|(k, _)| k.0 == 0)
            .map(|(k, h)| (*k, *h))
            .collect();
        stored.remove(&(0, 5));
        let got = layout.combine(alg, &[(2, 1), (2, 0), (1, 7)], &stored);
        assert_eq!(got.len(), 2);
        assert!(!got.contains_key(&(2, 1)));
        assert_eq!(Layout::from_meta(4, false), Some(Layout::SPARSE));
        assert_eq!(Layout::from_meta(1, false), Some(Layout::DENSE));
        assert_eq!(Layout::from_meta(4, true), Some(Layout::PACKED));
        assert_eq!(Layout::from_meta(1, true), None);
        for other in [0, 2, 3, 5, 8, -4] {
            assert_eq!(Layout::from_meta(other, false), None);
            assert_eq!(Layout::from_meta(other, true), None);
        }
        // The highest levels: a node of level 63 is made of 8 nodes of level 60.
        let top = Layout::SPARSE.sources(&[(63, 0), (61, 4)]);
        assert_eq!(top.len(), 8 + 2);
        assert!(top.iter().all(|(l, _)| *l == 60));
    }

    #[test]
    fn the_nodes_a_proof_reads_are_few_and_known_in_advance() {
        let alg = HashAlg::Sm3;
        let read = nodes_read(alg, |p| p.inclusion(123_456, 1_000_003).unwrap());
        assert!(read.len() <= 2 * 20, "{}", read.len());
        let read = nodes_read(alg, |p| p.consistency(999_999, 1_000_003).unwrap());
        assert!(read.len() <= 2 * 40, "{}", read.len());
        // In the sparse layout, each is at most eight stored nodes.
        let sources = Layout::SPARSE.sources(&read);
        assert!(sources.len() <= 8 * read.len(), "{}", sources.len());
    }
}
