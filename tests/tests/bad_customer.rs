//! One customer's bad data stops nobody else (issue "Money from counters"):
//! a customer whose bill cannot be computed exactly (an amount beyond the
//! exact integer range) is reported in `rating_errors` by the rater and by
//! the invoicer, and every other customer is rated and invoiced as usual.

use chrono::{DateTime, Duration, Utc};
use idlemeter_core::{CustomerId, UsageSample, VcpuMillis};
use idlemeter_invoicer::{Invoicer, InvoicerConfig};
use idlemeter_rater::{Period, Rater, RaterConfig};
use idlemeter_tests::{sample, TestEnv};

/// A price so high that 64 vCPUs for ten hours leave the exact range
/// (vCPU-µs x price x 100 cents above about 3.4e38) while 2 vCPUs for ten
/// minutes do not.
const SHEET: &str = r#"
[sheet]
platform = "test"
currency = "USD"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "10000000000000000000000000"
basis = "allocated"
increment_seconds = 1
idle = "billed"
"#;

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("rfc3339")
}

fn running(customer: &str, vcpu_milli: u32, minutes: i64) -> Vec<UsageSample> {
    (0..=minutes)
        .map(|minute| {
            let mut one = sample(
                &format!("sbx-{customer}"),
                1,
                minute as u64 + 1,
                at("2026-11-03T01:00:00Z") + Duration::minutes(minute),
                0,
                0,
            );
            one.customer = CustomerId::parse(customer).expect("valid id");
            one.vcpu = VcpuMillis(vcpu_milli);
            one
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_whose_bill_cannot_be_computed_stops_nobody_else() -> anyhow::Result<()> {
    let env = TestEnv::new("bad_customer").await?;
    let mut samples = running("small", 2_000, 10);
    samples.extend(running("huge", 64_000, 600));
    env.store.insert_samples(&samples).await?;

    let rater = Rater::new(
        env.store.clone(),
        SHEET,
        RaterConfig {
            sheet: "test.toml".to_owned(),
            ..RaterConfig::default()
        },
        &prometheus::Registry::new(),
    )?
    .with_terms(idlemeter_tests::terms(Period::Day))?;
    let pass = rater.rate_closed_hours(at("2026-11-04T01:00:00Z")).await?;
    assert_eq!(pass.customers_failed, 1, "{pass:?}");
    let small = env
        .store
        .latest_spend("small")
        .await?
        .expect("small is rated");
    // 2 vCPU x 600 s = 1/3 vCPU-hour at 1e25.
    assert_eq!(
        small.total.round_dp(2).to_string(),
        "3333333333333333333333333.33"
    );
    let errors = env.store.rating_errors_of("huge").await?;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, "customer");
    assert!(errors[0].reason.contains("too large"), "{errors:?}");
    assert!(env.store.latest_spend("huge").await?.is_none());

    let lock = tempfile::tempdir()?;
    let invoicer = Invoicer::new(
        env.store.clone(),
        idlemeter_tests::sheet_source(SHEET, "test.toml"),
        InvoicerConfig {
            grace_seconds: 0,
            lock_file: lock.path().join("lock").display().to_string(),
            ..InvoicerConfig::default()
        },
        idlemeter_core::BillingTerms {
            issuer: "acme-cloud".to_owned(),
            period: Period::Day,
            ..idlemeter_core::BillingTerms::default()
        },
    )?;
    let outcome = invoicer
        .close_period(
            at("2026-11-03T00:00:00Z"),
            at("2026-11-04T01:00:00Z"),
            false,
            &|_, _| {},
        )
        .await?;
    let issued: Vec<&str> = outcome
        .issued
        .iter()
        .map(|invoice| invoice.customer.as_str())
        .collect();
    assert_eq!(issued, vec!["small"]);
    assert_eq!(outcome.issued[0].number, 1, "numbering stays gapless");
    assert_eq!(outcome.failed.len(), 1, "{:?}", outcome.failed);
    assert_eq!(outcome.failed[0].0, "huge");
    let errors = env.store.rating_errors_of("huge").await?;
    assert!(
        errors.iter().any(|error| error.field == "invoice"),
        "{errors:?}"
    );
    Ok(())
}
