//! What one interval used, in base units, split by class of time: from the
//! counters where both samples carry them, from the gauges otherwise.
//!
//! A class is a part of the interval's time: running, the active part of
//! running, suspended, stopped. For each class the interval knows its
//! milliseconds and its integrals (allocated, max(requested, used) and used
//! vCPU and memory, GPU count, disk). Rating then sums the classes a resource
//! bills in; a gauge classifies (the closing sample's state, idleness and
//! GPU model), a counter measures.
//!
//! Counters make a lost sample cost resolution only: the difference of a
//! counter over a merged interval is the sum of its differences over the
//! parts. Gauges cannot: the closing sample's allocation and state hold over
//! the whole interval, which is the rule of samples without counters (and the
//! one `idlemeter rate` kept for every file written before them).

use crate::counters::{Counter, CounterSet};
use crate::sample::{LifecycleState, UsageSample};

const KIB: u128 = 1 << 10;
const MIB: u128 = 1 << 20;

/// A class of time within an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    Running = 0,
    /// Running and active: a part of `Running`, never added to it.
    Active = 1,
    Suspended = 2,
    Stopped = 3,
}

const CLASSES: usize = 4;

/// Integrals of one interval (or one price version's share of it), per class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct IntervalUsage {
    /// Length of the interval, milliseconds.
    pub millis: u64,
    pub ms: [u128; CLASSES],
    /// Allocated vCPU, vCPU-microseconds.
    pub vcpu_alloc: [u128; CLASSES],
    /// max(allocated vCPU, CPU used), vCPU-microseconds.
    pub vcpu_max: [u128; CLASSES],
    /// CPU used, microseconds.
    pub cpu_used: [u128; CLASSES],
    /// Allocated, max(allocated, used) and used memory, byte-milliseconds.
    pub mem_alloc: [u128; CLASSES],
    pub mem_max: [u128; CLASSES],
    pub mem_used: [u128; CLASSES],
    /// GPU count x milliseconds.
    pub gpu_alloc: [u128; CLASSES],
    /// Persistent disk, byte-milliseconds.
    pub disk: [u128; CLASSES],
    /// Bytes sent.
    pub net_tx: u128,
}

/// How running time splits into active and idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Activity {
    /// The idle policy's verdict on the interval (its closing sample).
    pub idle: bool,
    /// Whether the policy is the collector's own activity rule, so that the
    /// active counters measure exactly what it would classify.
    pub collector_rule: bool,
}

impl IntervalUsage {
    /// The usage of the interval from `previous` to `closing` (same epoch,
    /// checked to run forwards).
    pub fn between(previous: &UsageSample, closing: &UsageSample, activity: Activity) -> Self {
        let millis = u64::try_from(closing.ts.timestamp_millis() - previous.ts.timestamp_millis())
            .unwrap_or(0);
        let mut usage = Self::from_gauges(previous, closing, millis);
        let carried = previous.counters_present.both(closing.counters_present);
        if !carried.is_empty() {
            usage.overlay_running(previous, closing, carried);
        }
        usage.derive_active(activity.idle);
        if activity.collector_rule && !carried.is_empty() {
            usage.overlay_active(previous, closing, carried);
        }
        usage
    }

    /// Today's rule for samples without counters: the closing sample's state
    /// and allocations held over the whole interval.
    fn from_gauges(previous: &UsageSample, closing: &UsageSample, millis: u64) -> Self {
        let class = match closing.state {
            LifecycleState::Running => Class::Running,
            LifecycleState::Suspended => Class::Suspended,
            LifecycleState::Stopped => Class::Stopped,
        } as usize;
        let ms = u128::from(millis);
        let cpu = u128::from(closing.cpu_used_usec - previous.cpu_used_usec);
        let vcpu = u128::from(closing.vcpu.0) * ms;
        let mem = u128::from(closing.mem_bytes) * ms;
        let mem_used = u128::from(closing.mem_used_bytes) * ms;
        let mut usage = Self {
            millis,
            net_tx: u128::from(closing.net_tx_bytes - previous.net_tx_bytes),
            ..Self::default()
        };
        usage.ms[class] = ms;
        usage.vcpu_alloc[class] = vcpu;
        usage.vcpu_max[class] = vcpu.max(cpu);
        usage.cpu_used[class] = cpu;
        usage.mem_alloc[class] = mem;
        usage.mem_max[class] = mem.max(mem_used);
        usage.mem_used[class] = mem_used;
        usage.gpu_alloc[class] = u128::from(closing.gpu_count) * ms;
        usage.disk[class] = u128::from(closing.disk_bytes) * ms;
        usage
    }

    /// Replaces the running figures with counter differences where both
    /// samples carry the counter. Time in each state comes as a pair: with
    /// it, what is neither running nor suspended is stopped, and CPU time
    /// (which a frozen sandbox does not use) is all running.
    fn overlay_running(
        &mut self,
        previous: &UsageSample,
        closing: &UsageSample,
        carried: CounterSet,
    ) {
        let delta = |counter: Counter| {
            carried
                .contains(counter)
                .then(|| u128::from(closing.counter(counter) - previous.counter(counter)))
        };
        let running = Class::Running as usize;
        if let (Some(running_ms), Some(suspended_ms)) =
            (delta(Counter::RunningMs), delta(Counter::SuspendedMs))
        {
            let stopped_ms = u128::from(self.millis).saturating_sub(running_ms + suspended_ms);
            let cpu: u128 = self.cpu_used.iter().sum();
            for (class, ms) in [
                (Class::Running, running_ms),
                (Class::Suspended, suspended_ms),
                (Class::Stopped, stopped_ms),
            ] {
                self.rescale_gauge_class(class as usize, ms, closing);
            }
            self.cpu_used = [cpu, 0, 0, 0];
            self.vcpu_max[running] = self.vcpu_alloc[running].max(cpu);
        }
        let by = |counter: Counter, unit: u128| delta(counter).map(|value| value * unit);
        set(&mut self.vcpu_alloc[running], by(Counter::VcpuAllocUsec, 1));
        set(&mut self.vcpu_max[running], by(Counter::VcpuMaxUsec, 1));
        set(
            &mut self.mem_alloc[running],
            by(Counter::MemAllocKibMs, KIB),
        );
        set(&mut self.mem_max[running], by(Counter::MemMaxKibMs, KIB));
        set(&mut self.mem_used[running], by(Counter::MemUsedKibMs, KIB));
        set(&mut self.gpu_alloc[running], by(Counter::GpuAllocMs, 1));
        if let (Some(all), Some(disk_running)) = (
            by(Counter::DiskMibMs, MIB),
            by(Counter::DiskRunningMibMs, MIB),
        ) {
            self.disk[running] = disk_running;
            self.disk[Class::Suspended as usize] = all.saturating_sub(disk_running);
        }
    }

    /// The gauge figures of one class for `ms` milliseconds in it: the
    /// closing sample's allocation over the time the counters measured.
    fn rescale_gauge_class(&mut self, class: usize, ms: u128, closing: &UsageSample) {
        let vcpu = u128::from(closing.vcpu.0) * ms;
        let mem = u128::from(closing.mem_bytes) * ms;
        let mem_used = u128::from(closing.mem_used_bytes) * ms;
        self.ms[class] = ms;
        self.vcpu_alloc[class] = vcpu;
        self.vcpu_max[class] = vcpu;
        self.mem_alloc[class] = mem;
        self.mem_max[class] = mem.max(mem_used);
        self.mem_used[class] = if class == Class::Running as usize {
            mem_used
        } else {
            0
        };
        self.gpu_alloc[class] = u128::from(closing.gpu_count) * ms;
        self.disk[class] = u128::from(closing.disk_bytes) * ms;
    }

    /// The active class as the running one when the interval is not idle.
    fn derive_active(&mut self, idle: bool) {
        let (running, active) = (Class::Running as usize, Class::Active as usize);
        for field in self.per_class_mut() {
            field[active] = if idle { 0 } else { field[running] };
        }
    }

    /// Replaces the active figures with the collector's active counters.
    fn overlay_active(
        &mut self,
        previous: &UsageSample,
        closing: &UsageSample,
        carried: CounterSet,
    ) {
        let by = |counter: Counter, unit: u128| {
            carried
                .contains(counter)
                .then(|| u128::from(closing.counter(counter) - previous.counter(counter)) * unit)
        };
        let active = Class::Active as usize;
        set(&mut self.ms[active], by(Counter::ActiveMs, 1));
        set(
            &mut self.vcpu_alloc[active],
            by(Counter::VcpuAllocActiveUsec, 1),
        );
        set(
            &mut self.vcpu_max[active],
            by(Counter::VcpuMaxActiveUsec, 1),
        );
        set(
            &mut self.cpu_used[active],
            by(Counter::CpuUsedActiveUsec, 1),
        );
        set(
            &mut self.mem_alloc[active],
            by(Counter::MemAllocActiveKibMs, KIB),
        );
        set(
            &mut self.mem_max[active],
            by(Counter::MemMaxActiveKibMs, KIB),
        );
        set(
            &mut self.mem_used[active],
            by(Counter::MemUsedActiveKibMs, KIB),
        );
        set(
            &mut self.gpu_alloc[active],
            by(Counter::GpuAllocActiveMs, 1),
        );
        set(&mut self.disk[active], by(Counter::DiskActiveMibMs, MIB));
    }

    fn per_class_mut(&mut self) -> [&mut [u128; CLASSES]; 9] {
        [
            &mut self.ms,
            &mut self.vcpu_alloc,
            &mut self.vcpu_max,
            &mut self.cpu_used,
            &mut self.mem_alloc,
            &mut self.mem_max,
            &mut self.mem_used,
            &mut self.gpu_alloc,
            &mut self.disk,
        ]
    }

    /// The share of this interval `[start, end)` that falls in `[from, to)`,
    /// every integral split in proportion to time. Cumulative floors make the
    /// shares of a split interval sum exactly to the whole.
    pub fn share(&self, start: i64, end: i64, from: i64, to: i64) -> Self {
        if from <= start && to >= end {
            return *self;
        }
        let span = (end - start).max(1) as u128;
        let upto = |value: u128, at: i64| value * (at - start) as u128 / span;
        let part = |value: u128| upto(value, to) - upto(value, from);
        let mut shared = *self;
        shared.millis = (to - from) as u64;
        shared.net_tx = part(self.net_tx);
        for field in shared.per_class_mut() {
            for value in field.iter_mut() {
                *value = part(*value);
            }
        }
        shared
    }
}

fn set(target: &mut u128, value: Option<u128>) {
    if let Some(value) = value {
        *target = value;
    }
}
