//! Live sandbox state: the newest sample of each sandbox and its open
//! minute, kept in memory from the samples stream itself.
//!
//! Ingest writes a sandbox's samples to ClickHouse only where rating needs
//! them and its minute only when the minute closes, so the stored state of a
//! sandbox can be a minute old. This view closes the gap: the API process
//! reads the samples topic from its end (a tail consumer that never commits,
//! see `idlemeter api`) and the sandbox routes show whichever is newer, the
//! stored state or this one. It is not durable and need not be: a restarted
//! API rebuilds it from the next second of the stream, and until then serves
//! the stored state. It holds one sample and one minute per sandbox seen in
//! the last `quiet_ms` (about 700 bytes each).

use std::collections::HashMap;
use std::sync::RwLock;

use idlemeter_core::{CustomerId, MinuteRow, SandboxId, UsageSample};

/// What the stream last said about one sandbox.
#[derive(Debug, Clone)]
pub struct LiveSandbox {
    /// The newest sample (highest epoch, then seq).
    pub sample: UsageSample,
    /// The minute of the newest sample, as far as it has been seen.
    pub minute: MinuteRow,
    /// When this process received the newest sample, Unix ms.
    pub received_ms: i64,
}

/// The live state of every sandbox the stream mentioned lately.
#[derive(Debug, Default)]
pub struct LiveView {
    sandboxes: RwLock<HashMap<(CustomerId, SandboxId), LiveSandbox>>,
}

impl LiveView {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes samples in, in any order: older ones than the newest of their
    /// sandbox only widen its minute.
    pub fn apply(&self, samples: Vec<UsageSample>, received_ms: i64) {
        let mut sandboxes = self
            .sandboxes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for sample in samples {
            let key = (sample.customer.clone(), sample.sandbox.clone());
            match sandboxes.get_mut(&key) {
                None => {
                    sandboxes.insert(
                        key,
                        LiveSandbox {
                            minute: MinuteRow::open(&sample),
                            sample,
                            received_ms,
                        },
                    );
                }
                Some(live) => {
                    let newer = (sample.epoch, sample.seq) > (live.sample.epoch, live.sample.seq);
                    let same_minute =
                        sample.epoch == live.minute.epoch && live.minute.contains(&sample);
                    if same_minute {
                        live.minute.add(&sample);
                    } else if newer {
                        live.minute = MinuteRow::open(&sample);
                    }
                    if newer {
                        live.sample = sample;
                        live.received_ms = received_ms;
                    }
                }
            }
        }
    }

    /// The live state of one sandbox, if the stream mentioned it lately.
    pub fn get(&self, customer: &CustomerId, sandbox: &SandboxId) -> Option<LiveSandbox> {
        self.sandboxes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(customer.clone(), sandbox.clone()))
            .cloned()
    }

    /// Forgets sandboxes not heard of since `before_ms`.
    pub fn forget_quiet(&self, before_ms: i64) -> usize {
        let mut sandboxes = self
            .sandboxes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = sandboxes.len();
        sandboxes.retain(|_, live| live.received_ms >= before_ms);
        before - sandboxes.len()
    }

    pub fn len(&self) -> usize {
        self.sandboxes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Applies what `samples` delivers (node batches as the stream carries
/// them) until it closes, forgetting sandboxes quiet for `forget_after`.
pub async fn follow(
    view: std::sync::Arc<LiveView>,
    mut samples: tokio::sync::mpsc::Receiver<Vec<UsageSample>>,
    forget_after: std::time::Duration,
) {
    let mut forget = tokio::time::interval(forget_after.max(std::time::Duration::from_secs(1)));
    loop {
        tokio::select! {
            batch = samples.recv() => match batch {
                Some(batch) => view.apply(batch, chrono::Utc::now().timestamp_millis()),
                None => return,
            },
            _ = forget.tick() => {
                let before = chrono::Utc::now().timestamp_millis()
                    - i64::try_from(forget_after.as_millis()).unwrap_or(i64::MAX);
                view.forget_quiet(before);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};
    use idlemeter_core::{Epoch, NodeId, VcpuMillis};

    fn sample(seq: u64, second: i64, cpu: u64) -> UsageSample {
        UsageSample {
            vcpu: VcpuMillis(1000),
            cpu_used_usec: cpu,
            ..UsageSample::blank(
                CustomerId::parse("acme").expect("valid"),
                NodeId::parse("n").expect("valid"),
                SandboxId::parse("sbx").expect("valid"),
                Epoch(1),
                seq,
                DateTime::<Utc>::from_timestamp(1_800_000_000 + second, 0).expect("time"),
            )
        }
    }

    #[test]
    fn the_newest_sample_wins_and_its_minute_is_widened_by_older_ones() {
        let view = LiveView::new();
        // 1_800_000_000 starts a minute.
        view.apply(vec![sample(2, 1, 10), sample(4, 3, 30)], 1);
        view.apply(vec![sample(3, 2, 20), sample(1, 0, 5)], 2);
        let customer = CustomerId::parse("acme").expect("valid");
        let sandbox = SandboxId::parse("sbx").expect("valid");
        let live = view.get(&customer, &sandbox).expect("seen");
        assert_eq!(live.sample.seq, 4);
        assert_eq!(live.received_ms, 1);
        assert_eq!((live.minute.first_seq, live.minute.last_seq), (1, 4));
        assert_eq!((live.minute.lo[0], live.minute.hi[0]), (5, 30));
        // The next minute starts a new one.
        view.apply(vec![sample(5, 65, 50)], 3);
        let live = view.get(&customer, &sandbox).expect("seen");
        assert_eq!((live.minute.first_seq, live.minute.last_seq), (5, 5));
        assert_eq!(view.forget_quiet(3), 0);
        assert_eq!(view.forget_quiet(4), 1);
        assert!(view.is_empty());
    }
}
