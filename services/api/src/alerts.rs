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
//!   must not make the API POST into the operator's network. The host is
//!   resolved once per delivery and the connection goes to the address that
//!   was checked (with the URL's `Host` header), so DNS rebinding between
//!   the check and the connection cannot reach an internal address.
//! - Secrets are stored sealed (`sealed.rs`) and opened only to sign.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use idlemeter_core::Period;
use idlemeter_store::{
    from_column, to_column, unix_seconds, AlertFiringRow, LatestSpend, SpendAlertRow, Store,
};
use idlemeter_webhook::WebhookSender;

use crate::sealed::Sealer;
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

/// Whether `ip` is one a tenant's webhook must not reach: anything but a
/// globally routed unicast address. IPv6 forms that carry an IPv4 address
/// (mapped, compatible, NAT64, 6to4) are judged by that address.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_documentation()
        || v4.is_multicast()
        // 0.0.0.0/8, "this network".
        || a == 0
        // 100.64.0.0/10, carrier-grade NAT.
        || (a == 100 && (b & 0xc0) == 64)
        // 192.0.0.0/24, IETF protocol assignments.
        || (a == 192 && b == 0 && c == 0)
        // 198.18.0.0/15, benchmarking.
        || (a == 198 && (b & 0xfe) == 18)
        // 240.0.0.0/4, reserved (and the broadcast address in it).
        || a >= 240
}

fn is_internal_v6(v6: Ipv6Addr) -> bool {
    let segments = v6.segments();
    if let Some(v4) = embedded_v4(v6) {
        return is_internal_v4(v4);
    }
    v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        // fc00::/7 unique local, fe80::/10 link local, fec0::/10 site local.
        || (segments[0] & 0xfe00) == 0xfc00
        || (segments[0] & 0xffc0) == 0xfe80
        || (segments[0] & 0xffc0) == 0xfec0
        // 64:ff9b:1::/48, local-use NAT64.
        || (segments[0] == 0x64 && segments[1] == 0xff9b && segments[2] == 1)
        // 2001::/32 Teredo (its IPv4 is obfuscated), 2001:db8::/32 documentation.
        || (segments[0] == 0x2001 && (segments[1] == 0 || segments[1] == 0xdb8))
        // 100::/64, discard only.
        || (segments[0] == 0x100 && segments[1..4] == [0, 0, 0])
}

/// The IPv4 address an IPv6 address stands for, where it is one of the
/// forms that reach an IPv4 host: mapped (`::ffff:a.b.c.d`), compatible
/// (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) and 6to4 (`2002:aabb:ccdd::`).
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let from = |high: u16, low: u16| {
        Ipv4Addr::new((high >> 8) as u8, high as u8, (low >> 8) as u8, low as u8)
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    // Compatible, excluding :: and ::1 (judged as IPv6 loopback/unspecified).
    if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
        return Some(from(s[6], s[7]));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return Some(from(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(from(s[1], s[2]));
    }
    None
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

/// Name resolution for webhook targets: the system resolver in service, a
/// scripted one in tests (a rebinding attack answers differently on the
/// second call).
pub trait Resolver: Send + Sync + std::fmt::Debug {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> futures::future::BoxFuture<'a, std::io::Result<Vec<SocketAddr>>>;
}

/// The operating system's resolver.
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> futures::future::BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Resolves the URL's host once and returns the addresses to connect to,
/// in the resolver's order: refused if any answer is internal (unless
/// allowed). The caller connects to exactly these addresses, so a second
/// resolution (DNS rebinding) never happens.
pub async fn checked_targets(
    url: &str,
    allow_private: bool,
    resolver: &dyn Resolver,
) -> Result<Vec<SocketAddr>, String> {
    check_url(url, allow_private)?;
    let (host, port) = host_port(url).ok_or_else(|| "not an http:// URL".to_owned())?;
    let addresses = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => resolver
            .resolve(&host, port)
            .await
            .map_err(|error| format!("resolving {host}: {error}"))?,
    };
    if !allow_private {
        if let Some(internal) = addresses.iter().find(|address| is_internal(address.ip())) {
            return Err(format!(
                "{host} resolves to the internal address {}",
                internal.ip()
            ));
        }
    }
    if addresses.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    Ok(addresses)
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
    resolver: Box<dyn Resolver>,
    sealer: Sealer,
    interval: Duration,
    backoff: Mutex<HashMap<String, Backoff>>,
    fired: IntCounter,
    failed: IntCounter,
    owns: idlemeter_core::Share,
}

impl AlertDelivery {
    pub fn new(
        store: Store,
        period: Period,
        allow_private_targets: bool,
        sealer: Sealer,
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
            resolver: Box::new(SystemResolver),
            sealer,
            interval,
            backoff: Mutex::new(HashMap::new()),
            fired,
            failed,
            owns: idlemeter_core::Share::everyone(),
        }
    }

    /// Delivers only the alerts of the customers `owns` admits: with two or
    /// more API replicas, each customer's alerts are checked and delivered
    /// by the one replica that holds the customer's shard, so a crossed
    /// threshold is announced once, not once per replica.
    pub fn with_share(mut self, owns: idlemeter_core::Share) -> Self {
        self.owns = owns;
        self
    }

    /// Resolves webhook hosts with `resolver` instead of the system's.
    pub fn with_resolver(mut self, resolver: Box<dyn Resolver>) -> Self {
        self.resolver = resolver;
        self
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
        let live = alerts
            .into_iter()
            .filter(|alert| alert.deleted == 0 && self.owns.admits(&alert.customer));
        for alert in live {
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
        let sent = async {
            let targets = checked_targets(
                &alert.webhook_url,
                self.allow_private_targets,
                self.resolver.as_ref(),
            )
            .await?;
            let secret = self
                .sealer
                .open(
                    &alert.webhook_secret,
                    &crate::sealed::alert_context(&alert.customer, &alert.alert_id),
                )
                .map_err(|error| error.to_string())?;
            let sender = WebhookSender::new(&alert.webhook_url, secret.expose())
                .map_err(|error| error.to_string())?;
            // Each checked address in turn, until one answers.
            let mut last = String::new();
            for target in targets {
                match sender
                    .clone()
                    .connecting_to(target)
                    .post(&delivery_id, body.clone(), now.timestamp())
                    .await
                {
                    Ok(()) => return Ok(()),
                    Err(error @ idlemeter_webhook::DeliveryError::Transport(_)) => {
                        last = format!("{target}: {error}");
                    }
                    Err(error) => return Err(error.to_string()),
                }
            }
            Err(last)
        }
        .await;
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

    /// Finding "alert webhooks can reach internal addresses": every range
    /// that is not globally routed unicast, in every IPv6 form of an IPv4
    /// address.
    #[test]
    fn internal_ranges_include_nat64_6to4_mapped_compatible_and_reserved() {
        for internal in [
            "0.1.2.3",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "239.1.2.3",
            "192.0.0.8",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "ff02::1",
            "fec0::1",
            "2001:db8::1",
            "2001::1",
            "100::1",
        ] {
            let ip: IpAddr = internal.parse().expect("an address");
            assert!(is_internal(ip), "{internal} must be internal");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "198.20.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = public.parse().expect("an address");
            assert!(!is_internal(ip), "{public} is public");
        }
    }

    /// Answers a public address first, then loopback: DNS rebinding.
    #[derive(Debug, Default)]
    struct Rebinding {
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Resolver for Rebinding {
        fn resolve<'a>(
            &'a self,
            _host: &'a str,
            port: u16,
        ) -> futures::future::BoxFuture<'a, std::io::Result<Vec<SocketAddr>>> {
            let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let ip: IpAddr = if call == 0 {
                "93.184.216.34".parse().expect("ip")
            } else {
                "127.0.0.1".parse().expect("ip")
            };
            Box::pin(async move { Ok(vec![SocketAddr::new(ip, port)]) })
        }
    }

    #[tokio::test]
    async fn a_rebinding_resolver_is_asked_once_and_the_checked_address_is_used() {
        let resolver = Rebinding::default();
        let targets = checked_targets("http://hooks.example.com:8080/x", false, &resolver)
            .await
            .expect("the first answer is public");
        assert_eq!(targets, vec!["93.184.216.34:8080".parse().expect("addr")]);
        assert_eq!(
            resolver.calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "resolved once: the connection goes to `targets`, not to a second answer"
        );
        // The second answer (what a second lookup would connect to) is refused.
        let second = checked_targets("http://hooks.example.com:8080/x", false, &resolver).await;
        assert!(second.is_err(), "{second:?}");
    }
}
