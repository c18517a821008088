//! The bounded on-disk spool between the sampler and Kafka.
//!
//! Every node batch is written here first, as one file `<batch_seq>.batch`
//! (zero-padded, so name order is production order), and deleted once Kafka has
//! acknowledged it. While Kafka is unreachable batches pile up and are drained
//! oldest first when it returns, so a node's batches arrive in order; a
//! collector restart finds the spool where it left it.
//!
//! **Bound.** When the spool's files exceed `max_bytes`, the *oldest* batches are
//! dropped (the newest is always kept), with a metric and a log line. Oldest,
//! because every sample carries cumulative counters: dropping old batches costs
//! resolution of the past, while the newest samples still carry every billable
//! microsecond; dropping the newest would lose usage until the next batch.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::state::write_atomically;
use crate::{Error, Result};

const SUFFIX: &str = ".batch";

/// One spooled batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpooledBatch {
    pub batch_seq: u64,
    pub bytes: u64,
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
    /// Oldest batches dropped to respect the bound.
    pub dropped: u64,
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
            batches.push(SpooledBatch { batch_seq, bytes });
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
        // A panic while holding the lock leaves a consistent queue (every
        // mutation is a single push or pop), so a poisoned lock is still usable.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The highest batch sequence spooled, if any.
    pub fn last_batch_seq(&self) -> Option<u64> {
        self.queue().batches.back().map(|batch| batch.batch_seq)
    }

    /// Writes a batch durably and drops the oldest ones past the bound.
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
        });
        queue.total_bytes += payload.len() as u64;
        let mut dropped = 0;
        while queue.total_bytes > self.max_bytes && queue.batches.len() > 1 {
            let Some(oldest) = queue.batches.pop_front() else {
                break;
            };
            queue.total_bytes -= oldest.bytes;
            dropped += 1;
            if let Err(error) = std::fs::remove_file(self.path_of(oldest.batch_seq)) {
                tracing::warn!(batch_seq = oldest.batch_seq, %error, "removing dropped batch failed");
            }
        }
        Ok(Appended {
            dropped,
            batches: queue.batches.len(),
            total_bytes: queue.total_bytes,
        })
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
        // A single batch larger than the bound is still kept.
        let huge = spool.append(4, &[0_u8; 100]).expect("appends");
        assert_eq!((huge.batches, huge.dropped), (1, 2));
    }
}
