//! The source side of the collector: what one read of a node yields.
//!
//! [`UsageReader`] is the seam between the counters (pure) and the machine
//! (cgroups). The real implementation is [`crate::cgroup::CgroupReader`]; tests
//! of the counter and shipping logic can feed readings of their own.

use std::sync::Arc;

use idlemeter_core::SampleDetail;

use crate::sandbox::{Activity, Allocation, SandboxKey};
use crate::Result;

/// One sandbox as read at one instant: raw kernel counters, not yet epoch-relative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxReading {
    pub key: SandboxKey,
    /// The cgroup's name, `<customer>.<sandbox>` (the state file's key).
    pub name: Arc<str>,
    /// Identity of the cgroup instance (its inode): a sandbox whose cgroup was
    /// removed and created again between two reads has a new instance and so
    /// a new epoch, even if its counters happen to be higher.
    pub instance: u64,
    /// CPU time used since the cgroup was created (`cpu.stat` usage_usec).
    pub cpu_usage_usec: u64,
    /// Memory in use now; `None` when no memory controller covers the cgroup.
    pub mem_used_bytes: Option<u64>,
    /// Whether the cgroup is frozen now (`cgroup.events` frozen 1).
    pub frozen: bool,
    /// The sandbox's own network namespace's interface counters, when it has
    /// one (see `cgroup.rs`); `None` when its traffic cannot be told apart.
    pub net: Option<NetBytes>,
    /// Detail as last read (every few ticks); its `gpu_busy_ms` is unused:
    /// the counters integrate `gpu_sm_percent` instead.
    pub detail: SampleDetail,
    /// SM utilisation summed over the sandbox's GPU processes, percent.
    pub gpu_sm_percent: u32,
    pub allocation: Arc<Allocation>,
    pub activity: Activity,
}

/// Bytes through every interface but `lo` of one network namespace, as the
/// kernel counts them since each interface was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetBytes {
    /// The namespace's inode: counters of different namespaces never mix.
    pub namespace: u64,
    pub rx: u64,
    pub tx: u64,
}

/// Something that can list and read every sandbox of a node.
pub trait UsageReader {
    /// Replaces `readings` with one reading per sandbox present now. A sandbox
    /// that vanishes while being read is left out; only a failure to list the
    /// sandboxes at all is an error.
    fn read_node(&mut self, readings: &mut Vec<SandboxReading>) -> Result<()>;

    /// Sandboxes present at the last read but not readable then: they get no
    /// sample, and keep their epoch and counters (they did not vanish).
    fn unreadable(&self) -> &[Arc<str>] {
        &[]
    }

    /// Sandboxes metered without a label file (so with a zero allocation).
    fn unlabelled_sandboxes(&self) -> usize {
        0
    }
}
