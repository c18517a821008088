//! The usage sample: what a collector measured of one sandbox at one instant.
//!
//! A sample carries *cumulative* counters for one sandbox epoch, never deltas:
//! usage over any window is the difference of two samples of the same epoch. A
//! lost sample therefore costs resolution, a duplicated one costs nothing, and a
//! reordered one is put back in place by its `seq`.
//!
//! The state, allocations and activity of a sample describe the interval since
//! the previous sample of the same (sandbox, epoch); the first sample of an epoch
//! is the baseline and bills nothing.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::counters::{Counter, CounterSet, StateCounters};
use crate::ids::{CustomerId, Epoch, NodeId, SandboxId};

/// Why a sample (or one of its fields) is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    #[error("field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

impl SampleError {
    pub fn field(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Field {
            field,
            reason: reason.into(),
        }
    }
}

/// Lifecycle state of a sandbox over a sample's interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleState {
    /// Booted and schedulable: compute bills (subject to the idle rules).
    Running,
    /// Frozen or snapshotted: compute does not bill, storage does.
    Suspended,
    /// Gone: nothing bills but what the sheet says persists.
    Stopped,
}

impl LifecycleState {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleState::Running => "running",
            LifecycleState::Suspended => "suspended",
            LifecycleState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for LifecycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LifecycleState {
    type Err = SampleError;
    fn from_str(value: &str) -> Result<Self, SampleError> {
        match value {
            "running" => Ok(LifecycleState::Running),
            "suspended" => Ok(LifecycleState::Suspended),
            "stopped" => Ok(LifecycleState::Stopped),
            other => Err(SampleError::field(
                "state",
                format!("{other:?} is not one of running, suspended, stopped"),
            )),
        }
    }
}

/// Allocated vCPUs in thousandths (1.5 vCPU = 1500). Integer so that the hot
/// rating path multiplies integers; three decimals cover every published minimum
/// (Modal's 0.125 core is 0.25 vCPU).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct VcpuMillis(pub u32);

impl VcpuMillis {
    /// Parses a decimal vCPU count with at most three decimal places.
    pub fn from_decimal(vcpu: Decimal) -> Result<Self, SampleError> {
        if vcpu.is_sign_negative() {
            return Err(SampleError::field("vcpu", format!("{vcpu} is negative")));
        }
        let millis = vcpu * Decimal::ONE_THOUSAND;
        if millis.fract() != Decimal::ZERO {
            return Err(SampleError::field(
                "vcpu",
                format!("{vcpu} has more than three decimal places"),
            ));
        }
        let millis = millis
            .to_u32()
            .ok_or_else(|| SampleError::field("vcpu", format!("{vcpu} is too large")))?;
        Ok(Self(millis))
    }

    pub fn to_decimal(self) -> Decimal {
        Decimal::new(i64::from(self.0), 3)
    }
}

/// One measurement of one sandbox. See the module doc for the interval semantics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageSample {
    // Identity: (sandbox, epoch, seq) is unique; customer and node travel along.
    pub customer: CustomerId,
    pub node: NodeId,
    pub sandbox: SandboxId,
    pub epoch: Epoch,
    /// Rises by at least one per sample within an epoch.
    pub seq: u64,
    /// When the sample was taken, millisecond precision, UTC.
    pub ts: DateTime<Utc>,
    pub state: LifecycleState,

    // Allocations held over the interval.
    pub vcpu: VcpuMillis,
    pub mem_bytes: u64,
    pub gpu_model: Option<String>,
    pub gpu_count: u32,
    pub disk_bytes: u64,

    // Cumulative counters within the epoch.
    /// CPU time used, microseconds (cgroup `usage_usec`).
    pub cpu_used_usec: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// Allocated vCPU-microseconds while running: 1 vCPU for 1 s adds 1,000,000.
    /// Directly comparable with `cpu_used_usec`.
    pub vcpu_alloc_usec: u64,
    /// Allocated memory integral in KiB-milliseconds while running. KiB, not
    /// bytes: a byte-ms counter of a 64 GiB sandbox overflows u64 in 3 days.
    pub mem_alloc_kib_ms: u64,
    /// Used memory integral in KiB-milliseconds while running.
    pub mem_used_kib_ms: u64,
    /// GPU-milliseconds allocated while running (count x ms).
    pub gpu_alloc_ms: u64,
    /// Persistent disk integral in MiB-milliseconds, running or suspended.
    pub disk_mib_ms: u64,
    /// Platform API calls that named this sandbox.
    pub api_calls: u64,

    // Gauges at sample time.
    pub mem_used_bytes: u64,
    /// Open exec/PTY sessions.
    pub exec_sessions: u32,
    /// Open inbound connections.
    pub open_conns: u32,

    /// Measures that no default sheet bills (see [`SampleDetail`]).
    #[serde(default, skip_serializing_if = "SampleDetail::is_empty")]
    pub detail: SampleDetail,

    /// Counters by lifecycle state and activity (see [`StateCounters`]).
    #[serde(default)]
    pub state_counters: StateCounters,
    /// Which billed counters this sample carries; rating reads a counter
    /// only where both samples of an interval carry it, and the gauges
    /// otherwise (samples of collectors that predate the counters).
    #[serde(default)]
    pub counters_present: CounterSet,
}

/// What a sample can say beyond the billed counters: GPU utilisation,
/// pressure stall time, peak memory and block I/O. Cumulative fields follow
/// the same rule as the billed counters (within an epoch, never back); 0 where
/// the node cannot measure it. Read at a slower cadence than the billed
/// counters, so consecutive samples may repeat a value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleDetail {
    /// Cumulative GPU busy time: SM utilisation x milliseconds, summed over
    /// the sandbox's GPU processes (two fully busy GPUs add 2 ms per ms).
    pub gpu_busy_ms: u64,
    /// GPU memory held by the sandbox's processes at sample time.
    pub gpu_mem_used_bytes: u64,
    /// Cumulative pressure stall ("some") of `cpu.pressure`, microseconds.
    pub cpu_pressure_usec: u64,
    /// Cumulative pressure stall ("some") of `memory.pressure`, microseconds.
    pub mem_pressure_usec: u64,
    /// Cumulative pressure stall ("some") of `io.pressure`, microseconds.
    pub io_pressure_usec: u64,
    /// Highest memory use the kernel has seen for the sandbox's cgroup.
    pub mem_peak_bytes: u64,
    /// Cumulative block-device bytes read and written.
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

impl SampleDetail {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl UsageSample {
    /// A running sample with no allocation, every counter and gauge at zero
    /// and no counter marked carried: the base a literal completes with
    /// `..UsageSample::blank(...)`, naming only what it sets.
    pub fn blank(
        customer: CustomerId,
        node: NodeId,
        sandbox: SandboxId,
        epoch: Epoch,
        seq: u64,
        ts: DateTime<Utc>,
    ) -> Self {
        Self {
            customer,
            node,
            sandbox,
            epoch,
            seq,
            ts,
            state: LifecycleState::Running,
            vcpu: VcpuMillis(0),
            mem_bytes: 0,
            gpu_model: None,
            gpu_count: 0,
            disk_bytes: 0,
            cpu_used_usec: 0,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            vcpu_alloc_usec: 0,
            mem_alloc_kib_ms: 0,
            mem_used_kib_ms: 0,
            gpu_alloc_ms: 0,
            disk_mib_ms: 0,
            api_calls: 0,
            mem_used_bytes: 0,
            exec_sessions: 0,
            open_conns: 0,
            detail: SampleDetail::default(),
            state_counters: StateCounters::default(),
            counters_present: CounterSet::NONE,
        }
    }

    /// The value of one billed counter (whether or not the sample carries it).
    pub fn counter(&self, counter: Counter) -> u64 {
        let by_state = &self.state_counters;
        match counter {
            Counter::VcpuAllocUsec => self.vcpu_alloc_usec,
            Counter::MemAllocKibMs => self.mem_alloc_kib_ms,
            Counter::MemUsedKibMs => self.mem_used_kib_ms,
            Counter::GpuAllocMs => self.gpu_alloc_ms,
            Counter::DiskMibMs => self.disk_mib_ms,
            Counter::RunningMs => by_state.running_ms,
            Counter::SuspendedMs => by_state.suspended_ms,
            Counter::ActiveMs => by_state.active_ms,
            Counter::VcpuAllocActiveUsec => by_state.vcpu_alloc_active_usec,
            Counter::VcpuMaxUsec => by_state.vcpu_max_usec,
            Counter::VcpuMaxActiveUsec => by_state.vcpu_max_active_usec,
            Counter::CpuUsedActiveUsec => by_state.cpu_used_active_usec,
            Counter::MemAllocActiveKibMs => by_state.mem_alloc_active_kib_ms,
            Counter::MemMaxKibMs => by_state.mem_max_kib_ms,
            Counter::MemMaxActiveKibMs => by_state.mem_max_active_kib_ms,
            Counter::MemUsedActiveKibMs => by_state.mem_used_active_kib_ms,
            Counter::GpuAllocActiveMs => by_state.gpu_alloc_active_ms,
            Counter::DiskRunningMibMs => by_state.disk_running_mib_ms,
            Counter::DiskActiveMibMs => by_state.disk_active_mib_ms,
        }
    }

    /// Sets one billed counter and marks it carried.
    pub fn set_counter(&mut self, counter: Counter, value: u64) {
        let by_state = &mut self.state_counters;
        let slot = match counter {
            Counter::VcpuAllocUsec => &mut self.vcpu_alloc_usec,
            Counter::MemAllocKibMs => &mut self.mem_alloc_kib_ms,
            Counter::MemUsedKibMs => &mut self.mem_used_kib_ms,
            Counter::GpuAllocMs => &mut self.gpu_alloc_ms,
            Counter::DiskMibMs => &mut self.disk_mib_ms,
            Counter::RunningMs => &mut by_state.running_ms,
            Counter::SuspendedMs => &mut by_state.suspended_ms,
            Counter::ActiveMs => &mut by_state.active_ms,
            Counter::VcpuAllocActiveUsec => &mut by_state.vcpu_alloc_active_usec,
            Counter::VcpuMaxUsec => &mut by_state.vcpu_max_usec,
            Counter::VcpuMaxActiveUsec => &mut by_state.vcpu_max_active_usec,
            Counter::CpuUsedActiveUsec => &mut by_state.cpu_used_active_usec,
            Counter::MemAllocActiveKibMs => &mut by_state.mem_alloc_active_kib_ms,
            Counter::MemMaxKibMs => &mut by_state.mem_max_kib_ms,
            Counter::MemMaxActiveKibMs => &mut by_state.mem_max_active_kib_ms,
            Counter::MemUsedActiveKibMs => &mut by_state.mem_used_active_kib_ms,
            Counter::GpuAllocActiveMs => &mut by_state.gpu_alloc_active_ms,
            Counter::DiskRunningMibMs => &mut by_state.disk_running_mib_ms,
            Counter::DiskActiveMibMs => &mut by_state.disk_active_mib_ms,
        };
        *slot = value;
        self.counters_present = self.counters_present.with(counter);
    }

    /// Checks what types cannot: a GPU count without a model and the reverse.
    pub fn validate(&self) -> Result<(), SampleError> {
        match (&self.gpu_model, self.gpu_count) {
            (None, count) if count > 0 => Err(SampleError::field(
                "gpu_model",
                format!("missing while gpu_count is {count}"),
            )),
            (Some(model), _) if model.trim().is_empty() => Err(SampleError::field(
                "gpu_model",
                "is empty: use null for no GPU",
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_parses_three_decimals_and_refuses_more() {
        let parse = |s: &str| VcpuMillis::from_decimal(Decimal::from_str(s).expect("decimal"));
        assert_eq!(parse("1.5"), Ok(VcpuMillis(1500)));
        assert_eq!(parse("0.125"), Ok(VcpuMillis(125)));
        assert_eq!(parse("2"), Ok(VcpuMillis(2000)));
        assert!(parse("0.0625").is_err());
        assert!(parse("-1").is_err());
        assert_eq!(VcpuMillis(250).to_decimal().to_string(), "0.250");
    }

    #[test]
    fn lifecycle_state_parses_only_known_names() {
        assert_eq!("suspended".parse(), Ok(LifecycleState::Suspended));
        assert!("paused".parse::<LifecycleState>().is_err());
    }
}
