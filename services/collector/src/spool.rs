//! The bounded on-disk spool between the sampler and Kafka.
//!
//! Every node batch is written here first, as one file `<batch_seq>.batch`
//! (zero-padded, so name order is production order), and deleted once Kafka has
//! acknowledged it. While Kafka is unreachable batches pile up and are drained
//! oldest first when it returns, so a node's batches arrive in order; a
//! collector restart finds the spool where it left it.
//!
//! **Bound.** When the spool's files exceed `max_bytes`, the *oldest* batches
//! give way (the newest is always kept), with a metric and a log line. Oldest,
//! because every sample carries cumulative counters: dropping old batches costs
//! resolution of the past, while the newest samples still carry every billable
//! microsecond; dropping the newest would lose usage until the next batch.
//!
//! Two kinds of sample are not covered by later ones: an epoch's first
//! sample (seq 1, the baseline its counters are measured from) and a
//! `stopped` sample (the end of the epoch; nothing follows it). So a batch
//! giving way is first *shrunk* to those samples, rewritten in place, and
//! only a batch with none of them is deleted. Only when every batch but the
//! newest is already shrunk and the bound is still exceeded are shrunk
//! batches dropped, oldest first, counted apart (`boundaries_lost`) and
//! logged as an error: the bound on disk is kept, and the loss is visible.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message as _;

use crate::state::write_atomically;
use crate::{Error, Result};

const SUFFIX: &str = ".batch";

/// Whether later samples of the epoch do not make up for losing this one:
/// its first sample (the counters' baseline) or its stopped sample (its end).
fn is_boundary(sample: &idlemeter_proto::v1::UsageSample) -> bool {
    sample.seq == 1 || sample.state == idlemeter_proto::v1::LifecycleState::Stopped as i32
}

/// One spooled batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpooledBatch {
    pub batch_seq: u64,
    pub bytes: u64,
    /// Already cut down to its epoch boundaries (see the module doc).
    pub shrunk: bool,
}

#[derive(Debug, Default)]
struct Queue {
    batches: VecDeque<SpooledBatch>,
    total_bytes: u64,
}

/// The spool directory and its in-memory index; shared by the sampler (which
/// appends) and the shipper (which drains).
#[derive(Debug)]
pub struct Spool {
    directory: PathBuf,
    max_bytes: u64,
    queue: Mutex<Queue>,
}

/// What appending a batch did to the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    /// Oldest batches dropped to respect the bound (nothing lost: they held
    /// no epoch boundary).
    pub dropped: u64,
    /// Batches cut down to their epoch boundaries.
    pub shrunk: u64,
    /// Shrunk batches dropped all the same: epoch boundaries lost.
    pub boundaries_lost: u64,
    pub batches: usize,
    pub total_bytes: u64,
}

impl Spool {
    /// Opens (creating if needed) a spool directory, indexing batches left by a
    /// previous run.
    pub fn open(directory: &Path, max_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(directory)
            .map_err(|source| io_error("creating", directory, source))?;
        let mut batches = Vec::new();
        let entries = std::fs::read_dir(directory)
            .map_err(|source| io_error("listing", directory, source))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(batch_seq) = name
                .to_str()
                .and_then(|name| name.strip_suffix(SUFFIX))
                .and_then(|seq| seq.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = entry.metadata().map(|metadata| metadata.len()).unwrap_or(0);
            batches.push(SpooledBatch {
                batch_seq,
                bytes,
                shrunk: false,
            });
        }
        batches.sort_by_key(|batch| batch.batch_seq);
        let total_bytes = batches.iter().map(|batch| batch.bytes).sum();
        Ok(Self {
            directory: directory.to_owned(),
            max_bytes,
            queue: Mutex::new(Queue {
                batches: batches.into(),
                total_bytes,
            }),
        })
    }

    fn path_of(&self, batch_seq: u64) -> PathBuf {
        self.directory.join(format!("{batch_seq:020}{SUFFIX}"))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves a consistent queue (each
        // entry is pushed, removed or updated whole, and `total_bytes` at
        // worst overstates), so a poisoned lock is still usable. The bound's
        // file work runs under it: only when the spool is full, a rare path.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The highest batch sequence spooled, if any.
    pub fn last_batch_seq(&self) -> Option<u64> {
        self.queue().batches.back().map(|batch| batch.batch_seq)
    }

    /// Writes a batch durably, then makes the oldest ones give way past the
    /// bound (see the module doc).
    pub fn append(&self, batch_seq: u64, payload: &[u8]) -> Result<Appended> {
        write_atomically(&self.path_of(batch_seq), payload)?;
        let mut queue = self.queue();
        debug_assert!(queue
            .batches
            .back()
            .is_none_or(|last| last.batch_seq < batch_seq));
        queue.batches.push_back(SpooledBatch {
            batch_seq,
            bytes: payload.len() as u64,
            shrunk: false,
        });
        queue.total_bytes += payload.len() as u64;
        let mut appended = Appended::default();
        while queue.total_bytes > self.max_bytes && queue.batches.len() > 1 {
            let newest = queue.batches.len() - 1;
            let unshrunk = queue
                .batches
                .iter()
                .take(newest)
                .position(|batch| !batch.shrunk);
            let Some(index) = unshrunk else {
                // Only boundaries left: the bound wins, visibly.
                let Some(oldest) = queue.batches.pop_front() else {
                    break;
                };
                queue.total_bytes -= oldest.bytes;
                appended.boundaries_lost += 1;
                self.delete(oldest.batch_seq);
                continue;
            };
            let batch = queue.batches[index];
            match self.shrink(batch.batch_seq) {
                Ok(Some(bytes)) => {
                    queue.total_bytes = queue.total_bytes - batch.bytes + bytes;
                    queue.batches[index].bytes = bytes;
                    queue.batches[index].shrunk = true;
                    appended.shrunk += 1;
                }
                Ok(None) => {
                    queue.batches.remove(index);
                    queue.total_bytes -= batch.bytes;
                    appended.dropped += 1;
                    self.delete(batch.batch_seq);
                }
                Err(error) => {
                    // Unreadable: it cannot be shipped either.
                    tracing::warn!(batch_seq = batch.batch_seq, %error, "spooled batch unreadable; dropped");
                    queue.batches.remove(index);
                    queue.total_bytes -= batch.bytes;
                    appended.dropped += 1;
                    self.delete(batch.batch_seq);
                }
            }
        }
        appended.batches = queue.batches.len();
        appended.total_bytes = queue.total_bytes;
        Ok(appended)
    }

    /// Rewrites a batch with only its epoch boundaries (first samples and
    /// stopped samples); its new size, or `None` if it holds none.
    fn shrink(&self, batch_seq: u64) -> Result<Option<u64>> {
        let path = self.path_of(batch_seq);
        let payload = std::fs::read(&path).map_err(|source| io_error("reading", &path, source))?;
        let mut batch =
            idlemeter_proto::v1::NodeBatch::decode(payload.as_slice()).map_err(|error| {
                io_error(
                    "decoding",
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, error),
                )
            })?;
        let before = batch.samples.len();
        batch.samples.retain(is_boundary);
        if batch.samples.is_empty() {
            return Ok(None);
        }
        if batch.samples.len() == before {
            // Only boundaries already (shrunk before a restart): as it is.
            return Ok(Some(payload.len() as u64));
        }
        let shrunk = batch.encode_to_vec();
        write_atomically(&path, &shrunk)?;
        Ok(Some(shrunk.len() as u64))
    }

    fn delete(&self, batch_seq: u64) {
        if let Err(error) = std::fs::remove_file(self.path_of(batch_seq)) {
            tracing::warn!(batch_seq, %error, "removing dropped batch failed");
        }
    }

    /// The oldest batch and its bytes, or `None` when the spool is empty.
    pub fn oldest(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(oldest) = self.queue().batches.front().copied() else {
            return Ok(None);
        };
        let path = self.path_of(oldest.batch_seq);
        match std::fs::read(&path) {
            Ok(payload) => Ok(Some((oldest.batch_seq, payload))),
            // Dropped by the bound between the look and the read.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io_error("reading", &path, source)),
        }
    }

    /// Deletes a batch Kafka acknowledged.
    pub fn remove(&self, batch_seq: u64) -> Result<()> {
        let mut queue = self.queue();
        if let Some(position) = queue
            .batches
            .iter()
            .position(|batch| batch.batch_seq == batch_seq)
        {
            if let Some(removed) = queue.batches.remove(position) {
                queue.total_bytes -= removed.bytes;
            }
        }
        drop(queue);
        let path = self.path_of(batch_seq);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(io_error("removing", &path, source)),
        }
    }

    /// Batches and bytes waiting.
    pub fn backlog(&self) -> (usize, u64) {
        let queue = self.queue();
        (queue.batches.len(), queue.total_bytes)
    }
}

fn io_error(action: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        context: format!("{action} spool {}", path.display()),
        source,
    }
}

#[cfg(test)]
mod tests {
    use idlemeter_proto::v1;

    use super::*;

    #[test]
    fn batches_drain_in_the_order_they_were_spooled_across_reopen() {
        let directory = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(directory.path(), 1 << 20).expect("opens");
        for seq in [3, 9, 10] {
            spool
                .append(seq, format!("batch {seq}").as_bytes())
                .expect("appends");
        }
        let reopened = Spool::open(directory.path(), 1 << 20).expect("reopens");
        assert_eq!(reopened.last_batch_seq(), Some(10));
        let mut drained = Vec::new();
        while let Some((seq, payload)) = reopened.oldest().expect("reads") {
            assert_eq!(payload, format!("batch {seq}").into_bytes());
            drained.push(seq);
            reopened.remove(seq).expect("removes");
        }
        assert_eq!(drained, vec![3, 9, 10]);
        assert_eq!(reopened.backlog(), (0, 0));
    }

    /// A node batch of `sandboxes` samples at `seq`, in `state`.
    fn node_batch(seq: u64, sandboxes: usize, state: v1::LifecycleState) -> Vec<u8> {
        v1::NodeBatch {
            schema_version: idlemeter_proto::SCHEMA_VERSION,
            node: "node-1".into(),
            sent_unix_ms: 1,
            batch_seq: seq,
            samples: (0..sandboxes)
                .map(|index| v1::UsageSample {
                    node: "node-1".into(),
                    customer: "acme".into(),
                    sandbox: format!("sbx-{index}"),
                    epoch: 1,
                    seq,
                    ts_unix_ms: 1_790_000_000_000,
                    state: state as i32,
                    cpu_used_usec: seq * 1_000,
                    ..Default::default()
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// (sandbox, seq, state) of each sample of a spooled batch.
    type Kept = Vec<(String, u64, i32)>;

    fn spooled(spool: &Spool) -> Vec<(u64, Kept)> {
        let mut seen = Vec::new();
        for batch in spool.queue().batches.clone() {
            let bytes = std::fs::read(spool.path_of(batch.batch_seq)).expect("reads");
            let decoded = v1::NodeBatch::decode(bytes.as_slice()).expect("decodes");
            seen.push((
                batch.batch_seq,
                decoded
                    .samples
                    .iter()
                    .map(|s| (s.sandbox.clone(), s.seq, s.state))
                    .collect(),
            ));
        }
        seen
    }

    /// Finding "the spool's drop-oldest loses money": an epoch's first
    /// sample and a stopped sample survive the bound; what later samples
    /// make up for gives way.
    #[test]
    fn the_spool_bound_keeps_epoch_boundaries_and_drops_the_rest() {
        use v1::LifecycleState::{Running, Stopped};
        let directory = tempfile::tempdir().expect("tempdir");
        let one = node_batch(2, 50, Running).len() as u64;
        // Room for about three full batches.
        let spool = Spool::open(directory.path(), one * 3 + one / 2).expect("opens");
        spool
            .append(1, &node_batch(1, 50, Running))
            .expect("appends");
        for seq in 2..=5 {
            spool
                .append(seq, &node_batch(seq, 50, Running))
                .expect("appends");
        }
        let mut stopping =
            v1::NodeBatch::decode(node_batch(6, 50, Running).as_slice()).expect("decodes");
        stopping.samples[7].state = Stopped as i32;
        spool.append(6, &stopping.encode_to_vec()).expect("appends");
        for seq in 7..=12 {
            let appended = spool
                .append(seq, &node_batch(seq, 50, Running))
                .expect("appends");
            assert_eq!(appended.boundaries_lost, 0);
        }
        let kept = spooled(&spool);
        // Batch 1 (every sandbox's first sample) and sbx-7's stopped sample
        // are still there; batches 2-5 are gone.
        assert_eq!(kept[0].0, 1);
        assert_eq!(kept[0].1.len(), 50, "every epoch's first sample");
        assert!(kept[0].1.iter().all(|(_, seq, _)| *seq == 1));
        assert_eq!(kept[1].0, 6);
        assert_eq!(kept[1].1, vec![("sbx-7".to_owned(), 6, Stopped as i32)]);
        assert!(kept.iter().all(|(seq, _)| !(2..=5).contains(seq)));
        assert_eq!(
            kept.last().map(|(seq, _)| *seq),
            Some(12),
            "the newest is kept whole"
        );
        assert!(spool.backlog().1 <= one * 3 + one / 2);
    }

    #[test]
    fn bound_drops_the_oldest_and_keeps_the_newest() {
        let directory = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(directory.path(), 25).expect("opens");
        let payload = [0_u8; 10];
        assert_eq!(spool.append(1, &payload).expect("appends").dropped, 0);
        assert_eq!(spool.append(2, &payload).expect("appends").dropped, 0);
        let third = spool.append(3, &payload).expect("appends");
        assert_eq!(third.dropped, 1);
        assert_eq!((third.batches, third.total_bytes), (2, 20));
        assert_eq!(spool.oldest().expect("reads").map(|(seq, _)| seq), Some(2));
        assert!(!directory.path().join(format!("{:020}.batch", 1)).exists());
        // A single batch larger than the bound is still kept. (These
        // payloads are not node batches: unreadable ones are dropped.)
        let huge = spool.append(4, &[0_u8; 100]).expect("appends");
        assert_eq!((huge.batches, huge.dropped), (1, 2));
    }
}
