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
mod serve;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::api::HubState;

pub use data::Period;
pub use serve::{serve, tls_config};

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
    /// Behind a reverse proxy on this host: the client is the right-most address of
    /// `X-Forwarded-For` (the one the proxy added), not the proxy.
    pub trust_forwarded_for: bool,
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
        if self.min_ratings == 0 {
            return Err("public.min_ratings must be at least 1".into());
        }
        if self.case_delay_days > 3650 {
            return Err("public.case_delay_days must be at most 3650".into());
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
    body: axum::body::Bytes,
    content_type: &'static str,
    etag: String,
    last_modified: SystemTime,
    at: Instant,
}

/// Rendered bodies, bounded by count and by bytes.
#[derive(Default)]
struct Cache {
    entries: HashMap<String, Cached>,
    bytes: usize,
}

/// Cached bodies at most …
const CACHE_ENTRIES: usize = 512;
/// … and bytes at most.
const CACHE_BYTES: usize = 64 << 20;
/// Computations at once (each reads the database).
const COMPUTATIONS: usize = 2;
/// How long a name looked up from ratings is kept.
const NAME_TTL: Duration = Duration::from_secs(3600);

pub(crate) struct Site {
    state: Arc<HubState>,
    config: PublicConfig,
    rule: CaseRule,
    limiter: Limiter,
    cache: std::sync::Mutex<Cache>,
    /// One computation per key at a time: others wait for it, or take the stale copy.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    computing: tokio::sync::Semaphore,
    /// Names of organisations and items as their ratings give them, looked up once an hour.
    names: std::sync::Mutex<HashMap<String, (Instant, String)>>,
}

impl Site {
    pub(crate) fn new(state: Arc<HubState>, config: PublicConfig) -> anyhow::Result<Arc<Self>> {
        let quota = governor::Quota::per_second(
            NonZeroU32::new(config.requests_per_sec).unwrap_or(NonZeroU32::MIN),
        )
        .allow_burst(NonZeroU32::new(config.requests_burst).unwrap_or(NonZeroU32::MIN));
        Ok(Arc::new(Self {
            state,
            rule: config.case_rule().map_err(anyhow::Error::msg)?,
            config,
            limiter: governor::RateLimiter::keyed(quota),
            cache: Default::default(),
            locks: Default::default(),
            computing: tokio::sync::Semaphore::new(COMPUTATIONS),
            names: Default::default(),
        }))
    }
}

/// The query string of every page and file, as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Params {
    pub region: String,
    pub period: String,
    pub by: String,
    pub page: String,
}

/// A request checked: what it asks for, in one spelling (the cache's key).
#[derive(Debug, Clone)]
pub(crate) struct Ask {
    pub region: String,
    pub period: Period,
    pub by: data::Grouping,
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

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
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

/// The client's address: the peer, or behind a trusted proxy the address it forwarded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub SocketAddr);

/// The rate limiter's key for a client: its IPv4 address, or its IPv6 /64 (one subscriber's
/// network; addresses within it are free to pick).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl Site {
    /// Checks a request's parameters: the region published, the period and grouping known.
    fn ask(&self, p: &Params) -> Result<Ask, Refusal> {
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
        let period = if p.period.is_empty() {
            Period::quarter_of(self.state.clock.now_micros())
        } else {
            Period::parse(&p.period).ok_or_else(|| {
                Refusal::bad("时段应写作 2025（年）、2025-Q1（季度）或 2025-03（月）。")
            })?
        };
        let by = data::Grouping::parse(&p.by)
            .ok_or_else(|| Refusal::bad("分组应为 organization、region、city 或 item。"))?;
        let page = if p.page.is_empty() {
            1
        } else {
            p.page
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=10_000).contains(n) && p.page.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| Refusal::bad("页码应为正整数。"))?
        };
        Ok(Ask {
            region,
            period,
            by,
            page,
        })
    }

    fn name(&self, code: &str) -> Option<String> {
        self.config.names.get(code).cloned()
    }

    /// A name looked up from ratings, kept for an hour.
    fn remembered_name(&self, key: &str) -> Option<Option<String>> {
        let names = self.names.lock().expect("names");
        names
            .get(key)
            .filter(|(at, _)| at.elapsed() < NAME_TTL)
            .map(|(_, n)| (!n.is_empty()).then(|| n.clone()))
    }

    fn remember_name(&self, key: String, name: Option<&str>) {
        let mut names = self.names.lock().expect("names");
        if names.len() > 10_000 {
            names.retain(|_, (at, _)| at.elapsed() < NAME_TTL);
        }
        names.insert(key, (Instant::now(), name.unwrap_or_default().to_owned()));
    }

    fn fresh(&self, key: &str) -> Option<Cached> {
        let fresh = Duration::from_secs(self.config.refresh_secs);
        let cache = self.cache.lock().expect("cache");
        cache
            .entries
            .get(key)
            .filter(|c| c.at.elapsed() < fresh)
            .cloned()
    }

    fn stale(&self, key: &str) -> Option<Cached> {
        self.cache.lock().expect("cache").entries.get(key).cloned()
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().expect("locks");
        // Locks nobody holds or waits for are dropped.
        if locks.len() > 64 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key.to_owned()).or_default().clone()
    }

    /// The body for `key`: the cached copy while it is fresh; else computed by `make` once,
    /// however many ask at once. While a copy is being recomputed, others get the stale one
    /// rather than wait; a computation that fails serves the stale copy if there is one.
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
        if let Some(c) = self.fresh(&key) {
            return Ok(c);
        }
        let lock = self.lock_for(&key);
        let stale = self.stale(&key);
        let _one = match (&stale, lock.clone().try_lock_owned()) {
            (_, Ok(held)) => held,
            (Some(s), Err(_)) => return Ok(s.clone()),
            (None, Err(_)) => lock.clone().lock_owned().await,
        };
        // Computed by the request this one waited for?
        if let Some(c) = self.fresh(&key) {
            return Ok(c);
        }
        let body = {
            let _permit = self
                .computing
                .acquire()
                .await
                .map_err(|_| Refusal::unavailable("服务正在停止。"))?;
            match make().await {
                Ok(b) => b,
                Err(e) => return stale.ok_or(e),
            }
        };
        let etag = {
            use sha2::Digest;
            format!("\"{}\"", &hex::encode(sha2::Sha256::digest(&body))[..32])
        };
        let mut cache = self.cache.lock().expect("cache");
        // The same content as before keeps its Last-Modified.
        let last_modified = match cache.entries.get(&key) {
            Some(old) if old.etag == etag => old.last_modified,
            _ => SystemTime::now(),
        };
        let c = Cached {
            body: axum::body::Bytes::from(body),
            content_type,
            etag,
            last_modified,
            at: Instant::now(),
        };
        if let Some(old) = cache.entries.remove(&key) {
            cache.bytes -= old.body.len();
        }
        // Room for it: the oldest go first. A body larger than the whole cache is served,
        // not kept.
        while !cache.entries.is_empty()
            && (cache.entries.len() >= CACHE_ENTRIES || cache.bytes + c.body.len() > CACHE_BYTES)
        {
            let Some(oldest) = cache
                .entries
                .iter()
                .min_by_key(|(_, v)| v.at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(old) = cache.entries.remove(&oldest) {
                cache.bytes -= old.body.len();
            }
        }
        if c.body.len() <= CACHE_BYTES {
            cache.bytes += c.body.len();
            cache.entries.insert(key, c.clone());
        }
        Ok(c)
    }

    /// The client, for its request rate.
    fn client(&self, peer: ClientAddr, headers: &HeaderMap) -> IpAddr {
        // Only the proxy on this host may say who the client is.
        if self.config.trust_forwarded_for
            && peer.0.ip().to_canonical().is_loopback()
            && let Some(ip) = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .next_back()
                .and_then(|a| a.trim().parse::<IpAddr>().ok())
        {
            return client_key(ip);
        }
        client_key(peer.0.ip())
    }

    /// Within the client's request rate, or the 429 to answer.
    fn admit(&self, peer: ClientAddr, headers: &HeaderMap) -> Result<(), Box<Response>> {
        if self.limiter.check_key(&self.client(peer, headers)).is_err() {
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
        let strip = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        let matches = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| strip(t) == c.etag || t.trim() == "*"));
        let not_modified_since = headers.get(header::IF_NONE_MATCH).is_none()
            && headers
                .get(header::IF_MODIFIED_SINCE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok())
                // A date in the future is no date the client was given.
                .filter(|since| *since <= SystemTime::now())
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
        (StatusCode::OK, h, c.body.clone()).into_response()
    }

    /// The published 差评 cases of a region and period, computed once per refresh and shared
    /// by the page, its other pages, the JSON and the CSV.
    async fn cases(&self, ask: &Ask) -> Result<Arc<data::Cases>, Refusal> {
        if self.rule == CaseRule::None {
            return Err(Refusal::not_found("差评整改情况未公开。"));
        }
        let key = format!("cases.json|{}|{}", ask.region, ask.period.code());
        let c = self
            .cached(key, JSON, || async {
                let c = data::cases(self, &ask.region, &ask.period).await?;
                Ok(serde_json::to_vec_pretty(&c).expect("serialisable"))
            })
            .await?;
        serde_json::from_slice(&c.body)
            .map(Arc::new)
            .map_err(|_| Refusal::unavailable("差评整改情况暂时无法读取，请稍后再试。"))
    }
}

type SiteState = State<Arc<Site>>;
type Peer = axum::Extension<ClientAddr>;
type Asked = Result<Query<Params>, axum::extract::rejection::QueryRejection>;

pub(crate) const HTML: &str = "text/html; charset=utf-8";
pub(crate) const JSON: &str = "application/json";
pub(crate) const CSV: &str = "text/csv; charset=utf-8";

/// What every page and file does first: the client's rate, then its parameters.
fn admit_and_ask(
    site: &Site,
    peer: ClientAddr,
    headers: &HeaderMap,
    q: Asked,
) -> Result<Ask, Box<Response>> {
    site.admit(peer, headers)?;
    let Query(p) = q.map_err(|_| Box::new(Refusal::bad("请求参数有误。").into_response()))?;
    site.ask(&p).map_err(|r| Box::new(r.into_response()))
}

pub(crate) async fn index(
    State(site): SiteState,
    axum::Extension(peer): Peer,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = site.admit(peer, &headers) {
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
    match site
        .cached("index".to_owned(), HTML, || async move { Ok(body) })
        .await
    {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

/// Results as a page, JSON or CSV.
pub(crate) async fn results(
    site: Arc<Site>,
    peer: ClientAddr,
    headers: HeaderMap,
    q: Asked,
    kind: &'static str,
) -> Response {
    let ask = match admit_and_ask(&site, peer, &headers, q) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let key = format!(
        "results.{kind}|{}|{}|{}",
        ask.region,
        ask.period.code(),
        ask.by.code()
    );
    let content_type = match kind {
        "html" => HTML,
        "json" => JSON,
        _ => CSV,
    };
    let s = site.clone();
    let made = site
        .cached(key, content_type, || async move {
            let r = data::results(&s, &ask.region, &ask.period, ask.by).await?;
            Ok(match kind {
                "html" => render::results_page(&r, &s.config, s.rule != CaseRule::None),
                "json" => serde_json::to_vec_pretty(&r).expect("serialisable"),
                _ => render::results_csv(&r).into_bytes(),
            })
        })
        .await;
    match made {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

/// The 差评 list as a page, JSON or CSV.
pub(crate) async fn cases(
    site: Arc<Site>,
    peer: ClientAddr,
    headers: HeaderMap,
    q: Asked,
    kind: &'static str,
) -> Response {
    let ask = match admit_and_ask(&site, peer, &headers, q) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    if kind == "json" {
        return match site.cases(&ask).await {
            Ok(_) => {
                let key = format!("cases.json|{}|{}", ask.region, ask.period.code());
                match site.stale(&key) {
                    Some(c) => site.respond(&c, &headers),
                    None => Refusal::unavailable("请稍后再试。").into_response(),
                }
            }
            Err(e) => e.into_response(),
        };
    }
    let key = match kind {
        "html" => format!(
            "cases.html|{}|{}|{}",
            ask.region,
            ask.period.code(),
            ask.page
        ),
        _ => format!("cases.csv|{}|{}", ask.region, ask.period.code()),
    };
    let content_type = if kind == "html" { HTML } else { CSV };
    if let Some(c) = site.fresh(&key) {
        return site.respond(&c, &headers);
    }
    // The case list first, outside this page's computation: a computation never waits for
    // another one while holding its own slot (two of them waiting so would wait for ever).
    let c = match site.cases(&ask).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let made = site
        .cached(key, content_type, || async move {
            Ok(match kind {
                "html" => render::cases_page(&c, ask.page),
                _ => render::cases_csv(&c).into_bytes(),
            })
        })
        .await;
    match made {
        Ok(c) => site.respond(&c, &headers),
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn not_found(
    State(site): SiteState,
    axum::Extension(peer): Peer,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = site.admit(peer, &headers) {
        return *r;
    }
    Refusal::not_found("没有这个页面。").into_response()
}

/// The routes, for `serve`.
pub(crate) fn router(site: Arc<Site>) -> axum::Router {
    use axum::routing::get;
    macro_rules! route {
        ($f:ident, $kind:literal) => {
            get(
                |State(site): SiteState,
                 axum::Extension(peer): Peer,
                 headers: HeaderMap,
                 q: Asked| async move { $f(site, peer, headers, q, $kind).await },
            )
        };
    }
    axum::Router::new()
        .route("/", get(index))
        .route("/results", route!(results, "html"))
        .route("/data/results.json", route!(results, "json"))
        .route("/data/results.csv", route!(results, "csv"))
        .route("/cases", route!(cases, "html"))
        .route("/data/cases.json", route!(cases, "json"))
        .route("/data/cases.csv", route!(cases, "csv"))
        .fallback(not_found)
        .with_state(site)
}
