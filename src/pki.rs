//! Development PKI: a CA, a server certificate for localhost, client certificates for named
//! principals, and a CRL. Behind `rating-hub certs …` and the default `serve`, which creates
//! the development PKI on first start. Production points the config at real files instead.
//!
//! A client's principal is its certificate's subject common name (CN).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
pub const CRL: &str = "crl.pem";
const REVOKED_LIST: &str = "revoked.txt";
/// The principal the development PKI registers with every role.
pub const DEV_ADMIN: &str = "dev-admin";

/// Validity of an issued certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one day ago (clock skew) for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::days(1),
            not_after: now + Duration::days(days),
        }
    }
}

/// Paths of one issued certificate and its key.
#[derive(Debug, Clone)]
pub struct IssuedPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn serial() -> SerialNumber {
    // 16 unique bytes; the top bit cleared keeps the DER integer positive.
    let mut bytes = *uuid::Uuid::now_v7().as_bytes();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_atomic(path, contents)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Write to a temporary file and rename, so a reader (the CRL reloader) never sees half a file.
pub fn write_atomic(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Creates the development PKI in `dir` where missing: CA, server certificate (localhost,
/// 127.0.0.1, ::1) and the `dev-admin` client. Existing files are kept. Returns true when it
/// created anything.
pub fn init_dev(dir: &Path) -> anyhow::Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut created = false;
    if !dir.join(CA_CERT).exists() {
        create_ca(dir, "rating-hub development CA")?;
        created = true;
    }
    if !dir.join(SERVER_CERT).exists() {
        issue_server(dir, &["localhost", "127.0.0.1", "::1"], Validity::days(825))?;
        created = true;
    }
    if !dir.join(format!("{DEV_ADMIN}.pem")).exists() {
        issue_client(dir, DEV_ADMIN, Validity::days(825))?;
        created = true;
    }
    Ok(created)
}

/// Creates a CA key and self-signed certificate in `dir` (overwriting).
pub fn create_ca(dir: &Path, common_name: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let v = Validity::days(3650);
    params.not_before = v.not_before;
    params.not_after = v.not_after;
    params.serial_number = Some(serial());
    let cert = params.self_signed(&key)?;
    write_atomic(&dir.join(CA_CERT), &cert.pem())?;
    write_private(&dir.join(CA_KEY), &key.serialize_pem())?;
    Ok(())
}

fn load_issuer(dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let ca_pem = std::fs::read_to_string(dir.join(CA_CERT)).with_context(|| {
        format!(
            "reading {}; run `rating-hub certs init` first",
            dir.join(CA_CERT).display()
        )
    })?;
    let key_pem = std::fs::read_to_string(dir.join(CA_KEY))
        .with_context(|| format!("reading {}", dir.join(CA_KEY).display()))?;
    let key = KeyPair::from_pem(&key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&ca_pem, key)?)
}

fn leaf_params(common_name: &str, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params
}

/// Issues the server certificate for the given DNS names / IP addresses.
pub fn issue_server(dir: &Path, names: &[&str], validity: Validity) -> anyhow::Result<IssuedPair> {
    let issuer = load_issuer(dir)?;
    let mut params = leaf_params("rating-hub server", validity);
    params.subject_alt_names =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?
            .subject_alt_names;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let pair = IssuedPair {
        cert: dir.join(SERVER_CERT),
        key: dir.join(SERVER_KEY),
    };
    write_atomic(&pair.cert, &cert.pem())?;
    write_private(&pair.key, &key.serialize_pem())?;
    Ok(pair)
}

/// Checks a principal name: it becomes a file name and a certificate CN.
pub fn check_principal_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if !ok {
        bail!(
            "principal name {name:?} must be 1-64 characters of A-Z a-z 0-9 - _ . (not starting with .)"
        );
    }
    Ok(())
}

/// Issues a client certificate whose CN is the principal name: `<dir>/<name>.pem` and `.key`.
pub fn issue_client(dir: &Path, name: &str, validity: Validity) -> anyhow::Result<IssuedPair> {
    check_principal_name(name)?;
    let issuer = load_issuer(dir)?;
    let mut params = leaf_params(name, validity);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let pair = IssuedPair {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    write_atomic(&pair.cert, &cert.pem())?;
    write_private(&pair.key, &key.serialize_pem())?;
    Ok(pair)
}

/// Revokes `<dir>/<name>.pem`: adds its serial to the CA's list and rewrites `<dir>/crl.pem`
/// (atomically; a running hub picks it up at the next handshake).
pub fn revoke_client(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    check_principal_name(name)?;
    let pem_path = dir.join(format!("{name}.pem"));
    let pem =
        std::fs::read(&pem_path).with_context(|| format!("reading {}", pem_path.display()))?;
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e}", pem_path.display()))?;
    let cert = parsed.parse_x509()?;
    let serial_hex = hex::encode(cert.raw_serial());
    let list_path = dir.join(REVOKED_LIST);
    let mut serials: Vec<String> = std::fs::read_to_string(&list_path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    if !serials.contains(&serial_hex) {
        serials.push(serial_hex);
    }
    write_atomic(&list_path, &(serials.join("\n") + "\n"))?;
    write_crl(dir, &serials)
}

/// Writes `<dir>/crl.pem` listing the given serials (hex). An empty list is a valid empty CRL.
pub fn write_crl(dir: &Path, serials_hex: &[String]) -> anyhow::Result<PathBuf> {
    let issuer = load_issuer(dir)?;
    let now = OffsetDateTime::now_utc();
    let revoked_certs = serials_hex
        .iter()
        .map(|s| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&hex::decode(s)?),
                revocation_time: now,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let crl_number = now.unix_timestamp_nanos().to_be_bytes();
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(30),
        crl_number: SerialNumber::from_slice(&crl_number[8..]),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer)?;
    let path = dir.join(CRL);
    write_atomic(&path, &crl.pem()?)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert!(init_dev(dir.path()).unwrap());
        let ca = std::fs::read(dir.path().join(CA_CERT)).unwrap();
        assert!(!init_dev(dir.path()).unwrap());
        assert_eq!(std::fs::read(dir.path().join(CA_CERT)).unwrap(), ca);
        assert!(dir.path().join("dev-admin.key").exists());
    }

    #[test]
    fn principal_names_are_checked() {
        assert!(check_principal_name("km-wuhua_01.dept").is_ok());
        assert!(check_principal_name("../etc").is_err());
        assert!(check_principal_name("").is_err());
        assert!(check_principal_name("a b").is_err());
    }

    #[test]
    fn revocation_lists_the_serial() {
        let dir = tempfile::tempdir().unwrap();
        init_dev(dir.path()).unwrap();
        issue_client(dir.path(), "dept", Validity::days(1)).unwrap();
        let crl = revoke_client(dir.path(), "dept").unwrap();
        let pem = std::fs::read(&crl).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&p.contents).unwrap();
        assert_eq!(crl.iter_revoked_certificates().count(), 1);
    }
}
