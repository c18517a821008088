//! Cost of one hourly rating pass of the online rater's core, on the first
//! and on the last day of a 30-day period (issue "Money from counters").
//!
//! 10,000 sandboxes at 1 Hz, every counter carried. A pass does what the
//! rater does with an hour: load the carried state from its stored JSON,
//! rate the hour's 36 million samples on top of it, bill the period to date
//! (open spans closed on a copy) and store the new state as JSON. On day 30
//! the state carries 29 days and 23 hours of usage (its baselines and
//! quantities come from one sample per sandbox at that time, whose counters
//! hold the whole month so far); what a pass costs must not depend on it.
//!
//! Samples are generated a minute at a time outside the timed sections, so
//! memory stays small; the figure is rating time only (ClickHouse's read of
//! the hour is not in it).
//!
//! `cargo bench -p idlemeter-core --bench pass` prints the median of three
//! runs per day and, last, the line
//! `rater pass, 10000 sandboxes at 1 Hz: first day X s, last day Y s, ratio R`.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use idlemeter_core::{
    report_usage, BillingOptions, CounterSet, CustomerId, Epoch, LifecycleState, NodeId,
    NumberedSample, PriceSheet, RatingState, SandboxId, SessionOrConnection, StateCounters,
    UsageSample, VcpuMillis,
};

const SANDBOXES: usize = 10_000;
const RUNS: usize = 3;
const SHEET: &str = include_str!("../../../prices/sprites.toml");

struct Fleet {
    customers: Vec<CustomerId>,
    sandboxes: Vec<SandboxId>,
    node: NodeId,
    start: DateTime<Utc>,
}

impl Fleet {
    fn new() -> Self {
        Self {
            customers: (0..100)
                .map(|index| CustomerId::parse(format!("customer-{index:03}")).expect("id"))
                .collect(),
            sandboxes: (0..SANDBOXES)
                .map(|index| SandboxId::parse(format!("sbx-{index:06}")).expect("id"))
                .collect(),
            node: NodeId::parse("node-1").expect("id"),
            start: "2026-11-01T00:00:00Z".parse().expect("rfc3339"),
        }
    }

    /// Sandbox `index` at `t` seconds into the period: running nine minutes
    /// in ten, an exec session open on even sandboxes, 2 vCPU and 4 GiB;
    /// counters in closed form, as the collector would have integrated them.
    fn sample(&self, index: usize, t: u64) -> UsageSample {
        let running_s = t / 600 * 540 + (t % 600).min(540);
        let suspended_s = t - running_s;
        let running = t == 0 || (t - 1) % 600 < 540;
        let active = index.is_multiple_of(2);
        let active_s = if active { running_s } else { 0 };
        let (vcpu_milli, mem_kib, disk_mib) = (2000u64, 4u64 << 20, 10u64 << 10);
        let ms = |seconds: u64| seconds * 1000;
        UsageSample {
            customer: self.customers[index % self.customers.len()].clone(),
            node: self.node.clone(),
            sandbox: self.sandboxes[index].clone(),
            epoch: Epoch(1),
            seq: t + 1,
            ts: self.start + Duration::from_secs(t),
            state: if running {
                LifecycleState::Running
            } else {
                LifecycleState::Suspended
            },
            vcpu: VcpuMillis(vcpu_milli as u32),
            mem_bytes: mem_kib << 10,
            gpu_model: None,
            gpu_count: 0,
            disk_bytes: disk_mib << 20,
            cpu_used_usec: vcpu_milli * ms(running_s) / 2,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            vcpu_alloc_usec: vcpu_milli * ms(running_s),
            mem_alloc_kib_ms: mem_kib * ms(running_s),
            mem_used_kib_ms: mem_kib * ms(running_s) / 4,
            gpu_alloc_ms: 0,
            disk_mib_ms: disk_mib * ms(t),
            api_calls: 0,
            mem_used_bytes: mem_kib << 8,
            exec_sessions: u32::from(active && running),
            open_conns: 0,
            detail: Default::default(),
            state_counters: StateCounters {
                running_ms: ms(running_s),
                suspended_ms: ms(suspended_s),
                active_ms: ms(active_s),
                vcpu_alloc_active_usec: vcpu_milli * ms(active_s),
                vcpu_max_usec: vcpu_milli * ms(running_s),
                vcpu_max_active_usec: vcpu_milli * ms(active_s),
                cpu_used_active_usec: vcpu_milli * ms(active_s) / 2,
                mem_alloc_active_kib_ms: mem_kib * ms(active_s),
                mem_max_kib_ms: mem_kib * ms(running_s),
                mem_max_active_kib_ms: mem_kib * ms(active_s),
                mem_used_active_kib_ms: mem_kib * ms(active_s) / 4,
                gpu_alloc_active_ms: 0,
                disk_running_mib_ms: disk_mib * ms(running_s),
                disk_active_mib_ms: disk_mib * ms(active_s),
            },
            counters_present: CounterSet::ALL,
        }
    }

    /// Every sandbox's samples for seconds `from..to`, time-interleaved.
    fn chunk(&self, from: u64, to: u64) -> Vec<NumberedSample> {
        let mut samples = Vec::with_capacity(SANDBOXES * (to - from) as usize);
        for t in from..to {
            for index in 0..SANDBOXES {
                samples.push(NumberedSample {
                    line: samples.len() as u64 + 1,
                    sample: self.sample(index, t),
                });
            }
        }
        samples
    }
}

/// One pass over the hour after `hour_start` seconds, from `stored`; returns
/// the timed seconds and the new stored state.
fn pass(fleet: &Fleet, sheet: &PriceSheet, stored: &str, hour_start: u64) -> (f64, String) {
    let mut timed = Duration::ZERO;
    let began = Instant::now();
    let mut state = RatingState::from_json(stored, sheet).expect("state loads");
    timed += began.elapsed();
    for minute in 0..60 {
        let from = hour_start + 1 + minute * 60;
        let samples = fleet.chunk(from, from + 60);
        let began = Instant::now();
        let errors = state.advance(sheet, &samples, &SessionOrConnection);
        timed += began.elapsed();
        assert!(errors.is_empty(), "{:?}", errors.first());
    }
    let began = Instant::now();
    let report = report_usage(
        sheet,
        state.usage(sheet, &SessionOrConnection),
        &BillingOptions::default(),
        Vec::new(),
    )
    .expect("bills");
    let stored = state.to_json();
    timed += began.elapsed();
    assert_eq!(report.customers.len(), fleet.customers.len());
    (timed.as_secs_f64(), stored)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let fleet = Fleet::new();
    let sheet = PriceSheet::from_toml(SHEET, "prices/sprites.toml").expect("sheet");
    // Day 1: from nothing, the period's first sample as each baseline.
    let mut first_day_state = RatingState::new(&sheet);
    first_day_state.advance(&sheet, &fleet.chunk(0, 1), &SessionOrConnection);
    let first_day_stored = first_day_state.to_json();
    // Day 30, 23:00: the state after 29 days and 23 hours.
    let last_hour = 29 * 86_400 + 23 * 3_600;
    let mut last_day_state = RatingState::new(&sheet);
    last_day_state.advance(&sheet, &fleet.chunk(0, 1), &SessionOrConnection);
    last_day_state.advance(
        &sheet,
        &fleet.chunk(last_hour, last_hour + 1),
        &SessionOrConnection,
    );
    let last_day_stored = last_day_state.to_json();
    println!(
        "stored state: {} bytes on day 1, {} bytes on day 30",
        first_day_stored.len(),
        last_day_stored.len()
    );
    let samples = (SANDBOXES * 3_600) as f64;
    let mut first = Vec::new();
    let mut last = Vec::new();
    for run in 0..RUNS {
        let (seconds, _) = pass(&fleet, &sheet, &first_day_stored, 0);
        println!(
            "run {run}: first day {seconds:.2} s ({:.2}M samples/s)",
            samples / seconds / 1e6
        );
        first.push(seconds);
        let (seconds, _) = pass(&fleet, &sheet, &last_day_stored, last_hour);
        println!(
            "run {run}: last day {seconds:.2} s ({:.2}M samples/s)",
            samples / seconds / 1e6
        );
        last.push(seconds);
    }
    let (first, last) = (median(first), median(last));
    println!(
        "rater pass, {SANDBOXES} sandboxes at 1 Hz: first day {first:.2} s, last day {last:.2} s, ratio {:.2}",
        last / first
    );
}
