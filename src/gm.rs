//! 国密 (ShangMi) primitives the upstream envelopes need: SM2 signatures and public-key
//! encryption (GB/T 32918), SM3 hashing and HMAC-SM3 (GB/T 32905), SM4 in ECB and CBC mode
//! with PKCS#7 padding (GB/T 32907). Thin wrappers over RustCrypto's `sm2`, `sm3`, `sm4`,
//! `ecb`, `cbc` and `hmac` crates (docs/decisions/0008-guomi-and-upstream-profiles.md), so the protocol
//! engine speaks in bytes and names, never in curve types.
//!
//! Keys come from files (PEM or hex). Neither a key nor a plaintext ever reaches an error
//! text or a `Debug` print.

use std::fmt;

use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyInit, KeyIvInit, block_padding::Pkcs7};
use hmac_sm3::Mac;
use sm2::dsa::signature::{RandomizedSigner, Verifier};
use sm2::elliptic_curve::common::getrandom::SysRng;
use sm2::elliptic_curve::rand_core::{TryCryptoRng, TryRng};
use sm2::pkcs8::{DecodePrivateKey, DecodePublicKey};
use sm2::pke::{DecryptingKey, EncryptingKey, Mode};
use sm3::Digest;

/// The SM2 signer id GM/T 0009 recommends when the parties agree no other: "1234567812345678".
pub const DEFAULT_SIGNER_ID: &str = "1234567812345678";

/// Why a 国密 operation failed. Never carries key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GmError(pub String);

fn err(m: impl Into<String>) -> GmError {
    GmError(m.into())
}

/// SM3 of `data`.
pub fn sm3(data: &[u8]) -> [u8; 32] {
    sm3::Sm3::digest(data).into()
}

/// HMAC-SM3 of `data` under `key`.
pub fn hmac_sm3(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <hmac_sm3::Hmac<sm3::Sm3> as hmac_sm3::KeyInit>::new_from_slice(key)
        .expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// `n` bytes from the operating system's random source.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut out = vec![0; n];
    SysRng
        .try_fill_bytes(&mut out)
        .expect("the operating system's random source works");
    out
}

/// How the parts of an SM2 ciphertext are laid out: C1‖C3‖C2 (GB/T 32918.4-2016, the
/// current order) or C1‖C2‖C3 (GM/T 0003-2012 and older Java libraries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sm2Order {
    C1C3C2,
    C1C2C3,
}

impl Sm2Order {
    fn mode(self) -> Mode {
        match self {
            Sm2Order::C1C3C2 => Mode::C1C3C2,
            Sm2Order::C1C2C3 => Mode::C1C2C3,
        }
    }
}

/// Reads a key text: PEM, or hex digits (whitespace ignored).
fn hex_of(text: &str) -> Option<Vec<u8>> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(compact).ok()
}

/// An SM2 private key (signing and decryption).
#[derive(Clone)]
pub struct Sm2PrivateKey {
    secret: sm2::SecretKey,
}

impl fmt::Debug for Sm2PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sm2PrivateKey(..)")
    }
}

impl Sm2PrivateKey {
    /// From a PKCS#8 PEM ("BEGIN PRIVATE KEY", as `openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:SM2` writes), a SEC1 PEM ("BEGIN EC PRIVATE KEY"), or the 64 hex
    /// digits of the scalar.
    pub fn parse(text: &str) -> Result<Self, GmError> {
        let text = text.trim();
        let secret = if text.contains("BEGIN PRIVATE KEY") {
            sm2::SecretKey::from_pkcs8_pem(text)
                .map_err(|_| err("not an SM2 private key in PKCS#8 PEM"))?
        } else if text.contains("BEGIN EC PRIVATE KEY") {
            sm2::SecretKey::from_sec1_pem(text)
                .map_err(|_| err("not an SM2 private key in SEC1 PEM"))?
        } else {
            let bytes = hex_of(text)
                .filter(|b| b.len() == 32)
                .ok_or_else(|| err("an SM2 private key is a PEM file or 64 hex digits"))?;
            sm2::SecretKey::from_slice(&bytes)
                .map_err(|_| err("the hex digits are not an SM2 private key"))?
        };
        Ok(Self { secret })
    }

    pub fn public_key(&self) -> Sm2PublicKey {
        Sm2PublicKey {
            key: self.secret.public_key(),
        }
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        loop {
            let bytes = random_bytes(32);
            if let Ok(secret) = sm2::SecretKey::from_slice(&bytes) {
                return Self { secret };
            }
        }
    }

    /// The scalar as 64 hex digits (what [`Sm2PrivateKey::parse`] reads).
    pub fn to_hex(&self) -> String {
        hex::encode(self.secret.to_bytes())
    }

    /// SM2 signature (with SM3 and the signer id's Z value) of `msg`: r‖s, 64 bytes, or the
    /// ASN.1 DER SEQUENCE of r and s.
    pub fn sign(&self, signer_id: &str, msg: &[u8], der: bool) -> Result<Vec<u8>, GmError> {
        let key = sm2::dsa::SigningKey::new(signer_id, &self.secret)
            .map_err(|_| err("the SM2 signing key cannot be used"))?;
        let sig: sm2::dsa::Signature = key
            .try_sign_with_rng(&mut SysRng, msg)
            .map_err(|_| err("SM2 signing failed"))?;
        Ok(if der {
            sig.to_der().to_vec()
        } else {
            sig.to_bytes().to_vec()
        })
    }

    /// Decrypts an SM2 ciphertext (with or without the 04 point prefix).
    pub fn decrypt(&self, order: Sm2Order, ciphertext: &[u8]) -> Result<Vec<u8>, GmError> {
        let key = DecryptingKey::new_with_mode(self.secret.to_nonzero_scalar(), order.mode());
        // Some platforms drop the 04 that marks an uncompressed point. A first byte of 04
        // does not prove it is there (C1's x may begin with 04), so both readings are
        // tried; C3, the SM3 check over the plaintext, tells the wrong one.
        if ciphertext.first() == Some(&0x04)
            && let Ok(plain) = key.decrypt(ciphertext)
        {
            return Ok(plain);
        }
        key.decrypt(&[&[0x04], ciphertext].concat())
            .map_err(|_| err("the SM2 ciphertext does not decrypt under this key"))
    }
}

/// An SM2 public key (verification and encryption).
#[derive(Clone, PartialEq, Eq)]
pub struct Sm2PublicKey {
    key: sm2::PublicKey,
}

impl fmt::Debug for Sm2PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sm2PublicKey({})", self.to_hex())
    }
}

impl Sm2PublicKey {
    /// From a PEM ("BEGIN PUBLIC KEY"), or hex: 04‖x‖y (130 digits) or x‖y (128 digits).
    pub fn parse(text: &str) -> Result<Self, GmError> {
        let text = text.trim();
        let key = if text.contains("BEGIN PUBLIC KEY") {
            sm2::PublicKey::from_public_key_pem(text)
                .map_err(|_| err("not an SM2 public key in PEM"))?
        } else {
            let mut bytes = hex_of(text).ok_or_else(|| {
                err("an SM2 public key is a PEM file or 128/130 hex digits (04‖x‖y)")
            })?;
            if bytes.len() == 64 {
                bytes.insert(0, 0x04);
            }
            if bytes.len() != 65 {
                return Err(err(
                    "an SM2 public key is a PEM file or 128/130 hex digits (04‖x‖y)",
                ));
            }
            sm2::PublicKey::from_sec1_bytes(&bytes)
                .map_err(|_| err("the hex digits are not a point on the SM2 curve"))?
        };
        Ok(Self { key })
    }

    /// 04‖x‖y in upper-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode_upper(self.key.to_sec1_bytes())
    }

    /// 04‖x‖y.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.key.to_sec1_bytes().to_vec()
    }

    /// Checks an SM2 signature given as r‖s (64 bytes) or DER.
    pub fn verify(&self, signer_id: &str, msg: &[u8], signature: &[u8]) -> bool {
        let Ok(key) = sm2::dsa::VerifyingKey::new(signer_id, self.key) else {
            return false;
        };
        let sig = if signature.len() == 64 {
            sm2::dsa::Signature::from_slice(signature).ok()
        } else {
            sm2::dsa::Signature::from_der(signature).ok()
        };
        sig.is_some_and(|s| key.verify(msg, &s).is_ok())
    }

    /// SM2 encryption of `msg`, 04‖C1 x‖y, then C3 and C2 in `order`.
    pub fn encrypt(&self, order: Sm2Order, msg: &[u8]) -> Result<Vec<u8>, GmError> {
        self.encrypt_with(&mut SysRng, order, msg)
    }

    fn encrypt_with<R: TryCryptoRng>(
        &self,
        rng: &mut R,
        order: Sm2Order,
        msg: &[u8],
    ) -> Result<Vec<u8>, GmError> {
        EncryptingKey::new_with_mode(self.key, order.mode())
            .encrypt(rng, msg)
            .map_err(|_| err("SM2 encryption failed"))
    }
}

/// SM4 block mode. CBC carries its 16-byte IV.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sm4Mode {
    Ecb,
    Cbc([u8; 16]),
}

impl fmt::Debug for Sm4Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sm4Mode::Ecb => "Ecb",
            Sm4Mode::Cbc(_) => "Cbc(..)",
        })
    }
}

/// SM4 encryption of `data` with PKCS#7 padding.
pub fn sm4_encrypt(key: &[u8; 16], mode: Sm4Mode, data: &[u8]) -> Vec<u8> {
    match mode {
        Sm4Mode::Ecb => ecb::Encryptor::<sm4::Sm4>::new_from_slice(key)
            .expect("16-byte key")
            .encrypt_padded_vec::<Pkcs7>(data),
        Sm4Mode::Cbc(iv) => cbc::Encryptor::<sm4::Sm4>::new_from_slices(key, &iv)
            .expect("16-byte key and IV")
            .encrypt_padded_vec::<Pkcs7>(data),
    }
}

/// SM4 decryption of PKCS#7-padded `data`.
pub fn sm4_decrypt(key: &[u8; 16], mode: Sm4Mode, data: &[u8]) -> Result<Vec<u8>, GmError> {
    let bad = |_| err("the SM4 ciphertext does not decrypt under this key (length or padding)");
    match mode {
        Sm4Mode::Ecb => ecb::Decryptor::<sm4::Sm4>::new_from_slice(key)
            .expect("16-byte key")
            .decrypt_padded_vec::<Pkcs7>(data)
            .map_err(bad),
        Sm4Mode::Cbc(iv) => cbc::Decryptor::<sm4::Sm4>::new_from_slices(key, &iv)
            .expect("16-byte key and IV")
            .decrypt_padded_vec::<Pkcs7>(data)
            .map_err(bad),
    }
}

#[cfg(test)]
mod tests {
    //! The example vectors the standards publish.
    use super::*;
    use sm2::elliptic_curve::rand_core::TryRng;

    fn h(s: &str) -> Vec<u8> {
        hex_of(s).unwrap()
    }

    /// GB/T 32905-2016 Appendix A: "abc" and "abcd" × 16.
    #[test]
    fn sm3_matches_gb_t_32905_examples() {
        assert_eq!(
            sm3(b"abc").to_vec(),
            h("66C7F0F4 62EEEDD9 D1F2D46B DC10E4E2 4167C487 5CF2F7A2 297DA02B 8F4BA8E0")
        );
        assert_eq!(
            sm3(&b"abcd".repeat(16)).to_vec(),
            h("DEBE9FF9 2275B8A1 38604889 C18E5A4D 6FDB70E5 387E5765 293DCBA3 9C0C5732")
        );
    }

    /// GB/T 32907-2016 Appendix A: example 1 (one block) and example 2 (the same block
    /// encrypted 1,000,000 times).
    #[test]
    fn sm4_matches_gb_t_32907_examples() {
        use cbc::cipher::{BlockCipherEncrypt, KeyInit};
        let key: [u8; 16] = h("0123456789ABCDEFFEDCBA9876543210").try_into().unwrap();
        let plain = key;
        let cipher = sm4::Sm4::new_from_slice(&key).unwrap();
        let mut block = sm4::cipher::Block::<sm4::Sm4>::from(plain);
        cipher.encrypt_block(&mut block);
        assert_eq!(block.to_vec(), h("681EDF34D206965E86B3E94F536E4246"));
        for _ in 1..1_000_000 {
            cipher.encrypt_block(&mut block);
        }
        assert_eq!(block.to_vec(), h("595298C7C6FD271F0402F804C33D3F66"));
        // ECB over the one block plus PKCS#7's full padding block: the first block is the
        // standard's.
        let ecb = sm4_encrypt(&key, Sm4Mode::Ecb, &plain);
        assert_eq!(ecb.len(), 32);
        assert_eq!(ecb[..16], h("681EDF34D206965E86B3E94F536E4246")[..]);
        assert_eq!(sm4_decrypt(&key, Sm4Mode::Ecb, &ecb).unwrap(), plain);
        let iv = [7u8; 16];
        let cbc = sm4_encrypt(&key, Sm4Mode::Cbc(iv), b"rating");
        assert_eq!(
            sm4_decrypt(&key, Sm4Mode::Cbc(iv), &cbc).unwrap(),
            b"rating"
        );
        assert!(
            sm4_decrypt(&[1u8; 16], Sm4Mode::Cbc(iv), &cbc)
                .is_err_and(|e| { !e.0.contains("rating") })
        );
    }

    const D: &str = "3945208F 7B2144B1 3F36E38A C6D39F95 88939369 2860B51A 42FB81EF 4DF7C5B8";
    const P: &str = "04 09F9DF31 1E5421A1 50DD7D16 1E4BC5C6 72179FAD 1833FC07 6BB08FF3 56F35020 \
                     CCEA490C E26775A5 2DC6EA71 8CC1AA60 0AED05FB F35E084A 6632F607 2DA9AD13";
    const K: &str = "59276E27 D506861A 16680F3A D9C02DCC EF3CC1FA 3CDBE4CE 6D54B80D EAC1BC21";

    /// GB/T 32918.5-2017 (GM/T 0003.5-2012) Appendix A: the signature example on the
    /// recommended curve, signer id "1234567812345678", message "message digest".
    #[test]
    fn sm2_signature_matches_gb_t_32918_example() {
        let private = Sm2PrivateKey::parse(D).unwrap();
        let public = Sm2PublicKey::parse(P).unwrap();
        assert_eq!(private.public_key(), public, "the key pair of the example");
        let r = "F5A03B06 48D2C463 0EEAC513 E1BB81A1 5944DA38 27D5B741 43AC7EAC EEE720B3";
        let s = "B1B6AA29 DF212FD8 763182BC 0D421CA1 BB9038FD 1F7F42D4 840B69C4 85BBC1AA";
        let sig = h(&format!("{r}{s}"));
        assert!(public.verify(DEFAULT_SIGNER_ID, b"message digest", &sig));
        assert!(!public.verify(DEFAULT_SIGNER_ID, b"message digesT", &sig));
        assert!(!public.verify("ALICE123@YAHOO.COM", b"message digest", &sig));
        let mut tampered = sig.clone();
        tampered[63] ^= 1;
        assert!(!public.verify(DEFAULT_SIGNER_ID, b"message digest", &tampered));
        // Our own signatures, raw and DER, verify; signing is randomised.
        let a = private.sign(DEFAULT_SIGNER_ID, b"rating", false).unwrap();
        let b = private.sign(DEFAULT_SIGNER_ID, b"rating", true).unwrap();
        assert_eq!(a.len(), 64);
        assert!(public.verify(DEFAULT_SIGNER_ID, b"rating", &a));
        assert!(public.verify(DEFAULT_SIGNER_ID, b"rating", &b));
    }

    /// Yields the bytes it was given, then fails: the example's "random" k.
    struct Fixed(Vec<u8>);
    impl TryRng for Fixed {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            unreachable!("only bytes are drawn")
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            unreachable!("only bytes are drawn")
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            let n = dst.len();
            dst.copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(())
        }
    }
    impl TryCryptoRng for Fixed {}

    /// GB/T 32918.5-2017 Appendix C: the encryption example, k fixed, "encryption
    /// standard", C1‖C3‖C2; decrypts back, and in the older order too.
    #[test]
    fn sm2_encryption_matches_gb_t_32918_example() {
        let private = Sm2PrivateKey::parse(D).unwrap();
        let public = private.public_key();
        let c1 = "04 04EBFC71 8E8D1798 62043226 8E77FEB6 415E2EDE 0E073C0F 4F640ECD 2E149A73 \
                  E858F9D8 1E5430A5 7B36DAAB 8F950A3C 64E6EE6A 63094D99 283AFF76 7E124DF0";
        let c3 = "59983C18 F809E262 923C53AE C295D303 83B54E39 D609D160 AFCB1908 D0BD8766";
        let c2 = "21886CA9 89CA9C7D 58087307 CA93092D 651EFA";
        let want = h(&format!("{c1}{c3}{c2}"));
        let got = public
            .encrypt_with(&mut Fixed(h(K)), Sm2Order::C1C3C2, b"encryption standard")
            .unwrap();
        assert_eq!(hex::encode_upper(&got), hex::encode_upper(&want));
        assert_eq!(
            private.decrypt(Sm2Order::C1C3C2, &want).unwrap(),
            b"encryption standard"
        );
        // Without the 04 prefix, as some platforms send it.
        assert_eq!(
            private.decrypt(Sm2Order::C1C3C2, &want[1..]).unwrap(),
            b"encryption standard"
        );
        let old = h(&format!("{c1}{c2}{c3}"));
        assert_eq!(
            private.decrypt(Sm2Order::C1C2C3, &old).unwrap(),
            b"encryption standard"
        );
        let mut tampered = want.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(private.decrypt(Sm2Order::C1C3C2, &tampered).is_err());
    }

    /// Keys and a signature OpenSSL 3.0 made (`openssl genpkey -algorithm EC -pkeyopt
    /// ec_paramgen_curve:SM2`; `openssl pkeyutl -sign -rawin -digest sm3 -pkeyopt
    /// distid:1234567812345678`): the PEM files load and the DER signature verifies, so a
    /// platform's OpenSSL-made keys work here.
    #[test]
    fn openssl_made_keys_and_signatures_are_read() {
        let private =
            Sm2PrivateKey::parse(include_str!("../tests/fixtures/gm/openssl-sm2-private.pem"))
                .unwrap();
        let public =
            Sm2PublicKey::parse(include_str!("../tests/fixtures/gm/openssl-sm2-public.pem"))
                .unwrap();
        assert_eq!(private.public_key(), public);
        let sig = include_bytes!("../tests/fixtures/gm/openssl-signature-of-hello.der");
        assert!(public.verify(DEFAULT_SIGNER_ID, b"hello", sig));
        assert!(!public.verify(DEFAULT_SIGNER_ID, b"hellO", sig));
    }

    /// RFC 2104's second test case ("Jefe") with SM3, as OpenSSL 3.0 computes it
    /// (`openssl mac -digest SM3 -macopt key:Jefe HMAC`).
    #[test]
    fn hmac_sm3_matches_openssl() {
        assert_eq!(
            hmac_sm3(b"Jefe", b"what do ya want for nothing?").to_vec(),
            h("2E87F1D16862E6D964B50A5200BF2B10B764FAA9680A296A2405F24BEC39F882")
        );
        assert_ne!(hmac_sm3(b"k1", b"m"), hmac_sm3(b"k2", b"m"));
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        for text in [
            "zz",
            "00",
            &"f".repeat(64),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
        ] {
            let e = Sm2PrivateKey::parse(text).unwrap_err();
            assert!(!e.0.contains(text), "{e}");
        }
        assert!(Sm2PublicKey::parse(&format!("04{}", "11".repeat(64))).is_err());
    }
}
