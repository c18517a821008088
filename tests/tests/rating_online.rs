//! The online rater against a real ClickHouse: stored samples become
//! period-to-date snapshots with the same money as the offline CLI, a second
//! pass writes nothing, and a changed sheet re-rates beside the old results.

use chrono::{DateTime, Duration, Utc};
use idlemeter_core::{
    rate_report, BillingOptions, CustomerId, NumberedSample, PriceSheet, SessionOrConnection,
};
use idlemeter_rater::{Period, Rater, RaterConfig};
use idlemeter_tests::{sample, TestEnv};
use rust_decimal::Decimal;

const SHEET: &str = include_str!("../../prices/northflank.toml");

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("rfc3339")
}

/// sbx-a: 2 vCPU, 4 GiB (see `sample`), running from 00:00 to 02:00, one sample
/// every 10 minutes: 13 samples, 12 intervals of 600 s.
fn two_hours() -> Vec<idlemeter_core::UsageSample> {
    (0..=12)
        .map(|step| {
            sample(
                "sbx-a",
                1,
                step + 1,
                at("2026-11-03T00:00:00Z") + Duration::minutes(10 * step as i64),
                step * 1_000_000,
                0,
            )
        })
        .collect()
}

fn config() -> RaterConfig {
    RaterConfig {
        sheet: "prices/northflank.toml".to_owned(),
        grace_seconds: 300,
        interval_seconds: 60,
        idle_policy: String::new(),
        ..RaterConfig::default()
    }
}

async fn rated_rows(env: &TestEnv) -> anyhow::Result<u64> {
    Ok(env
        .store
        .client()
        .query("SELECT count() FROM rated_usage")
        .fetch_one::<u64>()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_hours_are_rated_like_the_cli_once_and_rerated_on_a_sheet_change(
) -> anyhow::Result<()> {
    let env = TestEnv::new("rating_online").await?;
    let samples = two_hours();
    env.store.insert_samples(&samples).await?;
    // A sample belongs to the hour it is taken in: the one at 02:00:00 closes an
    // interval of hour 02, so the snapshot as of 03:00 is the first with all 12.
    let now = at("2026-11-03T03:30:00Z");
    let customer = CustomerId::parse("acme")?;
    let period = at("2026-11-03T00:00:00Z").timestamp() as u32;
    let hour_3 = at("2026-11-03T03:00:00Z").timestamp() as u32;

    let rater = Rater::new(
        env.store.clone(),
        SHEET,
        config(),
        &prometheus::Registry::new(),
    )?
    .with_terms(idlemeter_tests::terms(Period::Day))?;
    let pass = rater.rate_closed_hours(now).await?;
    assert_eq!(
        pass.snapshots_written, 3,
        "hours ending 01:00, 02:00 and 03:00"
    );

    // By hand, Northflank: vCPU 2 x 2 h = 4 vCPU-h x $0.01667 = $0.06668 -> $0.07;
    // memory 4 GiB = 4.294967296 GB x 2 h = 8.589934592 GB-h x $0.00833
    // = $0.0715541551... -> $0.07. Total $0.14.
    let totals = env.store.snapshot_totals(&customer, period, hour_3).await?;
    assert_eq!(
        totals,
        vec![(rater.sheet_checksum().to_owned(), Decimal::new(14, 2))]
    );
    // The same function as `idlemeter rate`, on the same samples: same money.
    let sheet = PriceSheet::from_toml(SHEET, "northflank")?;
    let numbered: Vec<NumberedSample> = samples
        .iter()
        .enumerate()
        .map(|(line, sample)| NumberedSample {
            line: line as u64 + 1,
            sample: sample.clone(),
        })
        .collect();
    let offline = rate_report(
        &sheet,
        &numbered,
        &SessionOrConnection,
        &BillingOptions::default(),
        Vec::new(),
    )?;
    assert_eq!(offline.customers[0].total, totals[0].1);
    // As of 01:00: samples 00:00..00:50, 5 intervals = 50 min.
    // vCPU 2 x 5/6 h = 1.6667 vCPU-h x 0.01667 = 0.02778 -> 0.03;
    // memory 4.294967296 GB x 5/6 h x 0.00833 = 0.029814 -> 0.03. Total 0.06.
    let hour_1 = at("2026-11-03T01:00:00Z").timestamp() as u32;
    let first = env.store.snapshot_totals(&customer, period, hour_1).await?;
    assert_eq!(first[0].1, Decimal::new(6, 2));

    // Idempotent: the same pass again writes nothing.
    let rows_before = rated_rows(&env).await?;
    let again = rater.rate_closed_hours(now).await?;
    // (A customer rated through the newest closed hour is looked at once.)
    assert_eq!((again.snapshots_written, again.snapshots_present), (0, 1));
    assert_eq!(rated_rows(&env).await?, rows_before);

    // Finance raises the vCPU price: every hour is re-rated beside the old results.
    let raised = SHEET.replace("unit_price = \"0.01667\"", "unit_price = \"0.02\"");
    assert_ne!(raised, SHEET);
    let rerater = Rater::new(
        env.store.clone(),
        &raised,
        config(),
        &prometheus::Registry::new(),
    )?
    .with_terms(idlemeter_tests::terms(Period::Day))?;
    let rerated = rerater.rate_closed_hours(now).await?;
    assert_eq!(
        (rerated.snapshots_written, rerated.changes_recorded),
        (3, 3)
    );
    let totals = env.store.snapshot_totals(&customer, period, hour_3).await?;
    assert_eq!(totals.len(), 2, "old and new results both kept: {totals:?}");
    // New: 4 vCPU-h x 0.02 = 0.08, memory unchanged 0.07: 0.15.
    assert!(totals.contains(&(rerater.sheet_checksum().to_owned(), Decimal::new(15, 2))));
    let explanation: String = env
        .store
        .client()
        .query("SELECT explanation FROM rating_changes WHERE as_of = toDateTime(?)")
        .bind(hour_3)
        .fetch_one()
        .await?;
    assert!(
        explanation.contains("usage vcpu: 0.07 -> 0.08"),
        "{explanation}"
    );
    assert!(
        !explanation.contains("memory"),
        "memory did not change: {explanation}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_belongs_to_the_period_its_closing_sample_is_in() -> anyhow::Result<()> {
    let env = TestEnv::new("rating_boundary").await?;
    // Samples at 23:40, 23:50 (day 3), 00:00, 00:10, 00:20 (day 4): 4 intervals of 600 s.
    let samples: Vec<_> = (0..5)
        .map(|step| {
            sample(
                "sbx-a",
                1,
                step + 1,
                at("2026-11-03T23:40:00Z") + Duration::minutes(10 * step as i64),
                0,
                0,
            )
        })
        .collect();
    env.store.insert_samples(&samples).await?;
    let rater = Rater::new(
        env.store.clone(),
        SHEET,
        config(),
        &prometheus::Registry::new(),
    )?
    .with_terms(idlemeter_tests::terms(Period::Day))?;
    let pass = rater.rate_closed_hours(at("2026-11-04T01:30:00Z")).await?;
    // Day 3 has one hour with samples (as of 00:00); day 4 one closed hour (as of 01:00).
    assert_eq!(pass.snapshots_written, 2);

    let vcpu_base = |lines: Vec<idlemeter_store::RatedLineRow>| {
        lines
            .into_iter()
            .find(|line| line.resource == "vcpu")
            .map(|line| line.quantity_base)
    };
    let checksum = rater.sheet_checksum();
    let day_3 = env
        .store
        .rated_lines(
            &CustomerId::parse("acme")?,
            at("2026-11-03T00:00:00Z").timestamp() as u32,
            checksum,
            at("2026-11-04T00:00:00Z").timestamp() as u32,
        )
        .await?;
    let day_4 = env
        .store
        .rated_lines(
            &CustomerId::parse("acme")?,
            at("2026-11-04T00:00:00Z").timestamp() as u32,
            checksum,
            at("2026-11-04T01:00:00Z").timestamp() as u32,
        )
        .await?;
    // Day 3: 23:40 -> 23:50, 600 s x 2 vCPU = 1.2e9 vCPU-µs. The interval closing
    // at 00:00 is day 4's, measured from day 3's last sample: 3 x 600 s x 2 vCPU.
    assert_eq!(vcpu_base(day_3).as_deref(), Some("1200000000"));
    assert_eq!(vcpu_base(day_4).as_deref(), Some("3600000000"));
    Ok(())
}
