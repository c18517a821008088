//! One tick of the collector: read every sandbox, advance its counters, save
//! the state, spool the node batch. Blocking file I/O only, so it runs on its
//! own thread ([`run_sampler`]) and never stalls the async shipper or the
//! command consumer.

use std::collections::{HashMap, HashSet};
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
    /// A JSON state file of an earlier version, removed after the first save.
    legacy_state_file: Option<PathBuf>,
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
        // Versions before 0.2 kept the state as JSON in `state.json`: continue
        // from it once, and delete it after the first save so that it can never
        // be read again in place of a newer state.
        let legacy = state_file.with_file_name("state.json");
        let legacy = (!state_file.exists() && legacy.exists()).then_some(legacy);
        let mut state = CollectorState::load(legacy.as_deref().unwrap_or(&state_file))?;
        state.batch_seq = state.batch_seq.max(spool.last_batch_seq().unwrap_or(0));
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|text| text.trim().to_owned())
            .unwrap_or_default();
        if !state.boot_id.is_empty() && state.boot_id != boot_id {
            // Another boot: cgroup inode numbers repeat across boots, so no
            // saved instance may be trusted to be the same cgroup.
            tracing::info!(saved = %state.boot_id, now = %boot_id, "state saved before a reboot: every sandbox starts a new epoch");
            for counters in state.sandboxes.values_mut() {
                counters.instance = 0;
            }
        }
        state.boot_id = boot_id;
        tracing::info!(sandboxes = state.sandboxes.len(), batch_seq = state.batch_seq, file = %state_file.display(), "collector state loaded");
        let (epochs, _) = watch::channel(EpochIndex::default());
        let sampler = Self {
            reader,
            node,
            state,
            state_file,
            spool,
            metrics,
            epochs,
            readings: Vec::new(),
            previous_readings: Vec::new(),
            legacy_state_file: legacy,
        };
        sampler.publish_epochs();
        Ok(sampler)
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
        let (samples, epochs_changed) = self.advance_all(now);
        self.metrics.sandboxes.set(samples.len() as i64);
        self.metrics
            .unlabelled_sandboxes
            .set(self.reader.unlabelled_sandboxes() as i64);
        if epochs_changed {
            self.publish_epochs();
        }
        if samples.is_empty() {
            self.save_state()?;
            return Ok(TickReport {
                samples: 0,
                batch_seq: None,
                dropped_batches: 0,
            });
        }
        self.state.batch_seq += 1;
        let batch_seq = self.state.batch_seq;
        // State first, then the batch: see state.rs for why this order.
        self.save_state()?;
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

    /// Advances every sandbox's counters in place and makes the tick's
    /// samples; also says whether any sandbox started or ended an epoch.
    fn advance_all(&mut self, now: DateTime<Utc>) -> (Vec<UsageSample>, bool) {
        let now_ms = now.timestamp_millis();
        let mut samples = Vec::with_capacity(self.readings.len());
        let mut epochs_changed = false;
        let mut present: HashSet<&str> = HashSet::with_capacity(self.readings.len());
        present.extend(self.reader.unreadable().iter().map(|name| name.as_ref()));
        for reading in &self.readings {
            let name = reading.name.as_ref();
            present.insert(name);
            let counters = match self.state.sandboxes.get_mut(name) {
                Some(counters) => {
                    let next = advance(Some(counters), reading, now_ms);
                    if next.epoch != counters.epoch {
                        self.metrics.epochs_started.inc();
                        tracing::info!(sandbox = %reading.key, epoch = next.epoch, previous_epoch = counters.epoch, "epoch started");
                        epochs_changed = true;
                    }
                    *counters = next;
                    counters
                }
                None => {
                    let next = advance(None, reading, now_ms);
                    self.metrics.epochs_started.inc();
                    tracing::info!(sandbox = %reading.key, epoch = next.epoch, "epoch started");
                    epochs_changed = true;
                    self.state.sandboxes.entry(name.to_owned()).or_insert(next)
                }
            };
            samples.push(to_sample(&self.node, reading, counters, now));
        }
        // A sandbox whose cgroup vanished since the last tick gets one final
        // sample: state stopped, the next seq, its counters as last read (no
        // usage after the last reading can be measured, so none is billed).
        // It tells the rater, the policy and the usage API that the epoch
        // ended rather than went quiet. A sandbox removed while the collector
        // was down gets none: its allocation is not in the state file.
        for reading in &self.previous_readings {
            let name = reading.name.as_ref();
            if present.contains(name) {
                continue;
            }
            let Some(last) = self.state.sandboxes.get(name) else {
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
        let before = self.state.sandboxes.len();
        self.state
            .sandboxes
            .retain(|name, _| present.contains(name.as_str()));
        epochs_changed |= self.state.sandboxes.len() != before;
        (samples, epochs_changed)
    }

    /// Saves the counters (and, once, removes a legacy JSON state file).
    fn save_state(&mut self) -> Result<()> {
        self.state.save(&self.state_file)?;
        if let Some(legacy) = self.legacy_state_file.take() {
            tracing::info!(file = %legacy.display(), "legacy JSON state carried over; removing it");
            std::fs::remove_file(&legacy).map_err(|source| crate::Error::Io {
                context: format!("removing {}", legacy.display()),
                source,
            })?;
        }
        Ok(())
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
        if appended.shrunk > 0 {
            self.metrics.spool_shrunk_batches.inc_by(appended.shrunk);
        }
        if appended.boundaries_lost > 0 {
            self.metrics
                .spool_boundaries_lost
                .inc_by(appended.boundaries_lost);
            tracing::error!(
                batches = appended.boundaries_lost,
                "spool bound reached with only epoch boundaries left: first or stopped samples dropped (usage around them is lost); raise spool_max_bytes"
            );
        }
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

/// What the sampler thread is told between ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerControl {
    /// Take a sample this soon instead of waiting for the tick (a command
    /// changed a sandbox: its next sample acknowledges it within this
    /// delay, not a whole interval later). The ticks go on from there.
    SampleAfter(Duration),
    Stop,
}

/// Samples every `interval` until told to stop (or the sender is dropped),
/// waking the shipper after each spooled batch; a
/// [`SamplerControl::SampleAfter`] brings the next tick forward.
pub fn run_sampler<R: UsageReader>(
    mut sampler: Sampler<R>,
    interval: Duration,
    control: Receiver<SamplerControl>,
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
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match control.recv_timeout(wait) {
                Err(RecvTimeoutError::Timeout) => break,
                Ok(SamplerControl::SampleAfter(delay)) => {
                    next_tick = next_tick.min(Instant::now() + delay);
                }
                Ok(SamplerControl::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    tracing::info!("sampler stopped");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::SandboxCounters;
    use crate::sandbox::{Activity, Allocation, SandboxKey};

    /// A node with fixed sandboxes whose CPU counter rises by 1 ms per read.
    struct FixedNode {
        names: Vec<&'static str>,
        reads: u64,
    }

    impl UsageReader for FixedNode {
        fn read_node(&mut self, readings: &mut Vec<SandboxReading>) -> Result<()> {
            self.reads += 1;
            readings.clear();
            for name in &self.names {
                readings.push(SandboxReading {
                    key: SandboxKey::from_cgroup_name(name).expect("valid"),
                    name: Arc::from(*name),
                    instance: 9,
                    cpu_usage_usec: 50_000 + 1_000 * self.reads,
                    mem_used_bytes: None,
                    frozen: false,
                    net: None,
                    detail: Default::default(),
                    gpu_sm_percent: 0,
                    allocation: Arc::new(Allocation::default()),
                    activity: Activity::default(),
                });
            }
            Ok(())
        }
    }

    fn sampler(directory: &std::path::Path, names: Vec<&'static str>) -> Sampler<FixedNode> {
        let spool = Arc::new(Spool::open(&directory.join("spool"), 1 << 20).expect("spool"));
        let metrics = CollectorMetrics::register(&prometheus::Registry::new()).expect("metrics");
        Sampler::new(
            FixedNode { names, reads: 0 },
            NodeId::parse("node-1").expect("valid"),
            directory.join("counters.state"),
            spool,
            metrics,
        )
        .expect("sampler")
    }

    #[test]
    fn a_legacy_json_state_is_continued_once_then_removed() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut legacy = CollectorState {
            batch_seq: 70,
            ..Default::default()
        };
        legacy.sandboxes.insert(
            "acme.a".to_owned(),
            SandboxCounters {
                instance: 9,
                epoch: 1_000,
                seq: 41,
                last_ts_ms: 1_790_000_000_000,
                cpu_used_usec: 50_000,
                ..Default::default()
            },
        );
        let legacy_path = directory.path().join("state.json");
        std::fs::write(&legacy_path, serde_json::to_vec(&legacy).expect("json")).expect("write");

        let mut sampler = sampler(directory.path(), vec!["acme.a"]);
        assert_eq!(sampler.epochs().borrow().get("acme.a"), Some(&1_000));
        let now = DateTime::from_timestamp_millis(1_790_000_001_000).expect("valid");
        let report = sampler.sample_once(now).expect("tick");
        assert_eq!(report.batch_seq, Some(71), "batch numbering continues");
        assert!(
            !legacy_path.exists(),
            "the legacy file is gone after the first save"
        );
        let saved = CollectorState::load(&directory.path().join("counters.state")).expect("loads");
        let counters = &saved.sandboxes["acme.a"];
        assert_eq!(
            (counters.epoch, counters.seq),
            (1_000, 42),
            "same epoch, next seq"
        );
        assert_eq!(counters.cpu_used_usec, 51_000);
    }

    #[test]
    fn counters_are_kept_per_present_sandbox_and_dropped_after_the_final_sample() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut sampler = sampler(directory.path(), vec!["acme.a", "acme.b"]);
        let at = |ms: i64| DateTime::from_timestamp_millis(1_790_000_000_000 + ms).expect("valid");
        assert_eq!(sampler.sample_once(at(0)).expect("tick").samples, 2);
        assert_eq!(sampler.epochs().borrow().len(), 2);
        sampler.reader.names = vec!["acme.a"];
        // b's final stopped sample is the second of this tick.
        assert_eq!(sampler.sample_once(at(1_000)).expect("tick").samples, 2);
        assert_eq!(sampler.state.sandboxes.len(), 1);
        assert_eq!(sampler.state.sandboxes["acme.a"].seq, 2);
        assert_eq!(sampler.epochs().borrow().len(), 1, "the index follows");
        assert_eq!(sampler.sample_once(at(2_000)).expect("tick").samples, 1);
    }

    #[test]
    fn a_state_from_another_boot_starts_new_epochs() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut saved = CollectorState {
            batch_seq: 3,
            boot_id: "not-this-boot".to_owned(),
            ..Default::default()
        };
        let counters = SandboxCounters {
            instance: 9, // the same inode number the new cgroup has
            epoch: 1_000,
            seq: 41,
            last_ts_ms: 1_790_000_000_000,
            cpu_used_usec: 1_000,
            ..Default::default()
        };
        saved.sandboxes.insert("acme.a".to_owned(), counters);
        saved
            .save(&directory.path().join("counters.state"))
            .expect("saves");
        let mut sampler = sampler(directory.path(), vec!["acme.a"]);
        let now = DateTime::from_timestamp_millis(1_790_000_001_000).expect("valid");
        sampler.sample_once(now).expect("tick");
        let after = &sampler.state.sandboxes["acme.a"];
        assert!(after.epoch > 1_000, "a new epoch, not {}", after.epoch);
        assert_eq!(after.seq, 1);
        let this_boot =
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
        assert_eq!(sampler.state.boot_id, this_boot.trim());
    }
}
