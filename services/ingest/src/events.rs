//! Usage events: Kafka `usage.events` -> ClickHouse `usage_events` and
//! `meter_values`, exactly once by the same rule as samples: offsets are
//! committed only after ClickHouse acknowledged the batch's rows, and a
//! replayed batch writes identical rows that collapse on (source, id).
//!
//! The API validated every event against the meters before producing it;
//! ingest derives each meter's value with the same function. A message that
//! is not an event (a producer other than the API) is dead-lettered with the
//! reason, and the rest of its batch is stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idlemeter_bus::{
    GroupConsumer, KafkaSettings, Topics, DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER,
};
use idlemeter_core::events::{Meters, UsageEvent};
use idlemeter_store::{EventRow, MeterValueRow, Store};
use prometheus::{IntCounter, Registry};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::{Error, IngestConfig, Result};

/// Counters of the events path.
#[derive(Debug, Clone)]
struct EventMetrics {
    consumed: IntCounter,
    stored: IntCounter,
    meter_values: IntCounter,
    dead_letters: IntCounter,
    insert_failures: IntCounter,
}

impl EventMetrics {
    fn register(registry: &Registry) -> Result<Self> {
        let counter = |name, help| idlemeter_telemetry::counter(registry, name, help);
        Ok(Self {
            consumed: counter(
                "idlemeter_ingest_events_consumed_total",
                "usage events read from the events topic",
            )?,
            stored: counter(
                "idlemeter_ingest_events_stored_total",
                "usage events acknowledged by ClickHouse (a replayed one counts again)",
            )?,
            meter_values: counter(
                "idlemeter_ingest_meter_values_stored_total",
                "meter values derived from events and acknowledged by ClickHouse",
            )?,
            dead_letters: counter(
                "idlemeter_ingest_event_dead_letters_total",
                "messages on the events topic that were not events, dead-lettered",
            )?,
            insert_failures: counter(
                "idlemeter_ingest_event_insert_failures_total",
                "failed inserts of events (retried)",
            )?,
        })
    }
}

/// The events path of ingest.
pub struct EventIngest {
    consumer: Arc<GroupConsumer>,
    producer: FutureProducer,
    store: Store,
    topics: Topics,
    meters: Meters,
    config: IngestConfig,
    metrics: EventMetrics,
}

impl std::fmt::Debug for EventIngest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EventIngest")
            .field("topic", &self.topics.events)
            .field("meters", &self.meters.meters.len())
            .finish()
    }
}

#[derive(Default)]
struct EventBatch {
    events: Vec<EventRow>,
    values: Vec<MeterValueRow>,
    dead: Vec<(String, i32, i64, Vec<u8>, String)>,
    /// Next offset to commit per partition.
    next: HashMap<(String, i32), i64>,
}

impl EventIngest {
    /// Consumes `topics.events` in group `<group_id>.events`.
    pub fn build(
        kafka: &KafkaSettings,
        store: Store,
        topics: Topics,
        config: IngestConfig,
        meters: Meters,
        registry: &Registry,
    ) -> Result<Self> {
        let client_id = format!("idlemeter-ingest-events-{}", std::process::id());
        let consumer = kafka.consumer(&client_id, &format!("{}.events", config.group_id))?;
        consumer
            .subscribe(&[topics.events.as_str()])
            .map_err(|source| Error::Kafka {
                context: "subscribe to the events topic",
                source,
            })?;
        Ok(Self {
            consumer: Arc::new(consumer),
            producer: kafka.producer(&client_id)?,
            store,
            topics,
            meters,
            config,
            metrics: EventMetrics::register(registry)?,
        })
    }

    /// Consumes, stores and commits until `shutdown`. A batch caught by
    /// shutdown before its commit is replayed by the next owner.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let stop = idlemeter_telemetry::stop_on(shutdown);
        tracing::info!(topic = %self.topics.events, meters = self.meters.meters.len(), "event ingest started");
        while !stop.is_cancelled() {
            let batch = self.collect(&stop).await;
            if batch.next.is_empty() {
                continue;
            }
            if !self.flush(batch, &stop).await {
                break;
            }
        }
        Ok(())
    }

    async fn collect(&self, stop: &CancellationToken) -> EventBatch {
        let mut batch = EventBatch::default();
        let max_wait = Duration::from_millis(self.config.batch_max_wait_ms);
        let mut deadline: Option<tokio::time::Instant> = None;
        while batch.events.len() + batch.dead.len() < self.config.batch_max_samples {
            let wait_until = deadline.unwrap_or_else(|| tokio::time::Instant::now() + max_wait);
            tokio::select! {
                received = self.consumer.recv() => match received {
                    Ok(message) => {
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_wait);
                        self.metrics.consumed.inc();
                        let payload = message.payload().unwrap_or_default();
                        let (topic, partition, offset) =
                            (message.topic().to_owned(), message.partition(), message.offset());
                        batch.next.insert((topic.clone(), partition), offset + 1);
                        match self.decode(payload) {
                            Ok((event, values)) => {
                                batch.events.push(event);
                                batch.values.extend(values);
                            }
                            Err(reason) => batch.dead.push((topic, partition, offset, payload.to_vec(), reason)),
                        }
                    }
                    Err(error) => tracing::warn!(%error, "kafka consume error (events)"),
                },
                _ = tokio::time::sleep_until(wait_until) => break,
                _ = stop.cancelled() => break,
            }
        }
        batch
    }

    fn decode(
        &self,
        payload: &[u8],
    ) -> std::result::Result<(EventRow, Vec<MeterValueRow>), String> {
        let event: UsageEvent = serde_json::from_slice(payload)
            .map_err(|error| format!("not a usage event: {error}"))?;
        let mut values = Vec::new();
        for meter in self
            .meters
            .meters
            .iter()
            .filter(|meter| meter.event_type == event.event_type)
        {
            // The API refused events a meter cannot read; one that slipped
            // through (another producer, a meter changed since) is stored
            // without that meter's value and said so.
            match meter.value_of(&event).and_then(|value| {
                MeterValueRow::of(&event, meter, value)
                    .map_err(|error| (String::new(), error.to_string()))
            }) {
                Ok(row) => values.push(row),
                Err((field, reason)) => tracing::warn!(
                    meter = %meter.slug, source = %event.source, id = %event.id, %field, %reason,
                    "event stored without this meter's value"
                ),
            }
        }
        Ok((EventRow::of(&event), values))
    }

    /// Dead letters, insert, commit; each retried until it succeeds or
    /// shutdown comes (false: nothing committed, the batch replays).
    async fn flush(&self, batch: EventBatch, stop: &CancellationToken) -> bool {
        let mut backoff = crate::Backoff::new(&self.config);
        for (topic, partition, offset, payload, reason) in &batch.dead {
            let source = format!("{topic}/{partition}/{offset}");
            loop {
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: DEAD_LETTER_REASON_HEADER,
                        value: Some(reason.as_bytes()),
                    })
                    .insert(Header {
                        key: DEAD_LETTER_SOURCE_HEADER,
                        value: Some(source.as_bytes()),
                    });
                let record = FutureRecord::<(), _>::to(&self.topics.samples_dead_letter)
                    .payload(payload)
                    .headers(headers);
                match self.producer.send(record, Duration::from_secs(10)).await {
                    Ok(_) => {
                        self.metrics.dead_letters.inc();
                        tracing::warn!(%source, %reason, "event dead-lettered");
                        break;
                    }
                    Err((error, _)) => {
                        tracing::warn!(%error, "dead letter failed; retrying");
                        if !backoff.wait(stop).await {
                            return false;
                        }
                    }
                }
            }
        }
        loop {
            match self.store.insert_events(&batch.events, &batch.values).await {
                Ok(()) => break,
                Err(error) => {
                    self.metrics.insert_failures.inc();
                    tracing::warn!(%error, events = batch.events.len(), "event insert failed; retrying");
                    if !backoff.wait(stop).await {
                        return false;
                    }
                }
            }
        }
        self.metrics.stored.inc_by(batch.events.len() as u64);
        self.metrics.meter_values.inc_by(batch.values.len() as u64);
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in &batch.next {
            if offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*next))
                .is_err()
            {
                return true;
            }
        }
        if let Err(error) = self.consumer.commit(&offsets, CommitMode::Sync) {
            // Stored and not committed: the batch replays and collapses.
            tracing::warn!(%error, "event offset commit failed; the batch will be replayed");
        }
        true
    }
}
