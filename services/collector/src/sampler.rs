//! One tick of the collector: read every sandbox, advance its counters, save
//! the state, spool the node batch. Blocking file I/O only, so it runs on its
//! own thread ([`run_sampler`]) and never stalls the async shipper or the
//! command consumer.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use idlemeter_core::{NodeId, UsageSample};
use idlemeter_proto::encode_node_batch;
use tokio::sync::{watch, Notify};

use crate::counters::{advance, to_sample};
use crate::metrics::CollectorMetrics;
use crate::reader::{SandboxReading, UsageReader};
use crate::spool::Spool;
use crate::state::CollectorState;
use crate::Result;

/// Current epoch of each sandbox by cgroup name, for judging commands.
pub type EpochIndex = Arc<HashMap<String, u64>>;

/// What one tick produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickReport {
    pub samples: usize,
    /// The spooled batch, `None` when the node had no sandbox.
    pub batch_seq: Option<u64>,
    pub dropped_batches: u64,
}

/// Turns readings into spooled node batches, keeping the counters.
#[derive(Debug)]
pub struct Sampler<R> {
    reader: R,
    node: NodeId,
    state: CollectorState,
    state_file: PathBuf,
    spool: Arc<Spool>,
    metrics: CollectorMetrics,
    epochs: watch::Sender<EpochIndex>,
    readings: Vec<SandboxReading>,
    /// The previous tick's readings (swapped, not copied): what a sandbox
    /// that vanished since looked like, for its final sample.
    previous_readings: Vec<SandboxReading>,
}

impl<R: UsageReader> Sampler<R> {
    /// Loads the saved state; batch numbering continues after both the state
    /// and whatever is still spooled.
    pub fn new(
        reader: R,
        node: NodeId,
        state_file: PathBuf,
        spool: Arc<Spool>,
        metrics: CollectorMetrics,
    ) -> Result<Self> {
        let mut state = CollectorState::load(&state_file)?;
        state.batch_seq = state.batch_seq.max(spool.last_batch_seq().unwrap_or(0));
        tracing::info!(sandboxes = state.sandboxes.len(), batch_seq = state.batch_seq, file = %state_file.display(), "collector state loaded");
        let (epochs, _) = watch::channel(EpochIndex::default());
        Ok(Self {
            reader,
            node,
            state,
            state_file,
            spool,
            metrics,
            epochs,
            readings: Vec::new(),
            previous_readings: Vec::new(),
        })
    }

    /// Follows the current epoch of every sandbox, updated each tick.
    pub fn epochs(&self) -> watch::Receiver<EpochIndex> {
        self.epochs.subscribe()
    }

    /// Reads the node once at `now` and spools the resulting batch.
    pub fn sample_once(&mut self, now: DateTime<Utc>) -> Result<TickReport> {
        std::mem::swap(&mut self.readings, &mut self.previous_readings);
        if let Err(error) = self.reader.read_node(&mut self.readings) {
            // Keep last tick's readings as "previous": nothing vanished.
            std::mem::swap(&mut self.readings, &mut self.previous_readings);
            return Err(error);
        }
        let (samples, counters) = self.advance_all(now);
        self.state.sandboxes = counters;
        self.metrics.sandboxes.set(samples.len() as i64);
        self.metrics
            .unlabelled_sandboxes
            .set(self.reader.unlabelled_sandboxes() as i64);
        self.publish_epochs();
        if samples.is_empty() {
            self.state.save(&self.state_file)?;
            return Ok(TickReport {
                samples: 0,
                batch_seq: None,
                dropped_batches: 0,
            });
        }
        self.state.batch_seq += 1;
        let batch_seq = self.state.batch_seq;
        // State first, then the batch: see state.rs for why this order.
        self.state.save(&self.state_file)?;
        let payload = encode_node_batch(&self.node, now, batch_seq, &samples);
        let appended = self.spool.append(batch_seq, &payload)?;
        self.record_spool(appended);
        self.metrics.samples.inc_by(samples.len() as u64);
        Ok(TickReport {
            samples: samples.len(),
            batch_seq: Some(batch_seq),
            dropped_batches: appended.dropped,
        })
    }

    fn advance_all(
        &mut self,
        now: DateTime<Utc>,
    ) -> (
        Vec<UsageSample>,
        BTreeMap<String, crate::counters::SandboxCounters>,
    ) {
        let now_ms = now.timestamp_millis();
        let mut samples = Vec::with_capacity(self.readings.len());
        let mut counters_now = BTreeMap::new();
        for reading in &self.readings {
            let name = reading.key.cgroup_name();
            let previous = self.state.sandboxes.get(&name);
            let counters = advance(previous, reading, now_ms);
            if previous.is_none_or(|previous| previous.epoch != counters.epoch) {
                self.metrics.epochs_started.inc();
                tracing::info!(sandbox = %reading.key, epoch = counters.epoch, previous_epoch = ?previous.map(|p| p.epoch), "epoch started");
            }
            samples.push(to_sample(&self.node, reading, &counters, now));
            counters_now.insert(name, counters);
        }
        // A sandbox whose cgroup vanished since the last tick gets one final
        // sample: state stopped, the next seq, its counters as last read (no
        // usage after the last reading can be measured, so none is billed).
        // It tells the rater, the policy and the usage API that the epoch
        // ended rather than went quiet. A sandbox removed while the collector
        // was down gets none: its allocation is not in the state file.
        for reading in &self.previous_readings {
            let name = reading.key.cgroup_name();
            if counters_now.contains_key(&name) {
                continue;
            }
            let Some(last) = self.state.sandboxes.get(&name) else {
                continue;
            };
            let closed = crate::counters::SandboxCounters {
                seq: last.seq + 1,
                last_ts_ms: now_ms,
                ..last.clone()
            };
            let mut sample = to_sample(&self.node, reading, &closed, now);
            sample.state = idlemeter_core::LifecycleState::Stopped;
            sample.exec_sessions = 0;
            sample.open_conns = 0;
            sample.mem_used_bytes = 0;
            tracing::info!(sandbox = %reading.key, epoch = closed.epoch, seq = closed.seq, "sandbox cgroup vanished: final stopped sample");
            self.metrics.sandboxes_stopped.inc();
            samples.push(sample);
        }
        (samples, counters_now)
    }

    fn publish_epochs(&self) {
        let index: HashMap<String, u64> = self
            .state
            .sandboxes
            .iter()
            .map(|(name, counters)| (name.clone(), counters.epoch))
            .collect();
        self.epochs.send_replace(Arc::new(index));
    }

    fn record_spool(&self, appended: crate::spool::Appended) {
        self.metrics.spool_batches.set(appended.batches as i64);
        self.metrics.spool_bytes.set(appended.total_bytes as i64);
        if appended.dropped > 0 {
            self.metrics.spool_dropped_batches.inc_by(appended.dropped);
            tracing::warn!(
                dropped = appended.dropped,
                spooled_batches = appended.batches,
                spooled_bytes = appended.total_bytes,
                "spool bound reached: oldest batches dropped (newer samples still carry the cumulative counters)"
            );
        }
    }
}

/// Samples every `interval` until `stop` receives (or its sender is dropped),
/// waking the shipper after each spooled batch.
pub fn run_sampler<R: UsageReader>(
    mut sampler: Sampler<R>,
    interval: Duration,
    stop: Receiver<()>,
    spooled: Arc<Notify>,
) {
    let mut next_tick = Instant::now();
    loop {
        let started = Instant::now();
        match sampler.sample_once(Utc::now()) {
            Ok(report) => {
                sampler.metrics.ticks.inc();
                if report.batch_seq.is_some() {
                    spooled.notify_one();
                }
            }
            Err(error) => {
                sampler.metrics.tick_failures.inc();
                tracing::error!(%error, "sampling tick failed");
            }
        }
        sampler
            .metrics
            .tick_seconds
            .observe(started.elapsed().as_secs_f64());
        next_tick += interval;
        let now = Instant::now();
        if next_tick < now {
            // Fell behind (a slow disk, a suspended VM): skip, do not burst.
            next_tick = now + interval;
        }
        match stop.recv_timeout(next_tick - now) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    tracing::info!("sampler stopped");
}
