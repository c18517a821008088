//! What the API returns, and the pure arithmetic behind it: usage counters as
//! resource quantities, and cost per window from cumulative rated snapshots.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use idlemeter_core::rollup::{Counters, HourUsage};
use idlemeter_store::SnapshotLine;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Decimal places of usage quantities (the exact integer is in `raw`).
pub const QUANTITY_SCALE: u32 = 12;

/// A window width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WindowWidth {
    Minute,
    Hour,
    Day,
}

impl From<WindowWidth> for idlemeter_store::Window {
    fn from(width: WindowWidth) -> Self {
        match width {
            WindowWidth::Minute => idlemeter_store::Window::Minute,
            WindowWidth::Hour => idlemeter_store::Window::Hour,
            WindowWidth::Day => idlemeter_store::Window::Day,
        }
    }
}

/// A metered resource, as the usage endpoint names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Allocated vCPU time (vCPU-seconds).
    Vcpu,
    /// CPU time used (CPU-seconds).
    Cpu,
    /// Allocated memory over time (GiB-seconds).
    Memory,
    /// Memory used over time (GiB-seconds).
    MemoryUsed,
    /// Allocated GPU time (GPU-seconds).
    Gpu,
    /// Disk over time (GiB-seconds).
    Disk,
    /// Bytes received.
    NetRx,
    /// Bytes sent.
    NetTx,
}

/// (resource, unit, raw counter unit, raw units per unit, raw value).
type ResourceSpec = (
    Resource,
    &'static str,
    &'static str,
    u64,
    fn(&Counters) -> u64,
);

const RESOURCES: [ResourceSpec; 8] = [
    (
        Resource::Vcpu,
        "vcpu_seconds",
        "vcpu_usec",
        1_000_000,
        |c| c.vcpu_alloc_usec,
    ),
    (Resource::Cpu, "cpu_seconds", "usec", 1_000_000, |c| {
        c.cpu_used_usec
    }),
    // KiB-ms: 1,048,576 KiB a GiB, 1,000 ms a second.
    (
        Resource::Memory,
        "gib_seconds",
        "kib_ms",
        1_048_576_000,
        |c| c.mem_alloc_kib_ms,
    ),
    (
        Resource::MemoryUsed,
        "gib_seconds",
        "kib_ms",
        1_048_576_000,
        |c| c.mem_used_kib_ms,
    ),
    (Resource::Gpu, "gpu_seconds", "gpu_ms", 1_000, |c| {
        c.gpu_alloc_ms
    }),
    // MiB-ms: 1,024 MiB a GiB.
    (Resource::Disk, "gib_seconds", "mib_ms", 1_024_000, |c| {
        c.disk_mib_ms
    }),
    (Resource::NetRx, "bytes", "bytes", 1, |c| c.net_rx_bytes),
    (Resource::NetTx, "bytes", "bytes", 1, |c| c.net_tx_bytes),
];

/// One resource's usage in one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ResourceUsage {
    pub resource: Resource,
    /// In `unit`, a decimal string rounded half-up to 12 places.
    #[schema(value_type = String, example = "7200")]
    pub quantity: Decimal,
    pub unit: String,
    /// The exact integer the collector counted, in `raw_unit`.
    pub raw: u64,
    pub raw_unit: String,
}

/// Usage of one sandbox in one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct UsageWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Samples the window spans: last minus first sequence number, plus one,
    /// per epoch. Replays cannot change it; it is the number of samples
    /// taken unless some were lost before ingest (the metering coverage
    /// panel counts the stored ones exactly).
    pub samples: u64,
    pub usage: Vec<ResourceUsage>,
}

/// The windows of one sandbox that had samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct SandboxUsage {
    pub sandbox: String,
    pub windows: Vec<UsageWindow>,
}

/// A page of usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct UsagePage {
    pub customer: String,
    pub window: WindowWidth,
    /// The range covered: `from` rounded down and `to` rounded up to windows.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub sandboxes: Vec<SandboxUsage>,
    /// Pass as `cursor` for the next page of sandboxes; absent on the last.
    pub next_cursor: Option<String>,
}

/// `usage` (one sandbox's windows, in time order) as API windows, keeping the
/// resources in `only` (every resource when empty).
pub fn usage_windows(usage: &[&HourUsage], width_s: u32, only: &[Resource]) -> Vec<UsageWindow> {
    usage
        .iter()
        .map(|window| UsageWindow {
            start: window.hour,
            end: window.hour + chrono::Duration::seconds(i64::from(width_s)),
            samples: window.samples,
            usage: RESOURCES
                .iter()
                .filter(|(resource, ..)| only.is_empty() || only.contains(resource))
                .map(|(resource, unit, raw_unit, per_unit, value)| {
                    let raw = value(&window.usage);
                    ResourceUsage {
                        resource: *resource,
                        quantity: quantity(raw, *per_unit),
                        unit: (*unit).to_owned(),
                        raw,
                        raw_unit: (*raw_unit).to_owned(),
                    }
                })
                .collect(),
        })
        .collect()
}

fn quantity(raw: u64, per_unit: u64) -> Decimal {
    (Decimal::from(raw) / Decimal::from(per_unit))
        .round_dp_with_strategy(QUANTITY_SCALE, RoundingStrategy::MidpointAwayFromZero)
        .normalize()
}

/// One bill line's amount in a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CostLine {
    /// `usage`, `included`, `fee`, `credit`, ...
    pub kind: String,
    pub resource: String,
    #[schema(value_type = String, example = "1.25")]
    pub amount: Decimal,
}

/// What one window cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CostWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub currency: String,
    /// The sum of `lines` (checked).
    #[schema(value_type = String, example = "3.10")]
    pub amount: Decimal,
    pub lines: Vec<CostLine>,
}

/// Cost per window over a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CostHistory {
    pub customer: String,
    pub window: WindowWidth,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub windows: Vec<CostWindow>,
    /// Per currency: the sum of the windows (checked against the snapshots at
    /// `from` and `to`).
    #[schema(value_type = BTreeMap<String, String>)]
    pub totals: BTreeMap<String, Decimal>,
    /// The end of the last hour rated; windows after it show what is rated so far.
    pub rated_until: Option<DateTime<Utc>>,
}

/// A money sum that did not add up: a release blocker, never shown as money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cost windows of {customer} do not add up: {what}")]
pub struct SumMismatch {
    pub customer: String,
    pub what: String,
}

type LineKey = (String, String);

/// Cumulative amounts of one (period, checksum): per snapshot `as_of`, per line.
#[derive(Debug, Default)]
struct PeriodSnapshots {
    currency: String,
    rated_at: u32,
    snapshots: BTreeMap<u32, BTreeMap<LineKey, Decimal>>,
}

impl PeriodSnapshots {
    /// The period-to-date lines at `time`: the latest snapshot at or before it.
    fn at(&self, time: u32) -> Option<&BTreeMap<LineKey, Decimal>> {
        self.snapshots
            .range(..=time)
            .next_back()
            .map(|(_, lines)| lines)
    }
}

/// Cost per window of `[from, to)` (window starts `from + k * width`) from
/// cumulative snapshots: a window's cost is, per period, the period-to-date
/// amount at its end minus that at its start, so rounding never accumulates
/// and the windows sum exactly to the difference of the snapshots at `from`
/// and `to`. Per period the checksum rated most recently wins (a re-rating
/// supersedes the old sheet's snapshots).
pub fn cost_windows(
    customer: &str,
    lines: &[SnapshotLine],
    from: u32,
    to: u32,
    width_s: u32,
) -> Result<(Vec<CostWindow>, BTreeMap<String, Decimal>), SumMismatch> {
    let mut by_checksum: BTreeMap<(u32, &str), PeriodSnapshots> = BTreeMap::new();
    for line in lines {
        let period = by_checksum
            .entry((line.period_start, line.sheet_checksum.as_str()))
            .or_default();
        period.currency.clone_from(&line.currency);
        period.rated_at = period.rated_at.max(line.rated_at);
        *period
            .snapshots
            .entry(line.as_of)
            .or_default()
            .entry((line.kind.clone(), line.resource.clone()))
            .or_default() += line.amount;
    }
    let mut periods: BTreeMap<u32, PeriodSnapshots> = BTreeMap::new();
    for ((start, _), snapshots) in by_checksum {
        let newer = periods
            .get(&start)
            .is_none_or(|kept| snapshots.rated_at > kept.rated_at);
        if newer {
            periods.insert(start, snapshots);
        }
    }
    let empty = BTreeMap::new();
    let mut windows = Vec::new();
    let mut start = from;
    while start < to {
        let end = start.saturating_add(width_s).min(to);
        let mut per_currency: BTreeMap<String, BTreeMap<LineKey, Decimal>> = BTreeMap::new();
        for period in periods.values() {
            let at_end = period.at(end).unwrap_or(&empty);
            let at_start = period.at(start).unwrap_or(&empty);
            let moved = per_currency.entry(period.currency.clone()).or_default();
            for (key, amount) in at_end {
                *moved.entry(key.clone()).or_default() += amount;
            }
            for (key, amount) in at_start {
                *moved.entry(key.clone()).or_default() -= amount;
            }
        }
        for (currency, moved) in per_currency {
            let lines: Vec<CostLine> = moved
                .into_iter()
                .filter(|(_, amount)| !amount.is_zero())
                .map(|((kind, resource), amount)| CostLine {
                    kind,
                    resource,
                    amount: amount.normalize(),
                })
                .collect();
            if lines.is_empty() {
                continue;
            }
            let amount = lines.iter().map(|line| line.amount).sum::<Decimal>();
            windows.push(CostWindow {
                start: time(start),
                end: time(end),
                currency,
                amount,
                lines,
            });
        }
        start = end;
    }
    // Invariant: the windows add up to the difference of the snapshots at
    // `from` and `to`, per currency.
    let mut totals: BTreeMap<String, Decimal> = BTreeMap::new();
    for window in &windows {
        *totals.entry(window.currency.clone()).or_default() += window.amount;
    }
    let mut expected: BTreeMap<String, Decimal> = BTreeMap::new();
    for period in periods.values() {
        let sum = |lines: Option<&BTreeMap<LineKey, Decimal>>| {
            lines
                .map(|l| l.values().sum::<Decimal>())
                .unwrap_or_default()
        };
        *expected.entry(period.currency.clone()).or_default() +=
            sum(period.at(to)) - sum(period.at(from));
    }
    expected.retain(|_, amount| !amount.is_zero());
    let totals: BTreeMap<String, Decimal> = totals
        .into_iter()
        .filter(|(_, amount)| !amount.is_zero())
        .map(|(currency, amount)| (currency, amount.normalize()))
        .collect();
    let expected_normalized: BTreeMap<String, Decimal> = expected
        .into_iter()
        .map(|(currency, amount)| (currency, amount.normalize()))
        .collect();
    if totals != expected_normalized {
        return Err(SumMismatch {
            customer: customer.to_owned(),
            what: format!("windows sum to {totals:?}, snapshots moved by {expected_normalized:?}"),
        });
    }
    Ok((windows, totals))
}

pub fn time(unix: u32) -> DateTime<Utc> {
    DateTime::from_timestamp(i64::from(unix), 0).expect("a u32 unix time is a valid time")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        period: u32,
        checksum: &str,
        as_of: u32,
        resource: &str,
        amount: &str,
        rated_at: u32,
    ) -> SnapshotLine {
        SnapshotLine {
            period_start: period,
            sheet_checksum: checksum.to_owned(),
            as_of,
            currency: "USD".to_owned(),
            kind: "usage".to_owned(),
            resource: resource.to_owned(),
            amount: amount.parse().expect("decimal"),
            rated_at,
        }
    }

    const H: u32 = 3_600;

    #[test]
    fn a_window_costs_the_difference_of_the_snapshots_at_its_ends() {
        // Period starts at 0; hourly snapshots to date: vcpu 0.10, 0.25, 0.40.
        let lines = [
            line(0, "c1", H, "vcpu", "0.10", 10),
            line(0, "c1", 2 * H, "vcpu", "0.25", 10),
            line(0, "c1", 3 * H, "vcpu", "0.40", 10),
            line(0, "c1", 3 * H, "memory", "0.07", 10),
        ];
        let (windows, totals) = cost_windows("acme", &lines, 0, 4 * H, H).expect("adds up");
        let amounts: Vec<String> = windows.iter().map(|w| w.amount.to_string()).collect();
        assert_eq!(amounts, ["0.1", "0.15", "0.22"]);
        assert_eq!(windows[2].lines.len(), 2);
        assert_eq!(totals["USD"].to_string(), "0.47");
        // A window that starts mid-period subtracts the snapshot at its start.
        let (windows, _) = cost_windows("acme", &lines, H, 2 * H, H).expect("adds up");
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].amount.to_string(), "0.15");
    }

    #[test]
    fn a_later_rating_supersedes_and_a_new_period_starts_from_zero() {
        let lines = [
            line(0, "old", H, "vcpu", "9", 5),
            line(0, "new", H, "vcpu", "1", 6),
            line(2 * H, "new", 3 * H, "vcpu", "2", 6),
        ];
        let (windows, totals) = cost_windows("acme", &lines, 0, 4 * H, 2 * H).expect("adds up");
        let amounts: Vec<String> = windows.iter().map(|w| w.amount.to_string()).collect();
        assert_eq!(amounts, ["1", "2"]);
        assert_eq!(totals["USD"].to_string(), "3");
    }

    #[test]
    fn quantities_are_exact_to_twelve_places_and_raw_is_kept() {
        let usage = HourUsage {
            sandbox: idlemeter_core::SandboxId::parse("sb").expect("id"),
            hour: time(0),
            samples: 60,
            usage: Counters {
                vcpu_alloc_usec: 120_000_000,
                mem_alloc_kib_ms: 3, // 3 / 1,048,576,000 GiB-s
                ..Counters::default()
            },
        };
        let windows = usage_windows(&[&usage], 60, &[Resource::Vcpu, Resource::Memory]);
        assert_eq!(windows[0].usage.len(), 2);
        assert_eq!(windows[0].usage[0].quantity.to_string(), "120");
        assert_eq!(windows[0].usage[1].quantity.to_string(), "0.000000002861");
        assert_eq!(windows[0].usage[1].raw, 3);
        assert_eq!(windows[0].end, time(60));
    }
}
