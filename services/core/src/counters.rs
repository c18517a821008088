//! The billed counters a sample may carry, and which of them it carries.
//!
//! DESIGN.md's first contract: every billable quantity leaves the node as a
//! cumulative counter of one epoch, and a bill prices differences of counters.
//! The five integrals that predate this module (`vcpu_alloc_usec`,
//! `mem_alloc_kib_ms`, `mem_used_kib_ms`, `gpu_alloc_ms`, `disk_mib_ms`) are
//! fields of [`crate::UsageSample`]; [`StateCounters`] adds what the shipped
//! sheets need beyond them: time per lifecycle state, the part of each
//! running integral that was *active* under the collector's built-in activity
//! rule (an exec session or an open inbound connection at the tick, the rule
//! of [`crate::SessionOrConnection`]), the integrals of max(requested, used)
//! and disk by state.
//!
//! A sample says which counters it carries in a [`CounterSet`]. Samples of
//! older collectors (wire v1, JSONL without the fields) carry none and rate
//! from their gauges as before; an interval reads a counter only when both of
//! its samples carry it (see `rating::usage`).

use serde::{Deserialize, Serialize};

/// Cumulative integrals by lifecycle state and activity, within one epoch.
/// "Active" means running with an open exec session or inbound connection at
/// the collector's tick; every active integral is part of its running one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct StateCounters {
    /// Milliseconds running.
    pub running_ms: u64,
    /// Milliseconds suspended (frozen or snapshotted).
    pub suspended_ms: u64,
    /// Milliseconds running and active.
    pub active_ms: u64,
    /// Allocated vCPU-microseconds while active.
    pub vcpu_alloc_active_usec: u64,
    /// Integral of max(allocated vCPU, CPU used) while running, vCPU-µs: per
    /// collector tick the larger of the allocation and the CPU time used.
    pub vcpu_max_usec: u64,
    /// The same while active.
    pub vcpu_max_active_usec: u64,
    /// CPU time used while active, microseconds.
    pub cpu_used_active_usec: u64,
    /// Allocated memory KiB-milliseconds while active.
    pub mem_alloc_active_kib_ms: u64,
    /// Integral of max(allocated, used) memory while running, KiB-ms.
    pub mem_max_kib_ms: u64,
    /// The same while active.
    pub mem_max_active_kib_ms: u64,
    /// Used memory KiB-milliseconds while active.
    pub mem_used_active_kib_ms: u64,
    /// GPU count x milliseconds while active.
    pub gpu_alloc_active_ms: u64,
    /// Persistent disk MiB-milliseconds while running (`disk_mib_ms` holds
    /// running and suspended together).
    pub disk_running_mib_ms: u64,
    /// Persistent disk MiB-milliseconds while active.
    pub disk_active_mib_ms: u64,
}

/// One billed counter, by its wire and JSONL name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    VcpuAllocUsec,
    MemAllocKibMs,
    MemUsedKibMs,
    GpuAllocMs,
    DiskMibMs,
    RunningMs,
    SuspendedMs,
    ActiveMs,
    VcpuAllocActiveUsec,
    VcpuMaxUsec,
    VcpuMaxActiveUsec,
    CpuUsedActiveUsec,
    MemAllocActiveKibMs,
    MemMaxKibMs,
    MemMaxActiveKibMs,
    MemUsedActiveKibMs,
    GpuAllocActiveMs,
    DiskRunningMibMs,
    DiskActiveMibMs,
}

impl Counter {
    /// Every counter, in bit order.
    pub const ALL: [Counter; 19] = [
        Counter::VcpuAllocUsec,
        Counter::MemAllocKibMs,
        Counter::MemUsedKibMs,
        Counter::GpuAllocMs,
        Counter::DiskMibMs,
        Counter::RunningMs,
        Counter::SuspendedMs,
        Counter::ActiveMs,
        Counter::VcpuAllocActiveUsec,
        Counter::VcpuMaxUsec,
        Counter::VcpuMaxActiveUsec,
        Counter::CpuUsedActiveUsec,
        Counter::MemAllocActiveKibMs,
        Counter::MemMaxKibMs,
        Counter::MemMaxActiveKibMs,
        Counter::MemUsedActiveKibMs,
        Counter::GpuAllocActiveMs,
        Counter::DiskRunningMibMs,
        Counter::DiskActiveMibMs,
    ];

    /// The field name in JSONL, on the wire and in `usage_samples`.
    pub fn name(self) -> &'static str {
        match self {
            Counter::VcpuAllocUsec => "vcpu_alloc_usec",
            Counter::MemAllocKibMs => "mem_alloc_kib_ms",
            Counter::MemUsedKibMs => "mem_used_kib_ms",
            Counter::GpuAllocMs => "gpu_alloc_ms",
            Counter::DiskMibMs => "disk_mib_ms",
            Counter::RunningMs => "running_ms",
            Counter::SuspendedMs => "suspended_ms",
            Counter::ActiveMs => "active_ms",
            Counter::VcpuAllocActiveUsec => "vcpu_alloc_active_usec",
            Counter::VcpuMaxUsec => "vcpu_max_usec",
            Counter::VcpuMaxActiveUsec => "vcpu_max_active_usec",
            Counter::CpuUsedActiveUsec => "cpu_used_active_usec",
            Counter::MemAllocActiveKibMs => "mem_alloc_active_kib_ms",
            Counter::MemMaxKibMs => "mem_max_kib_ms",
            Counter::MemMaxActiveKibMs => "mem_max_active_kib_ms",
            Counter::MemUsedActiveKibMs => "mem_used_active_kib_ms",
            Counter::GpuAllocActiveMs => "gpu_alloc_active_ms",
            Counter::DiskRunningMibMs => "disk_running_mib_ms",
            Counter::DiskActiveMibMs => "disk_active_mib_ms",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// Which billed counters a sample carries: a bit per [`Counter`], in the
/// order of [`Counter::ALL`] (bit 0 is `vcpu_alloc_usec`). Stored and sent as
/// this integer (`counters_present`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CounterSet(pub u32);

impl CounterSet {
    /// No counters: a sample of a collector that predates them.
    pub const NONE: CounterSet = CounterSet(0);
    /// Every counter of [`Counter::ALL`]: what the collector and the
    /// simulator send.
    pub const ALL: CounterSet = CounterSet((1 << Counter::ALL.len()) - 1);

    pub fn contains(self, counter: Counter) -> bool {
        self.0 & counter.bit() != 0
    }

    pub fn with(self, counter: Counter) -> Self {
        Self(self.0 | counter.bit())
    }

    /// The counters both samples carry: what an interval between them can read.
    pub fn both(self, other: CounterSet) -> Self {
        Self(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_own_bit_and_name() {
        let mut names = std::collections::HashSet::new();
        let mut set = CounterSet::NONE;
        for counter in Counter::ALL {
            assert!(!set.contains(counter), "{counter:?} shares a bit");
            set = set.with(counter);
            assert!(names.insert(counter.name()));
        }
        assert_eq!(set, CounterSet::ALL);
        assert!(CounterSet::ALL
            .both(CounterSet::NONE.with(Counter::RunningMs))
            .contains(Counter::RunningMs));
        assert!(!CounterSet::ALL
            .both(CounterSet::NONE)
            .contains(Counter::RunningMs));
    }
}
