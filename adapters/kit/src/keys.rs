//! Deterministic source keys: the same input always gives the same key, so an adapter that
//! reads a file, a table row or a callback twice submits the same key twice — a duplicate the
//! hub answers as such, never a second rating.

use sha2::{Digest, Sha256};

/// `<prefix>:<32 hex>` from the parts that identify one rating in the source (e.g. the SMS
/// gateway's sequence id, or a table's primary key). Parts are length-prefixed, so
/// ("ab", "c") and ("a", "bc") differ.
pub fn source_key(prefix: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    format!("{prefix}:{}", &hex::encode(h.finalize())[..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_unambiguous() {
        assert_eq!(
            source_key("sms", &["a", "b"]),
            source_key("sms", &["a", "b"])
        );
        assert_ne!(
            source_key("sms", &["ab", "c"]),
            source_key("sms", &["a", "bc"])
        );
        assert!(source_key("sms", &["x"]).starts_with("sms:"));
        assert_eq!(source_key("sms", &["x"]).len(), 4 + 32);
    }
}
