//! Rater privacy: name, ID number and phone are sealed with an AEAD (ChaCha20-Poly1305, or
//! SM4-GCM where 国密 is required) before they reach the database, opened only to answer a
//! query, and masked unless the caller holds the read-pii role. Each sealed record names its
//! key, and each key its algorithm, so keys and algorithms can rotate: new records use the
//! active key, old ones open with the key they name.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use prost::Message;

use crate::domain::codes::{mask_document, mask_name, mask_phone};
use crate::domain::rating::document_type;
use crate::pb::v1 as pb;

const NONCE_LEN: usize = 12;

/// A sealed blob and the id of the key that sealed it.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    /// nonce ‖ ciphertext ‖ tag
    pub blob: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed({}, {} bytes)", self.key_id, self.blob.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error("privacy key {id}: {reason}")]
    Key { id: String, reason: String },
    #[error("the active privacy key {0:?} is not among [privacy.keys]")]
    NoActiveKey(String),
    #[error("record sealed with key {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("sealed personal data failed authentication (wrong key or tampered record)")]
    Open,
}

/// The AEAD a privacy key seals with (`[privacy.algorithms]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// 32-byte keys (64 hexadecimal characters).
    #[default]
    Chacha20Poly1305,
    /// SM4 in GCM mode (GB/T 32907 with the GCM of RFC 8998), 16-byte keys (32 hexadecimal
    /// characters), 12-byte nonces, 16-byte tags.
    Sm4Gcm,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Chacha20Poly1305 => "chacha20-poly1305",
            Algorithm::Sm4Gcm => "sm4-gcm",
        }
    }

    /// The key's length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Algorithm::Chacha20Poly1305 => 32,
            Algorithm::Sm4Gcm => 16,
        }
    }
}

type Sm4Gcm = aes_gcm::AesGcm<sm4::Sm4, aes_gcm::aead::consts::U12>;

/// One key, ready to seal and open.
enum Cipher {
    Chacha(ChaCha20Poly1305),
    Sm4Gcm(Box<Sm4Gcm>),
}

impl Cipher {
    fn new(algorithm: Algorithm, key: &[u8]) -> Self {
        match algorithm {
            Algorithm::Chacha20Poly1305 => {
                Cipher::Chacha(ChaCha20Poly1305::new(Key::from_slice(key)))
            }
            Algorithm::Sm4Gcm => Cipher::Sm4Gcm(Box::new(
                <Sm4Gcm as aes_gcm::KeyInit>::new_from_slice(key)
                    .expect("the key's length was checked"),
            )),
        }
    }

    /// ciphertext ‖ tag.
    fn seal(&self, nonce: &[u8; NONCE_LEN], msg: &[u8], aad: &[u8]) -> Vec<u8> {
        match self {
            Cipher::Chacha(c) => c
                .encrypt(Nonce::from_slice(nonce), Payload { msg, aad })
                .expect("ChaCha20-Poly1305 encryption of a small message cannot fail"),
            Cipher::Sm4Gcm(c) => aes_gcm::aead::Aead::encrypt(
                &**c,
                &(*nonce).into(),
                aes_gcm::aead::Payload { msg, aad },
            )
            .expect("SM4-GCM encryption of a small message cannot fail"),
        }
    }

    fn open(&self, nonce: &[u8], ct: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().ok()?;
        match self {
            Cipher::Chacha(c) => c
                .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
                .ok(),
            Cipher::Sm4Gcm(c) => aes_gcm::aead::Aead::decrypt(
                &**c,
                &(*nonce).into(),
                aes_gcm::aead::Payload { msg: ct, aad },
            )
            .ok(),
        }
    }
}

pub struct PiiKeys {
    active: String,
    keys: HashMap<String, Cipher>,
    algorithms: HashMap<String, Algorithm>,
    /// Derived from the active key: pseudonymous tags for matching (e.g. phone bursts).
    tag_key: [u8; 32],
}

impl fmt::Debug for PiiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("PiiKeys")
            .field("active", &self.active)
            .field("ids", &ids)
            .field("active_algorithm", &self.algorithm())
            .finish()
    }
}

fn key_bytes(id: &str, text: &str, algorithm: Algorithm) -> Result<Vec<u8>, PrivacyError> {
    let len = algorithm.key_len();
    let bytes = hex::decode(text.trim()).map_err(|_| PrivacyError::Key {
        id: id.into(),
        reason: format!(
            "must be {} hexadecimal characters ({len} bytes, {})",
            len * 2,
            algorithm.as_str()
        ),
    })?;
    if bytes.len() != len {
        return Err(PrivacyError::Key {
            id: id.into(),
            reason: format!(
                "is {} bytes; {} needs {len} ({} hexadecimal characters)",
                bytes.len(),
                algorithm.as_str(),
                len * 2
            ),
        });
    }
    Ok(bytes)
}

fn tag_key(key: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"rating-hub pseudonymous tag v1");
    h.update(key);
    h.finalize().into()
}

impl PiiKeys {
    /// `sources` maps key ids to a file path holding 64 hex characters, or to
    /// `env:VARIABLE` naming an environment variable that holds them (ChaCha20-Poly1305
    /// keys; see [`PiiKeys::load_with`] for others).
    pub fn load(active: &str, sources: &BTreeMap<String, String>) -> Result<Self, PrivacyError> {
        Self::load_with(active, sources, &BTreeMap::new())
    }

    /// As [`PiiKeys::load`], with each key's algorithm (ChaCha20-Poly1305 where none is
    /// named).
    pub fn load_with(
        active: &str,
        sources: &BTreeMap<String, String>,
        algorithms: &BTreeMap<String, Algorithm>,
    ) -> Result<Self, PrivacyError> {
        if let Some(id) = algorithms.keys().find(|id| !sources.contains_key(*id)) {
            return Err(PrivacyError::Key {
                id: id.clone(),
                reason: "has an algorithm in [privacy.algorithms] but no entry in [privacy.keys]"
                    .into(),
            });
        }
        let mut keys = HashMap::new();
        let mut kinds = HashMap::new();
        let mut tag = None;
        for (id, source) in sources {
            let text = if let Some(var) = source.strip_prefix("env:") {
                std::env::var(var).map_err(|_| PrivacyError::Key {
                    id: id.clone(),
                    reason: format!("environment variable {var} is not set"),
                })?
            } else {
                std::fs::read_to_string(source).map_err(|e| PrivacyError::Key {
                    id: id.clone(),
                    reason: format!("cannot read {source}: {e}"),
                })?
            };
            let algorithm = algorithms.get(id).copied().unwrap_or_default();
            let bytes = key_bytes(id, &text, algorithm)?;
            keys.insert(id.clone(), Cipher::new(algorithm, &bytes));
            kinds.insert(id.clone(), algorithm);
            if id == active {
                tag = Some(tag_key(&bytes));
            }
        }
        let Some(tag_key) = tag else {
            return Err(PrivacyError::NoActiveKey(active.into()));
        };
        Ok(Self {
            active: active.into(),
            keys,
            algorithms: kinds,
            tag_key,
        })
    }

    /// Whether a key with this id is loaded (records sealed under it can be opened).
    pub fn has_key(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// The active key's algorithm (what new records are sealed with).
    pub fn algorithm(&self) -> Algorithm {
        self.algorithms
            .get(&self.active)
            .copied()
            .unwrap_or_default()
    }

    /// Writes a fresh random key file (mode 0600) unless one is there; `Ok(true)` when this
    /// call wrote it. The key is written whole to a file of its own, synced, then linked
    /// into place: neither a second process starting at the same moment nor a crash half-way
    /// ever sees a partial key (whichever link lands first is the key).
    pub fn create_key_file(path: &Path) -> std::io::Result<bool> {
        Self::create_key_file_for(path, Algorithm::Chacha20Poly1305)
    }

    /// As [`PiiKeys::create_key_file`], a key for `algorithm`.
    pub fn create_key_file_for(path: &Path, algorithm: Algorithm) -> std::io::Result<bool> {
        use std::io::Write;
        if path.exists() {
            return Ok(false);
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let suffix = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let tmp = path.with_extension(format!("tmp.{}", hex::encode(suffix)));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        let key = ChaCha20Poly1305::generate_key(&mut OsRng);
        let key = &key[..algorithm.key_len()];
        let written = f
            .write_all((hex::encode(key) + "\n").as_bytes())
            .and_then(|()| f.sync_all());
        drop(f);
        let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
            // A file system without hard links: a rename, only while there is no key (it
            // would replace one another process just wrote).
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !path.exists() => {
                std::fs::rename(&tmp, path).map_err(|_| e)
            }
            other => other,
        });
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A keyed pseudonym of `value` (SHA-256 over key, value, key): equal values give equal
    /// tags, and without the key a tag reveals nothing usable about the value.
    pub fn tag(&self, value: &[u8]) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.tag_key);
        h.update(value);
        h.update(self.tag_key);
        h.finalize().into()
    }

    /// Seals `plaintext`; `aad` binds the blob to its record (it cannot be moved to another).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Sealed {
        let cipher = &self.keys[&self.active];
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&ChaCha20Poly1305::generate_nonce(&mut OsRng));
        let ct = cipher.seal(&nonce, plaintext, aad);
        let mut blob = Vec::with_capacity(NONCE_LEN + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        Sealed {
            key_id: self.active.clone(),
            blob,
        }
    }

    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Vec<u8>, PrivacyError> {
        let cipher = self
            .keys
            .get(&sealed.key_id)
            .ok_or_else(|| PrivacyError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.blob.len() < NONCE_LEN {
            return Err(PrivacyError::Open);
        }
        let (nonce, ct) = sealed.blob.split_at(NONCE_LEN);
        cipher.open(nonce, ct, aad).ok_or(PrivacyError::Open)
    }

    /// Moves the names, ID numbers and phones of a rater (or applicant) and of an agent
    /// (代办人) into one sealed blob. `None` when neither carries any.
    pub fn seal_persons(
        &self,
        rater: Option<&mut pb::Rater>,
        agent: Option<&mut pb::Rater>,
        aad: &[u8],
    ) -> Option<Sealed> {
        let take = |p: Option<&mut pb::Rater>| {
            p.map(|p| {
                (
                    std::mem::take(&mut p.name),
                    std::mem::take(&mut p.id_number),
                    std::mem::take(&mut p.phone),
                )
            })
            .unwrap_or_default()
        };
        let (name, id_number, phone) = take(rater);
        let (agent_name, agent_id_number, agent_phone) = take(agent);
        let pii = SealedPersons {
            name,
            id_number,
            phone,
            agent_name,
            agent_id_number,
            agent_phone,
        };
        if pii == SealedPersons::default() {
            return None;
        }
        Some(self.seal(&pii.encode_to_vec(), aad))
    }

    /// Puts a sealed rater's (or applicant's) and agent's data back, masked unless
    /// `unmasked`.
    pub fn reveal_persons(
        &self,
        rater: Option<&mut pb::Rater>,
        agent: Option<&mut pb::Rater>,
        sealed: &Sealed,
        aad: &[u8],
        unmasked: bool,
    ) -> Result<(), PrivacyError> {
        let pii = SealedPersons::decode(self.open(sealed, aad)?.as_slice())
            .map_err(|_| PrivacyError::Open)?;
        let put = |p: &mut pb::Rater, name: String, id: String, phone: String| {
            if unmasked {
                p.name = name;
                p.id_number = id;
                p.phone = phone;
            } else {
                p.name = mask_name(&name);
                let kind = pb::IdDocumentType::try_from(p.id_type).unwrap_or_default();
                p.id_number = mask_document(document_type(kind), &id);
                p.phone = mask_phone(&phone);
            }
        };
        if let Some(r) = rater {
            put(r, pii.name, pii.id_number, pii.phone);
        }
        if let Some(a) = agent {
            put(a, pii.agent_name, pii.agent_id_number, pii.agent_phone);
        }
        Ok(())
    }
}

/// `text` with these people's names (whole, and each ending of two characters or more:
/// "娜娜" of "欧阳娜娜"), phones, document numbers and organisation codes replaced by "*".
/// For texts that may repeat what a person sealed elsewhere said (a unit's note, a rater's
/// statement taken down by the authority).
pub fn mask_people(text: &str, people: &[pb::Rater]) -> String {
    let mut secrets: Vec<String> = Vec::new();
    for r in people {
        let name: Vec<char> = r.name.trim().chars().collect();
        for start in 0..name.len() {
            if name.len() - start >= 2 {
                secrets.push(name[start..].iter().collect());
            }
        }
        for s in [&r.phone, &r.id_number, &r.credit_code] {
            if s.trim().chars().count() >= 2 {
                secrets.push(s.trim().to_owned());
            }
        }
    }
    // Longest first, so a name is masked whole before its given name.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.chars().count()));
    let mut t = text.to_owned();
    for s in secrets {
        if t.contains(s.as_str()) {
            t = t.replace(&s, "*");
        }
    }
    t
}

/// What a sealed blob holds. The first three tags are `Rater`'s own (3 name, 4 id_number,
/// 6 phone), so blobs sealed before agents existed (an encoded `Rater`) read the same.
#[derive(Clone, PartialEq, prost::Message)]
struct SealedPersons {
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    id_number: String,
    #[prost(string, tag = "6")]
    phone: String,
    #[prost(string, tag = "13")]
    agent_name: String,
    #[prost(string, tag = "14")]
    agent_id_number: String,
    #[prost(string, tag = "16")]
    agent_phone: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> PiiKeys {
        let chacha = |hex: &str| {
            let bytes = key_bytes("k", hex, Algorithm::Chacha20Poly1305).unwrap();
            Cipher::new(Algorithm::Chacha20Poly1305, &bytes)
        };
        PiiKeys {
            active: "b".into(),
            keys: HashMap::from([
                ("a".to_string(), chacha(&"11".repeat(32))),
                ("b".to_string(), chacha(&"22".repeat(32))),
            ]),
            algorithms: HashMap::new(),
            tag_key: [7; 32],
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// SM4-GCM as RFC 8998 A.1 gives it (key, IV, AAD, plaintext → ciphertext ‖ tag).
    #[test]
    fn sm4_gcm_matches_rfc_8998() {
        let c = Cipher::new(
            Algorithm::Sm4Gcm,
            &unhex("0123456789ABCDEFFEDCBA9876543210"),
        );
        let nonce: [u8; 12] = unhex("00001234567800000000ABCD").try_into().unwrap();
        let aad = unhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2");
        let plain = unhex(
            "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD\
             EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA",
        );
        let sealed = c.seal(&nonce, &plain, &aad);
        assert_eq!(
            hex::encode_upper(&sealed),
            "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735\
             D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D\
             83DE3541E4C2B58177E065A9BF7B62EC"
        );
        assert_eq!(c.open(&nonce, &sealed, &aad).unwrap(), plain);
        for at in [0, 63, 64, 79] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(c.open(&nonce, &bad, &aad).is_none(), "byte {at} changed");
        }
        assert!(c.open(&nonce, &sealed, b"other record").is_none());
    }

    /// A hub moving to 国密: SM4-GCM records are written under the new key, read back, and
    /// refused when tampered with; ChaCha20-Poly1305 records sealed before stay readable.
    #[test]
    fn sm4_gcm_keys_seal_new_records_and_old_ones_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.key");
        let gm = dir.path().join("gm.key");
        assert!(PiiKeys::create_key_file(&old).unwrap());
        assert!(PiiKeys::create_key_file_for(&gm, Algorithm::Sm4Gcm).unwrap());
        assert_eq!(std::fs::read_to_string(&gm).unwrap().trim().len(), 32);
        let sources = BTreeMap::from([
            ("k2026".to_string(), old.display().to_string()),
            ("gm2027".to_string(), gm.display().to_string()),
        ]);
        let before = PiiKeys::load("k2026", &sources).unwrap_err();
        assert!(
            before.to_string().contains("gm2027") && before.to_string().contains("16 bytes"),
            "an SM4 key read as ChaCha20-Poly1305 is refused by name: {before}"
        );
        let algorithms = BTreeMap::from([("gm2027".to_string(), Algorithm::Sm4Gcm)]);
        let k2026 = PiiKeys::load_with("k2026", &sources, &algorithms).unwrap();
        let earlier = k2026.seal(b"13800138000", b"rec-1");
        let keys = PiiKeys::load_with("gm2027", &sources, &algorithms).unwrap();
        assert_eq!(keys.algorithm(), Algorithm::Sm4Gcm);
        let s = keys.seal(b"13800138000", b"rec-2");
        assert_eq!(s.key_id, "gm2027");
        assert_eq!(s.blob.len(), 12 + 11 + 16, "nonce, ciphertext, tag");
        assert!(!s.blob.windows(11).any(|w| w == b"13800138000"));
        assert_eq!(keys.open(&s, b"rec-2").unwrap(), b"13800138000");
        assert_eq!(keys.open(&earlier, b"rec-1").unwrap(), b"13800138000");
        assert!(matches!(keys.open(&s, b"rec-1"), Err(PrivacyError::Open)));
        let mut tampered = s.clone();
        tampered.blob[14] ^= 0x40;
        assert!(matches!(
            keys.open(&tampered, b"rec-2"),
            Err(PrivacyError::Open)
        ));
        // Under the wrong algorithm a record does not open (a key's algorithm is part of it).
        let mut renamed = s.clone();
        renamed.key_id = "k2026".into();
        assert!(matches!(
            keys.open(&renamed, b"rec-2"),
            Err(PrivacyError::Open)
        ));
        // An algorithm for a key that is not listed is a configuration error, named.
        let stray = BTreeMap::from([("gm2028".to_string(), Algorithm::Sm4Gcm)]);
        let e = PiiKeys::load_with("k2026", &sources, &stray).unwrap_err();
        assert!(e.to_string().contains("gm2028"), "{e}");
    }

    #[test]
    fn seal_open_and_bind_to_the_record() {
        let k = keys();
        let s = k.seal(b"13800138000", b"rec-1");
        assert_eq!(s.key_id, "b");
        assert!(!s.blob.windows(11).any(|w| w == b"13800138000"));
        assert_eq!(k.open(&s, b"rec-1").unwrap(), b"13800138000");
        assert!(matches!(k.open(&s, b"rec-2"), Err(PrivacyError::Open)));
    }

    #[test]
    fn old_records_open_with_the_key_they_name() {
        let mut k = keys();
        k.active = "a".into();
        let old = k.seal(b"x", b"");
        k.active = "b".into();
        assert_eq!(k.open(&old, b"").unwrap(), b"x");
        k.keys.remove("a");
        assert!(matches!(
            k.open(&old, b""),
            Err(PrivacyError::UnknownKey(_))
        ));
    }

    #[test]
    fn masks() {
        assert_eq!(mask_name("张三"), "张*");
        assert_eq!(mask_name("欧阳娜娜"), "欧***");
        use crate::domain::codes::DocumentType as D;
        assert_eq!(
            mask_document(D::ResidentIdCard, "11010519491231002X"),
            "110105********002X"
        );
        assert_eq!(mask_document(D::Passport, "E12345678"), "E******78");
        assert_eq!(
            mask_document(D::Passport, "E12345"),
            "E*****",
            "short: one character"
        );
        assert_eq!(
            mask_document(D::HkMacaoTravelPermit, "H12345678"),
            "H******78"
        );
        assert_eq!(mask_phone("13812345678"), "138****5678");
        assert_eq!(mask_phone("087163123456"), "0871****3456");
    }

    #[test]
    fn bad_key_material_is_named() {
        let e = key_bytes("k9", "abc", Algorithm::Chacha20Poly1305)
            .err()
            .unwrap();
        assert!(e.to_string().contains("k9"));
        let e = key_bytes("k9", &"ab".repeat(32), Algorithm::Sm4Gcm)
            .err()
            .unwrap();
        assert!(e.to_string().contains("sm4-gcm needs 16"), "{e}");
    }
}
