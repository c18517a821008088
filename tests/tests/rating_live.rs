//! Live cost (issue "Money from counters"): the rater rates the open hour
//! into a provisional figure that equals rating every sample so far from
//! scratch, the final snapshot takes over when the hour closes, one
//! and one customer's refused samples are reported without stopping anyone
//! else. (A budget cap acting on live spend: `policy_service.rs`.)

use chrono::{DateTime, Utc};
use idlemeter_core::{
    rate_report, BillingOptions, CustomerId, NumberedSample, PriceSheet, SessionOrConnection,
    UsageSample,
};
use idlemeter_rater::{Period, Rater, RaterConfig};
use idlemeter_tests::{counted_trace, TestEnv};
use rust_decimal::Decimal;

const SHEET: &str = include_str!("../../prices/sprites.toml");

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("rfc3339")
}

fn rater(env: &TestEnv) -> anyhow::Result<Rater> {
    let config = RaterConfig {
        sheet: "prices/sprites.toml".to_owned(),
        grace_seconds: 300,
        live_interval_seconds: 5,
        live_lateness_seconds: 10,
        ..RaterConfig::default()
    };
    Ok(Rater::new(
        env.store.clone(),
        SHEET,
        config,
        &prometheus::Registry::new(),
    )?
    .with_terms(idlemeter_tests::terms(Period::Month))?)
}

/// The period-to-date total of `customer` rated from scratch over every
/// sample before `until`.
fn scratch_total(samples: &[UsageSample], customer: &str, until: DateTime<Utc>) -> Decimal {
    let sheet = PriceSheet::from_toml(SHEET, "prices/sprites.toml").expect("sheet");
    let numbered: Vec<NumberedSample> = samples
        .iter()
        .filter(|sample| sample.ts < until && sample.customer.as_str() == customer)
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
    report
        .customers
        .iter()
        .find(|bill| bill.customer.as_str() == customer)
        .map_or(Decimal::ZERO, |bill| bill.total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_hour_is_rated_live_and_the_closed_hour_replaces_it() -> anyhow::Result<()> {
    let env = TestEnv::new("rating_live").await?;
    // acme's two sandboxes from 09:00 every 10 s; the store holds what was
    // sent by 10:20:05 at first, the rest arrives later.
    let start = at("2026-11-03T09:00:00Z");
    let mut samples = Vec::new();
    for sandbox in ["sbx-a", "sbx-b"] {
        samples.extend(counted_trace("acme", sandbox, start, 10, 6 * 60 * 2));
    }
    // beta, 09:00 to 10:10, has a counter go back at 09:30: that sample is
    // refused and reported; beta's other samples and acme are rated.
    let mut beta = counted_trace("beta", "sbx-z", start, 60, 70);
    beta[30].vcpu_alloc_usec = 0;
    samples.extend(beta);
    let first_now = at("2026-11-03T10:20:05Z");
    let (early, late): (Vec<UsageSample>, Vec<UsageSample>) = samples
        .iter()
        .cloned()
        .partition(|sample| sample.ts <= first_now);
    env.store.insert_samples(&early).await?;

    let rater = rater(&env)?;
    let pass = rater.rate_closed_hours(first_now).await?;
    assert_eq!(
        pass.snapshots_written, 2,
        "acme and beta, hour ending 10:00"
    );
    assert_eq!(pass.samples_refused, 1);
    let live = rater.rate_live(first_now).await?;
    assert_eq!(live.customers_rated, 1, "only acme has recent samples");
    let spend = env
        .store
        .latest_spend("acme")
        .await?
        .expect("acme has spend");
    assert!(spend.provisional, "{spend:?}");
    assert_eq!(spend.as_of, at("2026-11-03T10:20:00Z").timestamp() as u32);
    let expected = scratch_total(&samples, "acme", first_now);
    assert!(expected > Decimal::ZERO);
    assert_eq!(spend.total.normalize(), expected.normalize());
    let acme = CustomerId::parse("acme")?;
    let lines = env.store.spend_lines(&acme, &spend).await?;
    let summed: Decimal = lines
        .iter()
        .map(|line| idlemeter_store::from_column(line.amount).expect("amount"))
        .sum();
    assert_eq!(summed.normalize(), expected.normalize());

    // More samples: the live figure moves on, a few seconds at a time.
    env.store.insert_samples(&late).await?;
    for second_now in ["2026-11-03T10:20:12Z", "2026-11-03T10:40:00Z"] {
        let now = at(second_now);
        rater.rate_live(now).await?;
        let spend = env.store.latest_spend("acme").await?.expect("spend");
        assert!(spend.provisional);
        assert_eq!(
            spend.total.normalize(),
            scratch_total(&samples, "acme", now + chrono::Duration::milliseconds(1)).normalize(),
            "live at {now}"
        );
    }

    // The hour closes: the final snapshot as of 11:00 is newer than the
    // live figure and is what everyone reads.
    let close = at("2026-11-03T11:05:01Z");
    rater.rate_closed_hours(close).await?;
    let spend = env.store.latest_spend("acme").await?.expect("spend");
    assert!(!spend.provisional, "{spend:?}");
    assert_eq!(spend.as_of, at("2026-11-03T11:00:00Z").timestamp() as u32);
    assert_eq!(
        spend.total.normalize(),
        scratch_total(&samples, "acme", at("2026-11-03T11:00:00Z")).normalize()
    );

    let errors = env.store.rating_errors_of("beta").await?;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (
            errors[0].sandbox.as_str(),
            errors[0].seq,
            errors[0].field.as_str()
        ),
        ("sbx-z", 31, "vcpu_alloc_usec")
    );
    assert!(errors[0].reason.contains("backwards"), "{errors:?}");
    assert!(env.store.rating_errors_of("acme").await?.is_empty());
    Ok(())
}
