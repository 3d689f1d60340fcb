//! The public site's listener: HTTP/1.1 (over TLS when configured) with bounds a public
//! listener needs, so that nobody on the Internet can hold the hub's resources: connections
//! at most `MAX_CONNECTIONS` in all and `MAX_PER_CLIENT` per client address (its IPv6 /64),
//! a TLS handshake within 10 s, request headers within 10 s, a connection at most 2 minutes.
//! Past a bound, a new connection is closed at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use super::{ClientAddr, PublicConfig, Site, client_key};
use crate::api::HubState;

const MAX_CONNECTIONS: usize = 1024;
const MAX_PER_CLIENT: u32 = 32;
const HANDSHAKE: Duration = Duration::from_secs(10);
const HEADER_READ: Duration = Duration::from_secs(10);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// The site's TLS configuration (its own certificate; no client certificate; HTTP/1.1), or
/// `None` for plain HTTP. Built before the hub says it listens, so a certificate that does
/// not load stops the start.
pub fn tls_config(config: &PublicConfig) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    use anyhow::Context;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let Some((cert, key)) = config.tls() else {
        return Ok(None);
    };
    let certs = crate::tls::read_certs(&cert).context("public.tls_cert")?;
    let key = PrivateKeyDer::from_pem_file(&key)
        .with_context(|| format!("public.tls_key: reading {}", key.display()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("public.tls_cert and public.tls_key do not match")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(tls)))
}

/// Open connections per client.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, u32>>);

/// One client's connection, counted while it lives.
struct Counted {
    clients: Arc<PerClient>,
    key: IpAddr,
}

impl PerClient {
    fn enter(self: &Arc<Self>, key: IpAddr) -> Option<Counted> {
        let mut m = self.0.lock().expect("per-client");
        let n = m.entry(key).or_default();
        if *n >= MAX_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(Counted {
            clients: self.clone(),
            key,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut m = self.clients.0.lock().expect("per-client");
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Serves the public site on `listener` until `stop` turns true; open connections are then
/// closed (the site only reads).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HubState>,
    config: PublicConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let site = Site::new(state, config)?;
    let router = super::router(site.clone());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let clients = Arc::new(PerClient::default());
    let mut connections = tokio::task::JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if let Some(suppressed) = crate::telemetry::throttle("public.accept") {
                        tracing::warn!(error = %e, suppressed, "Public site: accept failed.");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = sweep.tick() => {
                // Forget quiet clients, so the rate limiter's map stays small.
                site.limiter.retain_recent();
                continue;
            }
            _ = stop.changed() => break,
        };
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let Some(counted) = clients.enter(client_key(peer.ip())) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (router, acceptor) = (router.clone(), acceptor.clone());
        connections.spawn(async move {
            let _held = (slot, counted);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, async move {
                match acceptor {
                    Some(a) => {
                        if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE, a.accept(tcp)).await {
                            connection(tls, peer, router).await;
                        }
                    }
                    None => connection(tcp, peer, router).await,
                }
            })
            .await;
        });
    }
    connections.shutdown().await;
    Ok(())
}

/// One connection's requests, each told its client's address.
async fn connection<I>(io: I, peer: SocketAddr, router: axum::Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ClientAddr(peer));
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ)
        .serve_connection(TokioIo::new(io), service)
        .await;
}
