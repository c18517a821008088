//! Incremental rating equals rating from scratch (issue "Money from
//! counters": the rater rates only what arrived since its last pass).
//!
//! Generated epochs for several sandboxes and customers are cut at random
//! times into passes; each pass re-delivers the samples of the second before
//! its start (as the store's query hands a pass the baseline it already
//! had), and some passes store and reload the state as JSON, as a restarted
//! or another rater would. After every pass, the carried state's
//! period-to-date quantities must equal `rate_samples` over every sample so
//! far, for the five shipped sheets, to the base unit.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::{collect, epoch_plan, SHEETS};
use idlemeter_core::{
    rate_samples, NumberedSample, PriceSheet, RatingState, SessionOrConnection, UsageSample,
};
use proptest::prelude::*;

fn numbered(samples: &[&UsageSample]) -> Vec<NumberedSample> {
    samples
        .iter()
        .enumerate()
        .map(|(index, sample)| NumberedSample {
            line: index as u64 + 1,
            sample: (*sample).clone(),
        })
        .collect()
}

fn before(samples: &[UsageSample], end: DateTime<Utc>) -> Vec<&UsageSample> {
    samples.iter().filter(|sample| sample.ts < end).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn rating_pass_by_pass_equals_rating_from_scratch(
        plans in prop::collection::vec(epoch_plan(), 1..5),
        cuts in prop::collection::vec((0u16..1000, any::<bool>()), 1..8),
        jitter in prop::collection::vec(0u16..999, 1..4),
    ) {
        let samples: Vec<UsageSample> = plans
            .iter()
            .enumerate()
            .flat_map(|(sandbox, plan)| collect(sandbox, plan, &jitter))
            .collect();
        let first = samples.iter().map(|sample| sample.ts).min().expect("samples");
        let last = samples.iter().map(|sample| sample.ts).max().expect("samples");
        let length_ms = (last - first).num_milliseconds() + 1;
        let mut ends: Vec<(DateTime<Utc>, bool)> = cuts
            .iter()
            .map(|(at, reload)| (first + Duration::milliseconds(length_ms * i64::from(*at) / 1000), *reload))
            .collect();
        ends.push((last + Duration::milliseconds(1), false));
        ends.sort();
        for (name, text, _) in SHEETS {
            let sheet = PriceSheet::from_toml(text, name).expect("shipped sheet loads");
            let mut state = RatingState::new(&sheet);
            let mut from = first;
            for (end, reload) in &ends {
                let redelivered = from - Duration::seconds(1);
                let pass: Vec<&UsageSample> = samples
                    .iter()
                    .filter(|sample| sample.ts >= redelivered && sample.ts < *end)
                    .collect();
                let errors = state.advance(&sheet, &numbered(&pass), &SessionOrConnection);
                let refused = errors.iter().find(|error| error.field != "gpu_model");
                prop_assert!(refused.is_none(), "{}: {:?}", name, refused);
                if *reload {
                    let text = state.to_json();
                    let reloaded = RatingState::from_json(&text, &sheet).expect("state reloads");
                    prop_assert_eq!(&reloaded.to_json(), &text);
                    state = reloaded;
                }
                let scratch = rate_samples(&sheet, &numbered(&before(&samples, *end)), &SessionOrConnection);
                let carried = state.usage(&sheet, &SessionOrConnection);
                prop_assert_eq!(&carried.customers, &scratch.customers, "{} up to {}", name, end);
                from = *end;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// A new period continues from the old one's baselines: the same as
    /// rating the new period's samples plus each series' last sample before
    /// it (what the store hands the rater for a period).
    #[test]
    fn the_next_period_starts_from_the_last_baselines(
        plans in prop::collection::vec(epoch_plan(), 1..4),
        cut in 1u16..1000,
    ) {
        let samples: Vec<UsageSample> = plans
            .iter()
            .enumerate()
            .flat_map(|(sandbox, plan)| collect(sandbox, plan, &[0]))
            .collect();
        let first = samples.iter().map(|sample| sample.ts).min().expect("samples");
        let last = samples.iter().map(|sample| sample.ts).max().expect("samples");
        let boundary = first + Duration::milliseconds((last - first).num_milliseconds() * i64::from(cut) / 1000);
        let mut period: Vec<&UsageSample> = samples.iter().filter(|sample| sample.ts >= boundary).collect();
        for sandbox in 0..plans.len() {
            let name = format!("sbx-{sandbox}");
            // As the store's query: baselines of the series with samples in the period.
            if !period.iter().any(|sample| sample.sandbox.as_str() == name) {
                continue;
            }
            if let Some(baseline) = samples
                .iter()
                .filter(|sample| sample.sandbox.as_str() == name && sample.ts < boundary)
                .max_by_key(|sample| sample.seq)
            {
                period.push(baseline);
            }
        }
        for (name, text, _) in SHEETS {
            let sheet = PriceSheet::from_toml(text, name).expect("shipped sheet loads");
            let mut state = RatingState::new(&sheet);
            state.advance(&sheet, &numbered(&before(&samples, boundary)), &SessionOrConnection);
            let mut next = state.next_period();
            let after: Vec<&UsageSample> = samples.iter().filter(|sample| sample.ts >= boundary).collect();
            next.advance(&sheet, &numbered(&after), &SessionOrConnection);
            let scratch = rate_samples(&sheet, &numbered(&period), &SessionOrConnection);
            prop_assert_eq!(&next.usage(&sheet, &SessionOrConnection).customers, &scratch.customers, "{}", name);
        }
    }
}

#[test]
fn a_state_refuses_a_sheet_of_another_shape() {
    let e2b = PriceSheet::from_toml(SHEETS[0].1, "e2b").expect("loads");
    let modal = PriceSheet::from_toml(SHEETS[2].1, "modal").expect("loads");
    let state = RatingState::new(&e2b);
    assert!(RatingState::from_json(&state.to_json(), &e2b).is_ok());
    assert_ne!(
        (e2b.slot_count(), e2b.versions().len()),
        (modal.slot_count(), modal.versions().len()),
        "the check below needs sheets of different shapes"
    );
    let error = RatingState::from_json(&state.to_json(), &modal).expect_err("other shape");
    assert!(error.to_string().contains("price versions"), "{error}");
    let error = RatingState::from_json("{\"format\":1}", &e2b).expect_err("truncated");
    assert!(error.to_string().contains("not valid JSON"), "{error}");
}
