//! The callback port: plain HTTP inside a closed network, or TLS (with client certificates
//! when `tls_client_ca` is set), and an optional allowlist of source addresses. A connection
//! from an address not allowed is closed before a byte is read; a TLS handshake that fails or
//! takes more than 10 s is dropped without holding up the others.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use crate::CallbackAuthConfig;

/// How long a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Most TLS handshakes under way at once: past it a new connection is closed at once
/// (counted), so a flood of half-open connections cannot use up the process's descriptors.
const HANDSHAKES: usize = 256;

/// Source addresses allowed to connect (empty: any).
#[derive(Debug, Clone, Default)]
pub struct Allow(Vec<ipnet::IpNet>);

impl Allow {
    /// Parses `allow_from` entries: addresses ("10.0.0.5") or networks ("10.0.0.0/24").
    pub fn parse(entries: &[String]) -> anyhow::Result<Self> {
        entries
            .iter()
            .map(|e| {
                let e = e.trim();
                e.parse::<ipnet::IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "[callback_auth] allow_from: {e:?} is not an address or a network"
                        )
                    })
            })
            .collect::<anyhow::Result<_>>()
            .map(Self)
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.is_empty() || self.0.iter().any(|n| n.contains(&ip))
    }
}

fn certs(path: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    anyhow::ensure!(!certs.is_empty(), "{path} holds no certificate");
    Ok(certs)
}

/// The TLS configuration of the callback port, when `tls_cert` is set.
pub fn tls_config(c: &CallbackAuthConfig) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    if c.tls_cert.is_empty() {
        anyhow::ensure!(
            c.tls_client_ca.is_empty(),
            "[callback_auth] tls_client_ca needs tls_cert and tls_key"
        );
        return Ok(None);
    }
    let key = PrivateKeyDer::from_pem_file(&c.tls_key)
        .map_err(|e| anyhow::anyhow!("[callback_auth] tls_key {}: {e}", c.tls_key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if c.tls_client_ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&c.tls_client_ca)? {
            roots.add(ca)?;
        }
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()?,
        )
    };
    let mut config = builder
        .with_single_cert(certs(&c.tls_cert)?, key)
        .map_err(|e| anyhow::anyhow!("[callback_auth] tls_cert and tls_key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// A connection to the callback port.
pub type Conn = Either<TcpStream, TlsStream<TcpStream>>;

/// The listener `axum::serve` takes: connections already past the allowlist and, with TLS,
/// the handshake.
pub struct CallbackListener {
    rx: mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
    /// The accepting task, which owns the socket: stopped when the server drops this.
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for CallbackListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl CallbackListener {
    /// Binds `addr` and starts accepting. `refused` counts connections turned away.
    pub async fn bind(
        addr: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
        allow: Allow,
        metrics: Arc<crate::Metrics>,
    ) -> anyhow::Result<Self> {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
        let accepting = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = tcp.accept() => a,
                    // The server stopped: stop accepting (and free the port).
                    _ = tx.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors, say: wait a moment rather than spin.
                        tracing::warn!(error = %e, "Cannot accept a callback connection.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if !allow.permits(peer.ip()) {
                    metrics.inc("callbacks_refused_address_total");
                    if let Some(held) =
                        rating_hub::telemetry::throttle_for("adapter.allow", &peer.ip().to_string())
                    {
                        tracing::warn!(peer = %peer.ip(), held, "Callback connection refused: address not in allow_from.");
                    }
                    continue;
                }
                match &acceptor {
                    None => {
                        if tx.send((Either::Left(stream), peer)).await.is_err() {
                            return;
                        }
                    }
                    Some(acceptor) => {
                        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                            metrics.inc("callbacks_tls_failed_total");
                            if let Some(held) =
                                rating_hub::telemetry::throttle("adapter.handshakes")
                            {
                                tracing::warn!(
                                    held,
                                    "Too many TLS handshakes at once; connection closed."
                                );
                            }
                            continue;
                        };
                        let (acceptor, tx, metrics) =
                            (acceptor.clone(), tx.clone(), metrics.clone());
                        tokio::spawn(async move {
                            let _permit = permit;
                            match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => {
                                    let _ = tx.send((Either::Right(tls), peer)).await;
                                }
                                Ok(Err(e)) => {
                                    metrics.inc("callbacks_tls_failed_total");
                                    if let Some(held) =
                                        rating_hub::telemetry::throttle("adapter.tls_handshake")
                                    {
                                        tracing::warn!(peer = %peer.ip(), error = %e, held, "Callback TLS handshake failed.");
                                    }
                                }
                                Err(_) => metrics.inc("callbacks_tls_failed_total"),
                            }
                        });
                    }
                }
            }
        });
        Ok(Self {
            rx,
            local,
            accepting,
        })
    }
}

impl axum::serve::Listener for CallbackListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accepting task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_from_takes_addresses_and_networks() {
        let a = Allow::parse(&["10.1.0.0/16".into(), "192.168.1.7".into(), "::1".into()]).unwrap();
        assert!(a.permits("10.1.200.3".parse().unwrap()));
        assert!(a.permits("192.168.1.7".parse().unwrap()));
        assert!(a.permits("::ffff:10.1.0.1".parse().unwrap()), "v4-mapped");
        assert!(a.permits("::1".parse().unwrap()));
        assert!(!a.permits("192.168.1.8".parse().unwrap()));
        assert!(!a.permits("10.2.0.1".parse().unwrap()));
        assert!(Allow::default().permits("8.8.8.8".parse().unwrap()));
        let e = Allow::parse(&["10.0.0.0/33".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.0.0.0/33"), "{e}");
    }
}
