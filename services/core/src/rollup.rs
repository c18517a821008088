//! Usage by hour from the hourly counter rollup.
//!
//! The store keeps, per (sandbox, epoch, hour), the smallest and largest value of
//! every cumulative counter seen in that hour. Usage in an hour is the hour's
//! largest value minus the largest value of the epoch's previous hour; an epoch's
//! first hour uses its own smallest value as the baseline, because the first
//! sample of an epoch bills nothing. Rows that end before the window arrive folded
//! into one baseline row per epoch ([`HourCounters::is_baseline`]) so a window
//! never needs the epoch's whole history.

use chrono::{DateTime, Utc};

use crate::ids::{Epoch, SandboxId};

/// The cumulative counters the rollup tracks, in the order the store returns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub cpu_used_usec: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub vcpu_alloc_usec: u64,
    pub mem_alloc_kib_ms: u64,
    pub mem_used_kib_ms: u64,
    pub gpu_alloc_ms: u64,
    pub disk_mib_ms: u64,
}

impl Counters {
    /// Component-wise difference; saturates at zero, which only a counter that
    /// went backwards inside one epoch (a collector bug, refused upstream) can hit.
    pub fn since(&self, baseline: &Counters) -> Counters {
        Counters {
            cpu_used_usec: self.cpu_used_usec.saturating_sub(baseline.cpu_used_usec),
            net_rx_bytes: self.net_rx_bytes.saturating_sub(baseline.net_rx_bytes),
            net_tx_bytes: self.net_tx_bytes.saturating_sub(baseline.net_tx_bytes),
            vcpu_alloc_usec: self
                .vcpu_alloc_usec
                .saturating_sub(baseline.vcpu_alloc_usec),
            mem_alloc_kib_ms: self
                .mem_alloc_kib_ms
                .saturating_sub(baseline.mem_alloc_kib_ms),
            mem_used_kib_ms: self
                .mem_used_kib_ms
                .saturating_sub(baseline.mem_used_kib_ms),
            gpu_alloc_ms: self.gpu_alloc_ms.saturating_sub(baseline.gpu_alloc_ms),
            disk_mib_ms: self.disk_mib_ms.saturating_sub(baseline.disk_mib_ms),
        }
    }

    /// Component-wise sum, for totals over hours or sandboxes. Saturating:
    /// counters come from nodes, and a forged one near `u64::MAX` must not
    /// panic a usage request (overflow checks are on in release builds).
    pub fn add(&self, other: &Counters) -> Counters {
        Counters {
            cpu_used_usec: self.cpu_used_usec.saturating_add(other.cpu_used_usec),
            net_rx_bytes: self.net_rx_bytes.saturating_add(other.net_rx_bytes),
            net_tx_bytes: self.net_tx_bytes.saturating_add(other.net_tx_bytes),
            vcpu_alloc_usec: self.vcpu_alloc_usec.saturating_add(other.vcpu_alloc_usec),
            mem_alloc_kib_ms: self.mem_alloc_kib_ms.saturating_add(other.mem_alloc_kib_ms),
            mem_used_kib_ms: self.mem_used_kib_ms.saturating_add(other.mem_used_kib_ms),
            gpu_alloc_ms: self.gpu_alloc_ms.saturating_add(other.gpu_alloc_ms),
            disk_mib_ms: self.disk_mib_ms.saturating_add(other.disk_mib_ms),
        }
    }
}

/// One rollup row: one epoch of one sandbox in one hour (or before the window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourCounters {
    pub sandbox: SandboxId,
    pub epoch: Epoch,
    /// Start of the hour; ignored for baseline rows.
    pub hour: DateTime<Utc>,
    /// True for the folded row of all hours before the window.
    pub is_baseline: bool,
    /// Distinct samples (by seq) in the hour.
    pub samples: u64,
    pub min: Counters,
    pub max: Counters,
}

/// Usage of one sandbox in one hour of the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourUsage {
    pub sandbox: SandboxId,
    pub hour: DateTime<Utc>,
    pub samples: u64,
    pub usage: Counters,
}

/// Turns rollup rows into usage per (sandbox, hour), summing the epochs of a
/// sandbox that share an hour. Rows may come in any order.
pub fn usage_by_hour(rows: &[HourCounters]) -> Vec<HourUsage> {
    let mut ordered: Vec<&HourCounters> = rows.iter().collect();
    // Baseline rows sort first within their epoch.
    ordered.sort_by(|a, b| {
        (&a.sandbox, a.epoch, !a.is_baseline, a.hour).cmp(&(
            &b.sandbox,
            b.epoch,
            !b.is_baseline,
            b.hour,
        ))
    });
    let mut per_epoch_hour: Vec<HourUsage> = Vec::new();
    let mut previous: Option<&HourCounters> = None;
    for row in ordered {
        let same_epoch = previous.is_some_and(|p| p.sandbox == row.sandbox && p.epoch == row.epoch);
        let baseline = if same_epoch {
            previous.map(|p| p.max)
        } else {
            None
        };
        previous = Some(row);
        if row.is_baseline {
            continue;
        }
        let usage = row.max.since(&baseline.unwrap_or(row.min));
        per_epoch_hour.push(HourUsage {
            sandbox: row.sandbox.clone(),
            hour: row.hour,
            samples: row.samples,
            usage,
        });
    }
    merge_epochs(per_epoch_hour)
}

fn merge_epochs(mut usages: Vec<HourUsage>) -> Vec<HourUsage> {
    usages.sort_by(|a, b| (&a.sandbox, a.hour).cmp(&(&b.sandbox, b.hour)));
    let mut merged: Vec<HourUsage> = Vec::with_capacity(usages.len());
    for usage in usages {
        match merged.last_mut() {
            Some(last) if last.sandbox == usage.sandbox && last.hour == usage.hour => {
                last.samples += usage.samples;
                last.usage = last.usage.add(&usage.usage);
            }
            _ => merged.push(usage),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(cpu: u64) -> Counters {
        Counters {
            cpu_used_usec: cpu,
            ..Counters::default()
        }
    }

    fn row(epoch: u64, hour: i64, min: u64, max: u64, baseline: bool) -> HourCounters {
        HourCounters {
            sandbox: SandboxId::parse("sbx").expect("id"),
            epoch: Epoch(epoch),
            hour: DateTime::from_timestamp(hour * 3600, 0).expect("hour"),
            is_baseline: baseline,
            samples: 2,
            min: counters(min),
            max: counters(max),
        }
    }

    #[test]
    fn first_hour_uses_its_min_later_hours_the_previous_max() {
        // Epoch 1: samples at cpu 100, 150 in hour 10 and 400 in hour 11.
        let usage = usage_by_hour(&[row(1, 11, 400, 400, false), row(1, 10, 100, 150, false)]);
        let cpu: Vec<u64> = usage.iter().map(|u| u.usage.cpu_used_usec).collect();
        assert_eq!(cpu, vec![50, 250]);
    }

    #[test]
    fn baseline_row_anchors_the_first_hour_of_the_window() {
        let usage = usage_by_hour(&[row(1, 0, 0, 1000, true), row(1, 10, 1200, 1300, false)]);
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].usage.cpu_used_usec, 300);
    }

    #[test]
    fn epochs_sharing_an_hour_are_summed_and_never_subtracted() {
        // Epoch 1 ends at 900; epoch 2 restarts from 0 in the same hour.
        let usage = usage_by_hour(&[row(1, 10, 100, 900, false), row(2, 10, 0, 50, false)]);
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].usage.cpu_used_usec, 800 + 50);
        assert_eq!(usage[0].samples, 4);
    }
}
