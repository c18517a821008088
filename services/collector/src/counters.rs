//! Cumulative counters per (sandbox, epoch): the pure arithmetic of the collector.
//!
//! No clock and no I/O: the time of each reading comes in as an argument, so
//! every rule here is unit-tested with made-up readings.
//!
//! Rules:
//! - **Epochs.** A sandbox seen for the first time, a cgroup with a new instance
//!   (inode), or a CPU counter lower than the last one read starts a new epoch.
//!   An epoch number is the Unix millisecond at which the collector started it
//!   (and always above the previous epoch of the sandbox), so epochs stay unique
//!   even if the state file is lost: a collector without state can never reuse
//!   an old (sandbox, epoch, seq) identity.
//! - **CPU.** `cpu_used_usec` is the cgroup's own `usage_usec`, which starts at
//!   zero with the cgroup; the first sample of an epoch is the baseline anyway.
//! - **Integrals.** Each reading closes the interval since the previous one, and
//!   the interval takes the state and allocation seen at its end (the collector
//!   freezes and thaws sandboxes itself, so a state change is seen within one
//!   interval of happening). Allocated vCPU, memory and GPU and used memory
//!   accumulate while running; disk accumulates while running or suspended.
//!   Sub-KiB and sub-MiB remainders are carried, so rounding never accumulates.
//! - **By state.** Each interval also adds its length to `running_ms` or
//!   `suspended_ms`, and, when running, max(allocation, CPU used in the
//!   interval) to `vcpu_max_usec` and max(allocated, used memory) to
//!   `mem_max_kib_ms`, disk to `disk_running_mib_ms`. An interval whose
//!   reading shows an exec session or an open inbound connection (the
//!   built-in activity rule) is *active*: it adds the same amounts to the
//!   `*_active` counters too. Rating prices their differences, so a lost
//!   sample changes no bill (services/core/README.md).
//! - **Sequence.** `seq` rises by one per sample within an epoch.

use chrono::{DateTime, Utc};
use idlemeter_core::{CounterSet, Epoch, LifecycleState, NodeId, StateCounters, UsageSample};
use serde::{Deserialize, Serialize};

use crate::reader::SandboxReading;

const KIB: u128 = 1 << 10;
const MIB: u128 = 1 << 20;

/// Everything needed to continue a sandbox's counters; persisted in the state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxCounters {
    pub instance: u64,
    pub epoch: u64,
    pub seq: u64,
    pub last_ts_ms: i64,
    pub cpu_used_usec: u64,
    pub vcpu_alloc_usec: u64,
    pub mem_alloc_kib_ms: u64,
    pub mem_used_kib_ms: u64,
    pub gpu_alloc_ms: u64,
    pub disk_mib_ms: u64,
    pub api_calls: u64,
    /// The agent's raw API call count at the last reading.
    pub api_calls_seen: u64,
    /// Byte-milliseconds not yet worth a whole KiB-ms (memory) or MiB-ms (disk).
    pub mem_alloc_rem: u64,
    pub mem_used_rem: u64,
    pub disk_rem: u64,
    /// Network bytes within the epoch (received, sent).
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// The namespace and its raw interface counters at the last reading.
    pub net_namespace: u64,
    pub net_rx_seen: u64,
    pub net_tx_seen: u64,
    /// GPU busy milliseconds (SM percent x ms / 100) and the percent-ms
    /// remainder below one whole millisecond.
    pub gpu_busy_ms: u64,
    pub gpu_busy_rem: u64,
    /// Counters by state and activity (see `idlemeter_core::StateCounters`):
    /// what the sample reports, plus the sub-unit remainders of the memory
    /// (KiB-ms) and disk (MiB-ms) ones.
    pub by_state: StateCounters,
    pub mem_alloc_active_rem: u64,
    pub mem_max_rem: u64,
    pub mem_max_active_rem: u64,
    pub mem_used_active_rem: u64,
    pub disk_running_rem: u64,
    pub disk_active_rem: u64,
}

/// Whether a reading continues the counters' epoch or starts a new one.
pub fn continues_epoch(counters: &SandboxCounters, reading: &SandboxReading) -> bool {
    counters.instance == reading.instance && reading.cpu_usage_usec >= counters.cpu_used_usec
}

/// The counters after `reading`, taken at `now_ms` (Unix milliseconds).
pub fn advance(
    previous: Option<&SandboxCounters>,
    reading: &SandboxReading,
    now_ms: i64,
) -> SandboxCounters {
    match previous {
        Some(counters) if continues_epoch(counters, reading) => {
            accumulate(counters, reading, now_ms)
        }
        _ => start_epoch(previous.map(|counters| counters.epoch), reading, now_ms),
    }
}

fn start_epoch(
    previous_epoch: Option<u64>,
    reading: &SandboxReading,
    now_ms: i64,
) -> SandboxCounters {
    let clock_epoch = u64::try_from(now_ms).unwrap_or(0);
    let epoch = match previous_epoch {
        Some(previous) => clock_epoch.max(previous + 1),
        None => clock_epoch,
    };
    SandboxCounters {
        instance: reading.instance,
        epoch,
        seq: 1,
        last_ts_ms: now_ms,
        cpu_used_usec: reading.cpu_usage_usec,
        api_calls_seen: reading.activity.api_calls_total,
        net_namespace: reading.net.map_or(0, |net| net.namespace),
        net_rx_seen: reading.net.map_or(0, |net| net.rx),
        net_tx_seen: reading.net.map_or(0, |net| net.tx),
        ..SandboxCounters::default()
    }
}

fn accumulate(
    previous: &SandboxCounters,
    reading: &SandboxReading,
    now_ms: i64,
) -> SandboxCounters {
    let elapsed_ms = u64::try_from(now_ms - previous.last_ts_ms).unwrap_or(0);
    let allocation = &reading.allocation;
    let running = !reading.frozen;
    let mut next = previous.clone();
    next.seq += 1;
    next.last_ts_ms = now_ms.max(previous.last_ts_ms);
    next.cpu_used_usec = reading.cpu_usage_usec;
    next.api_calls += counter_since(previous.api_calls_seen, reading.activity.api_calls_total);
    next.api_calls_seen = reading.activity.api_calls_total;
    if let Some(net) = reading.net {
        // The same namespace: what its counters rose by (a counter that went
        // down was reset, so all of it is new). Another namespace (the
        // sandbox's network was recreated): a new baseline, nothing counted.
        if net.namespace == previous.net_namespace {
            next.net_rx_bytes += counter_since(previous.net_rx_seen, net.rx);
            next.net_tx_bytes += counter_since(previous.net_tx_seen, net.tx);
        }
        next.net_namespace = net.namespace;
        next.net_rx_seen = net.rx;
        next.net_tx_seen = net.tx;
    }
    if running {
        next.vcpu_alloc_usec += u64::from(allocation.vcpu_milli) * elapsed_ms;
        next.gpu_alloc_ms += u64::from(allocation.gpu_count) * elapsed_ms;
        (next.mem_alloc_kib_ms, next.mem_alloc_rem) = integrate(
            (previous.mem_alloc_kib_ms, previous.mem_alloc_rem),
            allocation.mem_bytes,
            elapsed_ms,
            KIB,
        );
        let busy = previous.gpu_busy_rem + u64::from(reading.gpu_sm_percent) * elapsed_ms;
        next.gpu_busy_ms += busy / 100;
        next.gpu_busy_rem = busy % 100;
        (next.mem_used_kib_ms, next.mem_used_rem) = integrate(
            (previous.mem_used_kib_ms, previous.mem_used_rem),
            reading.mem_used_bytes.unwrap_or(0),
            elapsed_ms,
            KIB,
        );
    }
    (next.disk_mib_ms, next.disk_rem) = integrate(
        (previous.disk_mib_ms, previous.disk_rem),
        allocation.disk_bytes,
        elapsed_ms,
        MIB,
    );
    accumulate_by_state(previous, reading, elapsed_ms, &mut next);
    next
}

/// The counters by state and activity over one interval (see the module doc).
fn accumulate_by_state(
    previous: &SandboxCounters,
    reading: &SandboxReading,
    elapsed_ms: u64,
    next: &mut SandboxCounters,
) {
    let allocation = &reading.allocation;
    let counters = &mut next.by_state;
    if reading.frozen {
        counters.suspended_ms += elapsed_ms;
        return;
    }
    let active = reading.activity.exec_sessions > 0 || reading.activity.open_conns > 0;
    let vcpu_alloc = u64::from(allocation.vcpu_milli) * elapsed_ms;
    let cpu_used = reading
        .cpu_usage_usec
        .saturating_sub(previous.cpu_used_usec);
    let vcpu_max = vcpu_alloc.max(cpu_used);
    let mem_used = reading.mem_used_bytes.unwrap_or(0);
    let mem_max = allocation.mem_bytes.max(mem_used);
    counters.running_ms += elapsed_ms;
    counters.vcpu_max_usec += vcpu_max;
    (counters.mem_max_kib_ms, next.mem_max_rem) = integrate(
        (counters.mem_max_kib_ms, previous.mem_max_rem),
        mem_max,
        elapsed_ms,
        KIB,
    );
    (counters.disk_running_mib_ms, next.disk_running_rem) = integrate(
        (counters.disk_running_mib_ms, previous.disk_running_rem),
        allocation.disk_bytes,
        elapsed_ms,
        MIB,
    );
    if !active {
        return;
    }
    counters.active_ms += elapsed_ms;
    counters.vcpu_alloc_active_usec += vcpu_alloc;
    counters.vcpu_max_active_usec += vcpu_max;
    counters.cpu_used_active_usec += cpu_used;
    counters.gpu_alloc_active_ms += u64::from(allocation.gpu_count) * elapsed_ms;
    (counters.mem_alloc_active_kib_ms, next.mem_alloc_active_rem) = integrate(
        (
            counters.mem_alloc_active_kib_ms,
            previous.mem_alloc_active_rem,
        ),
        allocation.mem_bytes,
        elapsed_ms,
        KIB,
    );
    (counters.mem_max_active_kib_ms, next.mem_max_active_rem) = integrate(
        (counters.mem_max_active_kib_ms, previous.mem_max_active_rem),
        mem_max,
        elapsed_ms,
        KIB,
    );
    (counters.mem_used_active_kib_ms, next.mem_used_active_rem) = integrate(
        (
            counters.mem_used_active_kib_ms,
            previous.mem_used_active_rem,
        ),
        mem_used,
        elapsed_ms,
        KIB,
    );
    (counters.disk_active_mib_ms, next.disk_active_rem) = integrate(
        (counters.disk_active_mib_ms, previous.disk_active_rem),
        allocation.disk_bytes,
        elapsed_ms,
        MIB,
    );
}

/// Adds `bytes` held for `elapsed_ms` to a (whole units, leftover byte-ms) pair.
fn integrate(total: (u64, u64), bytes: u64, elapsed_ms: u64, unit: u128) -> (u64, u64) {
    let (whole, leftover) = total;
    let byte_ms = u128::from(bytes) * u128::from(elapsed_ms) + u128::from(leftover);
    let added = u64::try_from(byte_ms / unit).unwrap_or(u64::MAX);
    let leftover = u64::try_from(byte_ms % unit).expect("a remainder is below the unit");
    (whole.saturating_add(added), leftover)
}

/// API calls since the last reading; an agent whose count went back (it
/// restarted) counts from zero again.
/// How much a raw counter rose since `seen`; a lower value means it was reset.
pub(crate) fn counter_since(seen: u64, now: u64) -> u64 {
    if now >= seen {
        now - seen
    } else {
        now
    }
}

/// The sample that reports `counters` after `reading`.
pub fn to_sample(
    node: &NodeId,
    reading: &SandboxReading,
    counters: &SandboxCounters,
    ts: DateTime<Utc>,
) -> UsageSample {
    let allocation = &reading.allocation;
    UsageSample {
        customer: reading.key.customer.clone(),
        node: node.clone(),
        sandbox: reading.key.sandbox.clone(),
        epoch: Epoch(counters.epoch),
        seq: counters.seq,
        ts,
        state: if reading.frozen {
            LifecycleState::Suspended
        } else {
            LifecycleState::Running
        },
        vcpu: allocation.vcpu(),
        mem_bytes: allocation.mem_bytes,
        gpu_model: allocation
            .gpu_model
            .clone()
            .filter(|_| allocation.gpu_count > 0),
        gpu_count: allocation.gpu_count,
        disk_bytes: allocation.disk_bytes,
        cpu_used_usec: counters.cpu_used_usec,
        net_rx_bytes: counters.net_rx_bytes,
        net_tx_bytes: counters.net_tx_bytes,
        vcpu_alloc_usec: counters.vcpu_alloc_usec,
        mem_alloc_kib_ms: counters.mem_alloc_kib_ms,
        mem_used_kib_ms: counters.mem_used_kib_ms,
        gpu_alloc_ms: counters.gpu_alloc_ms,
        disk_mib_ms: counters.disk_mib_ms,
        api_calls: counters.api_calls,
        mem_used_bytes: reading.mem_used_bytes.unwrap_or(0),
        exec_sessions: reading.activity.exec_sessions,
        open_conns: reading.activity.open_conns,
        detail: idlemeter_core::SampleDetail {
            gpu_busy_ms: counters.gpu_busy_ms,
            ..reading.detail
        },
        state_counters: counters.by_state,
        counters_present: CounterSet::ALL,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::sandbox::{Activity, Allocation, SandboxKey};

    const T0: i64 = 1_790_000_000_000;

    fn reading(instance: u64, cpu_usage_usec: u64, frozen: bool) -> SandboxReading {
        SandboxReading {
            key: SandboxKey::from_cgroup_name("acme.sbx-1").expect("valid name"),
            name: Arc::from("acme.sbx-1"),
            instance,
            cpu_usage_usec,
            mem_used_bytes: Some(1536),
            frozen,
            net: None,
            detail: idlemeter_core::SampleDetail::default(),
            gpu_sm_percent: 0,
            allocation: Arc::new(Allocation {
                vcpu_milli: 1500,
                mem_bytes: 4 << 30,
                disk_bytes: 3 << 19, // 1.5 MiB
                gpu_model: Some("H100".to_owned()),
                gpu_count: 2,
            }),
            activity: Activity::default(),
        }
    }

    #[test]
    fn first_reading_starts_an_epoch_numbered_by_the_clock() {
        let counters = advance(None, &reading(7, 5_000, false), T0);
        assert_eq!(counters.epoch, T0 as u64);
        assert_eq!(counters.seq, 1);
        assert_eq!(counters.cpu_used_usec, 5_000);
        assert_eq!(
            counters.vcpu_alloc_usec, 0,
            "the baseline accumulates nothing"
        );
    }

    #[test]
    fn running_second_accumulates_every_integral() {
        let first = advance(None, &reading(7, 5_000, false), T0);
        let second = advance(Some(&first), &reading(7, 905_000, false), T0 + 1_000);
        assert_eq!(second.epoch, first.epoch);
        assert_eq!(second.seq, 2);
        assert_eq!(second.cpu_used_usec, 905_000);
        // 1.5 vCPU for 1 s = 1.5 vCPU-seconds = 1,500,000 vCPU-µs.
        assert_eq!(second.vcpu_alloc_usec, 1_500_000);
        // 4 GiB = 4,194,304 KiB for 1,000 ms.
        assert_eq!(second.mem_alloc_kib_ms, 4_194_304_000);
        // 1.5 KiB used for 1,000 ms.
        assert_eq!(second.mem_used_kib_ms, 1_500);
        assert_eq!(second.gpu_alloc_ms, 2_000);
        // 1.5 MiB for 1,000 ms.
        assert_eq!(second.disk_mib_ms, 1_500);
    }

    #[test]
    fn remainders_carry_so_small_intervals_add_up_exactly() {
        let mut counters = advance(None, &reading(7, 0, false), T0);
        for step in 1..=1_000 {
            counters = advance(Some(&counters), &reading(7, 0, false), T0 + step);
        }
        // 1.5 KiB for 1,000 ms in 1 ms steps: each step alone is 1 KiB-ms and
        // change; carried remainders make it exactly 1,500.
        assert_eq!(counters.mem_used_kib_ms, 1_500);
        assert_eq!(counters.disk_mib_ms, 1_500);
    }

    #[test]
    fn suspended_interval_bills_disk_only() {
        let first = advance(None, &reading(7, 5_000, false), T0);
        let frozen = advance(Some(&first), &reading(7, 5_000, true), T0 + 2_000);
        assert_eq!(frozen.vcpu_alloc_usec, 0);
        assert_eq!(frozen.mem_alloc_kib_ms, 0);
        assert_eq!(frozen.mem_used_kib_ms, 0);
        assert_eq!(frozen.gpu_alloc_ms, 0);
        assert_eq!(frozen.disk_mib_ms, 3_000);
        assert_eq!(frozen.seq, 2);
    }

    #[test]
    fn cpu_counter_going_back_starts_a_new_epoch() {
        let first = advance(None, &reading(7, 5_000, false), T0);
        let second = advance(Some(&first), &reading(7, 10, false), T0 + 1_000);
        assert_eq!(second.epoch, T0 as u64 + 1_000);
        assert_eq!(second.seq, 1);
        assert_eq!(second.cpu_used_usec, 10);
        assert_eq!(second.disk_mib_ms, 0);
    }

    #[test]
    fn recreated_cgroup_starts_a_new_epoch_even_with_higher_counters() {
        let first = advance(None, &reading(7, 5_000, false), T0);
        let second = advance(Some(&first), &reading(8, 9_000, false), T0 + 1_000);
        assert_ne!(second.epoch, first.epoch);
        assert_eq!(second.seq, 1);
    }

    #[test]
    fn new_epoch_is_above_the_old_one_even_if_the_clock_went_back() {
        let first = advance(None, &reading(7, 5_000, false), T0);
        let second = advance(Some(&first), &reading(8, 0, false), T0 - 60_000);
        assert_eq!(second.epoch, first.epoch + 1);
    }

    #[test]
    fn clock_going_back_adds_nothing_and_keeps_the_epoch() {
        let first = advance(None, &reading(7, 5_000, false), T0);
        let second = advance(Some(&first), &reading(7, 6_000, false), T0 - 5_000);
        assert_eq!(second.epoch, first.epoch);
        assert_eq!(second.vcpu_alloc_usec, 0);
        assert_eq!(second.last_ts_ms, T0);
    }

    #[test]
    fn api_calls_count_per_epoch_and_survive_an_agent_restart() {
        let mut with_calls = reading(7, 0, false);
        with_calls.activity.api_calls_total = 100;
        let first = advance(None, &with_calls, T0);
        with_calls.activity.api_calls_total = 130;
        let second = advance(Some(&first), &with_calls, T0 + 1_000);
        assert_eq!(second.api_calls, 30);
        with_calls.activity.api_calls_total = 4;
        let third = advance(Some(&second), &with_calls, T0 + 2_000);
        assert_eq!(third.api_calls, 34);
    }

    #[test]
    fn sample_reports_state_allocation_and_counters() {
        let first = advance(None, &reading(7, 5_000, false), T0);
        let frozen_reading = reading(7, 5_000, true);
        let second = advance(Some(&first), &frozen_reading, T0 + 1_000);
        let node = NodeId::parse("node-1").expect("valid id");
        let ts = DateTime::from_timestamp_millis(T0 + 1_000).expect("valid time");
        let sample = to_sample(&node, &frozen_reading, &second, ts);
        assert_eq!(sample.state, LifecycleState::Suspended);
        assert_eq!(sample.epoch, Epoch(T0 as u64));
        assert_eq!(sample.seq, 2);
        assert_eq!(sample.gpu_model.as_deref(), Some("H100"));
        assert_eq!(sample.disk_mib_ms, 1_500);
        assert!(sample.validate().is_ok());
    }

    #[test]
    fn network_bytes_count_from_the_epoch_start_across_resets_and_namespaces() {
        let with_net = |namespace, rx, tx| SandboxReading {
            net: Some(crate::reader::NetBytes { namespace, rx, tx }),
            ..reading(7, 5_000, false)
        };
        // The interfaces had traffic before the epoch: it is the baseline.
        let first = advance(None, &with_net(1, 1_000, 100), T0);
        assert_eq!((first.net_rx_bytes, first.net_tx_bytes), (0, 0));
        let second = advance(Some(&first), &with_net(1, 1_500, 130), T0 + 1_000);
        assert_eq!((second.net_rx_bytes, second.net_tx_bytes), (500, 30));
        // No reading (the process exited): the counters carry over.
        let third = advance(Some(&second), &reading(7, 5_000, false), T0 + 2_000);
        assert_eq!((third.net_rx_bytes, third.net_tx_bytes), (500, 30));
        // A counter that went down was reset: all of it is new.
        let fourth = advance(Some(&third), &with_net(1, 200, 160), T0 + 3_000);
        assert_eq!((fourth.net_rx_bytes, fourth.net_tx_bytes), (700, 60));
        // Another namespace: a new baseline, even with higher raw counters.
        let fifth = advance(Some(&fourth), &with_net(2, 90_000, 90_000), T0 + 4_000);
        assert_eq!((fifth.net_rx_bytes, fifth.net_tx_bytes), (700, 60));
        let sixth = advance(Some(&fifth), &with_net(2, 90_010, 90_001), T0 + 5_000);
        assert_eq!((sixth.net_rx_bytes, sixth.net_tx_bytes), (710, 61));
        let sample = to_sample(
            &NodeId::parse("node-1").expect("valid"),
            &reading(7, 5_000, false),
            &sixth,
            DateTime::from_timestamp_millis(T0 + 5_000).expect("valid"),
        );
        assert_eq!((sample.net_rx_bytes, sample.net_tx_bytes), (710, 61));
    }

    #[test]
    fn gpu_busy_time_integrates_utilisation_while_running_with_no_rounding_drift() {
        let busy = |percent, frozen| SandboxReading {
            gpu_sm_percent: percent,
            ..reading(7, 5_000, frozen)
        };
        let mut counters = advance(None, &busy(0, false), T0);
        // 33% for 1 ms, 300 times: 99 ms exactly, not 0 (rounding per step) or 300.
        for step in 1..=300 {
            counters = advance(Some(&counters), &busy(33, false), T0 + step);
        }
        assert_eq!(counters.gpu_busy_ms, 99);
        // Two fully busy GPUs for a second: 2,000 ms.
        counters = advance(Some(&counters), &busy(200, false), T0 + 1_300);
        assert_eq!(counters.gpu_busy_ms, 2_099);
        // Frozen: nothing accrues.
        counters = advance(Some(&counters), &busy(100, true), T0 + 2_300);
        assert_eq!(counters.gpu_busy_ms, 2_099);
    }
}
