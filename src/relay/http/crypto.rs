//! Secrets and keys an upstream's profile uses, loaded once at start from files or the
//! environment, and the 国密 steps computed values take (SM2 signatures and encryption,
//! SM3, HMAC-SM3, SM4). A secret's value never reaches a log line, an error text or a dead
//! letter: errors name the secret, never show it.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;

use crate::gm::{Sm2PrivateKey, Sm2PublicKey};

/// A secret as configured: "env:NAME" or "file:/path" (the file's content, trimmed).
pub fn load_secret(name: &str, reference: &str) -> Result<Secret, String> {
    let value = if let Some(var) = reference.strip_prefix("env:") {
        std::env::var(var)
            .map_err(|_| format!("secret {name}: environment variable {var} is not set"))?
    } else if let Some(path) = reference.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map_err(|e| format!("secret {name}: cannot read {path}: {}", e.kind()))?
            .trim()
            .to_owned()
    } else {
        return Err(format!(
            "secret {name}: write \"env:VARIABLE\" or \"file:/path\" (never the secret itself)"
        ));
    };
    if value.is_empty() {
        return Err(format!("secret {name}: is empty"));
    }
    Ok(Secret(value))
}

/// A secret's value. `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An SM2 key file: a private key (which also gives its public key) or a public key.
#[derive(Debug, Clone)]
pub enum Key {
    Private(Sm2PrivateKey),
    Public(Sm2PublicKey),
}

impl Key {
    pub fn load(name: &str, path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("key {name}: cannot read {path}: {}", e.kind()))?;
        if let Ok(k) = Sm2PrivateKey::parse(&text) {
            return Ok(Key::Private(k));
        }
        Sm2PublicKey::parse(&text).map(Key::Public).map_err(|_| {
            format!("key {name}: {path} is neither an SM2 private nor public key (PEM or hex)")
        })
    }

    pub fn private(&self) -> Option<&Sm2PrivateKey> {
        match self {
            Key::Private(k) => Some(k),
            Key::Public(_) => None,
        }
    }

    pub fn public(&self) -> Sm2PublicKey {
        match self {
            Key::Private(k) => k.public_key(),
            Key::Public(k) => k.clone(),
        }
    }
}

/// Secrets and keys of one upstream.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    pub secrets: BTreeMap<String, Secret>,
    pub keys: BTreeMap<String, Key>,
}

/// How bytes are written as text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// Lower-case hex.
    #[default]
    Hex,
    /// Upper-case hex.
    HexUpper,
    Base64,
}

impl Encoding {
    pub fn encode(self, bytes: &[u8]) -> String {
        match self {
            Encoding::Hex => hex::encode(bytes),
            Encoding::HexUpper => hex::encode_upper(bytes),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    pub fn decode(self, text: &str) -> Option<Vec<u8>> {
        match self {
            Encoding::Hex | Encoding::HexUpper => hex::decode(text.trim()).ok(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .ok(),
        }
    }
}
