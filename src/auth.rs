//! Who may do what. A caller's identity is its client certificate's CN, mapped to a
//! registered [`Principal`]: roles, a scope (organisations and/or region-code prefixes) and
//! inbound quotas. Nothing in a message can change who the caller is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use crate::domain::CreditCode;

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Submit ratings and 办件 events inside the scope.
    Submit,
    /// Read ratings and statistics inside the scope (personal data masked).
    Read,
    /// See rater name, ID number and phone unmasked (every such read is audited).
    ReadPii,
    /// Pull the feed (SyncService).
    Pull,
    /// Work bad-rating cases (RectificationService).
    Rectify,
    /// Operate the hub (AdminService, the PII audit trail).
    Admin,
    /// A downstream hub relaying its ratings (city → province): with submit, the hub id and
    /// origin it sends are kept instead of assigned here.
    Relay,
    /// Read the operations listener (metrics, the status page) when it is served off
    /// loopback over mutual TLS (`[ops] mtls`): e.g. the Prometheus server's certificate.
    Ops,
}

impl Role {
    /// Every role except relay (which changes what a submission means).
    pub const ALL: [Role; 7] = [
        Role::Submit,
        Role::Read,
        Role::ReadPii,
        Role::Pull,
        Role::Rectify,
        Role::Admin,
        Role::Ops,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Read => "read",
            Role::ReadPii => "read-pii",
            Role::Pull => "pull",
            Role::Rectify => "rectify",
            Role::Admin => "admin",
            Role::Relay => "relay",
            Role::Ops => "ops",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[principals.<name>]` entry of the config.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    /// Roles granted.
    #[serde(default)]
    pub roles: Vec<Role>,
    /// Organisations (统一社会信用代码) in scope.
    #[serde(default)]
    pub org_credit_codes: Vec<String>,
    /// Region-code prefixes in scope, e.g. "5301" (all of Kunming).
    #[serde(default)]
    pub region_prefixes: Vec<String>,
    /// The whole country in scope (national and provincial platforms, operators).
    #[serde(default)]
    pub all_regions: bool,
    /// Overrides `[limits] requests_per_sec` for this principal.
    pub requests_per_sec: Option<u32>,
    /// Overrides `[limits] requests_burst`.
    pub requests_burst: Option<u32>,
    /// Overrides `[limits] ratings_per_sec`.
    pub ratings_per_sec: Option<u32>,
    /// Overrides `[limits] ratings_burst`.
    pub ratings_burst: Option<u32>,
    /// A lower hub's log public key (`rating-hub log key` on that hub prints it): the tree
    /// heads it reports are checked with it.
    pub log_key: Option<String>,
}

/// Default inbound quotas (`[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct DefaultQuotas {
    pub requests_per_sec: u32,
    pub requests_burst: u32,
    pub ratings_per_sec: u32,
    pub ratings_burst: u32,
}

/// Where a principal may act.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub all_regions: bool,
    pub orgs: BTreeSet<String>,
    pub region_prefixes: Vec<String>,
}

impl Scope {
    pub fn national() -> Self {
        Self {
            all_regions: true,
            ..Default::default()
        }
    }

    /// A rating of `org` in `region` is in scope.
    pub fn covers(&self, org: &str, region: &str) -> bool {
        self.all_regions
            || self.orgs.contains(org)
            || self
                .region_prefixes
                .iter()
                .any(|p| region.starts_with(p.as_str()))
    }

    /// Every rating under `prefix` is in scope.
    pub fn covers_region_prefix(&self, prefix: &str) -> bool {
        self.all_regions
            || self
                .region_prefixes
                .iter()
                .any(|p| prefix.starts_with(p.as_str()))
    }
}

/// A registered caller.
pub struct Principal {
    pub name: String,
    pub roles: BTreeSet<Role>,
    pub scope: Scope,
    requests: DefaultDirectRateLimiter,
    ratings: DefaultDirectRateLimiter,
    /// A lower hub's registered log key.
    pub log_key: Option<crate::tree_head::PublicKey>,
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Over quota: try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

fn quota(per_sec: u32, burst: u32) -> Quota {
    let per_sec = NonZeroU32::new(per_sec.max(1)).expect("max(1)");
    let burst = NonZeroU32::new(burst.max(1)).expect("max(1)");
    Quota::per_second(per_sec).allow_burst(burst)
}

impl Principal {
    pub fn new(name: String, roles: BTreeSet<Role>, scope: Scope, q: DefaultQuotas) -> Self {
        Self {
            name,
            roles,
            scope,
            requests: RateLimiter::direct(quota(q.requests_per_sec, q.requests_burst)),
            ratings: RateLimiter::direct(quota(q.ratings_per_sec, q.ratings_burst)),
            log_key: None,
        }
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Takes one call from the request quota.
    pub fn check_request(&self) -> Result<(), RetryAfter> {
        self.requests.check().map_err(|not_until| {
            RetryAfter(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// Takes `n` ratings from the rating quota. A batch larger than the burst can never pass
    /// and says so (`None`).
    pub fn check_ratings(&self, n: u32) -> Result<(), Option<RetryAfter>> {
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        match self.ratings.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(RetryAfter(
                not_until.wait_time_from(DefaultClock::default().now()),
            ))),
            Err(_) => Err(None),
        }
    }

    /// Waits until one rating fits the quota (streams are slowed down, not refused).
    pub async fn wait_for_rating(&self) {
        self.ratings.until_ready().await;
    }
}

/// Every registered principal, by name.
#[derive(Debug, Default)]
pub struct Registry {
    principals: HashMap<String, Arc<Principal>>,
}

#[derive(Debug, thiserror::Error)]
#[error("principal {name}: {reason}")]
pub struct PrincipalError {
    pub name: String,
    pub reason: String,
}

impl Registry {
    pub fn from_config(
        entries: &BTreeMap<String, PrincipalConfig>,
        defaults: DefaultQuotas,
    ) -> Result<Self, PrincipalError> {
        let mut registry = Registry::default();
        for (name, c) in entries {
            let err = |reason: String| PrincipalError {
                name: name.clone(),
                reason,
            };
            crate::pki::check_principal_name(name).map_err(|e| err(e.to_string()))?;
            if name == crate::rules::engine::HUB_SOURCE {
                return Err(err(
                    "is reserved for ratings the hub records itself (default ratings)".into(),
                ));
            }
            let mut orgs = BTreeSet::new();
            for code in &c.org_credit_codes {
                let parsed = CreditCode::parse(code)
                    .map_err(|e| err(format!("org_credit_codes: {code:?} {e}")))?;
                orgs.insert(parsed.as_str().to_owned());
            }
            for p in &c.region_prefixes {
                if p.is_empty() || p.len() > 12 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err(format!(
                        "region_prefixes: {p:?} must be 1 to 12 digits (use all_regions = true for the whole country)"
                    )));
                }
            }
            let q = DefaultQuotas {
                requests_per_sec: c.requests_per_sec.unwrap_or(defaults.requests_per_sec),
                requests_burst: c.requests_burst.unwrap_or(defaults.requests_burst),
                ratings_per_sec: c.ratings_per_sec.unwrap_or(defaults.ratings_per_sec),
                ratings_burst: c.ratings_burst.unwrap_or(defaults.ratings_burst),
            };
            let scope = Scope {
                all_regions: c.all_regions,
                orgs,
                region_prefixes: c.region_prefixes.clone(),
            };
            let mut principal =
                Principal::new(name.clone(), c.roles.iter().copied().collect(), scope, q);
            if let Some(text) = &c.log_key {
                principal.log_key = Some(
                    crate::tree_head::PublicKey::parse(text)
                        .map_err(|e| err(format!("log_key: {e}")))?,
                );
            }
            registry.insert(principal);
        }
        Ok(registry)
    }

    pub fn insert(&mut self, p: Principal) {
        self.principals.insert(p.name.clone(), Arc::new(p));
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.principals.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Principal>> {
        self.principals.get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.principals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: DefaultQuotas = DefaultQuotas {
        requests_per_sec: 1,
        requests_burst: 2,
        ratings_per_sec: 10,
        ratings_burst: 10,
    };

    #[test]
    fn scope_by_org_or_region_prefix() {
        let s = Scope {
            all_regions: false,
            orgs: ["ORG".to_string()].into(),
            region_prefixes: vec!["5301".into()],
        };
        assert!(s.covers("ORG", "440103"));
        assert!(s.covers("X", "530102"));
        assert!(!s.covers("X", "530202"));
        assert!(s.covers_region_prefix("530102"));
        assert!(!s.covers_region_prefix("53"));
        assert!(Scope::national().covers("X", "110000"));
    }

    #[test]
    fn request_quota_refuses_past_the_burst_with_a_wait() {
        let p = Principal::new("p".into(), BTreeSet::new(), Scope::default(), Q);
        assert!(p.check_request().is_ok());
        assert!(p.check_request().is_ok());
        let RetryAfter(wait) = p.check_request().unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(p.check_ratings(11), Err(None), "larger than the burst");
        assert!(p.check_ratings(10).is_ok());
        assert!(matches!(p.check_ratings(1), Err(Some(_))));
    }

    #[test]
    fn config_entries_are_validated() {
        let mut m = BTreeMap::new();
        m.insert(
            "dept".to_string(),
            PrincipalConfig {
                region_prefixes: vec!["53x".into()],
                ..Default::default()
            },
        );
        let e = Registry::from_config(&m, Q).unwrap_err();
        assert!(e.to_string().contains("region_prefixes"), "{e}");
    }
}
