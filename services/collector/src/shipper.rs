//! Drains the spool to Kafka `usage.samples`, oldest batch first, one at a time.
//!
//! A batch leaves the spool only when the broker acknowledged it (acks=all,
//! idempotent producer), and the next one is sent only after that, so a node's
//! batches reach its partition in order. A failed send keeps the batch, backs
//! off (doubling up to 5 s) and retries; the producer is rebuilt after a
//! failure so that no stuck client state outlives an outage. A batch whose ack
//! was lost may be sent twice: its samples carry the same identities, which
//! ingest collapses.

use std::sync::Arc;
use std::time::Duration;

use idlemeter_bus::KafkaSettings;
use idlemeter_core::NodeId;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::CollectorMetrics;
use crate::spool::Spool;
use crate::{Error, Result};

const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Everything the shipper needs.
#[derive(Debug)]
pub struct Shipper {
    pub kafka: KafkaSettings,
    pub topic: String,
    pub node: NodeId,
    pub send_timeout: Duration,
    pub spool: Arc<Spool>,
    pub spooled: Arc<Notify>,
    pub metrics: CollectorMetrics,
}

impl Shipper {
    fn build_producer(&self) -> Result<FutureProducer> {
        let mut kafka = self.kafka.clone();
        kafka
            .properties
            .entry("message.timeout.ms".to_owned())
            .or_insert_with(|| self.send_timeout.as_millis().to_string());
        Ok(kafka.producer(&format!("idlemeter-collector-{}", self.node))?)
    }

    /// Ships until `stop` is cancelled; what is left stays spooled for the next run.
    pub async fn run(self, stop: CancellationToken) -> Result<()> {
        let mut producer = self.build_producer()?;
        let mut backoff = FIRST_BACKOFF;
        let mut failing_since: Option<u64> = None;
        while !stop.is_cancelled() {
            let Some((batch_seq, payload)) = self.spool.oldest()? else {
                tokio::select! {
                    _ = self.spooled.notified() => {}
                    _ = stop.cancelled() => {}
                }
                continue;
            };
            match self.send(&producer, &payload).await {
                Ok(()) => {
                    self.spool.remove(batch_seq)?;
                    self.metrics.batches_sent.inc();
                    let (batches, bytes) = self.spool.backlog();
                    self.metrics.spool_batches.set(batches as i64);
                    self.metrics.spool_bytes.set(bytes as i64);
                    if let Some(first_failed) = failing_since.take() {
                        tracing::info!(
                            first_failed_batch = first_failed,
                            batch_seq,
                            backlog = batches,
                            "kafka reachable again: draining the spool"
                        );
                    }
                    backoff = FIRST_BACKOFF;
                }
                Err(error) => {
                    self.metrics.send_failures.inc();
                    if failing_since.is_none() {
                        tracing::warn!(batch_seq, %error, "sending to kafka failed: batches stay spooled and are retried");
                        failing_since = Some(batch_seq);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    producer = self.build_producer()?;
                }
            }
        }
        Ok(())
    }

    async fn send(&self, producer: &FutureProducer, payload: &[u8]) -> Result<()> {
        let record = FutureRecord::to(&self.topic)
            .key(self.node.as_str())
            .payload(payload);
        let delivery = producer.send(record, self.send_timeout);
        match tokio::time::timeout(self.send_timeout + Duration::from_secs(1), delivery).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((source, _))) => Err(Error::Kafka {
                context: format!("producing to {}", self.topic),
                source,
            }),
            Err(_) => Err(Error::SendTimedOut {
                topic: self.topic.clone(),
            }),
        }
    }
}
