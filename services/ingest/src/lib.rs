//! Ingest: Kafka `usage.samples` → ClickHouse `usage_samples`, exactly once.
//!
//! The loop is source → batch → sink with end-to-end acknowledgement:
//! 1. consume node batches until the batch is full or its time is up;
//! 2. dead-letter what cannot be used (with the reason in a header) and wait for
//!    the broker to acknowledge the dead letters;
//! 3. insert the good samples and wait for ClickHouse to acknowledge the insert;
//! 4. only then commit the consumed offsets.
//!
//! A crash anywhere before step 4 replays the batch; replayed rows are identical
//! and collapse in ClickHouse (see migrations 0001 and 0002), so a replay changes
//! no rollup and no bill. While ClickHouse is down, step 3 retries with backoff
//! and nothing new is consumed: backpressure, with memory bounded by one batch
//! plus librdkafka's bounded prefetch.

mod batch;
mod metrics;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idlemeter_bus::{GroupConsumer, KafkaSettings, Topics};
use idlemeter_store::{ClickHouseSettings, Store};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::producer::FutureProducer;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub use batch::{Batch, DeadLetter};
pub use metrics::IngestMetrics;

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
    /// Flush when this many samples are pending...
    pub batch_max_samples: usize,
    /// ...or when the oldest pending message is this old.
    pub batch_max_wait_ms: u64,
    /// First retry delay after a failed insert; doubles up to `retry_max_backoff_ms`.
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            group_id: "idlemeter-ingest".to_owned(),
            batch_max_samples: 100_000,
            batch_max_wait_ms: 250,
            retry_initial_backoff_ms: 100,
            retry_max_backoff_ms: 10_000,
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
        })
    }

    /// Consumes, inserts and commits until `shutdown` completes. A batch caught
    /// half-way by shutdown is left uncommitted and will be replayed.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let stop = CancellationToken::new();
        let stop_on_shutdown = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop_on_shutdown.cancel();
        });
        tracing::info!(topic = %self.topics.samples, group = %self.config.group_id, "ingest started");
        self.metrics
            .follow_lag(Arc::clone(&self.consumer), stop.clone());
        while !stop.is_cancelled() {
            let batch = self.collect_batch(&stop).await;
            if batch.is_empty() {
                continue;
            }
            if !self.flush(batch, &stop).await {
                break;
            }
        }
        tracing::info!("ingest stopped");
        Ok(())
    }

    /// Gathers messages until the batch is full, its wait is over, or shutdown.
    async fn collect_batch(&self, stop: &CancellationToken) -> Batch {
        let mut batch = Batch::default();
        let max_wait = Duration::from_millis(self.config.batch_max_wait_ms);
        let mut deadline: Option<tokio::time::Instant> = None;
        while batch.sample_count() < self.config.batch_max_samples {
            let wait_until = deadline.unwrap_or_else(|| tokio::time::Instant::now() + max_wait);
            tokio::select! {
                received = self.consumer.recv() => match received {
                    Ok(message) => {
                        deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_wait);
                        batch.accept(&message, &self.metrics);
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
    async fn flush(&self, mut batch: Batch, stop: &CancellationToken) -> bool {
        let span = tracing::info_span!(
            "flush",
            samples = batch.sample_count(),
            dead_letters = batch.dead_letters().len()
        );
        let _entered = span.enter();
        let dead_letter_count = batch.dead_letters().len() as u64;
        let mut backoff = Backoff::new(&self.config);
        loop {
            match batch
                .send_dead_letters(&self.dead_letter_producer, &self.topics.samples_dead_letter)
                .await
            {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, "dead-letter produce failed, retrying");
                    if !backoff.wait(stop).await {
                        return false;
                    }
                }
            }
        }
        self.metrics.dead_letters.inc_by(dead_letter_count);

        let mut backoff = Backoff::new(&self.config);
        loop {
            let started = std::time::Instant::now();
            match self.store.insert_samples(batch.samples()).await {
                Ok(rows) => {
                    self.metrics
                        .insert_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.samples_inserted.inc_by(rows);
                    self.metrics.batch_samples.observe(rows as f64);
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

        // Offsets only now: everything in the batch is durable downstream.
        match self
            .consumer
            .commit(&batch.offsets_to_commit(), CommitMode::Sync)
        {
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

/// Exponential backoff between retries of one step, cut short by shutdown.
struct Backoff {
    delay: Duration,
    max: Duration,
}

impl Backoff {
    fn new(config: &IngestConfig) -> Self {
        Self {
            delay: Duration::from_millis(config.retry_initial_backoff_ms),
            max: Duration::from_millis(config.retry_max_backoff_ms),
        }
    }

    /// Sleeps the current delay and doubles it; false if shutdown came first.
    async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(self.max);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = stop.cancelled() => false,
        }
    }
}
