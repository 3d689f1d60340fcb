//! 评价结果公开: the public, read-only site (`[public] listen`). The policies require the
//! results and the rectification of 差评 to be published ("坚持以公开为常态、不公开为例外，…
//! 好差评评价结果及整改情况要在…公开"): results by region, organisation or item for a month,
//! quarter or year, and the 差评 list with each case's rectification status once its
//! publication rule allows — as Chinese pages that work without JavaScript (charts are
//! server-rendered SVG), and as JSON and CSV (docs/public-data.md).
//!
//! What is published is configuration ([`PublicConfig`]). Nothing about a rater is: not their
//! identity, not their words; numbers in published text are masked. Results are computed at
//! most every `refresh_secs` and served from that copy (ETag, Last-Modified, Cache-Control),
//! and each client address has its own request rate, so a burst of page loads costs the
//! database one computation, not one per request.

mod data;
mod render;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::api::HubState;

pub use data::Period;

/// `[public]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicConfig {
    /// Address of the public site; empty turns it off.
    pub listen: String,
    pub tls_cert: String,
    pub tls_key: String,
    /// Region-code prefixes published.
    pub regions: Vec<String>,
    /// Only these organisations; empty: all in the regions.
    pub organizations: Vec<String>,
    /// Result columns published.
    pub columns: Vec<String>,
    /// Fewer ratings than this: counts only, no rates, scores or rank.
    pub min_ratings: u64,
    /// "archived", "deadline" or "none".
    pub cases: String,
    pub case_delay_days: u32,
    pub refresh_secs: u64,
    pub requests_per_sec: u32,
    pub requests_burst: u32,
    /// Code → name shown.
    #[serde(default)]
    pub names: BTreeMap<String, String>,
}

/// The result columns a deployment may publish.
pub const COLUMNS: [&str; 6] = [
    "levels",
    "good_rate",
    "bad_rate",
    "rating_rate",
    "score",
    "rank",
];

/// When a 差评 case appears in the published list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseRule {
    /// Once archived (rectification confirmed, case closed).
    Archived,
    /// Once its rectification deadline passed, or once archived.
    Deadline,
    /// No case list.
    None,
}

impl PublicConfig {
    /// The address to listen on, if the site is on.
    pub fn addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.listen.trim().is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = self
            .listen
            .trim()
            .parse()
            .map_err(|_| format!("public.listen: {:?} is not an address:port", self.listen))?;
        if !addr.ip().is_loopback() && self.tls().is_none() {
            return Err(format!(
                "public.listen: {addr} is not a loopback address: set public.tls_cert and \
                 public.tls_key to serve HTTPS there"
            ));
        }
        Ok(Some(addr))
    }

    /// The server certificate and key, when HTTPS is configured.
    pub fn tls(&self) -> Option<(PathBuf, PathBuf)> {
        (!self.tls_cert.is_empty() && !self.tls_key.is_empty())
            .then(|| (PathBuf::from(&self.tls_cert), PathBuf::from(&self.tls_key)))
    }

    pub fn case_rule(&self) -> Result<CaseRule, String> {
        match self.cases.as_str() {
            "archived" => Ok(CaseRule::Archived),
            "deadline" => Ok(CaseRule::Deadline),
            "none" => Ok(CaseRule::None),
            other => Err(format!(
                "public.cases: {other:?} is not \"archived\", \"deadline\" or \"none\""
            )),
        }
    }

    /// Whether a column is published.
    pub fn shows(&self, column: &str) -> bool {
        self.columns.iter().any(|c| c == column)
    }

    /// Checked when the configuration loads.
    pub fn check(&self) -> Result<(), String> {
        let Some(_) = self.addr()? else {
            return Ok(());
        };
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            return Err("public.tls_cert and public.tls_key: set both or neither".into());
        }
        if self.regions.is_empty() {
            return Err(
                "public.regions is empty: name the region-code prefixes to publish (e.g. [\"5301\"])"
                    .into(),
            );
        }
        for r in &self.regions {
            if r.is_empty() || r.len() > 12 || !r.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "public.regions: {r:?} is not a region-code prefix (1 to 12 digits)"
                ));
            }
        }
        for c in &self.columns {
            if !COLUMNS.contains(&c.as_str()) {
                return Err(format!(
                    "public.columns: {c:?} is not one of {}",
                    COLUMNS.join(", ")
                ));
            }
        }
        self.case_rule()?;
        if self.refresh_secs == 0 {
            return Err("public.refresh_secs must be at least 1".into());
        }
        if self.requests_per_sec == 0 || self.requests_burst == 0 {
            return Err(
                "public.requests_per_sec and public.requests_burst must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// The published prefix `region` falls under, if any.
    fn publishes(&self, region: &str) -> bool {
        self.regions.iter().any(|p| region.starts_with(p.as_str()))
    }
}

type Limiter = governor::DefaultKeyedRateLimiter<IpAddr>;

/// A response body computed once and served until it is older than `refresh_secs`.
#[derive(Clone)]
struct Cached {
    body: bytes_body::Body,
    content_type: &'static str,
    etag: String,
    last_modified: SystemTime,
    at: Instant,
}

mod bytes_body {
    /// Shared bytes of a cached body.
    pub type Body = std::sync::Arc<Vec<u8>>;
}

/// Cached bodies at most.
const CACHE_ENTRIES: usize = 512;

pub(crate) struct Site {
    state: Arc<HubState>,
    config: PublicConfig,
    rule: CaseRule,
    limiter: Limiter,
    cache: tokio::sync::Mutex<HashMap<String, Cached>>,
    /// One computation at a time: a burst for one page waits for it, then reads the copy.
    computing: tokio::sync::Mutex<()>,
}

/// Serves the public site on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HubState>,
    config: PublicConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let quota = governor::Quota::per_second(
        NonZeroU32::new(config.requests_per_sec).unwrap_or(NonZeroU32::MIN),
    )
    .allow_burst(NonZeroU32::new(config.requests_burst).unwrap_or(NonZeroU32::MIN));
    let tls = config.tls();
    let site = Arc::new(Site {
        state,
        rule: config.case_rule().map_err(anyhow::Error::msg)?,
        config,
        limiter: governor::RateLimiter::keyed(quota),
        cache: tokio::sync::Mutex::new(HashMap::new()),
        computing: tokio::sync::Mutex::new(()),
    });
    // Forget quiet clients now and then, so the limiter's map stays small.
    {
        let site = site.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = every.tick() => site.limiter.retain_recent(),
                    _ = stop.changed() => return,
                }
            }
        });
    }
    let app = axum::Router::new()
        .route("/", get(index))
        .route("/results", get(results_page))
        .route("/cases", get(cases_page))
        .route("/data/results.json", get(results_json))
        .route("/data/results.csv", get(results_csv))
        .route("/data/cases.json", get(cases_json))
        .route("/data/cases.csv", get(cases_csv))
        .fallback(not_found)
        .with_state(site)
        .into_make_service_with_connect_info::<ClientAddr>();
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
        Some((cert, key)) => {
            let config = server_tls(&cert, &key)?;
            let incoming = crate::tls::incoming(listener, config, Duration::from_secs(10));
            axum::serve(TlsListener { incoming }, app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
    }
    Ok(())
}

/// HTTPS with the site's own certificate: no client certificate, HTTP/1.1.
fn server_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let certs = crate::tls::read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the public site's key {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("public.tls_cert and public.tls_key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client's address, over plain HTTP or HTTPS (the per-client request rate's key).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for ClientAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self(*s.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ClientAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Self(*s.remote_addr())
    }
}

/// Accepted TLS connections (handshakes run off the accept loop, in `tls::incoming`).
struct TlsListener {
    incoming: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(tls)) => {
                    let Ok(peer) = tls.get_ref().0.peer_addr() else {
                        continue;
                    };
                    return (tls, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop ended: nothing more will come.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Err(std::io::Error::other("not known here"))
    }
}

/// The query string of every page and file.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Params {
    pub region: String,
    pub period: String,
    pub by: String,
    pub page: u32,
}

/// A page or file the request cannot have, in Chinese.
pub(crate) struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let page = render::message_page(self.status.as_u16(), &self.message);
        (
            self.status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            page,
        )
            .into_response()
    }
}

impl Site {
    /// The region asked for (the first published one when none is), or why not.
    fn region(&self, p: &Params) -> Result<String, Refusal> {
        let region = if p.region.is_empty() {
            self.config.regions[0].clone()
        } else {
            p.region.clone()
        };
        if region.len() > 12 || !region.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Refusal::bad("地区代码应为1至12位数字。"));
        }
        if !self.config.publishes(&region) {
            return Err(Refusal::not_found(format!(
                "地区 {region} 的评价结果未公开。"
            )));
        }
        Ok(region)
    }

    fn period(&self, p: &Params) -> Result<Period, Refusal> {
        if p.period.is_empty() {
            return Ok(Period::quarter_of(self.state.clock.now_micros()));
        }
        Period::parse(&p.period)
            .ok_or_else(|| Refusal::bad("时段应写作 2025（年）、2025-Q1（季度）或 2025-03（月）。"))
    }

    fn name(&self, code: &str) -> Option<String> {
        self.config.names.get(code).cloned()
    }

    /// The cached body for `key`, computed by `make` when missing or older than the refresh.
    async fn cached<F, Fut>(
        &self,
        key: String,
        content_type: &'static str,
        make: F,
    ) -> Result<Cached, Refusal>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>, Refusal>>,
    {
        let fresh = Duration::from_secs(self.config.refresh_secs);
        if let Some(c) = self.cache.lock().await.get(&key)
            && c.at.elapsed() < fresh
        {
            return Ok(c.clone());
        }
        let _one = self.computing.lock().await;
        // Computed by the request this one waited for?
        if let Some(c) = self.cache.lock().await.get(&key)
            && c.at.elapsed() < fresh
        {
            return Ok(c.clone());
        }
        let body = make().await?;
        let etag = {
            use sha2::Digest;
            format!("\"{}\"", &hex::encode(sha2::Sha256::digest(&body))[..32])
        };
        let mut cache = self.cache.lock().await;
        // The same content as before keeps its Last-Modified.
        let last_modified = match cache.get(&key) {
            Some(old) if old.etag == etag => old.last_modified,
            _ => SystemTime::now(),
        };
        let c = Cached {
            body: Arc::new(body),
            content_type,
            etag,
            last_modified,
            at: Instant::now(),
        };
        if cache.len() >= CACHE_ENTRIES
            && !cache.contains_key(&key)
            && let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, v)| v.at)
                .map(|(k, _)| k.clone())
        {
            cache.remove(&oldest);
        }
        cache.insert(key, c.clone());
        Ok(c)
    }

    /// Within the client's request rate, or the 429 to answer.
    fn admit(&self, peer: ClientAddr) -> Result<(), Box<Response>> {
        if self.limiter.check_key(&peer.0.ip()).is_err() {
            let mut r = Refusal {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "请求过于频繁，请稍后再试。".into(),
            }
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Err(Box::new(r));
        }
        Ok(())
    }

    /// The cached body as a response, or 304 when the client's copy is current.
    fn respond(&self, c: &Cached, headers: &HeaderMap) -> Response {
        let matches = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == c.etag || t.trim() == "*"));
        let not_modified_since = headers.get(header::IF_NONE_MATCH).is_none()
            && headers
                .get(header::IF_MODIFIED_SINCE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .is_some_and(|since| {
                    // HTTP dates have whole seconds.
                    c.last_modified
                        .duration_since(since)
                        .map_or(true, |d| d < Duration::from_secs(1))
                });
        let cache_control = format!("public, max-age={}", self.config.refresh_secs);
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_str(&c.etag).expect("ascii"));
        h.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_str(&httpdate::fmt_http_date(c.last_modified)).expect("ascii"),
        );
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(&cache_control).expect("ascii"),
        );
        if matches || not_modified_since {
            return (StatusCode::NOT_MODIFIED, h).into_response();
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(c.content_type),
        );
        (StatusCode::OK, h, c.body.as_ref().clone()).into_response()
    }
}

type SiteState = State<Arc<Site>>;
type Peer = ConnectInfo<ClientAddr>;

const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";
const CSV: &str = "text/csv; charset=utf-8";

async fn index(State(site): SiteState, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    if let Err(r) = site.admit(peer) {
        return *r;
    }
    let regions: Vec<(String, String)> = site
        .config
        .regions
        .iter()
        .map(|r| (r.clone(), site.name(r).unwrap_or_default()))
        .collect();
    let period = Period::quarter_of(site.state.clock.now_micros());
    let body = render::index_page(&regions, &period, site.rule != CaseRule::None);
    let key = "index".to_owned();
    match site.cached(key, HTML, || async move { Ok(body) }).await {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

/// What a results request asks for, checked.
async fn results_for(site: &Site, p: &Params) -> Result<data::Results, Refusal> {
    let region = site.region(p)?;
    let period = site.period(p)?;
    let by = data::Grouping::parse(&p.by)
        .ok_or_else(|| Refusal::bad("分组应为 organization、region、city 或 item。"))?;
    data::results(site, &region, &period, by).await
}

async fn cases_for(site: &Site, p: &Params) -> Result<data::Cases, Refusal> {
    if site.rule == CaseRule::None {
        return Err(Refusal::not_found("差评整改情况未公开。"));
    }
    let region = site.region(p)?;
    let period = site.period(p)?;
    data::cases(site, &region, &period).await
}

fn key(kind: &str, p: &Params) -> String {
    format!("{kind}|{}|{}|{}|{}", p.region, p.period, p.by, p.page)
}

async fn results_page(
    State(site): SiteState,
    ConnectInfo(peer): Peer,
    Query(p): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = site.admit(peer) {
        return *r;
    }
    let s = site.clone();
    let made = site
        .cached(key("results.html", &p), HTML, || async move {
            let r = results_for(&s, &p).await?;
            Ok(render::results_page(
                &r,
                &s.config,
                s.rule != CaseRule::None,
            ))
        })
        .await;
    match made {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

async fn results_json(
    State(site): SiteState,
    ConnectInfo(peer): Peer,
    Query(p): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = site.admit(peer) {
        return *r;
    }
    let s = site.clone();
    let made = site
        .cached(key("results.json", &p), JSON, || async move {
            let r = results_for(&s, &p).await?;
            Ok(serde_json::to_vec_pretty(&r).expect("serialisable"))
        })
        .await;
    match made {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

async fn results_csv(
    State(site): SiteState,
    ConnectInfo(peer): Peer,
    Query(p): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = site.admit(peer) {
        return *r;
    }
    let s = site.clone();
    let made = site
        .cached(key("results.csv", &p), CSV, || async move {
            let r = results_for(&s, &p).await?;
            Ok(render::results_csv(&r).into_bytes())
        })
        .await;
    match made {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

async fn cases_page(
    State(site): SiteState,
    ConnectInfo(peer): Peer,
    Query(p): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = site.admit(peer) {
        return *r;
    }
    let s = site.clone();
    let made = site
        .cached(key("cases.html", &p), HTML, || async move {
            let page = p.page.max(1);
            let c = cases_for(&s, &p).await?;
            Ok(render::cases_page(&c, page))
        })
        .await;
    match made {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

async fn cases_json(
    State(site): SiteState,
    ConnectInfo(peer): Peer,
    Query(p): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = site.admit(peer) {
        return *r;
    }
    let s = site.clone();
    let made = site
        .cached(key("cases.json", &p), JSON, || async move {
            let c = cases_for(&s, &p).await?;
            Ok(serde_json::to_vec_pretty(&c).expect("serialisable"))
        })
        .await;
    match made {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

async fn cases_csv(
    State(site): SiteState,
    ConnectInfo(peer): Peer,
    Query(p): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = site.admit(peer) {
        return *r;
    }
    let s = site.clone();
    let made = site
        .cached(key("cases.csv", &p), CSV, || async move {
            let c = cases_for(&s, &p).await?;
            Ok(render::cases_csv(&c).into_bytes())
        })
        .await;
    match made {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

async fn not_found(State(site): SiteState, ConnectInfo(peer): Peer) -> Response {
    if let Err(r) = site.admit(peer) {
        return *r;
    }
    Refusal::not_found("没有这个页面。").into_response()
}
