//! Billing events for the platform: `invoice.issued` (and, as they come,
//! `credit_note.issued` and `customer.spend_limit_reached`), queued in the
//! ledger's outbox in the transaction that issued the document, then
//! delivered at least once to a signed webhook and/or a Kafka topic.
//!
//! Each event carries its delivery id (`id`, also the `Idlemeter-Delivery`
//! header and the Kafka key): the same on every retry, so a receiver acts
//! once per id. A failed delivery is retried with exponential backoff
//! (`retry_initial` doubling up to `retry_max`), the attempts and the last
//! error kept on the outbox row; nothing is dropped.

use std::future::Future;
use std::time::Duration;

use idlemeter_ledger::{Ledger, BILLING_EVENTS_TOPIC};
use idlemeter_webhook::WebhookSender;

use crate::Result;

/// Publishes to the billing events topic (see
/// `idlemeter_bus::KafkaSettings::publisher`).
pub use idlemeter_core::publish::Publisher;

/// Delivers due billing events from the ledger's outbox.
#[derive(Clone)]
pub struct EventDelivery {
    ledger: Ledger,
    webhook: Option<WebhookSender>,
    publish: Option<Publisher>,
    retry: (Duration, Duration),
}

impl std::fmt::Debug for EventDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventDelivery")
            .field("webhook", &self.webhook)
            .field("kafka", &self.publish.is_some())
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// What one pass delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryPass {
    pub delivered: usize,
    pub failed: usize,
}

impl EventDelivery {
    /// Delivers nothing until given a webhook or a publisher; retries after
    /// 1 s, doubling up to 5 min.
    pub fn new(ledger: Ledger) -> Self {
        Self {
            ledger,
            webhook: None,
            publish: None,
            retry: (Duration::from_secs(1), Duration::from_secs(300)),
        }
    }

    pub fn with_webhook(mut self, webhook: WebhookSender) -> Self {
        self.webhook = Some(webhook);
        self
    }

    pub fn with_publisher(mut self, publish: Publisher) -> Self {
        self.publish = Some(publish);
        self
    }

    pub fn with_retry(mut self, initial: Duration, max: Duration) -> Self {
        self.retry = (initial, max.max(initial));
        self
    }

    /// Whether any sink is configured.
    pub fn delivers(&self) -> bool {
        self.webhook.is_some() || self.publish.is_some()
    }

    /// Delivers every due event once (each to every sink); a failure is
    /// recorded and retried later.
    pub async fn deliver_due(&self) -> Result<DeliveryPass> {
        let mut pass = DeliveryPass::default();
        if !self.delivers() {
            return Ok(pass);
        }
        loop {
            let due = self.ledger.due(BILLING_EVENTS_TOPIC, 100).await?;
            if due.is_empty() {
                return Ok(pass);
            }
            for item in due {
                let body = serde_json::to_vec(&item.payload).unwrap_or_default();
                match self.send(&item.key, body).await {
                    Ok(()) => {
                        self.ledger.delivered(&[item.id]).await?;
                        pass.delivered += 1;
                    }
                    Err(error) => {
                        let attempts = self
                            .ledger
                            .attempt_failed(item.id, &error, self.retry)
                            .await?;
                        tracing::warn!(event = %item.key, attempts, %error, "billing event not delivered; retrying later");
                        pass.failed += 1;
                    }
                }
            }
            if pass.failed > 0 {
                // Failed ones are not due again yet: stop this pass.
                return Ok(pass);
            }
        }
    }

    async fn send(&self, id: &str, body: Vec<u8>) -> std::result::Result<(), String> {
        if let Some(webhook) = &self.webhook {
            webhook
                .post(id, body.clone(), chrono::Utc::now().timestamp())
                .await
                .map_err(|error| format!("webhook: {error}"))?;
        }
        if let Some(publish) = &self.publish {
            publish(vec![(id.to_owned(), body)])
                .await
                .map_err(|error| format!("kafka: {error}"))?;
        }
        Ok(())
    }

    /// Delivers due events every `every` until `shutdown` completes.
    pub async fn run_until_stopped(self, every: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            if let Err(error) = self.deliver_due().await {
                tracing::warn!(%error, "billing event delivery pass failed; retrying");
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// Queues `customer.spend_limit_reached` for every customer whose record
/// has a spend limit and whose spend in their latest rated period (the
/// newest figure, final or live: what spend alerts compare) reached it,
/// once per customer and period. Returns how many were queued now.
pub async fn check_spend_limits(
    ledger: &idlemeter_ledger::Ledger,
    store: &idlemeter_store::Store,
    issuer: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<usize, crate::Error> {
    let mut queued = 0;
    for record in store.customers_with_spend_limits(issuer).await? {
        let limit = idlemeter_store::from_column(record.spend_limit)?;
        let Some(figure) = store.latest_spend(&record.id).await? else {
            continue;
        };
        if figure.spend < limit {
            continue;
        }
        let period_start =
            chrono::DateTime::from_timestamp(i64::from(figure.period_start), 0).unwrap_or_default();
        let event = idlemeter_ledger::BillingEvent::spend_limit_reached(
            issuer,
            &record.id,
            period_start,
            (
                figure.spend.normalize(),
                limit.normalize(),
                &record.currency,
            ),
            now,
        );
        if ledger.queue_event_once(&event).await? {
            tracing::info!(customer = %record.id, spend = %figure.spend, %limit, "spend limit reached");
            queued += 1;
        }
    }
    Ok(queued)
}
