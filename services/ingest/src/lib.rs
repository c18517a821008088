//! Ingest: Kafka `usage.samples` → ClickHouse, compacted, exactly once.
//!
//! The loop is source → compaction → sink with end-to-end acknowledgement:
//! 1. consume node batches until the batch is full or its time is up, feeding
//!    every good sample to its partition's compactor
//!    ([`idlemeter_core::compact`]), which decides which samples rating needs
//!    (`usage_samples`) and closes sandbox-minutes (`usage_minutes`);
//! 2. dead-letter what cannot be used (with the reason in a header) and wait for
//!    the broker to acknowledge the dead letters;
//! 3. insert the decided rows and wait for ClickHouse to acknowledge them;
//! 4. only then commit, per partition, the earliest offset the compactor still
//!    needs (see `partitions.rs`).
//!
//! Steps 2-4 of one batch run while the next batch is consumed (step 1);
//! batches are flushed one at a time, in order.
//!
//! A crash anywhere before step 4 replays from the committed offsets; replayed
//! rows are identical or are more samples of the same series, and collapse or
//! combine in ClickHouse (migrations 0001 and 0010), so a replay changes no
//! window and no bill. While ClickHouse is down, step 3 retries with backoff
//! and at most one further batch is consumed: backpressure, with memory
//! bounded by the compaction state (two samples and a minute per series), two
//! batches' rows and librdkafka's bounded prefetch.

mod admission;
mod batch;
pub mod events;
mod metrics;
mod partitions;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idlemeter_bus::{GroupConsumer, KafkaSettings, Topics};
use idlemeter_core::{CompactRule, Compacted};
use idlemeter_store::{ClickHouseSettings, Store};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::TopicPartitionList;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub use admission::{Admission, AllowedCustomers};
pub use batch::{cap_reason, refusal_reason, Batch, DeadLetter, MAX_REASON_BYTES};
pub use metrics::IngestMetrics;
use partitions::Partitions;

/// Errors that stop ingest (transient sink errors are retried, not returned).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] idlemeter_bus::Error),
    #[error("kafka {context}: {source}")]
    Kafka {
        context: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Tuning of the ingest loop; every field has a production default.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Consumer group; ingest processes sharing it share the partitions.
    pub group_id: String,
    /// Flush when this many samples were consumed since the last flush...
    pub batch_max_samples: usize,
    /// ...or when the oldest message since then is this old. Each flush is
    /// one insert per table: ClickHouse wants about one a second.
    pub batch_max_wait_ms: u64,
    /// Keep only the samples rating needs (true), or every sample (false).
    /// What rating needs depends on the price sheet and idle policy in
    /// force ([`Ingest::compact_rule`]; `idlemeter ingest` reads them from
    /// the `[rater]` settings).
    pub compact: bool,
    /// A series that received nothing for this long is ended: its last
    /// samples and its open minute are written, and its offsets released.
    pub quiet_series_ms: u64,
    /// First retry delay after a failed insert; doubles up to `retry_max_backoff_ms`.
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    /// Samples taken longer ago than this (by ingest's clock) are
    /// dead-lettered: a broken clock or a forged batch cannot spread one
    /// insert over more monthly partitions than ClickHouse accepts. The
    /// default (400 days) keeps a year of late data.
    pub max_sample_age_s: u64,
    /// Samples stamped further than this in the future are dead-lettered.
    pub max_sample_ahead_s: u64,
    /// Which customers each node may report (see `admission.rs`); empty:
    /// any node, any customer.
    pub allowed_customers: AllowedCustomers,
    /// Rows of one batch ClickHouse may refuse for good, one by one, before
    /// ingest stops dead-lettering them and retries the whole batch
    /// instead: many refused rows mean a server or schema problem, not
    /// poison, and must not empty the stream into the dead-letter topic.
    pub max_refused_rows: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            group_id: "idlemeter-ingest".to_owned(),
            batch_max_samples: 1_000_000,
            batch_max_wait_ms: 1_000,
            compact: true,
            quiet_series_ms: 90_000,
            retry_initial_backoff_ms: 100,
            retry_max_backoff_ms: 10_000,
            max_sample_age_s: 400 * 86_400,
            max_sample_ahead_s: 600,
            allowed_customers: AllowedCustomers::default(),
            max_refused_rows: 100,
        }
    }
}

/// A running ingest worker: one consumer-group member and its sink.
pub struct Ingest {
    consumer: Arc<GroupConsumer>,
    dead_letter_producer: FutureProducer,
    store: Store,
    topics: Topics,
    config: IngestConfig,
    metrics: IngestMetrics,
    rule: CompactRule,
    lag_reader: Option<idlemeter_bus::LagReader>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("topics", &self.topics)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Ingest {
    /// Connects (lazily) to Kafka and ClickHouse and registers metrics in `registry`.
    pub fn build(
        kafka: &KafkaSettings,
        clickhouse: &ClickHouseSettings,
        topics: Topics,
        config: IngestConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self> {
        let client_id = format!("idlemeter-ingest-{}", std::process::id());
        let consumer = kafka.consumer(&client_id, &config.group_id)?;
        let lag_reader = kafka.lag_reader(&config.group_id)?;
        consumer
            .subscribe(&[topics.samples.as_str()])
            .map_err(|source| Error::Kafka {
                context: "subscribe",
                source,
            })?;
        Ok(Self {
            consumer: Arc::new(consumer),
            dead_letter_producer: kafka.producer(&client_id)?,
            store: Store::new(clickhouse),
            topics,
            config,
            metrics: IngestMetrics::register(registry)?,
            rule: CompactRule::default(),
            lag_reader: Some(lag_reader),
        })
    }

    /// What compaction must keep: by default what any price sheet needs;
    /// [`CompactRule::for_sheets`] keeps less where the sheets in force
    /// allow it, [`CompactRule::KEEP_ALL`] keeps every sample.
    pub fn compact_rule(mut self, rule: CompactRule) -> Self {
        self.rule = rule;
        self
    }

    /// Consumes, inserts and commits until `shutdown` completes. A batch caught
    /// half-way by shutdown is left uncommitted and will be replayed.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let stop = idlemeter_telemetry::stop_on(shutdown);
        tracing::info!(topic = %self.topics.samples, group = %self.config.group_id, "ingest started");
        if let Some(lag) = self.lag_reader.take() {
            self.metrics.follow_lag(&self.consumer, lag, stop.clone());
        }
        let rule = if self.config.compact {
            self.rule
        } else {
            CompactRule::KEEP_ALL
        };
        tracing::info!(
            keep_all = rule.keeps_all(),
            separates_use = rule.separates_use(),
            "compaction rule"
        );
        let mut partitions = Partitions::new(&self.topics.samples, rule);
        let mut admission = Admission::new(
            self.config.max_sample_age_s,
            self.config.max_sample_ahead_s,
            self.config.allowed_customers.clone(),
        );
        // One flush runs while the next batch is consumed and compacted: the
        // two halves of the work overlap, and flushes still run one at a
        // time, in order, so a batch's offsets are committed only after every
        // earlier batch's rows are acknowledged.
        let this = Arc::new(self);
        let mut in_flight: Option<tokio::task::JoinHandle<bool>> = None;
        // Time spent blocked behind a slow flush (ClickHouse down) does not
        // count as silence of the series: the clock of arrivals and of the
        // quiet check stops while ingest cannot consume.
        let mut clock = QuietClock::default();
        while !stop.is_cancelled() {
            let mut batch = this
                .collect_batch(&mut partitions, &mut admission, &clock, &stop)
                .await;
            // Offsets are committed only for partitions still owned.
            this.drop_revoked(&mut partitions);
            let quiet_since = clock.now_ms() - this.config.quiet_series_ms as i64;
            let ended = partitions.end_quiet(quiet_since, batch.rows_mut());
            if !ended.is_empty() {
                // Rare while a stream flows: a series is quiet when its
                // sandbox stopped, its node went, or its partition's fetch
                // stalled; which one is the first question after a gap.
                tracing::info!(
                    ?ended,
                    "quiet series ended: (partition, minute rows) written"
                );
            }
            this.observe_compaction(&mut partitions);
            if batch.is_empty() && batch.rows().is_empty() {
                continue;
            }
            let offsets = partitions.offsets_to_commit();
            if let Some(previous) = in_flight.take() {
                let waited = std::time::Instant::now();
                let flushed = previous.await.unwrap_or(false);
                clock.blocked_for(waited.elapsed());
                if !flushed {
                    break;
                }
            }
            let sink = Arc::clone(&this);
            let stop = stop.clone();
            in_flight = Some(tokio::spawn(async move {
                sink.flush(batch, offsets, &stop).await
            }));
        }
        if let Some(previous) = in_flight.take() {
            let _ = previous.await;
        }
        tracing::info!("ingest stopped");
        Ok(())
    }

    /// Gathers messages until the batch is full, its wait is over, or shutdown.
    async fn collect_batch(
        &self,
        partitions: &mut Partitions,
        admission: &mut Admission,
        clock: &QuietClock,
        stop: &CancellationToken,
    ) -> Batch {
        let mut batch = Batch::default();
        let max_wait = Duration::from_millis(self.config.batch_max_wait_ms);
        let mut deadline: Option<tokio::time::Instant> = None;
        while batch.sample_count() < self.config.batch_max_samples {
            let wait_until = deadline.unwrap_or_else(|| tokio::time::Instant::now() + max_wait);
            tokio::select! {
                received = self.consumer.recv() => match received {
                    Ok(message) => {
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_wait);
                        // State of a partition lost since the last message
                        // goes first: its next owner rebuilds it.
                        self.drop_revoked(partitions);
                        let Some(skipped) = self.consumer.context().admit(&message) else {
                            self.metrics.messages_not_held.inc();
                            continue;
                        };
                        self.metrics.offsets_skipped.inc_by(skipped);
                        batch.accept(&message, &self.metrics, partitions, admission, clock.now_ms());
                    }
                    Err(error) => {
                        tracing::warn!(%error, "kafka consume error");
                        self.metrics.consume_errors.inc();
                    }
                },
                _ = tokio::time::sleep_until(wait_until) => break,
                _ = stop.cancelled() => break,
            }
        }
        batch
    }

    /// Dead letters, insert, commit; each step retried until it succeeds. Returns
    /// false if shutdown interrupted it (nothing committed: the batch replays).
    async fn flush(
        &self,
        mut batch: Batch,
        offsets: TopicPartitionList,
        stop: &CancellationToken,
    ) -> bool {
        let span = tracing::info_span!(
            "flush",
            samples = batch.sample_count(),
            kept = batch.rows().samples.len(),
            minutes = batch.rows().minutes.len(),
            dead_letters = batch.dead_letters().len()
        );
        let _entered = span.enter();
        let dead_letter_count = batch.dead_letters().len() as u64;
        if !self.send_dead_letters(&mut batch, stop).await {
            return false;
        }
        self.metrics.dead_letters.inc_by(dead_letter_count);

        let mut backoff = Backoff::new(&self.config);
        loop {
            let started = std::time::Instant::now();
            match self.store.insert_compacted(batch.rows()).await {
                Ok(rows) => {
                    self.metrics
                        .insert_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.samples_inserted.inc_by(rows.samples);
                    self.metrics.minutes_inserted.inc_by(rows.minutes);
                    self.metrics
                        .batch_samples
                        .observe(batch.sample_count() as f64);
                    tracing::debug!(
                        samples = rows.samples,
                        minutes = rows.minutes,
                        "batch stored"
                    );
                    break;
                }
                Err(error) if error.is_permanent() => {
                    // Some row cannot be stored, however often it is sent:
                    // store everything else, dead-letter that row.
                    self.metrics.insert_failures.inc();
                    tracing::warn!(%error, "clickhouse refused the batch for good; splitting it to find the rows");
                    if !self.insert_splitting(&mut batch, stop).await {
                        return false;
                    }
                    break;
                }
                Err(error) => {
                    self.metrics.insert_failures.inc();
                    tracing::warn!(%error, "clickhouse insert failed, retrying");
                    if !backoff.wait(stop).await {
                        return false;
                    }
                }
            }
        }
        batch.observe_latency(&self.metrics);

        // Offsets only now, and only up to what compaction no longer needs
        // (taken when the batch was closed): everything before them is
        // durable downstream.
        // A partition revoked since the batch closed is its new owner's to
        // commit: an offset from here could pass samples it still holds.
        let offsets = self.consumer.context().held_only(&offsets);
        if offsets.count() == 0 {
            return true;
        }
        match self.consumer.commit(&offsets, CommitMode::Sync) {
            Ok(()) => self.metrics.batches_committed.inc(),
            Err(error) => {
                // Typically a rebalance took the partitions away: their new owner
                // replays from the last commit, and the rows collapse.
                self.metrics.commit_failures.inc();
                tracing::warn!(%error, "offset commit failed; the batch will be replayed");
            }
        }
        true
    }
}

impl Ingest {
    /// Sends the batch's dead letters, retrying transient errors; false if
    /// shutdown came first.
    async fn send_dead_letters(&self, batch: &mut Batch, stop: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(&self.config);
        loop {
            match batch
                .send_dead_letters(&self.dead_letter_producer, &self.topics.samples_dead_letter)
                .await
            {
                Ok(dropped) => {
                    self.metrics.dead_letters_dropped.inc_by(dropped);
                    return true;
                }
                Err(error) => {
                    tracing::warn!(%error, "dead-letter produce failed, retrying");
                    if !backoff.wait(stop).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Inserts the batch's rows in halves, and halves of halves, until each
    /// part is stored or is one row ClickHouse refuses for good; those rows
    /// are dead-lettered (as JSON, with ClickHouse's reason). Transient
    /// errors on the way are retried, and so is the whole batch once more
    /// than `max_refused_rows` rows are refused. False if shutdown came first.
    async fn insert_splitting(&self, batch: &mut Batch, stop: &CancellationToken) -> bool {
        let mut pending = vec![batch.rows().clone()];
        let mut refused = Vec::new();
        let mut backoff = Backoff::new(&self.config);
        while let Some(part) = pending.pop() {
            match self.store.insert_compacted(&part).await {
                Ok(rows) => {
                    self.metrics.samples_inserted.inc_by(rows.samples);
                    self.metrics.minutes_inserted.inc_by(rows.minutes);
                }
                Err(error)
                    if error.is_permanent() && refused.len() >= self.config.max_refused_rows =>
                {
                    // Past a handful of rows this is not poison but the
                    // server or the schema (a half-applied migration): keep
                    // everything, retry, and let the alert on insert
                    // failures bring a person.
                    self.metrics.insert_failures.inc();
                    tracing::error!(%error, refused = refused.len(), "clickhouse refuses many rows of one batch: treated as a server or schema problem, retrying the batch");
                    refused.clear();
                    pending = vec![batch.rows().clone()];
                    if !backoff.wait(stop).await {
                        return false;
                    }
                }
                Err(error) if error.is_permanent() => {
                    self.metrics.insert_failures.inc();
                    match split(part) {
                        Ok((first, second)) => {
                            pending.push(second);
                            pending.push(first);
                        }
                        Err(row) => refused.push(batch::row_dead_letter(
                            row,
                            &format!("clickhouse refused this row for good: {error}"),
                            &batch.message_ranges(),
                        )),
                    }
                }
                Err(error) => {
                    self.metrics.insert_failures.inc();
                    tracing::warn!(%error, "clickhouse insert failed, retrying");
                    pending.push(part);
                    if !backoff.wait(stop).await {
                        return false;
                    }
                }
            }
        }
        if refused.is_empty() {
            return true;
        }
        let count = refused.len() as u64;
        tracing::warn!(rows = count, "rows clickhouse refused are dead-lettered");
        batch.push_dead_letters(refused);
        if !self.send_dead_letters(batch, stop).await {
            return false;
        }
        self.metrics.rows_dead_lettered.inc_by(count);
        true
    }
}

/// Two halves of `part` (samples apart from minutes first), or its one row.
fn split(part: idlemeter_core::Compacted) -> Result<(Compacted, Compacted), Compacted> {
    let idlemeter_core::Compacted {
        mut samples,
        mut minutes,
    } = part;
    let rows = samples.len() + minutes.len();
    if rows <= 1 {
        return Err(Compacted { samples, minutes });
    }
    if !samples.is_empty() && !minutes.is_empty() {
        return Ok((
            Compacted {
                samples,
                minutes: Vec::new(),
            },
            Compacted {
                samples: Vec::new(),
                minutes,
            },
        ));
    }
    let second = Compacted {
        samples: samples.split_off(samples.len() / 2),
        minutes: minutes.split_off(minutes.len() / 2),
    };
    Ok((Compacted { samples, minutes }, second))
}

/// Wall-clock milliseconds less the time ingest spent blocked behind a
/// flush longer than a second: the clock series' silence is measured on.
#[derive(Debug, Default)]
struct QuietClock {
    blocked_ms: i64,
}

impl QuietClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() - self.blocked_ms
    }

    fn blocked_for(&mut self, waited: Duration) {
        let excess = waited.saturating_sub(Duration::from_secs(1));
        self.blocked_ms += i64::try_from(excess.as_millis()).unwrap_or(i64::MAX / 2);
    }
}

impl Ingest {
    /// Drops the compaction state of partitions revoked since the last call.
    fn drop_revoked(&self, partitions: &mut Partitions) {
        let revoked = self.consumer.context().take_revoked();
        if !revoked.is_empty() {
            let dropped = partitions.drop_revoked(&revoked);
            tracing::info!(dropped, "compaction state of revoked partitions dropped");
        }
    }

    fn observe_compaction(&self, partitions: &mut Partitions) {
        let stats = partitions.take_stats();
        self.metrics.compact_duplicates.inc_by(stats.duplicates);
        self.metrics.compact_late.inc_by(stats.late);
        self.metrics.samples_missing.inc_by(stats.missing);
        self.metrics.compact_refused.inc_by(stats.refused);
        self.metrics.series_ended.inc_by(stats.series_ended);
        self.metrics
            .series_held
            .set(i64::try_from(partitions.series_held()).unwrap_or(i64::MAX));
    }
}

/// Exponential backoff between retries of one step, cut short by shutdown.
pub(crate) struct Backoff {
    delay: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(config: &IngestConfig) -> Self {
        Self {
            delay: Duration::from_millis(config.retry_initial_backoff_ms),
            max: Duration::from_millis(config.retry_max_backoff_ms),
        }
    }

    /// Sleeps the current delay and doubles it; false if shutdown came first.
    pub(crate) async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(self.max);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = stop.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(samples: usize, minutes: usize) -> Compacted {
        let sample = idlemeter_core::jsonl::parse_sample(SAMPLE).expect("sample");
        let minute = idlemeter_core::compact_all([sample.clone()], CompactRule::KEEP_ALL)
            .minutes
            .remove(0);
        Compacted {
            samples: vec![sample; samples],
            minutes: vec![minute; minutes],
        }
    }

    const SAMPLE: &str = r#"{"ts": "2026-11-02T09:00:00Z", "customer": "acme", "node": "node-1", "sandbox": "s", "epoch": 1, "seq": 1, "state": "running", "vcpu": 2, "mem_bytes": 1024, "gpu_model": null, "gpu_count": 0, "disk_bytes": 0, "cpu_used_usec": 0, "mem_used_bytes": 0, "net_rx_bytes": 0, "net_tx_bytes": 0, "exec_sessions": 0, "open_conns": 0}"#;

    /// Splitting ends at single rows and loses none on the way.
    #[test]
    fn splitting_a_refused_insert_reaches_every_row_once() {
        let mut pending = vec![rows(5, 3)];
        let mut singles = 0;
        while let Some(part) = pending.pop() {
            match split(part) {
                Ok((first, second)) => {
                    assert!(!first.is_empty() && !second.is_empty());
                    pending.push(first);
                    pending.push(second);
                }
                Err(single) => {
                    assert_eq!(single.samples.len() + single.minutes.len(), 1);
                    singles += 1;
                }
            }
        }
        assert_eq!(singles, 8);
    }
}
