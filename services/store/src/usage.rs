//! Usage read back from the minute and hour rows (`usage_minutes`,
//! `usage_hours`, migration 0010): per window of a customer's sandboxes,
//! and per hour for rating reports.

use chrono::{DateTime, Utc};
use idlemeter_core::rollup::{usage_by_hour, Counters, HourCounters, HourUsage};
use idlemeter_core::{Epoch, SandboxId};

use crate::sql::{statement, Fetch};
use crate::{Error, Result, Store};
use idlemeter_core::CustomerId;

/// Usage per (sandbox, epoch, hour or day) from the hourly rollup; see the file.
pub const USAGE_WINDOW_ROLLUP_SQL: &str = include_str!("queries/usage_window_rollup.sql");

/// Usage per (sandbox, epoch, minute) from raw samples; see the file.
pub const USAGE_WINDOW_MINUTE_SQL: &str = include_str!("queries/usage_window_minute.sql");

/// A window width of the usage API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Hour,
    Day,
}

impl Window {
    pub fn seconds(self) -> u32 {
        match self {
            Window::Minute => 60,
            Window::Hour => 3_600,
            Window::Day => 86_400,
        }
    }
}

/// Which sandboxes one usage page covers: `first..=last` in id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRange {
    pub first: String,
    pub last: String,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct WindowRow {
    sandbox: String,
    epoch: u64,
    bucket: u32,
    sample_count: u64,
    lo: [u64; 8],
    hi: [u64; 8],
}

/// The eight rollup counters in the order the window queries return them.
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

/// Window rows (bucket 0 = everything before the range) as per-window usage.
fn windows(rows: Vec<WindowRow>) -> Result<Vec<HourUsage>> {
    let rollup = rows
        .into_iter()
        .map(|row| {
            Ok(HourCounters {
                sandbox: SandboxId::parse(row.sandbox).map_err(|e| Error::BadRow(e.to_string()))?,
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

/// Unix seconds of `time`, clamped to what a ClickHouse `DateTime` holds.
pub fn unix_seconds(time: DateTime<Utc>) -> u32 {
    u32::try_from(time.timestamp().max(0)).unwrap_or(u32::MAX)
}

/// Unix milliseconds of `time` (0 before 1970), as the `*_ms` columns hold them.
pub fn unix_ms(time: DateTime<Utc>) -> u64 {
    u64::try_from(time.timestamp_millis()).unwrap_or(0)
}

impl Store {
    /// Sandboxes of `customer` with samples in `[from, to)`, after `after` (in
    /// id order), at most `limit`, or only `only` when given.
    pub async fn sandboxes_with_usage(
        &self,
        customer: &str,
        from: u32,
        to: u32,
        after: &str,
        only: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>> {
        // The hourly rollup knows the same sandboxes at a fraction of the rows;
        // hours are widened to cover a minute range that starts mid-hour.
        let from_hour = from - from % 3_600;
        statement!(
            self.client,
            "SELECT DISTINCT sandbox FROM usage_hours \
             WHERE customer = {customer} AND hour >= toDateTime({from_hour}) \
             AND hour < toDateTime({to}) \
             AND sandbox > {after} \
             AND ({only_flag} = 0 OR sandbox = {only}) ORDER BY sandbox LIMIT {limit}",
            customer,
            from_hour,
            to,
            after,
            only_flag = u8::from(only.is_some()),
            only = only.unwrap_or(""),
            limit,
        )
        .all(format!("sandboxes with usage of {customer}"))
        .await
    }

    /// Usage of `customer`'s sandboxes in `range` per window of `[from, to)`
    /// (both on window boundaries), as the rollup arithmetic of
    /// [`idlemeter_core::rollup`] computes it.
    pub async fn usage_by_window(
        &self,
        customer: &str,
        range: &SandboxRange,
        from: u32,
        to: u32,
        window: Window,
    ) -> Result<Vec<HourUsage>> {
        let context = format!("usage by {window:?} of {customer}");
        let rows: Vec<WindowRow> = match window {
            Window::Hour | Window::Day => {
                statement!(
                    self.client,
                    USAGE_WINDOW_ROLLUP_SQL,
                    from,
                    width = window.seconds(),
                    customer,
                    to,
                    first = &range.first,
                    last = &range.last
                )
                .all(context)
                .await?
            }
            Window::Minute => {
                let from_hour = from - from % 3_600;
                statement!(
                    self.client,
                    USAGE_WINDOW_MINUTE_SQL,
                    customer,
                    from_hour,
                    first = &range.first,
                    last = &range.last,
                    from,
                    to
                )
                .all(context)
                .await?
            }
        };
        windows(rows)
    }

    /// Usage of one customer per (sandbox, hour) for hours in `[from, to)`.
    pub async fn usage_by_hour(
        &self,
        customer: &CustomerId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<HourUsage>> {
        let every_sandbox = SandboxRange {
            first: String::new(),
            // Above every id (ids are printable ASCII).
            last: "\u{7f}".to_owned(),
        };
        self.usage_by_window(
            customer.as_str(),
            &every_sandbox,
            unix_seconds(from),
            unix_seconds(to),
            Window::Hour,
        )
        .await
    }
}
