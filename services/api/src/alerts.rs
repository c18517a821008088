//! Spend alert delivery: every interval, each alert whose customer's rated
//! spend in their latest period reached its threshold, and that has not fired
//! for that period, is POSTed (signed, see `idlemeter-webhook`) to its
//! webhook; an acknowledged delivery is recorded in `spend_alert_firings`,
//! so an alert fires once per period. A failed delivery is retried at the
//! next check. Delivery is at least once: the `Idlemeter-Delivery` header
//! (`<alert id>:<period start>`) is the same on every attempt, for receivers
//! to act once.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use idlemeter_store::{from_column, to_column, unix_seconds, AlertFiringRow, Store};
use idlemeter_webhook::WebhookSender;
use prometheus::{IntCounter, Registry};
use serde::Serialize;

/// The webhook's JSON body.
#[derive(Debug, Serialize)]
pub struct AlertNotice {
    pub alert_id: String,
    pub customer: String,
    pub threshold: String,
    pub spend: String,
    pub period_start: chrono::DateTime<chrono::Utc>,
    pub as_of: chrono::DateTime<chrono::Utc>,
}

/// Checks alerts and delivers their notices.
#[derive(Debug)]
pub struct AlertDelivery {
    store: Store,
    secret: String,
    fired: IntCounter,
    failed: IntCounter,
}

impl AlertDelivery {
    pub fn new(store: Store, secret: String, registry: &Registry) -> Self {
        let fired = IntCounter::new(
            "idlemeter_api_alerts_fired_total",
            "Spend alerts delivered.",
        )
        .expect("valid metric");
        let failed = IntCounter::new(
            "idlemeter_api_alert_delivery_failures_total",
            "Spend alert deliveries that failed (retried at the next check).",
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(fired.clone()));
        let _ = registry.register(Box::new(failed.clone()));
        Self {
            store,
            secret,
            fired,
            failed,
        }
    }

    /// One pass over every alert; returns how many fired.
    pub async fn check_once(&self) -> Result<usize, idlemeter_store::Error> {
        let alerts = self.store.spend_alerts(None).await?;
        let fired: HashSet<(String, String, u32)> = self
            .store
            .alert_firings()
            .await?
            .into_iter()
            .map(|row| (row.customer, row.alert_id, row.period_start))
            .collect();
        let mut delivered = 0;
        let mut spend_of = std::collections::HashMap::new();
        for alert in alerts.iter().filter(|alert| alert.deleted == 0) {
            if !spend_of.contains_key(&alert.customer) {
                let spend = self.store.latest_spend(&alert.customer).await?;
                spend_of.insert(alert.customer.clone(), spend);
            }
            let Some(Some(spend)) = spend_of.get(&alert.customer) else {
                continue;
            };
            let threshold = from_column(alert.threshold)?;
            let key = (
                alert.customer.clone(),
                alert.alert_id.clone(),
                spend.period_start,
            );
            if spend.total < threshold || fired.contains(&key) {
                continue;
            }
            let notice = AlertNotice {
                alert_id: alert.alert_id.clone(),
                customer: alert.customer.clone(),
                threshold: threshold.normalize().to_string(),
                spend: spend.total.normalize().to_string(),
                period_start: crate::views::time(spend.period_start),
                as_of: crate::views::time(spend.as_of),
            };
            let body = serde_json::to_vec(&notice).expect("a notice serialises");
            let delivery_id = format!("{}:{}", alert.alert_id, spend.period_start);
            let now = chrono::Utc::now();
            let sent = match WebhookSender::new(&alert.webhook_url, &self.secret) {
                Ok(sender) => sender.post(&delivery_id, body, now.timestamp()).await,
                Err(error) => Err(error),
            };
            match sent {
                Ok(()) => {
                    self.store
                        .insert_alert_firing(&AlertFiringRow {
                            customer: alert.customer.clone(),
                            alert_id: alert.alert_id.clone(),
                            period_start: spend.period_start,
                            spend: to_column(spend.total)?,
                            fired_at: unix_seconds(now),
                        })
                        .await?;
                    self.fired.inc();
                    delivered += 1;
                    tracing::info!(alert = %alert.alert_id, customer = %alert.customer, spend = %spend.total, "spend alert delivered");
                }
                Err(error) => {
                    self.failed.inc();
                    tracing::warn!(alert = %alert.alert_id, customer = %alert.customer, %error, "spend alert delivery failed; retrying at the next check");
                }
            }
        }
        Ok(delivered)
    }

    /// Checks every `interval` until `shutdown`.
    pub async fn run_until_stopped(&self, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            if let Err(error) = self.check_once().await {
                tracing::warn!(%error, "checking spend alerts failed; retrying at the next check");
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
