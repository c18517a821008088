//! What every idlemeter service exposes about itself: tracing logs, Prometheus
//! metrics at `/metrics`, readiness at `/health` and liveness at `/live`.
//!
//! Each service owns a [`prometheus::Registry`] (no global registry, so tests can
//! run several services in one process) and names its metrics
//! `idlemeter_<service>_<what>_<unit>`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;

/// Installs the global tracing subscriber once; `RUST_LOG` filters (default `info`).
/// Safe to call more than once (later calls do nothing), which tests rely on.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Whether a service can do its job: it is running (`set_healthy`) and every
/// readiness check (broker, ClickHouse, lag; see [`Readiness`]) passed last
/// time it ran. `/health` answers 200 or 503 from it, naming each check.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<HealthState>>);

#[derive(Debug, Default)]
struct HealthState {
    running: bool,
    /// Each check's last outcome; a check that has not run yet is absent
    /// from here but counted as failing (see `expected`).
    checks: BTreeMap<&'static str, Result<(), String>>,
    expected: Vec<&'static str>,
}

impl Health {
    /// The service started (true) or is stopping (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.state().running = healthy;
    }

    /// Running, and every expected check passed on its last run.
    pub fn is_healthy(&self) -> bool {
        let state = self.state();
        state.running
            && state
                .expected
                .iter()
                .all(|name| matches!(state.checks.get(name), Some(Ok(()))))
    }

    /// Each expected check and its last outcome ("ok", "not checked yet", or
    /// the reason it failed).
    pub fn checks(&self) -> Vec<(&'static str, String)> {
        let state = self.state();
        state
            .expected
            .iter()
            .map(|name| {
                let outcome = match state.checks.get(name) {
                    Some(Ok(())) => "ok".to_owned(),
                    Some(Err(reason)) => reason.clone(),
                    None => "not checked yet".to_owned(),
                };
                (*name, outcome)
            })
            .collect()
    }

    fn expect(&self, names: Vec<&'static str>) {
        self.state().expected = names;
    }

    fn record(&self, name: &'static str, outcome: Result<(), String>) {
        self.state().checks.insert(name, outcome);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // A panic while holding this lock cannot leave the state half
        // written (each write is one assignment), so a poisoned lock is used.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Check = Box<dyn Fn() -> CheckFuture + Send + Sync>;

/// The checks behind `/health`: each runs every `every` (default 5 s) with a
/// time limit (2 s); a check that errs or runs out of time makes the service
/// not ready until it passes again. Exported as `idlemeter_ready` (0/1) and
/// `idlemeter_readiness_check{check}` (0/1).
pub struct Readiness {
    checks: Vec<(&'static str, Check)>,
    every: Duration,
    limit: Duration,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Readiness")
            .field(
                "checks",
                &self
                    .checks
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>(),
            )
            .field("every", &self.every)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            checks: Vec::new(),
            every: Duration::from_secs(5),
            limit: Duration::from_secs(2),
        }
    }
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check: `probe` returns Ok, or why the service cannot work.
    pub fn check<F, Fut>(mut self, name: &'static str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks
            .push((name, Box::new(move || Box::pin(probe()) as CheckFuture)));
        self
    }

    /// How often the checks run (tests shorten it).
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Runs the checks until `stop`, recording them in `health` and in
    /// `registry`'s readiness gauges.
    pub fn spawn(
        self,
        health: Health,
        registry: &Registry,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> prometheus::Result<tokio::task::JoinHandle<()>> {
        let ready = IntGauge::new("idlemeter_ready", "1 while every readiness check passes")?;
        let by_check = IntGaugeVec::new(
            Opts::new(
                "idlemeter_readiness_check",
                "1 while this readiness check passes (see /health for the reason it fails)",
            ),
            &["check"],
        )?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(by_check.clone()))?;
        health.expect(self.checks.iter().map(|(name, _)| *name).collect());
        for (name, _) in &self.checks {
            by_check.with_label_values(&[name]).set(0);
        }
        Ok(tokio::spawn(async move {
            tokio::pin!(stop);
            let mut every = tokio::time::interval(self.every);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = every.tick() => {}
                }
                let outcomes =
                    futures::future::join_all(self.checks.iter().map(|(name, probe)| async move {
                        let outcome = match tokio::time::timeout(self.limit, probe()).await {
                            Ok(outcome) => outcome,
                            Err(_) => {
                                Err(format!("no answer within {} ms", self.limit.as_millis()))
                            }
                        };
                        (*name, outcome)
                    }))
                    .await;
                for (name, outcome) in outcomes {
                    if let Err(reason) = &outcome {
                        tracing::warn!(check = name, %reason, "readiness check failed");
                    }
                    by_check
                        .with_label_values(&[name])
                        .set(i64::from(outcome.is_ok()));
                    health.record(name, outcome);
                }
                ready.set(i64::from(health.is_healthy()));
            }
        }))
    }
}

/// `metric`, registered in `registry`: how every service makes its
/// metrics, so that one registered twice fails where it is made.
pub fn registered<M>(registry: &Registry, metric: M) -> prometheus::Result<M>
where
    M: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// A counter named `name`, registered in `registry`.
pub fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    registered(registry, IntCounter::new(name, help)?)
}

/// A gauge named `name`, registered in `registry`.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    registered(registry, IntGauge::new(name, help)?)
}

/// A histogram named `name` with `buckets`, registered in `registry`.
pub fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> prometheus::Result<Histogram> {
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    registered(registry, Histogram::with_opts(opts)?)
}

/// What a [`follow_gauge`] read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    Value(i64),
    /// Not known this time (the gauge keeps its last value).
    Unknown,
    /// What was read is gone (its owner dropped it): stop following.
    Gone,
}

/// From an optional read of something that may be gone: `None` (gone),
/// `Some(None)` (not known this time), `Some(Some(value))`.
impl From<Option<Option<i64>>> for Reading {
    fn from(read: Option<Option<i64>>) -> Self {
        match read {
            Some(Some(value)) => Self::Value(value),
            Some(None) => Self::Unknown,
            None => Self::Gone,
        }
    }
}

/// Sets `gauge` every `every` from `read` until `stop` or until `read`
/// reports [`Reading::Gone`]. `read` may block (a broker round trip): it
/// runs on the blocking pool, so it never delays the service's own work. A
/// follower must not keep what it reads alive (hold a `Weak`): a consumer
/// kept alive past its service stays in its group and holds partitions.
pub fn follow_gauge(
    gauge: IntGauge,
    every: Duration,
    read: impl Fn() -> Reading + Send + Sync + 'static,
    stop: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let read = Arc::new(read);
    tokio::spawn(async move {
        tokio::pin!(stop);
        let mut every = tokio::time::interval(every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = every.tick() => {}
            }
            let read = Arc::clone(&read);
            match tokio::task::spawn_blocking(move || read()).await {
                Ok(Reading::Value(value)) => gauge.set(value),
                Ok(Reading::Unknown) | Err(_) => {}
                Ok(Reading::Gone) => return,
            }
        }
    })
}

#[derive(Clone)]
struct Exposed {
    registry: Registry,
    health: Health,
}

/// Serves `/metrics` and `/health` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health", get(render_health))
        .route("/live", get(|| async { "ok" }))
        .with_state(Exposed { registry, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn render_metrics(State(exposed): State<Exposed>) -> impl IntoResponse {
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&exposed.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            format!("encoding metrics failed: {error}").into_bytes(),
        ),
    }
}

/// `{"status": "ready" | "not ready", "checks": {"<name>": "ok" | "<reason>"}}`
/// with 200 or 503: for load balancers, orchestrators' readiness probes and
/// people. Liveness (the process answers at all) is `/live`.
async fn render_health(State(exposed): State<Exposed>) -> impl IntoResponse {
    let ready = exposed.health.is_healthy();
    let checks: serde_json::Map<String, serde_json::Value> = exposed
        .health
        .checks()
        .into_iter()
        .map(|(name, outcome)| (name.to_owned(), serde_json::Value::String(outcome)))
        .collect();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": checks,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

/// A token cancelled once `shutdown` completes: the one stop signal a
/// service's tasks share, however the service was asked to stop (a signal,
/// a test's channel).
pub fn stop_on(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    stop
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn gauge(registry: &Registry, name: &str, check: Option<&str>) -> Option<f64> {
        registry
            .gather()
            .iter()
            .find(|family| family.name() == name)?
            .get_metric()
            .iter()
            .find(|metric| {
                check.is_none_or(|check| {
                    metric
                        .get_label()
                        .iter()
                        .any(|label| label.name() == "check" && label.value() == check)
                })
            })
            .map(|metric| metric.get_gauge().get_value())
    }

    #[tokio::test]
    async fn not_ready_until_every_check_passes_and_again_when_one_fails() {
        let registry = Registry::new();
        let health = Health::default();
        health.set_healthy(true);
        let broker_up = Arc::new(AtomicBool::new(true));
        let readiness = Readiness::new()
            .every(Duration::from_millis(20))
            .check("always", || async { Ok(()) })
            .check("broker", {
                let broker_up = Arc::clone(&broker_up);
                move || {
                    let up = broker_up.load(Ordering::SeqCst);
                    async move {
                        if up {
                            Ok(())
                        } else {
                            Err("broker down".to_owned())
                        }
                    }
                }
            });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Before the first round: not ready, and it says so.
        let task = readiness
            .spawn(health.clone(), &registry, async {
                let _ = stopped.await;
            })
            .expect("registers");
        assert!(!health.is_healthy());
        assert_eq!(
            health.checks(),
            vec![
                ("always", "not checked yet".to_owned()),
                ("broker", "not checked yet".to_owned())
            ]
        );
        let wait_for = |want: bool| {
            let health = health.clone();
            async move {
                for _ in 0..200 {
                    if health.is_healthy() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("health never became {want}: {:?}", health.checks());
            }
        };
        wait_for(true).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(gauge(&registry, "idlemeter_ready", None), Some(1.0));
        broker_up.store(false, Ordering::SeqCst);
        wait_for(false).await;
        assert_eq!(health.checks()[1], ("broker", "broker down".to_owned()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(gauge(&registry, "idlemeter_ready", None), Some(0.0));
        assert_eq!(
            gauge(&registry, "idlemeter_readiness_check", Some("broker")),
            Some(0.0)
        );
        assert_eq!(
            gauge(&registry, "idlemeter_readiness_check", Some("always")),
            Some(1.0)
        );
        // A stopping service is not ready, whatever its checks say.
        broker_up.store(true, Ordering::SeqCst);
        wait_for(true).await;
        health.set_healthy(false);
        assert!(!health.is_healthy());
        let _ = stop.send(());
        task.await.expect("stops");
    }

    #[tokio::test]
    async fn a_check_that_hangs_fails_at_its_time_limit() {
        let registry = Registry::new();
        let health = Health::default();
        health.set_healthy(true);
        let mut readiness = Readiness::new()
            .every(Duration::from_millis(20))
            .check("hangs", std::future::pending);
        readiness.limit = Duration::from_millis(30);
        let _task = readiness
            .spawn(health.clone(), &registry, std::future::pending())
            .expect("registers");
        for _ in 0..200 {
            if health.checks()[0].1 != "not checked yet" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            health.checks()[0],
            ("hangs", "no answer within 30 ms".to_owned())
        );
        assert!(!health.is_healthy());
    }
}
