//! Signed tree heads of the rating log: (size, root, time) signed with the hub's log key —
//! SM2 with SM3 by default, Ed25519 selectable — made at least every
//! `rating_log.sign_interval_secs` and on demand, and the proofs served beside them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;
use crate::gm::{Sm2PrivateKey, Sm2PublicKey};
use crate::merkle::{self, Hash, HashAlg, Prover};
use crate::store::{Store, StoreError};

/// GB/T 35276's default signer id (the Z value of SM2 signatures).
pub const SM2_SIGNER_ID: &str = "1234567812345678";

/// What signs tree heads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureAlg {
    /// SM2 with SM3 (GB/T 32918, GB/T 35276), signatures as r‖s.
    #[default]
    Sm2,
    Ed25519,
}

impl SignatureAlg {
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureAlg::Sm2 => "sm2-sm3",
            SignatureAlg::Ed25519 => "ed25519",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sm2" | "sm2-sm3" => Some(SignatureAlg::Sm2),
            "ed25519" => Some(SignatureAlg::Ed25519),
            _ => None,
        }
    }
}

/// A log key's private half.
pub enum SigningKey {
    Sm2(Sm2PrivateKey),
    Ed25519(ring::signature::Ed25519KeyPair),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public().to_text())
    }
}

/// A log key's public half, written as `sm2:<04‖x‖y hex>` or `ed25519:<32 bytes hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Sm2(Sm2PublicKey),
    Ed25519([u8; 32]),
}

impl SigningKey {
    /// A key file: SM2 as 64 hex digits or PEM, Ed25519 as PKCS#8 PEM.
    pub fn parse(alg: SignatureAlg, text: &str) -> Result<Self, String> {
        match alg {
            SignatureAlg::Sm2 => Sm2PrivateKey::parse(text)
                .map(SigningKey::Sm2)
                .map_err(|e| e.to_string()),
            SignatureAlg::Ed25519 => {
                use rustls::pki_types::PrivateKeyDer;
                use rustls::pki_types::pem::PemObject;
                let der = PrivateKeyDer::from_pem_slice(text.as_bytes())
                    .map_err(|_| "an Ed25519 key is a PKCS#8 PEM file".to_owned())?;
                let PrivateKeyDer::Pkcs8(der) = der else {
                    return Err("an Ed25519 key is a PKCS#8 PEM file (BEGIN PRIVATE KEY)".into());
                };
                ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
                    .map(SigningKey::Ed25519)
                    .map_err(|_| "not an Ed25519 private key".into())
            }
        }
    }

    /// A fresh key, as the text of its file.
    pub fn generate(alg: SignatureAlg) -> String {
        match alg {
            SignatureAlg::Sm2 => Sm2PrivateKey::generate().to_hex() + "\n",
            SignatureAlg::Ed25519 => {
                use base64::Engine;
                let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(
                    &ring::rand::SystemRandom::new(),
                )
                .expect("the system's random source");
                let b64 = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
                let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
                for line in b64.as_bytes().chunks(64) {
                    pem.push_str(std::str::from_utf8(line).expect("base64"));
                    pem.push('\n');
                }
                pem + "-----END PRIVATE KEY-----\n"
            }
        }
    }

    pub fn alg(&self) -> SignatureAlg {
        match self {
            SigningKey::Sm2(_) => SignatureAlg::Sm2,
            SigningKey::Ed25519(_) => SignatureAlg::Ed25519,
        }
    }

    pub fn public(&self) -> PublicKey {
        match self {
            SigningKey::Sm2(k) => PublicKey::Sm2(k.public_key()),
            SigningKey::Ed25519(k) => {
                use ring::signature::KeyPair;
                PublicKey::Ed25519(
                    k.public_key()
                        .as_ref()
                        .try_into()
                        .expect("an Ed25519 public key is 32 bytes"),
                )
            }
        }
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            SigningKey::Sm2(k) => k.sign(SM2_SIGNER_ID, msg, false).map_err(|e| e.to_string()),
            SigningKey::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
        }
    }
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(hex) = text.strip_prefix("sm2:") {
            return Sm2PublicKey::parse(hex)
                .map(PublicKey::Sm2)
                .map_err(|e| e.to_string());
        }
        if let Some(h) = text.strip_prefix("ed25519:") {
            return hex::decode(h)
                .ok()
                .and_then(|b| b.try_into().ok())
                .map(PublicKey::Ed25519)
                .ok_or_else(|| "an Ed25519 public key is 64 hex digits".into());
        }
        Err("a log public key is sm2:<hex> or ed25519:<hex> (rating-hub log key prints it)".into())
    }

    pub fn to_text(&self) -> String {
        match self {
            PublicKey::Sm2(k) => format!("sm2:{}", k.to_hex()),
            PublicKey::Ed25519(k) => format!("ed25519:{}", hex::encode(k)),
        }
    }

    pub fn alg(&self) -> SignatureAlg {
        match self {
            PublicKey::Sm2(_) => SignatureAlg::Sm2,
            PublicKey::Ed25519(_) => SignatureAlg::Ed25519,
        }
    }

    /// SM3 of the key's bytes (04‖x‖y for SM2, the 32 bytes for Ed25519): what a head
    /// names its key by.
    pub fn key_id(&self) -> Vec<u8> {
        let bytes = match self {
            PublicKey::Sm2(k) => k.to_bytes(),
            PublicKey::Ed25519(k) => k.to_vec(),
        };
        crate::gm::sm3(&bytes).to_vec()
    }

    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> bool {
        match self {
            PublicKey::Sm2(k) => k.verify(SM2_SIGNER_ID, msg, signature),
            PublicKey::Ed25519(k) => {
                ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k)
                    .verify(msg, signature)
                    .is_ok()
            }
        }
    }
}

/// A tree head: the log's size and root at a time, signed (or not, when the hub has no log
/// key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeHead {
    pub size: u64,
    pub root: Hash,
    pub timestamp_micros: i64,
    pub hash: HashAlg,
    /// `None`: unsigned.
    pub signature_alg: Option<SignatureAlg>,
    pub signature: Vec<u8>,
    pub key_id: Vec<u8>,
}

const HEAD_V1: &[u8] = b"rating-hub tree head v1\0";

impl TreeHead {
    /// What is signed: a tag, the hash's name, the size, the time and the root.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_V1.len() + 64);
        out.extend_from_slice(HEAD_V1);
        let name = self.hash.as_str().as_bytes();
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.timestamp_micros.to_be_bytes());
        out.extend_from_slice(&self.root);
        out
    }

    /// Signs the head with `key` (its algorithm and key id set).
    pub fn sign(&mut self, key: &SigningKey) -> Result<(), String> {
        self.signature_alg = Some(key.alg());
        self.key_id = key.public().key_id();
        self.signature = key.sign(&self.signed_bytes())?;
        Ok(())
    }

    /// Whether `key` signed this head.
    pub fn verify(&self, key: &PublicKey) -> bool {
        self.signature_alg == Some(key.alg())
            && self.key_id == key.key_id()
            && key.verify(&self.signed_bytes(), &self.signature)
    }

    pub fn to_pb(&self) -> crate::pb::v1::SignedTreeHead {
        crate::pb::v1::SignedTreeHead {
            tree_size: self.size,
            root_hash: self.root.to_vec(),
            timestamp: Some(crate::time::timestamp_from_micros(self.timestamp_micros)),
            hash_algorithm: self.hash.as_str().into(),
            signature_algorithm: self
                .signature_alg
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default(),
            signature: self.signature.clone(),
            key_id: self.key_id.clone(),
        }
    }

    /// The head as a file a platform keeps (`rating-hub log head` writes it, `log verify
    /// --head` reads it): every field, binary ones in hex, the time also in words.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tree_size": self.size,
            "root_hash": hex::encode(self.root),
            "timestamp_micros": self.timestamp_micros,
            "time": crate::time::format_cst_micros(self.timestamp_micros),
            "hash_algorithm": self.hash.as_str(),
            "signature_algorithm": self.signature_alg.map(SignatureAlg::as_str).unwrap_or(""),
            "signature": hex::encode(&self.signature),
            "key_id": hex::encode(&self.key_id),
        })
    }

    /// A head file back; the error names the field.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let field = |name: &str| v.get(name).ok_or_else(|| format!("{name} is missing"));
        let text = |name: &str| -> Result<String, String> {
            field(name)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{name} is not a string"))
        };
        let hex_field = |name: &str| -> Result<Vec<u8>, String> {
            hex::decode(text(name)?.trim()).map_err(|e| format!("{name} is not hexadecimal: {e}"))
        };
        let size = field("tree_size")?
            .as_u64()
            .ok_or("tree_size is not a non-negative integer")?;
        let root: Hash = hex_field("root_hash")?
            .try_into()
            .map_err(|_| "root_hash is not 32 bytes".to_owned())?;
        let timestamp_micros = field("timestamp_micros")?
            .as_i64()
            .ok_or("timestamp_micros is not an integer")?;
        let hash = HashAlg::parse(&text("hash_algorithm")?)
            .ok_or("hash_algorithm is neither sm3 nor sha256")?;
        let sig = v
            .get("signature_algorithm")
            .and_then(|s| s.as_str())
            .unwrap_or("");
        let signature_alg = if sig.is_empty() {
            None
        } else {
            Some(
                SignatureAlg::parse(sig)
                    .ok_or("signature_algorithm is neither sm2-sm3 nor ed25519")?,
            )
        };
        let opt_hex = |name: &str| -> Result<Vec<u8>, String> {
            if v.get(name).is_none() {
                Ok(Vec::new())
            } else {
                hex_field(name)
            }
        };
        Ok(Self {
            size,
            root,
            timestamp_micros,
            hash,
            signature_alg,
            signature: opt_hex("signature")?,
            key_id: opt_hex("key_id")?,
        })
    }

    /// From the contract; `None` when a field cannot be read.
    pub fn from_pb(h: &crate::pb::v1::SignedTreeHead) -> Option<Self> {
        Some(Self {
            size: h.tree_size,
            root: h.root_hash.clone().try_into().ok()?,
            timestamp_micros: crate::time::micros_from_timestamp(h.timestamp.as_ref()?)?,
            hash: HashAlg::parse(&h.hash_algorithm)?,
            signature_alg: if h.signature_algorithm.is_empty() {
                None
            } else {
                Some(SignatureAlg::parse(&h.signature_algorithm)?)
            },
            signature: h.signature.clone(),
            key_id: h.key_id.clone(),
        })
    }
}

/// Why the log cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Proof(#[from] merkle::ProofError),
    #[error("signing the tree head failed: {0}")]
    Sign(String),
}

/// The hub's log: its heads and proofs.
pub struct TreeLog {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    key: Option<SigningKey>,
    interval: Duration,
    latest: Mutex<Option<TreeHead>>,
    /// One signing at a time.
    signing: tokio::sync::Mutex<()>,
    /// What this hub's own check of its stored ratings against its log found: the first
    /// feed position that differs (0: none can be named), and why (`None`: not checked
    /// yet, or nothing found).
    self_check: Mutex<Option<(u64, String)>>,
}

impl TreeLog {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        key: Option<SigningKey>,
        interval: Duration,
    ) -> Self {
        Self {
            store,
            clock,
            key,
            interval,
            latest: Mutex::new(None),
            signing: tokio::sync::Mutex::new(()),
            self_check: Mutex::new(None),
        }
    }

    /// How often heads are signed (and reported upstream).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The first position the self-check found differing, and why.
    pub fn self_check(&self) -> Option<(u64, String)> {
        self.self_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Checks the stored ratings against the log once, in the background (what
    /// `rating-hub log verify` does, on its own read-only connection): a database edited
    /// while the hub was stopped is found at its next start, logged, shown in the metrics,
    /// and reported upstream with the next tree head.
    pub fn spawn_self_check(
        self: Arc<Self>,
        storage_url: String,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let run = async {
                let mut db = crate::store::verify::Db::open(&storage_url).await?;
                let report = crate::store::verify::verify(&mut db, None, |_| {}).await;
                db.close().await;
                report
            };
            match run.await {
                Ok(report) => {
                    if let Some((position, why)) = &report.first_bad {
                        tracing::error!(
                            first_bad_position = position,
                            reason = %why,
                            "RATING LOG ALARM: the stored ratings differ from the rating log \
                             (rating-hub log verify shows the same); reported upstream."
                        );
                        metrics.log_self_check_failed.set(1);
                    } else {
                        tracing::info!(
                            ratings = report.size,
                            "Rating log self-check: every stored rating matches the log."
                        );
                        metrics.log_self_check_failed.set(0);
                    }
                    *self.self_check.lock().unwrap_or_else(|p| p.into_inner()) = report.first_bad;
                }
                Err(e) => {
                    // Not a pass: a row that cannot be read is one way to hide an edit.
                    tracing::error!(error = %e, "RATING LOG ALARM: the rating log self-check could not run; reported upstream.");
                    metrics.log_self_check_failed.set(1);
                    *self.self_check.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((0, format!("the self-check could not run: {e}")));
                }
            }
        })
    }

    pub fn public_key(&self) -> Option<PublicKey> {
        self.key.as_ref().map(SigningKey::public)
    }

    fn alg(&self) -> HashAlg {
        self.store.log_hash()
    }

    /// The stored nodes `f` reads, fetched in one query, then `f` over them.
    async fn with_nodes<T>(
        &self,
        f: impl Fn(&Prover<'_, dyn merkle::Nodes>) -> Result<T, merkle::ProofError>,
    ) -> Result<T, LogError> {
        let alg = self.alg();
        // First over a recorder (it answers zeros) to learn what `f` reads.
        let want = merkle::nodes_read(alg, |p| {
            let _ = f(p);
        });
        let nodes = self.store.log_nodes(&want).await?;
        Ok(f(&Prover {
            alg,
            nodes: &nodes as &dyn merkle::Nodes,
        })?)
    }

    /// The root of the first `size` ratings.
    pub async fn root(&self, size: u64) -> Result<Hash, LogError> {
        self.with_nodes(|p| p.root(size)).await
    }

    /// The log's size now: the feed's committed head.
    pub fn size(&self) -> u64 {
        *self.store.feed_head().borrow()
    }

    /// Signs the head of the log as it is now.
    pub async fn sign_now(&self) -> Result<TreeHead, LogError> {
        let _one = self.signing.lock().await;
        let size = self.size();
        let root = self.root(size).await?;
        let mut head = TreeHead {
            size,
            root,
            timestamp_micros: self.clock.now_micros(),
            hash: self.alg(),
            signature_alg: None,
            signature: Vec::new(),
            key_id: Vec::new(),
        };
        if let Some(key) = &self.key {
            head.signature = key.sign(&head.signed_bytes()).map_err(LogError::Sign)?;
            head.signature_alg = Some(key.alg());
            head.key_id = key.public().key_id();
        }
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(head.clone());
        Ok(head)
    }

    /// The latest signed head (signing one when there is none yet).
    pub async fn latest(&self) -> Result<TreeHead, LogError> {
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match latest {
            Some(h) => Ok(h),
            None => self.sign_now().await,
        }
    }

    /// The leaf hash at `index` and its audit path in the tree of `size`.
    pub async fn inclusion(&self, index: u64, size: u64) -> Result<(Hash, Vec<Hash>), LogError> {
        self.with_nodes(|p| {
            let leaf = p
                .nodes
                .node(0, index)
                .ok_or(merkle::ProofError::Missing(0, index))?;
            Ok((leaf, p.inclusion(index, size)?))
        })
        .await
    }

    /// The consistency proof from the tree of `first` to that of `second`.
    pub async fn consistency(&self, first: u64, second: u64) -> Result<Vec<Hash>, LogError> {
        self.with_nodes(|p| p.consistency(first, second)).await
    }

    /// Signs a head every interval while the log grows (and once an interval when it does
    /// not, so a head's time says the log was checked then), until `stopping`.
    pub fn spawn(
        self: Arc<Self>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.sign_now().await {
                    tracing::error!(error = %e, "Cannot sign the rating log's tree head.");
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.interval) => {}
                    _ = stopping.changed() => return,
                }
                if *stopping.borrow() {
                    return;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(key: &SigningKey) -> TreeHead {
        let mut h = TreeHead {
            size: 70,
            root: HashAlg::Sm3.leaf(b"root"),
            timestamp_micros: 1_780_000_000_000_000,
            hash: HashAlg::Sm3,
            signature_alg: Some(key.alg()),
            signature: Vec::new(),
            key_id: key.public().key_id(),
        };
        h.signature = key.sign(&h.signed_bytes()).unwrap();
        h
    }

    /// Heads signed with SM2-with-SM3 and with Ed25519 verify under their key, through the
    /// contract's message and the printed public key; a changed size, root, time or hash,
    /// or another key, does not.
    #[test]
    fn signed_heads_verify_and_changed_ones_do_not() {
        for alg in [SignatureAlg::Sm2, SignatureAlg::Ed25519] {
            let key = SigningKey::parse(alg, &SigningKey::generate(alg)).unwrap();
            let public = PublicKey::parse(&key.public().to_text()).unwrap();
            let h = head(&key);
            assert!(h.verify(&public), "{alg:?}");
            let back = TreeHead::from_pb(&h.to_pb()).unwrap();
            assert_eq!(back, h);
            assert!(back.verify(&public));
            let other = SigningKey::parse(alg, &SigningKey::generate(alg)).unwrap();
            assert!(!h.verify(&other.public()), "another key");
            for change in 0..4 {
                let mut bad = h.clone();
                match change {
                    0 => bad.size -= 1,
                    1 => bad.root[0] ^= 1,
                    2 => bad.timestamp_micros += 1,
                    _ => bad.hash = HashAlg::Sha256,
                }
                assert!(!bad.verify(&public), "{alg:?} change {change}");
            }
            let mut unsigned = h.clone();
            unsigned.signature_alg = None;
            assert!(!unsigned.verify(&public));
        }
        assert!(PublicKey::parse("rsa:00").is_err());
    }
}
