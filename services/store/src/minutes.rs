//! Inserting compacted ingest output: the kept samples into `usage_samples`
//! and the minute rows into `usage_minutes` (migration 0010).

use idlemeter_core::{Compacted, MinuteRow};

use crate::samples::StateColumn;
use crate::{Context, Result, Store};

/// One row of `usage_minutes`; field names are column names.
#[derive(Debug, clickhouse::Row, serde::Serialize)]
struct MinuteColumns<'a> {
    customer: &'a str,
    sandbox: &'a str,
    epoch: u64,
    minute: u32,
    first_seq: u64,
    last_seq: u64,
    first_ts_ms: u64,
    last_ts_ms: u64,
    vcpu_milli: u32,
    state: StateColumn,
    cpu_used_usec_lo: u64,
    cpu_used_usec_hi: u64,
    net_rx_bytes_lo: u64,
    net_rx_bytes_hi: u64,
    net_tx_bytes_lo: u64,
    net_tx_bytes_hi: u64,
    vcpu_alloc_usec_lo: u64,
    vcpu_alloc_usec_hi: u64,
    mem_alloc_kib_ms_lo: u64,
    mem_alloc_kib_ms_hi: u64,
    mem_used_kib_ms_lo: u64,
    mem_used_kib_ms_hi: u64,
    gpu_alloc_ms_lo: u64,
    gpu_alloc_ms_hi: u64,
    disk_mib_ms_lo: u64,
    disk_mib_ms_hi: u64,
    running_ms_lo: u64,
    running_ms_hi: u64,
    suspended_ms_lo: u64,
    suspended_ms_hi: u64,
    active_ms_lo: u64,
    active_ms_hi: u64,
}

impl<'a> From<&'a MinuteRow> for MinuteColumns<'a> {
    fn from(row: &'a MinuteRow) -> Self {
        Self {
            customer: row.customer.as_str(),
            sandbox: row.sandbox.as_str(),
            epoch: row.epoch.0,
            minute: u32::try_from(row.minute_s).unwrap_or(0),
            first_seq: row.first_seq,
            last_seq: row.last_seq,
            first_ts_ms: u64::try_from(row.first_ts_ms).unwrap_or(0),
            last_ts_ms: u64::try_from(row.last_ts_ms).unwrap_or(0),
            vcpu_milli: row.vcpu_milli,
            state: row.state.into(),
            cpu_used_usec_lo: row.lo[0],
            cpu_used_usec_hi: row.hi[0],
            net_rx_bytes_lo: row.lo[1],
            net_rx_bytes_hi: row.hi[1],
            net_tx_bytes_lo: row.lo[2],
            net_tx_bytes_hi: row.hi[2],
            vcpu_alloc_usec_lo: row.lo[3],
            vcpu_alloc_usec_hi: row.hi[3],
            mem_alloc_kib_ms_lo: row.lo[4],
            mem_alloc_kib_ms_hi: row.hi[4],
            mem_used_kib_ms_lo: row.lo[5],
            mem_used_kib_ms_hi: row.hi[5],
            gpu_alloc_ms_lo: row.lo[6],
            gpu_alloc_ms_hi: row.hi[6],
            disk_mib_ms_lo: row.lo[7],
            disk_mib_ms_hi: row.hi[7],
            running_ms_lo: row.lo[8],
            running_ms_hi: row.hi[8],
            suspended_ms_lo: row.lo[9],
            suspended_ms_hi: row.hi[9],
            active_ms_lo: row.lo[10],
            active_ms_hi: row.hi[10],
        }
    }
}

/// Rows written by one [`Store::insert_compacted`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactedRows {
    pub samples: u64,
    pub minutes: u64,
}

impl Store {
    /// Inserts the kept samples, then the minute rows; returns once
    /// ClickHouse acknowledged both. Inserting the same output again is
    /// harmless (see migrations 0001 and 0010).
    pub async fn insert_compacted(&self, compacted: &Compacted) -> Result<CompactedRows> {
        let mut rows = CompactedRows::default();
        if !compacted.samples.is_empty() {
            rows.samples = self.insert_samples(&compacted.samples).await?;
        }
        if !compacted.minutes.is_empty() {
            let mut insert = self
                .client
                .insert::<MinuteColumns<'_>>("usage_minutes")
                .await
                .context("insert usage_minutes")?;
            for row in &compacted.minutes {
                insert
                    .write(&MinuteColumns::from(row))
                    .await
                    .context("insert usage_minutes")?;
                rows.minutes += 1;
            }
            insert.end().await.context("insert usage_minutes")?;
        }
        Ok(rows)
    }
}
