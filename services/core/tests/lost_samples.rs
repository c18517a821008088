//! A lost sample costs resolution, never money (DESIGN.md, principle 1).
//!
//! Epochs are generated tick by tick the way the collector integrates them
//! (`services/collector/src/counters.rs`): each tick closes the interval since
//! the previous one with the state, allocation and activity seen at the tick,
//! and adds to every counter. Resizes, suspends, resumes, sessions opening and
//! closing and GPUs are all in the traces. Then interior samples are deleted,
//! one at a time and in runs of hundreds, and every shipped sheet rates both.
//!
//! - Ticks one whole second apart: every span of billable time is whole
//!   seconds, so the sheets with a one-second increment (E2B, Northflank,
//!   Modal, Sprites) must bill the same quantities and the same cents.
//! - CodeSandbox rounds each span up to a minute, and a lost run that
//!   swallows a whole suspension joins two spans into one: its bill may only
//!   move by at most one increment per span the losses touched (the bound
//!   stated in services/core/README.md).
//! - Ticks with millisecond jitter: every sheet within that bound.
//!
//! The same losses on the same traces rated from their gauges (the samples'
//! counters withdrawn) change bills: `gauge_rating_loses_money_on_the_same_losses`.

use idlemeter_core::{
    rate_report, BillingOptions, CounterSet, NumberedSample, PriceSheet, RateReport,
    SessionOrConnection, UsageSample,
};
use proptest::prelude::*;
use rust_decimal::Decimal;

mod common;

use common::{collect, epoch_plan, lines, EpochPlan, Phase, SHEETS};

/// Which interior samples to lose: single ones and runs, as (start, length)
/// in thousandths of the series' length.
fn losses() -> impl Strategy<Value = Vec<(u16, u16)>> {
    prop::collection::vec(
        (0u16..1000, prop::sample::select(vec![1u16, 1, 3, 40, 300])),
        1..6,
    )
}

/// The series with the losses applied (never its first or last sample) and
/// the indices lost.
fn lose(series: &[UsageSample], losses: &[(u16, u16)]) -> (Vec<UsageSample>, Vec<usize>) {
    let last = series.len() - 1;
    let mut lost = vec![false; series.len()];
    for &(at, length) in losses {
        let begin = 1 + (last.saturating_sub(1)) * usize::from(at) / 1000;
        let end = (begin + usize::from(length)).min(last);
        if begin < end {
            lost[begin..end].fill(true);
        }
    }
    let kept = series
        .iter()
        .zip(&lost)
        .filter(|(_, lost)| !**lost)
        .map(|(sample, _)| sample.clone())
        .collect();
    let indices = (0..series.len()).filter(|index| lost[*index]).collect();
    (kept, indices)
}

fn rate(sheet: &PriceSheet, samples: Vec<UsageSample>) -> RateReport {
    let report = common::rate(sheet, &samples);
    // Sheets without a GPU price report the GPU time they cannot bill; no
    // other sample may be refused.
    let refused = report
        .errors
        .iter()
        .find(|error| error.field != "gpu_model");
    assert!(refused.is_none(), "{refused:?}");
    report
}

/// The most one span's rounding can move a line: one increment at the
/// highest rate any sandbox of the trace bills, priced at the sheet's unit
/// price for that resource. Generous on purpose (a bound, not an estimate).
fn span_bound(sheet_name: &str, increment_s: u64, spans_touched: usize) -> Decimal {
    // CodeSandbox: $0.0446 per vCPU-hour and $0.0149 per GB-hour; the
    // largest sandbox here is 8 vCPU and 8 GiB (< 9 GB). The others: below
    // $0.05 a second for anything generated here (two H100s on Modal are
    // $0.0022 a second).
    let per_second_ceiling = match sheet_name {
        "codesandbox" => {
            (Decimal::new(8 * 446, 4) + Decimal::new(9 * 149, 4)) / Decimal::from(3600)
        }
        _ => Decimal::new(5, 2),
    };
    // Rounding of the two bills to cents: one cent per line either way.
    per_second_ceiling * Decimal::from(increment_s) * Decimal::from(spans_touched as u64)
        + Decimal::new(2, 2)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whole-second ticks: every sheet with a one-second increment bills the
    /// same quantities and cents whatever is lost; CodeSandbox stays within
    /// one minute of rounding per span the losses touched.
    #[test]
    fn losing_samples_changes_no_bill(
        plans in prop::collection::vec(epoch_plan(), 1..5),
        losses in prop::collection::vec(losses(), 5),
    ) {
        let series: Vec<Vec<UsageSample>> = plans
            .iter()
            .enumerate()
            .map(|(sandbox, plan)| collect(sandbox, plan, &[0]))
            .collect();
        let mut lossy = Vec::new();
        let mut touched = 0;
        for (index, one) in series.iter().enumerate() {
            let (kept, lost) = lose(one, &losses[index % losses.len()]);
            touched += lost.len().min(1) * (plans[index].phases.len() + 1);
            lossy.extend(kept);
        }
        for (name, text, increment_s) in SHEETS {
            let sheet = PriceSheet::from_toml(text, name).expect("shipped sheet loads");
            let full = lines(&rate(&sheet, series.concat()));
            let lost = lines(&rate(&sheet, lossy.clone()));
            prop_assert_eq!(full.keys().collect::<Vec<_>>(), lost.keys().collect::<Vec<_>>(), "{}", name);
            for (key, (quantity, amount)) in &full {
                let (lost_quantity, lost_amount) = &lost[key];
                if increment_s == 1 {
                    prop_assert_eq!(quantity, lost_quantity, "{} {:?}", name, key);
                    prop_assert_eq!(amount, lost_amount, "{} {:?}", name, key);
                } else {
                    let bound = span_bound(name, increment_s, touched);
                    prop_assert!((*amount - *lost_amount).abs() <= bound,
                        "{} {:?}: {} vs {} (bound {})", name, key, amount, lost_amount, bound);
                }
            }
        }
    }

    /// Ticks with millisecond jitter: spans are no longer whole seconds, so
    /// every sheet's rounding of spans may move, within the stated bound.
    #[test]
    fn losing_jittered_samples_stays_within_the_rounding_bound(
        plans in prop::collection::vec(epoch_plan(), 1..4),
        losses in prop::collection::vec(losses(), 4),
        jitter in prop::collection::vec(0u16..400, 1..50),
    ) {
        let series: Vec<Vec<UsageSample>> = plans
            .iter()
            .enumerate()
            .map(|(sandbox, plan)| collect(sandbox, plan, &jitter))
            .collect();
        let mut lossy = Vec::new();
        let mut touched = 0;
        for (index, one) in series.iter().enumerate() {
            let (kept, lost) = lose(one, &losses[index % losses.len()]);
            touched += lost.len().min(1) * (plans[index].phases.len() + 1);
            lossy.extend(kept);
        }
        for (name, text, increment_s) in SHEETS {
            let sheet = PriceSheet::from_toml(text, name).expect("shipped sheet loads");
            let full = lines(&rate(&sheet, series.concat()));
            let lost = lines(&rate(&sheet, lossy.clone()));
            for (key, (_, amount)) in &full {
                let bound = span_bound(name, increment_s, touched);
                let lost_amount = lost.get(key).map_or(Decimal::ZERO, |(_, amount)| *amount);
                prop_assert!((*amount - lost_amount).abs() <= bound,
                    "{} {:?}: {} vs {} (bound {})", name, key, amount, lost_amount, bound);
            }
        }
    }
}

/// A resize and a suspend inside a lost run: counters bill what happened,
/// gauges bill the closing sample's allocation and state over the whole gap.
#[test]
fn gauge_rating_loses_money_on_the_same_losses() {
    let plan = EpochPlan {
        phases: vec![
            Phase {
                ticks: 600,
                running: true,
                vcpu: 8000,
                mem_mib: 8192,
                cpu_permille: 500,
                session: true,
            },
            Phase {
                ticks: 600,
                running: true,
                vcpu: 1000,
                mem_mib: 1024,
                cpu_permille: 100,
                session: false,
            },
            Phase {
                ticks: 600,
                running: false,
                vcpu: 1000,
                mem_mib: 1024,
                cpu_permille: 0,
                session: false,
            },
            Phase {
                ticks: 600,
                running: true,
                vcpu: 2000,
                mem_mib: 2048,
                cpu_permille: 900,
                session: true,
            },
        ],
        gpus: 1,
        disk_gib: 50,
    };
    let series = collect(0, &plan, &[0]);
    // Lose ticks 500..=1900: the resize at 600 and the suspension 1200..1800.
    let (lossy, _) = lose(
        &series,
        &[(207, 300), (332, 300), (457, 300), (582, 300), (707, 200)],
    );
    assert!(lossy.len() < series.len() - 1000, "a long run is lost");
    let without_counters = |samples: &[UsageSample]| -> Vec<UsageSample> {
        samples
            .iter()
            .cloned()
            .map(|mut sample| {
                sample.counters_present = CounterSet::NONE;
                sample
            })
            .collect()
    };
    for (name, text, _) in SHEETS {
        let sheet = PriceSheet::from_toml(text, name).expect("shipped sheet loads");
        // The subtotal: usage before plan credits, which can hide a difference.
        let total = |report: RateReport| report.customers[0].subtotal;
        let full = total(rate(&sheet, series.clone()));
        let from_counters = total(rate(&sheet, lossy.clone()));
        let from_gauges = total(rate(&sheet, without_counters(&lossy)));
        let gauges_in_full = total(rate(&sheet, without_counters(&series)));
        assert_eq!(
            full, gauges_in_full,
            "{name}: without losses both rules agree"
        );
        assert_eq!(full, from_counters, "{name}: counters bill what happened");
        assert_ne!(
            full, from_gauges,
            "{name}: gauges bill the closing sample over the gap"
        );
    }
}

/// An absurd counter is refused, not billed: a sample whose running time
/// grew by more than the interval lasted (a corrupted counter) is reported
/// on its line, and the next sample is measured from the last good one, so
/// the bill is the bill without it.
#[test]
fn running_longer_than_the_interval_is_refused_and_costs_nothing() {
    let plan = EpochPlan {
        phases: vec![Phase {
            ticks: 20,
            running: true,
            vcpu: 2000,
            mem_mib: 1024,
            cpu_permille: 500,
            session: true,
        }],
        gpus: 0,
        disk_gib: 10,
    };
    let series = collect(0, &plan, &[0]);
    let mut corrupted = series.clone();
    corrupted[10].state_counters.running_ms += 3_600_000;
    for (name, text, _) in SHEETS {
        let sheet = PriceSheet::from_toml(text, name).expect("shipped sheet loads");
        let numbered: Vec<NumberedSample> = corrupted
            .iter()
            .enumerate()
            .map(|(index, sample)| NumberedSample {
                line: index as u64 + 1,
                sample: sample.clone(),
            })
            .collect();
        let report = rate_report(
            &sheet,
            &numbered,
            &SessionOrConnection,
            &BillingOptions::default(),
            Vec::new(),
        )
        .expect("rates");
        assert_eq!(report.errors.len(), 1, "{name}: {:?}", report.errors);
        assert_eq!(report.errors[0].line, 11);
        assert_eq!(report.errors[0].field, "running_ms");
        assert!(
            report.errors[0].reason.contains("interval of 1000 ms"),
            "{:?}",
            report.errors
        );
        let mut without = series.clone();
        without.remove(10);
        assert_eq!(
            lines(&report),
            lines(&rate(&sheet, without)),
            "{name}: the bill without the bad sample"
        );
    }
}
