//! Rater privacy: name, ID number and phone are sealed with an AEAD (ChaCha20-Poly1305)
//! before they reach the database, opened only to answer a query, and masked unless the
//! caller holds the read-pii role. Each sealed record names its key, so keys can rotate:
//! new records use the active key, old ones open with the key they name.

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

pub struct PiiKeys {
    active: String,
    keys: HashMap<String, ChaCha20Poly1305>,
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
            .finish()
    }
}

fn key_bytes(id: &str, text: &str) -> Result<Vec<u8>, PrivacyError> {
    let bytes = hex::decode(text.trim()).map_err(|_| PrivacyError::Key {
        id: id.into(),
        reason: "must be 64 hexadecimal characters (32 bytes)".into(),
    })?;
    if bytes.len() != 32 {
        return Err(PrivacyError::Key {
            id: id.into(),
            reason: format!("is {} bytes; 32 are needed", bytes.len()),
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

fn parse_hex_key(id: &str, text: &str) -> Result<ChaCha20Poly1305, PrivacyError> {
    Ok(ChaCha20Poly1305::new(Key::from_slice(&key_bytes(
        id, text,
    )?)))
}

impl PiiKeys {
    /// `sources` maps key ids to a file path holding 64 hex characters, or to
    /// `env:VARIABLE` naming an environment variable that holds them.
    pub fn load(active: &str, sources: &BTreeMap<String, String>) -> Result<Self, PrivacyError> {
        let mut keys = HashMap::new();
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
            keys.insert(id.clone(), parse_hex_key(id, &text)?);
            if id == active {
                tag = Some(tag_key(&key_bytes(id, &text)?));
            }
        }
        let Some(tag_key) = tag else {
            return Err(PrivacyError::NoActiveKey(active.into()));
        };
        Ok(Self {
            active: active.into(),
            keys,
            tag_key,
        })
    }

    /// Writes a fresh random key file (mode 0600) unless one is there; `Ok(true)` when this
    /// call wrote it. The key is written whole to a file of its own, synced, then linked
    /// into place: neither a second process starting at the same moment nor a crash half-way
    /// ever sees a partial key (whichever link lands first is the key).
    pub fn create_key_file(path: &Path) -> std::io::Result<bool> {
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
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("ChaCha20-Poly1305 encryption of a small message cannot fail");
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
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| PrivacyError::Open)
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
        let mut k = HashMap::new();
        k.insert(
            "a".to_string(),
            parse_hex_key("a", &"11".repeat(32)).unwrap(),
        );
        k.insert(
            "b".to_string(),
            parse_hex_key("b", &"22".repeat(32)).unwrap(),
        );
        PiiKeys {
            active: "b".into(),
            keys: k,
            tag_key: [7; 32],
        }
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
        let e = parse_hex_key("k9", "abc").err().unwrap();
        assert!(e.to_string().contains("k9"));
    }
}
