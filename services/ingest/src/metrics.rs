//! Prometheus metrics of ingest, all named `idlemeter_ingest_*`.

use std::sync::Arc;
use std::time::Duration;

use idlemeter_bus::GroupConsumer;
use idlemeter_telemetry::{counter, gauge, histogram};
use prometheus::{Histogram, IntCounter, IntGauge, Registry};
use tokio_util::sync::CancellationToken;

/// Every metric ingest exports.
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    pub messages_consumed: IntCounter,
    pub samples_consumed: IntCounter,
    pub samples_rejected: IntCounter,
    pub samples_inserted: IntCounter,
    pub minutes_inserted: IntCounter,
    pub compact_duplicates: IntCounter,
    pub samples_missing: IntCounter,
    pub compact_late: IntCounter,
    pub compact_refused: IntCounter,
    pub series_ended: IntCounter,
    pub series_held: IntGauge,
    pub dead_letters: IntCounter,
    pub dead_letters_dropped: IntCounter,
    pub rows_dead_lettered: IntCounter,
    pub consume_errors: IntCounter,
    pub messages_not_held: IntCounter,
    pub offsets_skipped: IntCounter,
    pub insert_failures: IntCounter,
    pub commit_failures: IntCounter,
    pub batches_committed: IntCounter,
    pub batch_samples: Histogram,
    pub insert_seconds: Histogram,
    pub end_to_end_seconds: Histogram,
    pub lag_messages: IntGauge,
}

impl IngestMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let seconds = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let lag_messages = gauge(
            registry,
            "idlemeter_ingest_lag_messages",
            "messages not yet consumed on the assigned partitions (high watermark - position)",
        )?;
        let series_held = gauge(
            registry,
            "idlemeter_ingest_series_held",
            "series (sandbox epochs) whose compaction state this process holds",
        )?;
        Ok(Self {
            series_held,
            minutes_inserted: counter(
                registry,
                "idlemeter_ingest_minutes_inserted_total",
                "sandbox-minute rows acknowledged by clickhouse (replays included)",
            )?,
            compact_duplicates: counter(
                registry,
                "idlemeter_ingest_compact_duplicates_total",
                "samples received twice while their series was held (dropped)",
            )?,
            compact_late: counter(
                registry,
                "idlemeter_ingest_compact_late_total",
                "samples older than their series' newest (kept as they are)",
            )?,
            samples_missing: counter(
                registry,
                "idlemeter_ingest_samples_missing_total",
                "samples a seq jump skipped when the next arrived (lost on the node or in transit; one arriving later also counts as late)",
            )?,
            compact_refused: counter(
                registry,
                "idlemeter_ingest_compact_refused_total",
                "samples rating will refuse (kept with their neighbours)",
            )?,
            series_ended: counter(
                registry,
                "idlemeter_ingest_series_ended_total",
                "series ended by a new epoch or by silence",
            )?,
            messages_consumed: counter(
                registry,
                "idlemeter_ingest_messages_consumed_total",
                "kafka messages consumed",
            )?,
            samples_consumed: counter(
                registry,
                "idlemeter_ingest_samples_consumed_total",
                "valid samples decoded",
            )?,
            samples_rejected: counter(
                registry,
                "idlemeter_ingest_samples_rejected_total",
                "samples refused by validation",
            )?,
            samples_inserted: counter(
                registry,
                "idlemeter_ingest_samples_inserted_total",
                "kept sample rows acknowledged by clickhouse (replays included)",
            )?,
            dead_letters: counter(
                registry,
                "idlemeter_ingest_dead_letters_total",
                "messages sent to the dead-letter topic",
            )?,
            dead_letters_dropped: counter(
                registry,
                "idlemeter_ingest_dead_letters_dropped_total",
                "dead letters the broker refused even without their payload (logged with their source offset)",
            )?,
            rows_dead_lettered: counter(
                registry,
                "idlemeter_ingest_rows_dead_lettered_total",
                "rows clickhouse refused for good, alone, sent to the dead-letter topic as JSON",
            )?,
            consume_errors: counter(
                registry,
                "idlemeter_ingest_consume_errors_total",
                "kafka consume errors",
            )?,
            messages_not_held: counter(
                registry,
                "idlemeter_ingest_messages_not_held_total",
                "messages of partitions revoked before they were handled, left to the partition's owner",
            )?,
            offsets_skipped: counter(
                registry,
                "idlemeter_ingest_offsets_skipped_total",
                "offsets the broker skipped when a partition was assigned at the group's commit: samples lost to ingest (see the error logged)",
            )?,
            insert_failures: counter(
                registry,
                "idlemeter_ingest_insert_failures_total",
                "failed clickhouse inserts (transient ones retried, permanent ones split)",
            )?,
            commit_failures: counter(
                registry,
                "idlemeter_ingest_commit_failures_total",
                "failed offset commits (batch replays)",
            )?,
            batches_committed: counter(
                registry,
                "idlemeter_ingest_batches_committed_total",
                "batches whose offsets were committed",
            )?,
            batch_samples: histogram(
                registry,
                "idlemeter_ingest_batch_samples",
                "samples consumed per flushed batch",
                prometheus::exponential_buckets(1.0, 4.0, 10)?,
            )?,
            insert_seconds: histogram(
                registry,
                "idlemeter_ingest_insert_seconds",
                "clickhouse insert latency",
                seconds.clone(),
            )?,
            end_to_end_seconds: histogram(
                registry,
                "idlemeter_ingest_end_to_end_seconds",
                "message produced to rows acknowledged",
                seconds,
            )?,
            lag_messages,
        })
    }

    /// Refreshes the lag gauge every 5 s until `stop`: for each partition this
    /// process owns, high watermark minus the group's committed offset (the low
    /// watermark before the first commit). A consumed message whose insert is
    /// still being retried counts as lag. Its broker round trips run on the
    /// blocking pool, beside the consuming loop, so it keeps reporting during a
    /// sink outage and never delays a batch.
    pub fn follow_lag(
        &self,
        consumer: &Arc<GroupConsumer>,
        lag: idlemeter_bus::LagReader,
        stop: CancellationToken,
    ) {
        let consumer = Arc::downgrade(consumer);
        idlemeter_telemetry::follow_gauge(
            self.lag_messages.clone(),
            Duration::from_secs(5),
            move || lag.lag_of(&consumer).into(),
            stop.cancelled_owned(),
        );
    }
}
