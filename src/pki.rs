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
/// Every client certificate issued: one line each, "<serial hex> <name> <not after>".
const ISSUED_LIST: &str = "issued.txt";
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
    if !dir.join(CRL).exists() {
        // A PKI made before the CA published a CRL from the start.
        write_crl(dir, &revoked_serials(dir))?;
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
    // A new CA revokes nothing yet, and publishes that: a hub that watches the CRL file
    // refuses to start without it.
    write_atomic(&dir.join(REVOKED_LIST), "")?;
    write_atomic(&dir.join(ISSUED_LIST), "")?;
    write_crl(dir, &[])?;
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
    record_issued(dir, &serial_of(&pair.cert)?, name, validity)?;
    Ok(pair)
}

/// Appends an issued client certificate to `<dir>/issued.txt`.
fn record_issued(
    dir: &Path,
    serial_hex: &str,
    name: &str,
    validity: Validity,
) -> anyhow::Result<()> {
    use std::io::Write;
    let path = dir.join(ISSUED_LIST);
    let not_after = validity
        .not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{serial_hex} {name} {not_after}")?;
    f.sync_all()?;
    Ok(())
}

/// The serial number (hex) of the PEM certificate at `path`.
pub fn serial_of(path: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e}", path.display()))?;
    let cert = parsed.parse_x509()?;
    Ok(hex::encode(cert.raw_serial()))
}

fn revoked_serials(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(REVOKED_LIST))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One client certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub serial_hex: String,
    pub name: String,
    pub not_after: String,
    pub revoked: bool,
}

/// Every client certificate issued in `dir`, oldest first, with whether it is revoked.
pub fn list_issued(dir: &Path) -> anyhow::Result<Vec<IssuedCert>> {
    let path = dir.join(ISSUED_LIST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let revoked = revoked_serials(dir);
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (serial_hex, name) = (parts.next()?, parts.next()?);
            Some(IssuedCert {
                revoked: revoked.iter().any(|r| r == serial_hex),
                serial_hex: serial_hex.to_owned(),
                name: name.to_owned(),
                not_after: parts.next().unwrap_or_default().to_owned(),
            })
        })
        .collect())
}

/// Adds serials to the CA's revoked list and rewrites `<dir>/crl.pem` (atomically; a running
/// hub reads it within a second).
fn revoke_serials(dir: &Path, new: impl IntoIterator<Item = String>) -> anyhow::Result<PathBuf> {
    let mut serials = revoked_serials(dir);
    for s in new {
        let s = s.trim().to_ascii_lowercase();
        hex::decode(&s).with_context(|| format!("serial {s:?} is not hexadecimal"))?;
        if !serials.contains(&s) {
            serials.push(s);
        }
    }
    write_atomic(&dir.join(REVOKED_LIST), &(serials.join("\n") + "\n"))?;
    write_crl(dir, &serials)
}

/// Revokes every client certificate issued to `name` (`issued.txt`), and `<dir>/<name>.pem`
/// (issued before that list was kept): a re-issued certificate does not leave an older one
/// valid.
pub fn revoke_client(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    check_principal_name(name)?;
    let mut serials: Vec<String> = list_issued(dir)?
        .into_iter()
        .filter(|c| c.name == name)
        .map(|c| c.serial_hex)
        .collect();
    let current = dir.join(format!("{name}.pem"));
    if current.exists() {
        serials.push(serial_of(&current)?);
    }
    if serials.is_empty() {
        bail!("no certificate was issued to {name:?} in {}", dir.display());
    }
    revoke_serials(dir, serials)
}

/// Revokes one certificate by its serial number (hex, as `certs list` prints it).
pub fn revoke_serial(dir: &Path, serial_hex: &str) -> anyhow::Result<PathBuf> {
    revoke_serials(dir, [serial_hex.to_owned()])
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

    fn revoked_in_crl(dir: &Path) -> usize {
        let pem = std::fs::read(dir.join(CRL)).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&p.contents).unwrap();
        crl.iter_revoked_certificates().count()
    }

    /// A principal whose certificate was re-issued has two valid certificates: revoking the
    /// principal revokes both (before, only the current `<name>.pem`), and one certificate can
    /// be revoked by the serial `list_issued` shows.
    #[test]
    fn revoking_a_principal_revokes_every_certificate_issued_to_it() {
        let dir = tempfile::tempdir().unwrap();
        init_dev(dir.path()).unwrap();
        assert_eq!(
            revoked_in_crl(dir.path()),
            0,
            "a new CA publishes an empty CRL"
        );
        let first = serial_of(
            &issue_client(dir.path(), "dept", Validity::days(1))
                .unwrap()
                .cert,
        )
        .unwrap();
        let second = serial_of(
            &issue_client(dir.path(), "dept", Validity::days(1))
                .unwrap()
                .cert,
        )
        .unwrap();
        let other = serial_of(
            &issue_client(dir.path(), "other", Validity::days(1))
                .unwrap()
                .cert,
        )
        .unwrap();
        let issued = list_issued(dir.path()).unwrap();
        let serials: Vec<&str> = issued.iter().map(|c| c.serial_hex.as_str()).collect();
        assert!(serials.ends_with(&[first.as_str(), second.as_str(), other.as_str()]));
        assert!(issued.iter().all(|c| !c.revoked));

        revoke_client(dir.path(), "dept").unwrap();
        let issued = list_issued(dir.path()).unwrap();
        let revoked: Vec<&str> = issued
            .iter()
            .filter(|c| c.revoked)
            .map(|c| c.serial_hex.as_str())
            .collect();
        assert_eq!(revoked, [first.as_str(), second.as_str()]);
        assert_eq!(revoked_in_crl(dir.path()), 2);

        revoke_serial(dir.path(), &other.to_uppercase()).unwrap();
        assert!(
            list_issued(dir.path())
                .unwrap()
                .iter()
                .all(|c| c.revoked || c.name == DEV_ADMIN)
        );
        assert_eq!(revoked_in_crl(dir.path()), 3);
        assert!(revoke_serial(dir.path(), "not-hex").is_err());
        assert!(revoke_client(dir.path(), "nobody").is_err());
    }
}
