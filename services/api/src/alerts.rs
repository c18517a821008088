//! Spend alert delivery: every interval, each alert whose customer's rated
//! spend in the *current* billing period reached its threshold, and that has
//! not fired for that period, is POSTed to its webhook, signed with the
//! alert's own secret (see `idlemeter-webhook`); an acknowledged delivery is
//! recorded in `spend_alert_firings`, so an alert fires once per period.
//!
//! - Delivery is at least once: `Idlemeter-Delivery` (`<alert id>:<period
//!   start>`) is the same on every attempt, for receivers to act once.
//! - Deliveries run concurrently (at most [`CONCURRENCY`] at once) and a
//!   failing alert backs off (doubling from one interval to an hour), so one
//!   tenant's dead endpoint cannot hold up the others'.
//! - Webhooks to loopback, private, link-local or otherwise internal
//!   addresses are refused (at creation for literal addresses, at delivery
//!   after DNS resolution) unless `allow_private_targets` is set: a tenant
//!   must not make the API POST into the operator's network. DNS can still
//!   change between the check and the connection; an egress proxy is the
//!   complete answer.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use idlemeter_core::Period;
use idlemeter_store::{
    from_column, to_column, unix_seconds, AlertFiringRow, LatestSpend, SpendAlertRow, Store,
};
use idlemeter_webhook::WebhookSender;
use prometheus::{IntCounter, Registry};
use serde::Serialize;

/// Most deliveries in flight at once.
pub const CONCURRENCY: usize = 16;
const MAX_BACKOFF: Duration = Duration::from_secs(3_600);

/// The webhook's JSON body.
#[derive(Debug, Serialize)]
pub struct AlertNotice {
    pub alert_id: String,
    pub customer: String,
    pub threshold: String,
    pub spend: String,
    pub period_start: DateTime<Utc>,
    pub as_of: DateTime<Utc>,
}

/// Whether `ip` is one a tenant's webhook must not reach.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                // 100.64.0.0/10, carrier-grade NAT.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                // fc00::/7 unique local, fe80::/10 link local.
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_internal(IpAddr::V4(v4)))
        }
    }
}

/// The host and port of an `http://` URL.
fn host_port(url: &str) -> Option<(String, u16)> {
    let uri: axum::http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Some((host, uri.port_u16().unwrap_or(80)))
}

/// Checks a webhook URL when an alert is created: `http://` with a host, and
/// (unless allowed) not a literal internal address or `localhost`.
pub fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let (host, _) = host_port(url)
        .ok_or_else(|| format!("webhook_url {url:?} is not an http:// URL with a host"))?;
    if allow_private {
        return Ok(());
    }
    let internal = match host.parse::<IpAddr>() {
        Ok(ip) => is_internal(ip),
        Err(_) => host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost"),
    };
    if internal {
        return Err(format!(
            "webhook_url {url:?} points at an internal address, which alerts may not call"
        ));
    }
    Ok(())
}

/// Resolves the URL's host and refuses internal addresses (unless allowed).
async fn check_target(url: &str, allow_private: bool) -> Result<(), String> {
    check_url(url, allow_private)?;
    if allow_private {
        return Ok(());
    }
    let (host, port) = host_port(url).ok_or_else(|| "not an http:// URL".to_owned())?;
    let addresses = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|error| format!("resolving {host}: {error}"))?;
    for address in addresses {
        if is_internal(address.ip()) {
            return Err(format!(
                "{host} resolves to the internal address {}",
                address.ip()
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    next_try: Instant,
}

/// Checks alerts and delivers their notices.
#[derive(Debug)]
pub struct AlertDelivery {
    store: Store,
    period: Period,
    allow_private_targets: bool,
    interval: Duration,
    backoff: Mutex<HashMap<String, Backoff>>,
    fired: IntCounter,
    failed: IntCounter,
}

impl AlertDelivery {
    pub fn new(
        store: Store,
        period: Period,
        allow_private_targets: bool,
        interval: Duration,
        registry: &Registry,
    ) -> Self {
        let fired = IntCounter::new(
            "idlemeter_api_alerts_fired_total",
            "Spend alerts delivered.",
        )
        .expect("valid metric");
        let failed = IntCounter::new(
            "idlemeter_api_alert_delivery_failures_total",
            "Spend alert deliveries that failed (retried with backoff).",
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(fired.clone()));
        let _ = registry.register(Box::new(failed.clone()));
        Self {
            store,
            period,
            allow_private_targets,
            interval,
            backoff: Mutex::new(HashMap::new()),
            fired,
            failed,
        }
    }

    /// One pass over every alert, judging "the current period" at `now`
    /// (the wall clock in service; tests pick it); returns how many fired.
    pub async fn check_once(&self, now: DateTime<Utc>) -> Result<usize, idlemeter_store::Error> {
        let current_period = unix_seconds(self.period.start_of(now));
        let alerts = self.store.spend_alerts(None).await?;
        let fired: HashSet<(String, String, u32)> = self
            .store
            .alert_firings()
            .await?
            .into_iter()
            .map(|row| (row.customer, row.alert_id, row.period_start))
            .collect();
        let mut spend_of: HashMap<String, Option<LatestSpend>> = HashMap::new();
        let mut due = Vec::new();
        for alert in alerts.into_iter().filter(|alert| alert.deleted == 0) {
            if self
                .backoff
                .lock()
                .expect("not poisoned")
                .get(&alert.alert_id)
                .is_some_and(|b| b.next_try > Instant::now())
            {
                continue;
            }
            if !spend_of.contains_key(&alert.customer) {
                let spend = self.store.latest_spend(&alert.customer).await?;
                spend_of.insert(alert.customer.clone(), spend);
            }
            // Only the current period's spend: last period's total is not
            // what "spend this period" means, even before this period's
            // first rated hour.
            let Some(Some(spend)) = spend_of.get(&alert.customer) else {
                continue;
            };
            if spend.period_start != current_period {
                continue;
            }
            let threshold = from_column(alert.threshold)?;
            let key = (
                alert.customer.clone(),
                alert.alert_id.clone(),
                spend.period_start,
            );
            if spend.spend >= threshold && !fired.contains(&key) {
                due.push((alert, threshold, spend.clone()));
            }
        }
        let results: Vec<Result<bool, idlemeter_store::Error>> = futures::stream::iter(due)
            .map(|(alert, threshold, spend)| self.deliver(alert, threshold, spend))
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut delivered = 0;
        for result in results {
            delivered += usize::from(result?);
        }
        Ok(delivered)
    }

    async fn deliver(
        &self,
        alert: SpendAlertRow,
        threshold: rust_decimal::Decimal,
        spend: LatestSpend,
    ) -> Result<bool, idlemeter_store::Error> {
        // Signed and recorded at the wall clock's time, whatever `now` the
        // period was judged at.
        let now = Utc::now();
        let notice = AlertNotice {
            alert_id: alert.alert_id.clone(),
            customer: alert.customer.clone(),
            threshold: threshold.normalize().to_string(),
            spend: spend.spend.normalize().to_string(),
            period_start: crate::views::time(spend.period_start),
            as_of: crate::views::time(spend.as_of),
        };
        let body = serde_json::to_vec(&notice).expect("a notice serialises");
        let delivery_id = format!("{}:{}", alert.alert_id, spend.period_start);
        let sent = match check_target(&alert.webhook_url, self.allow_private_targets).await {
            Err(refused) => Err(refused),
            Ok(()) => match WebhookSender::new(&alert.webhook_url, &alert.webhook_secret) {
                Ok(sender) => sender
                    .post(&delivery_id, body, now.timestamp())
                    .await
                    .map_err(|error| error.to_string()),
                Err(error) => Err(error.to_string()),
            },
        };
        match sent {
            Ok(()) => {
                self.store
                    .insert_alert_firing(&AlertFiringRow {
                        customer: alert.customer.clone(),
                        alert_id: alert.alert_id.clone(),
                        period_start: spend.period_start,
                        spend: to_column(spend.spend)?,
                        fired_at: unix_seconds(now),
                    })
                    .await?;
                self.backoff
                    .lock()
                    .expect("not poisoned")
                    .remove(&alert.alert_id);
                self.fired.inc();
                tracing::info!(alert = %alert.alert_id, customer = %alert.customer, spend = %spend.spend, "spend alert delivered");
                Ok(true)
            }
            Err(error) => {
                self.failed.inc();
                let mut backoff = self.backoff.lock().expect("not poisoned");
                let entry = backoff.entry(alert.alert_id.clone()).or_insert(Backoff {
                    failures: 0,
                    next_try: Instant::now(),
                });
                entry.failures += 1;
                let wait = self
                    .interval
                    .saturating_mul(2u32.saturating_pow(entry.failures - 1))
                    .min(MAX_BACKOFF);
                entry.next_try = Instant::now() + wait;
                tracing::warn!(alert = %alert.alert_id, customer = %alert.customer, %error, retry_in_s = wait.as_secs(), "spend alert delivery failed");
                Ok(false)
            }
        }
    }

    /// Checks every interval until `shutdown`.
    pub async fn run_until_stopped(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            if let Err(error) = self.check_once(Utc::now()).await {
                tracing::warn!(%error, "checking spend alerts failed; retrying at the next check");
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_targets_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:8123/",
            "http://10.1.2.3/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:80/",
            "http://localhost:9000/",
            "http://192.168.0.1/",
        ] {
            assert!(check_url(url, false).is_err(), "{url}");
            assert!(check_url(url, true).is_ok(), "{url}");
        }
        assert!(check_url("http://hooks.example.com/idlemeter", false).is_ok());
        assert!(
            check_url("https://hooks.example.com/", true).is_err(),
            "http only"
        );
        assert!(check_url("ftp://x/", true).is_err());
    }
}
