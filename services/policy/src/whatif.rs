//! What-if: replay recorded samples under a candidate policy and measure what
//! it would have changed, before a platform ships it.
//!
//! For each customer, the candidate's suspend and stop decisions (first
//! attempts; a re-issue is the same idle streak) are counted. From each
//! decision the recorded samples are walked forward: every running interval
//! the candidate calls idle would have been spent suspended. The walk ends at
//! the first interval with activity under the candidate's signals (the
//! sandbox would have been woken there), at a recorded suspend or stop (the
//! real history stopped billing there anyway), at a gap (missing data is not
//! idle), or at the end of the range. Per customer:
//!
//! - `suspends`: the candidate's suspend/stop decisions in the range;
//! - `idle_hours_saved`: the walked time, in hours (4 decimals, half-up);
//! - `money_saved`: the customer's usage subtotal under the sheet (their
//!   plan's prices and inclusions; before fees, credits and tax) as recorded,
//!   minus the same with the walked samples suspended, both rated from the
//!   samples' gauges with the bill's idle rule. Exact decimals;
//! - `felt_suspends`: suspends whose walk ended by activity within
//!   `felt_within_s` (60 s) of the decision: a user came back right after,
//!   and would have waited for a resume.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use idlemeter_core::policy::{replay, Action, Policy, PolicyIdle};
use idlemeter_core::rating::{is_gap, NumberedSample};
use idlemeter_core::{
    rate_report, BillingOptions, CounterSet, Epoch, IdlePolicy, LifecycleState, PriceSheet,
    SandboxId, UsageSample,
};
use rust_decimal::Decimal;
use serde::Serialize;

/// What a candidate policy would have changed for one customer (or in total).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Savings {
    pub suspends: u64,
    pub idle_hours_saved: Decimal,
    pub money_saved: Decimal,
    pub felt_suspends: u64,
    /// Intervals the candidate could not judge: samples lost within them or
    /// longer than its `gap_after_s`. Many of them mean the samples were
    /// compacted or lost, and the figures above undercount.
    pub intervals_missing_data: u64,
}

impl Savings {
    /// Adds `other` (same currency: one sheet).
    pub fn add(&mut self, other: &Savings) {
        self.suspends += other.suspends;
        self.idle_hours_saved += other.idle_hours_saved;
        self.money_saved += other.money_saved;
        self.felt_suspends += other.felt_suspends;
        self.intervals_missing_data += other.intervals_missing_data;
    }
}

/// A candidate policy measured against recorded samples.
#[derive(Debug)]
pub struct WhatIf<'a, P> {
    pub candidate: &'a Policy,
    pub sheet: &'a PriceSheet,
    /// The idle rule the bills are rated with (the rater's).
    pub billing: &'a P,
    /// Only decisions in `[from, to)` count; samples at or after `to` are
    /// not walked.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub felt_within_s: i64,
}

type Series = BTreeMap<(SandboxId, Epoch), Vec<UsageSample>>;

impl<P: IdlePolicy> WhatIf<'_, P> {
    /// The savings for one customer's samples (any order, duplicates fine).
    pub fn customer(&self, samples: Vec<UsageSample>) -> idlemeter_core::Result<Savings> {
        let mut series: Series = BTreeMap::new();
        for sample in samples.iter().filter(|sample| sample.ts < self.to) {
            series
                .entry((sample.sandbox.clone(), sample.epoch))
                .or_default()
                .push(sample.clone());
        }
        let mut savings = Savings::default();
        for samples in series.values_mut() {
            samples.sort_by_key(|sample| sample.seq);
            samples.dedup_by_key(|sample| sample.seq);
            let gap_after_s = samples.first().map_or(0, |first| {
                self.candidate.rules_for(&first.customer).gap_after_s
            });
            savings.intervals_missing_data += samples
                .windows(2)
                .filter(|pair| is_gap(&pair[0], &pair[1], gap_after_s))
                .count() as u64;
        }
        let candidate_idle = PolicyIdle::new(self.candidate.clone());
        let mut saved_ms: i64 = 0;
        let mut walked = series.clone();
        let decisions = replay(self.candidate, samples, Vec::new());
        for decision in decisions.iter().filter(|decision| {
            matches!(decision.action, Action::Suspend | Action::Stop)
                && decision.attempt == 1
                && decision.at >= self.from
                && decision.at < self.to
        }) {
            savings.suspends += 1;
            let key = (decision.sandbox.clone(), decision.epoch);
            let Some(recorded) = series.get(&key) else {
                continue;
            };
            let Some(start) = recorded.iter().position(|sample| sample.ts >= decision.at) else {
                continue;
            };
            let gap_after_s = self.candidate.rules_for(&decision.customer).gap_after_s;
            let mut end = start;
            for (index, pair) in recorded[start..].windows(2).enumerate() {
                let (previous, closing) = (&pair[0], &pair[1]);
                if closing.state != LifecycleState::Running
                    || is_gap(previous, closing, gap_after_s)
                {
                    break;
                }
                if !candidate_idle.is_idle(previous, closing) {
                    if (closing.ts - decision.at).num_seconds() <= self.felt_within_s {
                        savings.felt_suspends += 1;
                    }
                    break;
                }
                end = start + index + 1;
            }
            saved_ms += (recorded[end].ts - decision.at).num_milliseconds().max(0);
            if let Some(walked) = walked.get_mut(&key) {
                for sample in &mut walked[start + 1..=end] {
                    sample.state = LifecycleState::Suspended;
                }
            }
        }
        savings.idle_hours_saved = (Decimal::from(saved_ms) / Decimal::from(3_600_000))
            .round_dp_with_strategy(4, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
        savings.money_saved = self.subtotal(&series)? - self.subtotal(&walked)?;
        Ok(savings)
    }

    /// The usage subtotal of these series, rated from their gauges.
    fn subtotal(&self, series: &Series) -> idlemeter_core::Result<Decimal> {
        let numbered: Vec<NumberedSample> = series
            .values()
            .flatten()
            .enumerate()
            .map(|(index, sample)| {
                let mut sample = sample.clone();
                sample.counters_present = CounterSet::NONE;
                NumberedSample {
                    line: index as u64 + 1,
                    sample,
                }
            })
            .collect();
        let report = rate_report(
            self.sheet,
            &numbered,
            self.billing,
            &BillingOptions::default(),
            Vec::new(),
        )?;
        Ok(report.customers.iter().map(|bill| bill.subtotal).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idlemeter_core::{CustomerId, NodeId, SessionOrConnection, VcpuMillis};

    /// $1 per running vCPU-second, nothing else.
    const SHEET: &str = r#"
[sheet]
platform = "whatif"
currency = "USD"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-second"
unit_price = "1"
basis = "allocated"
increment_seconds = 1
idle = "billed"
"#;

    const CANDIDATE: &str =
        "[policy]\nname = \"cand\"\nversion = \"2\"\n[rules]\nidle_window_s = 10\nreissue_after_s = 3600\n";

    fn t(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + second, 0).expect("time")
    }

    /// One sample per second of `sandbox`, running, 1 vCPU, with a session
    /// open where `busy` says so.
    fn trace(sandbox: &str, seconds: i64, busy: impl Fn(i64) -> bool) -> Vec<UsageSample> {
        (0..seconds)
            .map(|second| UsageSample {
                vcpu: VcpuMillis(1000),
                exec_sessions: u32::from(busy(second)),
                ..UsageSample::blank(
                    CustomerId::parse("acme").expect("id"),
                    NodeId::parse("n").expect("id"),
                    SandboxId::parse(sandbox).expect("id"),
                    Epoch(1),
                    second as u64 + 1,
                    t(second),
                )
            })
            .collect()
    }

    #[test]
    fn savings_are_the_idle_seconds_after_each_suspend_until_activity() {
        let sheet = PriceSheet::from_toml(SHEET, "s.toml").expect("sheet");
        let candidate = Policy::from_toml(CANDIDATE, "c.toml").expect("policy");
        let whatif = WhatIf {
            candidate: &candidate,
            sheet: &sheet,
            billing: &SessionOrConnection,
            from: t(0),
            to: t(1_000),
            felt_within_s: 60,
        };
        // A session open at 0..19, none from 20: idle since the last active
        // sample (19), suspended at 29, idle to the end (t = 119).
        let quiet = trace("quiet", 120, |s| s < 20);
        // The same, but busy again at 50, 21 s after the suspend: felt.
        let back = trace("back", 120, |s| !(20..50).contains(&s));
        let mut samples = quiet;
        samples.extend(back.clone());
        samples.extend(back); // duplicates change nothing
        let savings = whatif.customer(samples).expect("rated");
        assert_eq!(savings.suspends, 2);
        assert_eq!(savings.felt_suspends, 1);
        // quiet: 29 -> 119 = 90 s; back: 29 -> 49 = 20 s. 110 s = 0.030555 h.
        assert_eq!(savings.idle_hours_saved, Decimal::new(306, 4));
        // 110 running vCPU-seconds at $1 no longer billed.
        assert_eq!(savings.money_saved, Decimal::from(110));
        assert_eq!(savings.intervals_missing_data, 0);
    }
}
