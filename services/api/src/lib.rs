//! The customer usage API: usage, cost so far, invoices, spend alerts and
//! sandbox state, per tenant, over HTTP (axum).
//!
//! - Every `/v1` route needs an API key (`Authorization: Bearer imk_...`, see
//!   [`auth`]); a customer key sees its own tenant only, and another tenant's
//!   data answers 404 exactly as absent data does. Admin keys see all.
//! - Errors are `application/problem+json` ([`problem`]).
//! - `/openapi.json` is generated from the handlers ([`ApiDoc`]); `/docs`
//!   renders it for people, server-side (no CDN, no JavaScript).
//! - Rate limits per key, a timeout per request, Prometheus metrics and a log
//!   line per request; graceful shutdown finishes requests in flight.
//! - Spend alerts are checked every `alert_interval_s` against the rated
//!   spend of the open period, and notified once per period by a signed
//!   webhook ([`alerts`]).

pub mod alerts;
pub mod auth;
pub mod customers;
mod docs;
pub mod events;
pub mod finance;
pub mod live;
mod preview;
pub mod problem;
pub mod routes;
pub mod sealed;
pub mod views;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use idlemeter_store::Store;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::auth::{KeyCache, RateLimiter};
use crate::problem::Problem;

/// The `[api]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `host:port` the API listens on; port 0 picks a free one.
    pub listen: String,
    /// How often every key is reloaded (a revocation takes effect within it).
    pub key_refresh_ms: u64,
    /// Keys are not trusted past this age: if reloads keep failing (the
    /// store unreachable) for this long, every request answers 503 rather
    /// than honour a key that may have been revoked since (fail closed).
    pub key_max_staleness_ms: u64,
    /// Requests a second, shared by every anonymous caller, to `/docs` and
    /// `/openapi.json` (0: unlimited). `/finance` counts against the key
    /// that made its link.
    pub public_rate_limit_per_s: u32,
    /// A connection that has not sent a request's headers within this is
    /// closed (slowloris): also the limit on an idle keep-alive connection.
    pub header_read_timeout_ms: u64,
    /// A response the client does not read for this long (its socket buffer
    /// full) closes the connection: a client that sends requests and never
    /// reads cannot hold a connection either.
    pub write_timeout_ms: u64,
    /// Connections served at once (0: unlimited); past it a new connection
    /// is answered 503 and closed at once, so held connections cannot
    /// exhaust the process.
    pub max_connections: u32,
    /// Requests a second per key (0: unlimited), and the burst allowed.
    pub rate_limit_per_s: u32,
    pub rate_limit_burst: u32,
    /// Per key id: its own requests a second (0: unlimited).
    pub rate_limits: BTreeMap<String, u32>,
    /// Most windows one usage or cost request may cover.
    pub max_windows: u32,
    pub default_page: u32,
    pub max_page: u32,
    /// A request running longer than this answers 503 (its ClickHouse
    /// queries stop too: `max_execution_time`).
    pub request_timeout_ms: u64,
    /// Requests one tenant (a customer, or an admin key) may have running at
    /// once; more answer 429 at once (0: unlimited). With the rate limit,
    /// what bounds the API's memory under one tenant's burst.
    pub max_in_flight_per_tenant: u32,
    /// How often spend alerts are checked; 0 disables delivery (alerts can
    /// still be managed).
    pub alert_interval_s: u64,
    /// Replicas divide the customers whose alerts they deliver (on the
    /// `[topics] shares` coordination topic), so each alert fires once
    /// across them. Off: this replica delivers every alert (run one, or
    /// set `alert_interval_s = 0` on the others).
    pub divide_alerts: bool,
    /// Let alert webhooks call loopback and private addresses (tests, or a
    /// platform whose receivers live inside its network). Off by default.
    pub alert_private_targets: bool,
    /// The collectors' sampling interval, for the finance page's hours.
    pub sample_interval_s: u32,
    /// Read the samples topic for sandbox state newer than the stored one
    /// (`idlemeter api`; see `live.rs`): each replica reads every sample.
    pub live_state: bool,
    /// A sandbox the stream has not mentioned for this long leaves the view.
    pub live_forget_s: u64,
    /// 64 hex digits (32 bytes): the key alert signing secrets are sealed
    /// with in the store (`sealed.rs`). Without it alerts cannot be created.
    /// Printed redacted; generate one with `openssl rand -hex 32`.
    pub secrets_key: idlemeter_core::Secret,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            key_refresh_ms: 5_000,
            key_max_staleness_ms: 60_000,
            public_rate_limit_per_s: 20,
            header_read_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            max_connections: 10_000,
            rate_limit_per_s: 50,
            rate_limit_burst: 100,
            rate_limits: BTreeMap::new(),
            max_windows: 2_000,
            default_page: 100,
            max_page: 1_000,
            request_timeout_ms: 10_000,
            max_in_flight_per_tenant: 8,
            alert_interval_s: 60,
            divide_alerts: false,
            alert_private_targets: false,
            sample_interval_s: 1,
            live_state: true,
            live_forget_s: 300,
            secrets_key: idlemeter_core::Secret::default(),
        }
    }
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("api config: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] idlemeter_store::Error),
    #[error("api listener: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sheet(#[from] idlemeter_core::SheetError),
    #[error(transparent)]
    Terms(#[from] idlemeter_core::TermsError),
}

/// What the API bills an invoice preview with: the sheet the rater rates
/// with (its checksum must match the rater's figures) and the billing terms
/// the rater and the invoicer are given.
#[derive(Debug)]
pub struct Billing {
    pub(crate) sheet: idlemeter_core::PriceSheet,
    pub(crate) sheet_label: String,
    pub(crate) sheet_checksum: String,
    /// The version of the idle rule the rater classifies with.
    pub(crate) idle_policy: String,
    pub(crate) terms: idlemeter_core::BillingTerms,
}

impl Billing {
    /// `source`: the sheet and idle policy the rater rates with (the
    /// checksum its figures carry).
    pub fn new(
        source: idlemeter_store::SheetSource<'_>,
        terms: idlemeter_core::BillingTerms,
    ) -> Result<Self, Error> {
        Ok(Self {
            sheet: idlemeter_core::PriceSheet::from_toml(source.sheet_text, source.sheet_label)?,
            sheet_label: source.sheet_label.to_owned(),
            sheet_checksum: source.checksum(),
            idle_policy: source.idle_version()?,
            terms,
        })
    }
}

impl AppState {
    pub(crate) fn now(&self) -> chrono::DateTime<chrono::Utc> {
        (self.clock)()
    }

    /// Takes a token of the shared anonymous bucket (`/docs`,
    /// `/openapi.json`).
    pub(crate) fn check_public(&self) -> Result<(), Problem> {
        self.public_limiter
            .check(PUBLIC_BUCKET, Instant::now())
            .map_err(Problem::too_many_requests)
    }

    /// Reads accounts under `billing` as the rater and the invoicer do.
    pub(crate) fn accounts<'a>(
        &'a self,
        billing: &'a Billing,
    ) -> idlemeter_store::AccountReader<'a> {
        idlemeter_store::AccountReader {
            store: &self.store,
            terms: &billing.terms,
            tax_rates: billing.terms.tax_rates.rates(),
            sheet: &billing.sheet,
            sheet_checksum: &billing.sheet_checksum,
            adjusted: None,
        }
    }

    /// The sheet that bills `customer`: that of their record's currency
    /// (`[rater] currency_sheets`), else the primary.
    pub(crate) async fn billing_of(
        &self,
        customer: &str,
    ) -> Result<&Billing, idlemeter_store::Error> {
        if self.currency_billing.is_empty() {
            return Ok(&self.billing);
        }
        let record = self
            .store
            .customers_between(&self.billing.terms.issuer, customer, customer)
            .await?;
        Ok(record
            .first()
            .and_then(|record| {
                self.currency_billing
                    .iter()
                    .find(|billing| billing.sheet.currency.code() == record.currency)
            })
            .unwrap_or(&self.billing))
    }
}

#[derive(Debug, Clone)]
struct ApiMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    connections_refused: prometheus::IntCounter,
}

impl ApiMetrics {
    fn new(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "idlemeter_api_requests_total",
                "Requests answered, by route and status.",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("idlemeter_api_request_seconds", "Time to answer, by route.")
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ]),
            &["route"],
        )
        .expect("valid metric");
        let connections_refused = prometheus::IntCounter::new(
            "idlemeter_api_connections_refused_total",
            "Connections answered 503 and closed because max_connections were open.",
        )
        .expect("valid metric");
        for metric in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(connections_refused.clone()),
        ] {
            // A second API in one registry (tests) keeps the first's metrics.
            let _ = registry.register(metric);
        }
        Self {
            requests,
            latency,
            connections_refused,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub(crate) store: Store,
    pub(crate) keys: KeyCache,
    pub(crate) limiter: RateLimiter,
    /// One bucket for every anonymous caller of the public pages.
    pub(crate) public_limiter: RateLimiter,
    pub(crate) billing: Billing,
    /// The sheets of further currencies (`[rater] currency_sheets`).
    pub(crate) currency_billing: Vec<Billing>,
    /// Where customers and plans live (`[ledger] url`): the admin customer
    /// routes answer 503 without it.
    pub(crate) ledger: Option<idlemeter_ledger::Ledger>,
    pub(crate) config: ApiConfig,
    pub(crate) links: finance::PageLinks,
    pub(crate) sealer: sealed::Sealer,
    /// Sandbox state from the stream, newer than the stored one (see `live`).
    pub(crate) live: Option<Arc<live::LiveView>>,
    /// Where `POST /api/v1/events` publishes, and the meters (None: the
    /// endpoint answers 404).
    pub(crate) events: Option<events::EventSink>,
    /// What "now" is: the wall clock in service; tests pin it.
    clock: Clock,
    pub(crate) in_flight: InFlight,
    metrics: ApiMetrics,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("store", &self.store)
            .field("billing", &self.billing)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What one client may hold of the server.
#[derive(Debug, Clone, Copy)]
struct ServeLimits {
    header_read_timeout: Duration,
    write_timeout: Duration,
    max_connections: usize,
}

/// Longest wait at shutdown for the requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Refused connections being told so at once, at most.
const REFUSING: usize = 1_024;

/// The accept loop: HTTP/1.1 connections with a header-read timeout (a
/// client that opens a connection and trickles its headers, or sends none,
/// is closed when it runs out), a write timeout (a client that does not
/// read its responses), and at most `max_connections` at once (past it a
/// new connection gets a 503 and is closed at once). On `shutdown` it stops
/// accepting and lets the requests in flight finish, for at most
/// [`SHUTDOWN_GRACE`].
async fn serve_connections(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    refused: prometheus::IntCounter,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let refusing = Arc::new(tokio::sync::Semaphore::new(REFUSING));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refused.inc();
            if let Ok(telling) = Arc::clone(&refusing).try_acquire_owned() {
                tokio::spawn(refuse(stream, telling));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.write_timeout));
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection =
            builder.serve_connection(hyper_util::rt::TokioIo::new(Box::pin(stream)), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(slot);
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "connections still open at the end of the shutdown grace; closing them"
        );
    }
    Ok(())
}

/// Tells a connection past the limit so (503) and closes it without a
/// reset: the write half is shut, and what the client sent is read and
/// dropped for at most a second.
async fn refuse(mut stream: tokio::net::TcpStream, _telling: tokio::sync::OwnedSemaphorePermit) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 1\r\n\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

/// The rate-limit bucket of anonymous callers.
const PUBLIC_BUCKET: &str = "anonymous";

/// The API's clock (see [`Api::with_clock`]).
pub type Clock = Arc<dyn Fn() -> chrono::DateTime<chrono::Utc> + Send + Sync>;

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "idlemeter usage API", version = "1",
        description = "Usage, cost so far, invoices, spend alerts and sandbox state, per tenant. \
Every route needs `Authorization: Bearer <API key>`. Times are RFC 3339 (UTC); money and \
quantities are decimal strings; lists page with an opaque `cursor`. Errors are \
`application/problem+json`. Another tenant's data answers 404, exactly like absent data."),
    paths(
        routes::me,
        routes::usage,
        routes::cost_now,
        routes::cost_history,
        routes::invoice_preview,
        routes::invoices,
        routes::invoice,
        routes::create_alert,
        routes::list_alerts,
        routes::delete_alert,
        routes::sandboxes,
        routes::sandbox,
        routes::create_key,
        routes::revoke_key,
        routes::finance_panels,
        routes::finance_link,
        routes::margin,
        routes::credit_notes,
        customers::put_customer,
        customers::get_customer,
        customers::post_subscription,
        events::ingest_events,
        events::list_meters,
        events::query_meter,
    ),
    // Referenced only by query parameters, which do not collect their schemas.
    components(schemas(problem::Problem, routes::InvoiceFormat, views::WindowWidth, views::Resource)),
    modifiers(&BearerAuth),
    // Every operation takes a key: customer, admin or finance.
    security(("api_key" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("imk_<key id>_<secret>")
                    .build(),
            ),
        );
    }
}

/// The API, ready to serve.
#[derive(Debug, Clone)]
pub struct Api {
    state: Arc<AppState>,
}

impl Api {
    /// Loads the keys once (a store that cannot be read fails here, not on
    /// the first request) and checks the config.
    pub async fn new(
        store: Store,
        billing: Billing,
        config: ApiConfig,
        registry: &Registry,
    ) -> Result<Self, Error> {
        if config.max_page == 0 || config.max_windows == 0 || config.default_page == 0 {
            return Err(Error::Config(
                "api.max_page, api.default_page and api.max_windows must be above 0".to_owned(),
            ));
        }
        let sealer = sealed::Sealer::from_key(&config.secrets_key)
            .map_err(|e| Error::Config(e.to_string()))?;
        // Queries stop with the request that needed them.
        let store = store.with_max_execution_time(config.request_timeout_ms.div_ceil(1000));
        let keys = KeyCache::new(store.clone())
            .with_max_staleness(Duration::from_millis(config.key_max_staleness_ms));
        let count = keys.reload().await?;
        tracing::info!(keys = count, "api keys loaded");
        let limiter = RateLimiter::new(
            config.rate_limit_per_s,
            config.rate_limit_burst,
            &config.rate_limits,
        );
        let public_limiter = RateLimiter::new(
            config.public_rate_limit_per_s,
            config.public_rate_limit_per_s.saturating_mul(2),
            &BTreeMap::new(),
        );
        Ok(Self {
            state: Arc::new(AppState {
                store,
                keys,
                limiter,
                public_limiter,
                billing,
                currency_billing: Vec::new(),
                ledger: None,
                config,
                links: finance::PageLinks::default(),
                sealer,
                live: None,
                events: None,
                clock: Arc::new(chrono::Utc::now),
                in_flight: InFlight::default(),
                metrics: ApiMetrics::new(registry),
            }),
        })
    }

    pub fn config(&self) -> &ApiConfig {
        &self.state.config
    }

    /// Manages customers and plans in `ledger` (the admin customer
    /// routes). Call before [`Api::serve`] or [`Api::router`].
    pub fn with_ledger(mut self, ledger: idlemeter_ledger::Ledger) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.ledger = Some(ledger);
        }
        self
    }

    /// Bills customers of further currencies with their sheets (one per
    /// currency, `[rater] currency_sheets`). Call before [`Api::serve`] or
    /// [`Api::router`].
    pub fn with_currency_sheets(mut self, billing: Vec<Billing>) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.currency_billing = billing;
        }
        self
    }

    /// Serves sandbox state from `live` where it is newer than the stored
    /// state. Call before [`Api::serve`] or [`Api::router`].
    pub fn with_live(mut self, live: Arc<live::LiveView>) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.live = Some(live);
        }
        self
    }

    /// Takes usage events (`POST /api/v1/events`) into `sink` and reads
    /// its meters. Call before [`Api::serve`] or [`Api::router`].
    pub fn with_events(mut self, sink: events::EventSink) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.events = Some(sink);
        }
        self
    }

    /// Answers as if it were always `clock()` (the open period, cost so
    /// far, the preview): for tests that replay a period. Call before
    /// [`Api::serve`] or [`Api::router`].
    pub fn with_clock(mut self, clock: Clock) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.clock = clock;
        }
        self
    }

    /// The routes, with authentication, rate limits, timeouts and metrics.
    pub fn router(&self) -> Router {
        // One customer's data: every handler takes `auth::Tenant`.
        let customer = Router::new()
            .route("/usage", get(routes::usage))
            .route("/cost", get(routes::cost_now))
            .route("/cost/history", get(routes::cost_history))
            .route("/invoice-preview", get(routes::invoice_preview))
            .route("/invoices", get(routes::invoices))
            .route("/invoices/{number}", get(routes::invoice))
            .route(
                "/alerts",
                get(routes::list_alerts).post(routes::create_alert),
            )
            .route("/alerts/{alert_id}", delete(routes::delete_alert))
            .route("/sandboxes", get(routes::sandboxes))
            .route("/sandboxes/{sandbox}", get(routes::sandbox))
            .route("/credit-notes", get(routes::credit_notes));
        let v1 = Router::new()
            .route("/v1/me", get(routes::me))
            .nest("/v1/customers/{customer}", customer)
            .route("/api/v1/events", axum::routing::post(events::ingest_events))
            .route("/api/v1/meters", get(events::list_meters))
            .route("/api/v1/meters/{slug}/query", get(events::query_meter))
            .merge(
                // Admin-only: checked before the body is read, so a customer
                // key gets the same 404 as for a route that does not exist.
                Router::new()
                    .route("/v1/keys", axum::routing::post(routes::create_key))
                    .route("/v1/keys/{key_id}", delete(routes::revoke_key))
                    .route("/v1/finance/panels", get(routes::finance_panels))
                    .route("/v1/admin/margin", get(routes::margin))
                    .route(
                        "/v1/admin/customers/{customer}",
                        get(customers::get_customer).put(customers::put_customer),
                    )
                    .route(
                        "/v1/admin/customers/{customer}/subscriptions",
                        axum::routing::post(customers::post_subscription),
                    )
                    .route(
                        "/v1/finance/link",
                        axum::routing::post(routes::finance_link),
                    )
                    .route_layer(middleware::from_fn(require_admin)),
            )
            .route_layer(middleware::from_fn_with_state(
                self.state.clone(),
                authenticate,
            ));
        Router::new()
            .merge(v1)
            .route("/openapi.json", get(openapi_json))
            .route("/docs", get(docs_page))
            .route("/finance", get(routes::finance_page))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(middleware::from_fn_with_state(self.state.clone(), observe))
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown`, then lets requests in flight finish.
    /// Keys are reloaded every `key_refresh_ms` meanwhile.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let refresh = tokio::spawn(async move {
            let period = Duration::from_millis(state.config.key_refresh_ms.max(100));
            loop {
                tokio::time::sleep(period).await;
                if let Err(error) = state.keys.reload().await {
                    tracing::warn!(%error, "reloading api keys failed; keeping the last ones");
                }
            }
        });
        let result = serve_connections(
            listener,
            self.router(),
            ServeLimits {
                header_read_timeout: Duration::from_millis(
                    self.state.config.header_read_timeout_ms,
                ),
                write_timeout: Duration::from_millis(self.state.config.write_timeout_ms),
                max_connections: match self.state.config.max_connections {
                    0 => tokio::sync::Semaphore::MAX_PERMITS,
                    limit => limit as usize,
                },
            },
            self.state.metrics.connections_refused.clone(),
            shutdown,
        )
        .await;
        refresh.abort();
        result
    }

    /// Delivers spend alerts until `shutdown` (see [`alerts`]); returns at once
    /// when `alert_interval_s` is 0.
    pub async fn deliver_alerts_until_stopped(
        &self,
        registry: &Registry,
        owns: Option<idlemeter_core::Share>,
        shutdown: impl Future<Output = ()>,
    ) {
        let config = &self.state.config;
        if config.alert_interval_s == 0 {
            return;
        }
        let delivery = alerts::AlertDelivery::new(
            self.state.store.clone(),
            self.state.billing.terms.period,
            config.alert_private_targets,
            self.state.sealer.clone(),
            Duration::from_secs(config.alert_interval_s),
            registry,
        );
        let delivery = match owns {
            Some(owns) => delivery.with_share(owns),
            None => delivery,
        };
        delivery.run_until_stopped(shutdown).await;
    }
}

/// Authenticates `/v1` requests, applies the key's rate limit and hands the
/// [`auth::Principal`] to the handler.
async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or(""));
    let principal = match state.keys.authenticate(authorization).await {
        Ok(principal) => principal,
        Err(problem) => return problem.into_response(),
    };
    if let Err(retry_after_s) = state.limiter.check(&principal.key_id, Instant::now()) {
        return Problem::too_many_requests(retry_after_s).into_response();
    }
    let tenant = match &principal.scope {
        auth::Scope::Customer(customer) => customer.as_str().to_owned(),
        auth::Scope::Admin => format!("admin key {}", principal.key_id),
        auth::Scope::Ingest(_) => format!("ingest key {}", principal.key_id),
    };
    let Some(_slot) = state
        .in_flight
        .enter(&tenant, state.config.max_in_flight_per_tenant)
    else {
        return Problem::too_many_requests(1).into_response();
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// Requests running per tenant (see `ApiConfig::max_in_flight_per_tenant`).
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    running: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// A running request's place, given back when dropped.
pub(crate) struct Slot<'a> {
    in_flight: &'a InFlight,
    tenant: String,
}

impl InFlight {
    /// A slot for `tenant`, unless it already has `max` requests running.
    pub(crate) fn enter(&self, tenant: &str, max: u32) -> Option<Slot<'_>> {
        let mut running = self.running.lock().expect("not poisoned");
        let count = running.entry(tenant.to_owned()).or_default();
        if max > 0 && *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            in_flight: self,
            tenant: tenant.to_owned(),
        })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut running = self.in_flight.running.lock().expect("not poisoned");
        if let Some(count) = running.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                running.remove(&self.tenant);
            }
        }
    }
}

/// Lets only admin keys through (after [`authenticate`]).
async fn require_admin(request: Request, next: Next) -> Response {
    let admin = request
        .extensions()
        .get::<auth::Principal>()
        .is_some_and(auth::Principal::is_admin);
    if admin {
        next.run(request).await
    } else {
        not_found().await.into_response()
    }
}

/// Times, counts, logs and bounds every request.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().clone();
    let started = Instant::now();
    let timeout = Duration::from_millis(state.config.request_timeout_ms);
    let response = match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::unavailable(format!(
            "the request took longer than {} ms; narrow it or retry",
            timeout.as_millis()
        ))
        .into_response(),
    };
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), &status.to_string()])
        .inc();
    state
        .metrics
        .latency
        .with_label_values(&[route.as_str()])
        .observe(elapsed.as_secs_f64());
    tracing::info!(%method, %route, status, elapsed_ms = elapsed.as_secs_f64() * 1e3, "request");
    response
}

/// The OpenAPI document, rendered once.
fn openapi_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| ApiDoc::openapi().to_json().unwrap_or_default())
}

/// The docs page, rendered once.
fn docs_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| docs::render(&ApiDoc::openapi()))
}

async fn openapi_json(State(state): State<Arc<AppState>>) -> Response {
    if let Err(problem) = state.check_public() {
        return problem.into_response();
    }
    ([(header::CONTENT_TYPE, "application/json")], openapi_text()).into_response()
}

async fn docs_page(State(state): State<Arc<AppState>>) -> Response {
    if let Err(problem) = state.check_public() {
        return problem.into_response();
    }
    Html(docs_text()).into_response()
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", "no such resource")
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this resource does not support that method",
    )
}
