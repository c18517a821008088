//! Reading usage back from the hourly rollup (migration 0002).

use chrono::{DateTime, Utc};
use idlemeter_core::rollup::{usage_by_hour, Counters, HourCounters, HourUsage};
use idlemeter_core::{CustomerId, Epoch, SandboxId};

use crate::{Context, Error, Result, Store};

/// Per (sandbox, epoch, hour) counters of one customer, with every hour before
/// the window folded into bucket 0. Binds: from, customer, to, customer, from, to.
pub const USAGE_HOURLY_WINDOW_SQL: &str = include_str!("queries/usage_hourly_window.sql");

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct WindowRow {
    sandbox: String,
    epoch: u64,
    bucket: u32,
    sample_count: u64,
    lo: [u64; 8],
    hi: [u64; 8],
}

fn counters(values: [u64; 8]) -> Counters {
    let [cpu_used_usec, net_rx_bytes, net_tx_bytes, vcpu_alloc_usec, mem_alloc_kib_ms, mem_used_kib_ms, gpu_alloc_ms, disk_mib_ms] =
        values;
    Counters {
        cpu_used_usec,
        net_rx_bytes,
        net_tx_bytes,
        vcpu_alloc_usec,
        mem_alloc_kib_ms,
        mem_used_kib_ms,
        gpu_alloc_ms,
        disk_mib_ms,
    }
}

fn unix_seconds(time: DateTime<Utc>) -> u32 {
    u32::try_from(time.timestamp().max(0)).unwrap_or(u32::MAX)
}

impl Store {
    /// Usage of one customer per (sandbox, hour) for hours in `[from, to)`.
    pub async fn usage_by_hour(
        &self,
        customer: &CustomerId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<HourUsage>> {
        let (from, to) = (unix_seconds(from), unix_seconds(to));
        let rows: Vec<WindowRow> = self
            .client
            .query(USAGE_HOURLY_WINDOW_SQL)
            .bind(from)
            .bind(customer.as_str())
            .bind(to)
            .bind(customer.as_str())
            .bind(from)
            .bind(to)
            .fetch_all()
            .await
            .context(format!("usage by hour of {customer}"))?;
        let rollup = rows
            .into_iter()
            .map(|row| {
                Ok(HourCounters {
                    sandbox: SandboxId::parse(row.sandbox)
                        .map_err(|e| Error::BadRow(e.to_string()))?,
                    epoch: Epoch(row.epoch),
                    hour: DateTime::from_timestamp(i64::from(row.bucket), 0)
                        .expect("a u32 unix time is a valid time"),
                    is_baseline: row.bucket == 0,
                    samples: row.sample_count,
                    min: counters(row.lo),
                    max: counters(row.hi),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(usage_by_hour(&rollup))
    }
}
