//! API keys: `imk_<key id>_<secret>`, the secret 256 random bits shown once
//! and stored only as its SHA-256; a per-key token bucket.
//!
//! A key belongs to one customer (sees that tenant only) or is an admin key
//! (finance: sees every tenant). Keys live in ClickHouse (`api_keys`); each
//! API process keeps them in memory and reloads them every
//! `key_refresh_ms`, and at once (at most once a second) when a key it does
//! not know is presented, so a new key works at once and a revoked one stops
//! working within `key_refresh_ms` on every replica.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use idlemeter_core::CustomerId;
use idlemeter_store::{ApiKeyRow, Store};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;

use crate::problem::Problem;

const PREFIX: &str = "imk_";

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Customer(CustomerId),
    /// Sends usage events (`POST /api/v1/events`) and reads nothing: for one
    /// customer's subjects, or for every customer's (None).
    Ingest(Option<CustomerId>),
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub scope: Scope,
}

impl Principal {
    /// `customer` as a tenant this caller may see, or the not-found problem
    /// (the same for another tenant as for one that does not exist).
    pub fn tenant(&self, customer: &str) -> Result<CustomerId, Problem> {
        let id =
            CustomerId::parse(customer).map_err(|_| Problem::not_found("customer", customer))?;
        match &self.scope {
            Scope::Admin => Ok(id),
            Scope::Customer(own) if *own == id => Ok(id),
            Scope::Customer(_) | Scope::Ingest(_) => Err(Problem::not_found("customer", customer)),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.scope == Scope::Admin
    }
}

/// The route's `{customer}` as a tenant the caller may see: what every
/// customer route takes instead of the path and the principal, so none can
/// read a customer without the check. Another tenant's id answers the same
/// not-found as one that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub CustomerId);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Tenant {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Problem> {
        let principal = parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| Problem::unauthorized("no API key was checked for this route"))?;
        let crate::problem::Path(params) =
            crate::problem::Path::<HashMap<String, String>>::from_request_parts(parts, state)
                .await?;
        let customer = params
            .get("customer")
            .ok_or_else(|| Problem::internal("the route has no {customer} parameter"))?;
        principal.tenant(customer).map(Tenant)
    }
}

/// The OpenAPI description of the path parameter [`Tenant`] reads.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // read by utoipa only
struct TenantPath {
    /// Customer id
    customer: String,
}

/// In the OpenAPI document a `Tenant` is the path's `customer`.
impl utoipa::IntoParams for Tenant {
    fn into_params(
        parameter_in: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        TenantPath::into_params(parameter_in)
    }
}

/// A new key, as returned once to whoever created it.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The full key to hand to the customer: shown once, never stored.
    pub key: String,
    /// The row stored (hash only).
    pub row: ApiKeyRow,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Makes a key for `customer` (an admin key when `None`) and its row.
pub fn generate(customer: Option<&CustomerId>, name: &str, now_unix: u32) -> NewKey {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    // ThreadRng is a CSPRNG seeded from the operating system.
    let mut rng = rand::rng();
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let key_id = hex::encode(id);
    let secret = hex::encode(secret);
    NewKey {
        key: format!("{PREFIX}{key_id}_{secret}"),
        row: ApiKeyRow {
            key_id,
            customer: customer.map(|c| c.as_str().to_owned()).unwrap_or_default(),
            role: if customer.is_some() {
                "customer"
            } else {
                "admin"
            }
            .to_owned(),
            secret_sha256: sha256_hex(secret.as_bytes()),
            name: name.to_owned(),
            created_at: now_unix,
            revoked_at: 0,
            version: 1,
        },
    }
}

/// Makes an ingest key: it sends usage events for `customer`'s subjects
/// (every customer's when `None`) and reads nothing.
pub fn generate_ingest(customer: Option<&CustomerId>, name: &str, now_unix: u32) -> NewKey {
    let mut key = generate(customer, name, now_unix);
    key.row.role = "ingest".to_owned();
    key
}

/// `row` revoked at `now_unix`, as the next version.
pub fn revoked(row: &ApiKeyRow, now_unix: u32) -> ApiKeyRow {
    ApiKeyRow {
        revoked_at: now_unix.max(1),
        version: row.version + 1,
        ..row.clone()
    }
}

/// Splits `imk_<id>_<secret>`.
fn parse(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Constant-time equality of two hex digests of equal length.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[derive(Debug, Clone)]
struct KnownKey {
    scope: Scope,
    secret_sha256: String,
    revoked: bool,
}

/// The keys, in memory, reloaded from the store.
#[derive(Debug)]
pub struct KeyCache {
    store: Store,
    keys: RwLock<HashMap<String, KnownKey>>,
    /// One reload at a time, fetch and install together: a reload that
    /// started before a revocation cannot install the map from before it.
    reloading: tokio::sync::Mutex<()>,
    /// When the last reload started (successful or not).
    last_attempt: Mutex<Option<Instant>>,
    /// When the last successful reload started: the keys are as of then.
    loaded_at: Mutex<Option<Instant>>,
    /// Past this age the keys are not trusted (a revocation since may be
    /// missing): requests answer 503 until a reload succeeds.
    max_staleness: Duration,
}

impl KeyCache {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            keys: RwLock::new(HashMap::new()),
            reloading: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
            loaded_at: Mutex::new(None),
            max_staleness: Duration::from_secs(60),
        }
    }

    /// Refuses every key once the last successful reload is older than
    /// `max_staleness` (zero: never).
    pub fn with_max_staleness(mut self, max_staleness: Duration) -> Self {
        self.max_staleness = max_staleness;
        self
    }

    /// Whether the keys are recent enough to be trusted.
    fn fresh(&self) -> bool {
        self.max_staleness.is_zero()
            || self
                .loaded_at
                .lock()
                .expect("not poisoned")
                .is_some_and(|at| at.elapsed() <= self.max_staleness)
    }

    /// Whether `key_id` is a known, unrevoked admin key now (finance page
    /// links live only as long as the key that made them).
    pub async fn is_admin(&self, key_id: &str) -> bool {
        self.fresh()
            && self
                .keys
                .read()
                .await
                .get(key_id)
                .is_some_and(|key| !key.revoked && key.scope == Scope::Admin)
    }

    /// Loads every key's latest version.
    pub async fn reload(&self) -> Result<usize, idlemeter_store::Error> {
        let _one_at_a_time = self.reloading.lock().await;
        let started = Instant::now();
        *self.last_attempt.lock().expect("not poisoned") = Some(started);
        let rows = self.store.api_keys().await?;
        let mut keys = HashMap::with_capacity(rows.len());
        for row in rows {
            let scope = if row.role == "admin" {
                Scope::Admin
            } else if row.role == "ingest" && row.customer.is_empty() {
                Scope::Ingest(None)
            } else if row.role == "ingest" {
                match CustomerId::parse(row.customer.clone()) {
                    Ok(customer) => Scope::Ingest(Some(customer)),
                    Err(error) => {
                        tracing::warn!(key_id = %row.key_id, %error, "ingest key with an invalid customer ignored");
                        continue;
                    }
                }
            } else {
                match CustomerId::parse(row.customer.clone()) {
                    Ok(customer) => Scope::Customer(customer),
                    Err(error) => {
                        tracing::warn!(key_id = %row.key_id, %error, "api key with an invalid customer ignored");
                        continue;
                    }
                }
            };
            keys.insert(
                row.key_id,
                KnownKey {
                    scope,
                    secret_sha256: row.secret_sha256,
                    revoked: row.revoked_at != 0,
                },
            );
        }
        let count = keys.len();
        *self.keys.write().await = keys;
        *self.loaded_at.lock().expect("not poisoned") = Some(started);
        Ok(count)
    }

    /// Claims the once-a-second reload for an unknown key id: unauthenticated
    /// callers with made-up ids cannot make the API query its store faster.
    fn claim_reload(&self) -> bool {
        let mut last = self.last_attempt.lock().expect("not poisoned");
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(1))
            || self.reloading.try_lock().is_err()
        {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// The caller presenting `authorization` (the header's value).
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, Problem> {
        let Some(value) = authorization else {
            return Err(Problem::unauthorized(
                "no API key: send `Authorization: Bearer imk_...`",
            ));
        };
        let Some(key) = value.strip_prefix("Bearer ") else {
            return Err(Problem::unauthorized(
                "the Authorization header must be `Bearer <API key>`",
            ));
        };
        if !self.fresh() {
            // Fail closed: a key revoked since the last good reload must
            // not keep working on this replica.
            return Err(Problem::unavailable(format!(
                "API keys could not be reloaded for more than {} s; requests are refused until the key store is reachable",
                self.max_staleness.as_secs()
            )));
        }
        let invalid =
            || Problem::unauthorized("the API key is not valid (unknown, malformed or revoked)");
        let (key_id, secret) = parse(key.trim()).ok_or_else(invalid)?;
        let mut known = self.keys.read().await.get(key_id).cloned();
        if known.is_none() && self.claim_reload() {
            // A store that cannot be read now is logged; the caller only
            // learns that the key is not (yet) valid.
            if let Err(error) = self.reload().await {
                tracing::warn!(%error, "reloading api keys for an unknown key id failed");
            }
            known = self.keys.read().await.get(key_id).cloned();
        }
        let known = known.ok_or_else(invalid)?;
        if known.revoked || !same_digest(&known.secret_sha256, &sha256_hex(secret.as_bytes())) {
            return Err(invalid());
        }
        Ok(Principal {
            key_id: key_id.to_owned(),
            scope: known.scope,
        })
    }
}

/// Token buckets per key: `rate` requests a second, bursts up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    default_rate: f64,
    burst: f64,
    per_key: HashMap<String, f64>,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// A rate of 0 disables limiting (for that key, or by default).
    pub fn new(
        default_rate: u32,
        burst: u32,
        per_key: &std::collections::BTreeMap<String, u32>,
    ) -> Self {
        Self {
            default_rate: f64::from(default_rate),
            burst: f64::from(burst.max(1)),
            per_key: per_key
                .iter()
                .map(|(key, rate)| (key.clone(), f64::from(*rate)))
                .collect(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key_id`, or says how many seconds until one is there.
    pub fn check(&self, key_id: &str, now: Instant) -> Result<(), u64> {
        let rate = self
            .per_key
            .get(key_id)
            .copied()
            .unwrap_or(self.default_rate);
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = self.burst.max(rate);
        let mut buckets = self.buckets.lock().expect("not poisoned");
        let (tokens, at) = buckets.entry(key_id.to_owned()).or_insert((burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * rate;
        *tokens = (*tokens + refill).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - *tokens) / rate).ceil();
            // Bounded by 1 / rate with rate >= 1 a second; at most a second.
            Err(if wait >= 1.0 { wait as u64 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_only_their_own_secret_matches() {
        let customer = CustomerId::parse("acme").expect("id");
        let new = generate(Some(&customer), "ci", 1);
        let (id, secret) = parse(&new.key).expect("parses");
        assert_eq!(id, new.row.key_id);
        assert!(same_digest(
            &new.row.secret_sha256,
            &sha256_hex(secret.as_bytes())
        ));
        assert!(!same_digest(&new.row.secret_sha256, &sha256_hex(b"other")));
        assert!(
            !new.row.secret_sha256.contains(secret),
            "the secret is not stored"
        );
        assert_eq!(parse("imk_"), None);
        assert_eq!(parse("bearer"), None);
        let other = generate(None, "finance", 1);
        assert_ne!(other.row.key_id, new.row.key_id);
        assert_eq!(other.row.role, "admin");
    }

    /// Finding "fail-open revocation": when reloads keep failing, keys stop
    /// being accepted once the last good load is older than the bound.
    #[tokio::test]
    async fn keys_are_refused_once_reloads_have_failed_for_longer_than_the_bound() {
        let dead = idlemeter_store::Store::new(&idlemeter_store::ClickHouseSettings {
            url: "http://127.0.0.1:1".to_owned(),
            database: "none".to_owned(),
            user: "default".to_owned(),
            password: Default::default(),
            cluster: None,
            max_replica_delay_s: idlemeter_store::DEFAULT_MAX_REPLICA_DELAY_S,
        });
        let cache = KeyCache::new(dead).with_max_staleness(Duration::from_millis(300));
        let customer = CustomerId::parse("acme").expect("id");
        let new = generate(Some(&customer), "ci", 1);
        let header = format!("Bearer {}", new.key);
        // Never loaded: refused, 503, whatever the key.
        let refused = cache.authenticate(Some(&header)).await.expect_err("stale");
        assert_eq!(refused.status, 503);
        // A good load (as a reload that reached the store would install).
        cache.keys.write().await.insert(
            new.row.key_id.clone(),
            KnownKey {
                scope: Scope::Customer(customer.clone()),
                secret_sha256: new.row.secret_sha256.clone(),
                revoked: false,
            },
        );
        *cache.loaded_at.lock().expect("lock") = Some(Instant::now());
        assert!(cache.authenticate(Some(&header)).await.is_ok());
        // The store goes away: reloads fail, and past the bound the key
        // that was valid is refused.
        assert!(cache.reload().await.is_err());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(cache.reload().await.is_err());
        let refused = cache.authenticate(Some(&header)).await.expect_err("stale");
        assert_eq!(refused.status, 503);
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let limiter = RateLimiter::new(2, 3, &[("vip".to_owned(), 0)].into_iter().collect());
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check("k", start), Ok(()));
        }
        assert_eq!(limiter.check("k", start), Err(1));
        // Half a second at 2/s refills one token.
        assert_eq!(
            limiter.check("k", start + Duration::from_millis(500)),
            Ok(())
        );
        assert_eq!(
            limiter.check("k", start + Duration::from_millis(500)),
            Err(1)
        );
        // Another key has its own bucket; a rate of 0 is unlimited.
        assert_eq!(limiter.check("other", start), Ok(()));
        for _ in 0..100 {
            assert_eq!(limiter.check("vip", start), Ok(()));
        }
    }

    #[test]
    fn a_customer_key_sees_its_tenant_only_and_absent_equals_foreign() {
        let acme = Principal {
            key_id: "k".to_owned(),
            scope: Scope::Customer(CustomerId::parse("acme").expect("id")),
        };
        assert_eq!(acme.tenant("acme").expect("own").as_str(), "acme");
        let foreign = acme.tenant("globex").expect_err("foreign");
        let absent = acme.tenant("nobody").expect_err("absent");
        assert_eq!(foreign.status, 404);
        assert_eq!(
            foreign.detail.replace("globex", "X"),
            absent.detail.replace("nobody", "X")
        );
        let admin = Principal {
            key_id: "a".to_owned(),
            scope: Scope::Admin,
        };
        assert!(admin.tenant("globex").is_ok());
        assert_eq!(admin.tenant("bad id").expect_err("invalid").status, 404);
    }
}
