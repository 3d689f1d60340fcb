//! mTLS for the gRPC port (rustls): the server certificate, client verification against the
//! configured CA with CRLs that are re-read when their files change (no restart), and the
//! accept loop that hands finished handshakes to tonic.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Where the server's TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crls: Vec<PathBuf>,
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn read_certs(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// Builds the rustls server config: TLS 1.2/1.3, h2 only, client certificates mandatory.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the private key {}", files.key.display()))?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.client_ca)? {
        roots
            .add(ca)
            .with_context(|| format!("adding CA from {}", files.client_ca.display()))?;
    }
    let verifier = ReloadingVerifier::new(Arc::new(roots), files.crls.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(certs, key)
        .context("server certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Verifies client certificates with webpki against fixed roots and the configured CRLs.
///
/// - Every configured CRL file must exist and hold at least one CRL (PEM, or one DER CRL) when
///   the hub starts: a CRL that silently revokes nothing is refused, not skipped.
/// - A watcher thread stats the files every second and rebuilds the verifier when one
///   changed; handshakes only take the current verifier (no file system calls on the
///   runtime's threads). A file that disappears, or cannot be read or parsed, keeps the last
///   good lists: nothing un-revokes a certificate but a new, valid CRL.
/// - Revocation is checked for the client's own certificate against its issuer's CRL
///   (webpki's unknown status is a refusal). Intermediate CAs are not checked for revocation:
///   with root → intermediate → client, configuring the intermediate's CRL is enough, and a
///   missing root CRL does not lock every client out.
#[derive(Debug)]
struct ReloadingVerifier {
    subjects: Vec<DistinguishedName>,
    current: Arc<Mutex<Arc<dyn ClientCertVerifier>>>,
}

/// Modification times and sizes of the CRL files (None: missing), to notice changes.
type CrlStamps = Vec<Option<(SystemTime, u64)>>;

/// How often the watcher looks at the CRL files.
const CRL_POLL: Duration = Duration::from_secs(1);

/// Reads the CRLs of one file: PEM (one or more `X509 CRL` sections), or a single DER CRL.
pub fn read_crls(
    path: &std::path::Path,
) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading CRL {}", path.display()))?;
    let pem = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing CRL {}", path.display()))?;
    if !pem.is_empty() {
        return Ok(pem);
    }
    use x509_parser::prelude::FromDer;
    match x509_parser::revocation_list::CertificateRevocationList::from_der(&bytes) {
        Ok(([], _)) => Ok(vec![CertificateRevocationListDer::from(bytes)]),
        _ => Err(anyhow!(
            "{} holds no certificate revocation list (neither PEM nor DER)",
            path.display()
        )),
    }
}

impl ReloadingVerifier {
    fn new(roots: Arc<RootCertStore>, crl_paths: Vec<PathBuf>) -> anyhow::Result<Self> {
        let stamps = stamps(&crl_paths);
        let inner = build(&roots, &crl_paths)?;
        let current = Arc::new(Mutex::new(inner));
        if !crl_paths.is_empty() {
            let watched = Arc::downgrade(&current);
            std::thread::Builder::new()
                .name("crl-watcher".into())
                .spawn(move || watch_crls(watched, roots, crl_paths, stamps))
                .context("starting the CRL watcher")?;
        }
        let subjects = {
            let v = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
            v.root_hint_subjects().to_vec()
        };
        Ok(Self { subjects, current })
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn stamps(paths: &[PathBuf]) -> CrlStamps {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn build(
    roots: &Arc<RootCertStore>,
    crl_paths: &[PathBuf],
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let mut crls = Vec::new();
    for path in crl_paths {
        crls.extend(read_crls(path)?);
    }
    Ok(
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .build()?,
    )
}

/// Rebuilds the verifier when a CRL file changes, until the verifier is dropped.
fn watch_crls(
    current: std::sync::Weak<Mutex<Arc<dyn ClientCertVerifier>>>,
    roots: Arc<RootCertStore>,
    paths: Vec<PathBuf>,
    mut seen: CrlStamps,
) {
    let mut failing: Option<String> = None;
    loop {
        std::thread::sleep(CRL_POLL);
        let Some(current) = current.upgrade() else {
            return;
        };
        let now = stamps(&paths);
        // Unchanged files are not read again, unless the last reading failed: a failure
        // that leaves the file as it was (permissions since mended) is tried every round.
        if now == seen && failing.is_none() {
            continue;
        }
        match build(&roots, &paths) {
            Ok(v) => {
                *current.lock().unwrap_or_else(|p| p.into_inner()) = v;
                seen = now;
                failing = None;
                tracing::info!(
                    files = paths.len(),
                    "Reloaded certificate revocation lists."
                );
            }
            Err(e) => {
                // Keep the previous lists: a CRL file that disappeared or cannot be read must
                // not un-revoke anyone. Said once per distinct failure.
                let text = format!("{e:#}");
                if failing.as_deref() != Some(text.as_str()) {
                    tracing::error!(error = %text, "Cannot reload CRLs; keeping the previous ones.");
                }
                failing = Some(text);
            }
        }
    }
}

impl ClientCertVerifier for ReloadingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

/// Accepts TCP connections and runs each TLS handshake on its own task (a slow or hostile
/// client never blocks the accept loop); finished handshakes are handed to tonic. Stops when
/// the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        // A certificate refused (revoked, expired, from another CA, none) is
                        // said once a second per peer; everything else (a load balancer's
                        // plain TCP port check) once a second in all.
                        let text = e.to_string();
                        let throttled = if text.contains("certificate") {
                            crate::telemetry::throttle_for(
                                "tls.refused_certificate",
                                &peer.ip().to_string(),
                            )
                        } else {
                            crate::telemetry::throttle("tls.refused")
                        };
                        if let Some(suppressed) = throttled {
                            tracing::info!(%peer, error = %text, suppressed, "TLS handshake refused.");
                        }
                    }
                    Err(_) => {
                        if let Some(suppressed) = crate::telemetry::throttle("tls.timed_out") {
                            tracing::info!(%peer, suppressed, "TLS handshake timed out.");
                        }
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The subject common name of a client's leaf certificate: its principal name.
pub fn principal_name(certs: &[CertificateDer<'_>]) -> Option<String> {
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
