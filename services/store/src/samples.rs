//! Inserting usage samples into `usage_samples` (migration 0001).

use idlemeter_core::{LifecycleState, UsageSample};
use serde_repr::Serialize_repr;

use crate::{Context, Result, Store};

/// `Enum8('running' = 1, 'suspended' = 2, 'stopped' = 3)` as RowBinary sends it.
#[derive(Debug, Clone, Copy, Serialize_repr)]
#[repr(i8)]
pub(crate) enum StateColumn {
    Running = 1,
    Suspended = 2,
    Stopped = 3,
}

impl From<LifecycleState> for StateColumn {
    fn from(state: LifecycleState) -> Self {
        match state {
            LifecycleState::Running => StateColumn::Running,
            LifecycleState::Suspended => StateColumn::Suspended,
            LifecycleState::Stopped => StateColumn::Stopped,
        }
    }
}

/// One row of `usage_samples`, borrowing from the sample; field order is column order.
#[derive(Debug, clickhouse::Row, serde::Serialize)]
pub struct SampleRow<'a> {
    customer: &'a str,
    sandbox: &'a str,
    node: &'a str,
    epoch: u64,
    seq: u64,
    ts: u32,
    ts_ms: u64,
    state: StateColumn,
    vcpu_milli: u32,
    mem_bytes: u64,
    gpu_model: &'a str,
    gpu_count: u32,
    disk_bytes: u64,
    cpu_used_usec: u64,
    net_rx_bytes: u64,
    net_tx_bytes: u64,
    vcpu_alloc_usec: u64,
    mem_alloc_kib_ms: u64,
    mem_used_kib_ms: u64,
    gpu_alloc_ms: u64,
    disk_mib_ms: u64,
    api_calls: u64,
    mem_used_bytes: u64,
    exec_sessions: u32,
    open_conns: u32,
    gpu_busy_ms: u64,
    gpu_mem_used_bytes: u64,
    cpu_pressure_usec: u64,
    mem_pressure_usec: u64,
    io_pressure_usec: u64,
    mem_peak_bytes: u64,
    io_read_bytes: u64,
    io_write_bytes: u64,
    counters_present: u32,
    running_ms: u64,
    suspended_ms: u64,
    active_ms: u64,
    vcpu_alloc_active_usec: u64,
    vcpu_max_usec: u64,
    vcpu_max_active_usec: u64,
    cpu_used_active_usec: u64,
    mem_alloc_active_kib_ms: u64,
    mem_max_kib_ms: u64,
    mem_max_active_kib_ms: u64,
    mem_used_active_kib_ms: u64,
    gpu_alloc_active_ms: u64,
    disk_running_mib_ms: u64,
    disk_active_mib_ms: u64,
}

impl<'a> From<&'a UsageSample> for SampleRow<'a> {
    fn from(sample: &'a UsageSample) -> Self {
        let ts_ms = u64::try_from(sample.ts.timestamp_millis())
            .expect("ingest refuses samples before 1970");
        SampleRow {
            customer: sample.customer.as_str(),
            sandbox: sample.sandbox.as_str(),
            node: sample.node.as_str(),
            epoch: sample.epoch.0,
            seq: sample.seq,
            ts: u32::try_from(ts_ms / 1000).unwrap_or(u32::MAX),
            ts_ms,
            state: sample.state.into(),
            vcpu_milli: sample.vcpu.0,
            mem_bytes: sample.mem_bytes,
            gpu_model: sample.gpu_model.as_deref().unwrap_or(""),
            gpu_count: sample.gpu_count,
            disk_bytes: sample.disk_bytes,
            cpu_used_usec: sample.cpu_used_usec,
            net_rx_bytes: sample.net_rx_bytes,
            net_tx_bytes: sample.net_tx_bytes,
            vcpu_alloc_usec: sample.vcpu_alloc_usec,
            mem_alloc_kib_ms: sample.mem_alloc_kib_ms,
            mem_used_kib_ms: sample.mem_used_kib_ms,
            gpu_alloc_ms: sample.gpu_alloc_ms,
            disk_mib_ms: sample.disk_mib_ms,
            api_calls: sample.api_calls,
            mem_used_bytes: sample.mem_used_bytes,
            exec_sessions: sample.exec_sessions,
            open_conns: sample.open_conns,
            gpu_busy_ms: sample.detail.gpu_busy_ms,
            gpu_mem_used_bytes: sample.detail.gpu_mem_used_bytes,
            cpu_pressure_usec: sample.detail.cpu_pressure_usec,
            mem_pressure_usec: sample.detail.mem_pressure_usec,
            io_pressure_usec: sample.detail.io_pressure_usec,
            mem_peak_bytes: sample.detail.mem_peak_bytes,
            io_read_bytes: sample.detail.io_read_bytes,
            io_write_bytes: sample.detail.io_write_bytes,
            counters_present: sample.counters_present.0,
            running_ms: sample.state_counters.running_ms,
            suspended_ms: sample.state_counters.suspended_ms,
            active_ms: sample.state_counters.active_ms,
            vcpu_alloc_active_usec: sample.state_counters.vcpu_alloc_active_usec,
            vcpu_max_usec: sample.state_counters.vcpu_max_usec,
            vcpu_max_active_usec: sample.state_counters.vcpu_max_active_usec,
            cpu_used_active_usec: sample.state_counters.cpu_used_active_usec,
            mem_alloc_active_kib_ms: sample.state_counters.mem_alloc_active_kib_ms,
            mem_max_kib_ms: sample.state_counters.mem_max_kib_ms,
            mem_max_active_kib_ms: sample.state_counters.mem_max_active_kib_ms,
            mem_used_active_kib_ms: sample.state_counters.mem_used_active_kib_ms,
            gpu_alloc_active_ms: sample.state_counters.gpu_alloc_active_ms,
            disk_running_mib_ms: sample.state_counters.disk_running_mib_ms,
            disk_active_mib_ms: sample.state_counters.disk_active_mib_ms,
        }
    }
}

impl Store {
    /// Inserts samples in one INSERT; returns once ClickHouse acknowledged it,
    /// materialized views included. Re-inserting the same samples is harmless
    /// (see migration 0001).
    pub async fn insert_samples<'a>(
        &self,
        samples: impl IntoIterator<Item = &'a UsageSample>,
    ) -> Result<u64> {
        let mut insert = self
            .client
            .insert::<SampleRow<'_>>("usage_samples")
            .await
            .context("insert usage_samples")?;
        let mut rows = 0u64;
        for sample in samples {
            insert
                .write(&SampleRow::from(sample))
                .await
                .context("insert usage_samples")?;
            rows += 1;
        }
        insert.end().await.context("insert usage_samples")?;
        Ok(rows)
    }
}
