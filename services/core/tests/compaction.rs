//! Compaction keeps every bill: rating the samples a [`Compactor`] keeps gives
//! the same quantities and cents as rating every sample, for every shipped
//! sheet (CodeSandbox's minute rounding included), for the whole trace and
//! for the lines written at the end of each hour; a restart that replays from
//! the compactor's oldest open position changes neither. Minute rows give the
//! usage windows what the per-second rows gave them.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Duration;
use idlemeter_core::{
    compact_all, CompactRule, Compacted, Compactor, MinuteRow, PriceSheet, UsageSample,
    MINUTE_COUNTERS,
};
use proptest::prelude::*;

mod common;

use common::{collect, epoch_plan, lines, SHEETS};

fn bill_lines(sheet: &PriceSheet, samples: &[UsageSample]) -> common::Lines {
    lines(&common::rate(sheet, samples))
}

/// A stream as ingest sees it: the series interleaved tick by tick (a node
/// batch holds one tick of every sandbox), shifted so that the trace starts
/// `offset_s` into its hour, with some samples sent twice.
fn stream(
    plans: &[common::EpochPlan],
    jitter: &[u16],
    offset_s: i64,
    duplicate_every: usize,
    idle_every: u64,
) -> Vec<UsageSample> {
    let series: Vec<Vec<UsageSample>> = plans
        .iter()
        .enumerate()
        .map(|(sandbox, plan)| {
            let mut samples = collect(sandbox, plan, jitter);
            // Every `idle_every`th interval uses no CPU (an idle second), so
            // CPU use is zero in some intervals and not in their neighbours.
            let mut unused = (0, 0);
            let mut previous = (0, 0);
            for sample in &mut samples {
                sample.ts += Duration::seconds(offset_s);
                let now = (
                    sample.cpu_used_usec,
                    sample.state_counters.cpu_used_active_usec,
                );
                if idle_every > 0 && sample.seq % idle_every == 0 {
                    unused.0 += now.0 - previous.0;
                    unused.1 += now.1 - previous.1;
                }
                previous = now;
                sample.cpu_used_usec -= unused.0;
                sample.state_counters.cpu_used_active_usec -= unused.1;
            }
            samples
        })
        .collect();
    let longest = series.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::new();
    for tick in 0..longest {
        for one in &series {
            if let Some(sample) = one.get(tick) {
                out.push(sample.clone());
                if duplicate_every > 0 && (tick + out.len()) % duplicate_every == 0 {
                    out.push(sample.clone());
                }
            }
        }
    }
    out
}

/// The distinct samples of a stream, as rating sees them.
fn distinct(samples: &[UsageSample]) -> Vec<UsageSample> {
    let mut seen = BTreeSet::new();
    samples
        .iter()
        .filter(|sample| {
            seen.insert((
                sample.customer.to_string(),
                sample.sandbox.to_string(),
                sample.epoch.0,
                sample.seq,
            ))
        })
        .cloned()
        .collect()
}

/// The hour ends inside a stream, Unix ms.
fn hour_ends(samples: &[UsageSample]) -> Vec<i64> {
    let hours: BTreeSet<i64> = samples
        .iter()
        .map(|sample| sample.ts.timestamp_millis().div_euclid(3_600_000))
        .collect();
    hours
        .into_iter()
        .skip(1)
        .map(|hour| hour * 3_600_000)
        .collect()
}

fn before(samples: &[UsageSample], end_ms: i64) -> Vec<UsageSample> {
    samples
        .iter()
        .filter(|sample| sample.ts.timestamp_millis() < end_ms)
        .cloned()
        .collect()
}

/// Per (sandbox, epoch, minute): first and last seq, the range of every
/// minute counter. From raw samples, and from minute rows.
type Windows = BTreeMap<(String, u64, i64), (u64, u64, Vec<u64>, Vec<u64>)>;

fn windows_of_samples(samples: &[UsageSample]) -> Windows {
    let mut windows = Windows::new();
    for sample in samples {
        let counters = [
            sample.cpu_used_usec,
            sample.net_rx_bytes,
            sample.net_tx_bytes,
            sample.vcpu_alloc_usec,
            sample.mem_alloc_kib_ms,
            sample.mem_used_kib_ms,
            sample.gpu_alloc_ms,
            sample.disk_mib_ms,
            sample.state_counters.running_ms,
            sample.state_counters.suspended_ms,
            sample.state_counters.active_ms,
        ];
        let key = (
            sample.sandbox.to_string(),
            sample.epoch.0,
            sample.ts.timestamp_millis().div_euclid(60_000) * 60,
        );
        let entry = windows
            .entry(key)
            .or_insert((u64::MAX, 0, vec![u64::MAX; 11], vec![0; 11]));
        entry.0 = entry.0.min(sample.seq);
        entry.1 = entry.1.max(sample.seq);
        for (index, value) in counters.into_iter().enumerate() {
            entry.2[index] = entry.2[index].min(value);
            entry.3[index] = entry.3[index].max(value);
        }
    }
    windows
}

fn windows_of_rows(rows: &[MinuteRow]) -> Windows {
    let mut windows = Windows::new();
    for row in rows {
        let entry = windows
            .entry((row.sandbox.to_string(), row.epoch.0, row.minute_s))
            .or_insert((u64::MAX, 0, vec![u64::MAX; 11], vec![0; 11]));
        entry.0 = entry.0.min(row.first_seq);
        entry.1 = entry.1.max(row.last_seq);
        for index in 0..MINUTE_COUNTERS.len() {
            entry.2[index] = entry.2[index].min(row.lo[index]);
            entry.3[index] = entry.3[index].max(row.hi[index]);
        }
    }
    windows
}

/// The shipped sheets, and under `every_sheet` also CodeSandbox's billing
/// CPU and memory by use alone (`basis = "used"`), in minute increments:
/// a sheet that ends spans where use is zero.
fn sheets(every_sheet: bool) -> Vec<(String, PriceSheet)> {
    let mut sheets: Vec<(String, PriceSheet)> = SHEETS
        .iter()
        .map(|(name, text, _)| {
            let sheet = PriceSheet::from_toml(text, name).expect("shipped sheet loads");
            ((*name).to_owned(), sheet)
        })
        .collect();
    if every_sheet {
        let (_, codesandbox, _) = SHEETS[4];
        let used = codesandbox.replace("basis = \"allocated\"", "basis = \"used\"");
        assert_ne!(used, codesandbox, "the CodeSandbox sheet names its basis");
        let sheet = PriceSheet::from_toml(&used, "used").expect("the used-basis sheet loads");
        sheets.push(("codesandbox-used".to_owned(), sheet));
    }
    sheets
}

fn assert_same_bills(
    all: &[UsageSample],
    kept: &[UsageSample],
    every_sheet: bool,
) -> Result<(), TestCaseError> {
    for (name, sheet) in sheets(every_sheet) {
        prop_assert_eq!(
            bill_lines(&sheet, all),
            bill_lines(&sheet, kept),
            "{} whole trace",
            name
        );
        for end in hour_ends(all) {
            prop_assert_eq!(
                bill_lines(&sheet, &before(all, end)),
                bill_lines(&sheet, &before(kept, end)),
                "{} lines at the hour ending {}",
                name,
                end
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn the_kept_samples_bill_what_every_sample_bills(
        plans in prop::collection::vec(epoch_plan(), 1..5),
        jitter in prop::sample::select(vec![vec![0u16], vec![0, 250, 7, 999, 400]]),
        offset_s in 0i64..3600,
        duplicate_every in prop::sample::select(vec![0usize, 7]),
    ) {
        let input = stream(&plans, &jitter, offset_s, duplicate_every, 3);
        let all = distinct(&input);
        let compacted = compact_all(input.iter().cloned(), CompactRule::EVERY_SHEET);
        prop_assert!(compacted.samples.len() <= all.len());
        assert_same_bills(&all, &distinct(&compacted.samples), true)?;
        prop_assert_eq!(windows_of_samples(&all), windows_of_rows(&compacted.minutes));
    }

    /// The rule for the shipped sheets keeps fewer samples (it merges
    /// intervals with and without CPU use) and still bills exactly under them.
    #[test]
    fn the_rule_for_the_shipped_sheets_bills_them_exactly(
        plans in prop::collection::vec(epoch_plan(), 1..5),
        jitter in prop::sample::select(vec![vec![0u16], vec![0, 250, 7, 999, 400]]),
        offset_s in 0i64..3600,
    ) {
        let input = stream(&plans, &jitter, offset_s, 0, 3);
        let all = distinct(&input);
        let shipped: Vec<PriceSheet> = sheets(false).into_iter().map(|(_, sheet)| sheet).collect();
        let rule = CompactRule::for_sheets(&shipped);
        prop_assert!(!rule.separates_use());
        let compacted = compact_all(input.iter().cloned(), rule);
        assert_same_bills(&all, &distinct(&compacted.samples), false)?;
        prop_assert_eq!(windows_of_samples(&all), windows_of_rows(&compacted.minutes));
    }

    /// A crash after any sample: what was written before it stays, the new
    /// process replays from the oldest open position, and the union bills
    /// and windows exactly as one uninterrupted run.
    #[test]
    fn a_replay_from_the_oldest_open_position_changes_nothing(
        plans in prop::collection::vec(epoch_plan(), 1..4),
        offset_s in 0i64..3600,
        crash_at in 0.0f64..1.0,
    ) {
        let input = stream(&plans, &[0], offset_s, 0, 3);
        let crash = ((input.len() as f64) * crash_at) as usize;
        let mut written = Compacted::default();
        let mut first = Compactor::<usize>::with_rule(CompactRule::EVERY_SHEET);
        for (position, sample) in input.iter().enumerate().take(crash) {
            first.push(sample.clone(), position, 0, &mut written);
        }
        let resume = first.oldest_position().unwrap_or(crash);
        drop(first);
        let mut second = Compactor::<usize>::with_rule(CompactRule::EVERY_SHEET);
        for (position, sample) in input.iter().enumerate().skip(resume) {
            second.push(sample.clone(), position, 0, &mut written);
        }
        second.finish(&mut written);
        let all = distinct(&input);
        assert_same_bills(&all, &distinct(&written.samples), true)?;
        prop_assert_eq!(windows_of_samples(&all), windows_of_rows(&written.minutes));
    }
}

/// A steady sandbox keeps about one sample a minute, not sixty.
#[test]
fn a_steady_sandbox_keeps_about_one_sample_a_minute() {
    let plan = common::EpochPlan {
        phases: vec![common::Phase {
            ticks: 3 * 3600,
            running: true,
            vcpu: 2000,
            mem_mib: 2048,
            cpu_permille: 300,
            session: true,
        }],
        gpus: 0,
        disk_gib: 10,
    };
    let input = stream(&[plan], &[0], 0, 0, 0);
    let compacted = compact_all(input.iter().cloned(), CompactRule::EVERY_SHEET);
    let minutes = input.len() / 60;
    assert!(
        compacted.samples.len() <= minutes + 3 * 4 + 4,
        "{} kept of {} over {minutes} minutes",
        compacted.samples.len(),
        input.len()
    );
    assert_eq!(compacted.minutes.len(), minutes + 1);
}

/// Keeping all keeps every distinct sample, and the same minute rows.
#[test]
fn keep_all_keeps_every_sample_and_the_same_minutes() {
    let plan = common::EpochPlan {
        phases: vec![common::Phase {
            ticks: 200,
            running: true,
            vcpu: 1000,
            mem_mib: 512,
            cpu_permille: 100,
            session: false,
        }],
        gpus: 0,
        disk_gib: 1,
    };
    let input = stream(&[plan], &[0], 30, 3, 0);
    let all = distinct(&input);
    let kept = compact_all(input.iter().cloned(), CompactRule::KEEP_ALL);
    assert_eq!(distinct(&kept.samples), all);
    assert_eq!(kept.samples.len(), all.len());
    let compacted = compact_all(input.iter().cloned(), CompactRule::EVERY_SHEET);
    assert!(compacted.samples.len() < all.len() / 10);
    assert_eq!(
        windows_of_rows(&kept.minutes),
        windows_of_rows(&compacted.minutes)
    );
}

/// What the rule for a set of sheets cannot merge, it keeps whole.
#[test]
fn sheets_the_rule_cannot_serve_keep_every_sample() {
    let (_, e2b, _) = SHEETS[0];
    let e2b_sheet = PriceSheet::from_toml(e2b, "e2b").expect("loads");
    assert!(!CompactRule::for_sheets([&e2b_sheet]).keeps_all());
    let off_the_hour = e2b.replacen("T00:00:00Z", "T00:30:00Z", 1);
    assert_ne!(off_the_hour, e2b, "the e2b sheet has a version at midnight");
    let sheet = PriceSheet::from_toml(&off_the_hour, "e2b-half-past").expect("loads");
    assert!(CompactRule::for_sheets([&sheet]).keeps_all());
    let (_, codesandbox, _) = SHEETS[4];
    let used_with_minimum = codesandbox.replacen(
        "basis = \"allocated\"",
        "basis = \"used\"\nminimum = \"0.25\"",
        1,
    );
    let sheet = PriceSheet::from_toml(&used_with_minimum, "used-minimum").expect("loads");
    assert!(CompactRule::for_sheets([&sheet]).keeps_all());
}

/// A collector clock that jumps ahead once makes rating refuse every sample
/// after it for as long; the series starts again after three refusals, so
/// its offsets are released and its minutes written, and every refused
/// sample is kept.
#[test]
fn a_run_of_refused_samples_restarts_the_series() {
    let plan = common::EpochPlan {
        phases: vec![common::Phase {
            ticks: 40,
            running: true,
            vcpu: 1000,
            mem_mib: 512,
            cpu_permille: 100,
            session: true,
        }],
        gpus: 0,
        disk_gib: 1,
    };
    let mut input = stream(&[plan], &[0], 0, 0, 0);
    input[10].ts += Duration::hours(6);
    let mut compactor = Compactor::<usize>::with_rule(CompactRule::EVERY_SHEET);
    let mut out = Compacted::default();
    for (position, sample) in input.iter().enumerate() {
        compactor.push(sample.clone(), position, 0, &mut out);
    }
    // Samples 11-13 are refused; the third restarts the series there.
    let oldest = compactor.oldest_position().expect("a series is held");
    assert!(oldest >= 13, "the offsets stay pinned at {oldest}");
    assert_eq!(compactor.stats().series_ended, 1);
    compactor.finish(&mut out);
    let kept: Vec<u64> = distinct(&out.samples).iter().map(|s| s.seq).collect();
    for seq in 11..=14 {
        assert!(kept.contains(&seq), "refused sample {seq} kept: {kept:?}");
    }
}

/// Seq jumps count the samples they skipped; one that arrives after its
/// successor counts as late, and duplicates as duplicates.
#[test]
fn seq_jumps_count_the_samples_they_skipped() {
    let plan = common::EpochPlan {
        phases: vec![common::Phase {
            ticks: 30,
            running: true,
            vcpu: 1000,
            mem_mib: 512,
            cpu_permille: 100,
            session: true,
        }],
        gpus: 0,
        disk_gib: 1,
    };
    let all = stream(&[plan], &[0], 0, 0, 0);
    // Seqs 1-5, then 9 (6-8 skipped), 7 late, 9 again, then 10-20 and 25.
    let mut input: Vec<UsageSample> = all[..5].to_vec();
    input.push(all[8].clone());
    input.push(all[6].clone());
    input.push(all[8].clone());
    input.extend(all[9..20].iter().cloned());
    input.push(all[24].clone());
    assert_eq!(input[5].seq, 9, "the stream numbers samples from 1");
    let mut compactor = Compactor::<usize>::with_rule(CompactRule::EVERY_SHEET);
    let mut out = Compacted::default();
    for (position, sample) in input.iter().enumerate() {
        compactor.push(sample.clone(), position, 0, &mut out);
    }
    let stats = compactor.stats();
    assert_eq!(stats.missing, 3 + 4, "6-8 and 21-24");
    assert_eq!(stats.late, 1);
    assert_eq!(stats.duplicates, 1);
}
