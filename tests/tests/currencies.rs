//! A sheet per currency: a customer billed in EUR beside one billed in USD,
//! each rated, invoiced and previewed by their currency's sheet only, with
//! no amount ever converted or summed across currencies.

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_invoicer::{Invoicer, InvoicerConfig};
use idlemeter_ledger::CustomerRecord;
use idlemeter_rater::{Period, Rater, RaterConfig};
use idlemeter_store::CurrencyLane;
use idlemeter_tests::{TestEnv, SIMPLE_SHEET};
use rust_decimal::Decimal;

const ISSUER: &str = "two-currencies";

/// [`SIMPLE_SHEET`]'s twin in euros: EUR 0.90 per vCPU-hour.
const EURO_SHEET: &str = r#"
[sheet]
platform = "test"
currency = "EUR"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "0.90"
basis = "allocated"
increment_seconds = 1
idle = "billed"
"#;

fn at(year: i32, month: u32, day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, 0, 0, 0)
        .single()
        .expect("valid date")
}

fn terms() -> idlemeter_core::BillingTerms {
    idlemeter_core::BillingTerms {
        issuer: ISSUER.to_owned(),
        period: Period::Month,
        ..idlemeter_core::BillingTerms::default()
    }
}

fn lane(currency: &str, primary: bool) -> CurrencyLane {
    CurrencyLane {
        currency: currency.to_owned(),
        primary,
    }
}

fn rater(env: &TestEnv, sheet: &str, path: &str, lane: CurrencyLane) -> anyhow::Result<Rater> {
    Ok(Rater::new(
        env.store.clone(),
        sheet,
        RaterConfig {
            sheet: path.to_owned(),
            ..RaterConfig::default()
        },
        &prometheus::Registry::new(),
    )?
    .with_terms(terms())?
    .with_lane(lane)?)
}

async fn invoicer(
    env: &TestEnv,
    sheet: &str,
    path: &str,
    lane: Option<CurrencyLane>,
    lock: &std::path::Path,
) -> anyhow::Result<Invoicer> {
    let invoicer = Invoicer::new(
        env.store.clone(),
        idlemeter_tests::sheet_source(sheet, path),
        InvoicerConfig {
            lock_file: lock.display().to_string(),
            ..InvoicerConfig::default()
        },
        terms(),
    )?
    .with_ledger(env.ledger().await?);
    Ok(match lane {
        Some(lane) => invoicer.with_lane(lane)?,
        None => invoicer,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_eur_customer_is_billed_by_the_eur_sheet_beside_a_usd_one() -> anyhow::Result<()> {
    let env = TestEnv::new("currencies").await?;
    let lock = tempfile::tempdir()?;
    let ledger = env.ledger().await?;
    // Ten vCPU-hours each in October.
    let mut samples = idlemeter_tests::running_span("usd-1", 1, at(2026, 10, 5), 10, 1000, 0);
    samples.extend(idlemeter_tests::running_span(
        "eur-1",
        1,
        at(2026, 10, 5),
        10,
        1000,
        0,
    ));
    env.store.insert_samples(&samples).await?;
    // eur-1 has a record in EUR; usd-1 has none (the primary sheet's).
    ledger
        .save_customer(
            ISSUER,
            &CustomerRecord {
                id: "eur-1".to_owned(),
                name: "Euro GmbH".to_owned(),
                currency: "EUR".to_owned(),
                tax_rate: Some(Decimal::new(19, 2)),
                tax_id: "DE123456789".to_owned(),
                billing_email: String::new(),
                spend_limit: None,
                metadata: serde_json::Map::new(),
            },
        )
        .await?;
    ledger.relay(&env.store).await?;
    // A sheet in another currency than its lane is refused.
    assert!(rater(&env, EURO_SHEET, "eur.toml", lane("USD", true)).is_err());

    let after = at(2026, 11, 1) + chrono::Duration::hours(1);
    let usd_rater = rater(&env, SIMPLE_SHEET, "usd.toml", lane("USD", true))?;
    let eur_rater = rater(&env, EURO_SHEET, "eur.toml", lane("EUR", false))?;
    usd_rater.rate_closed_hours(after).await?;
    eur_rater.rate_closed_hours(after).await?;
    // Each sheet rated its own customer only.
    let start_s = at(2026, 10, 1).timestamp() as u32;
    assert_eq!(
        env.store
            .rated_customers(start_s, usd_rater.sheet_checksum())
            .await?,
        ["usd-1"]
    );
    assert_eq!(
        env.store
            .rated_customers(start_s, eur_rater.sheet_checksum())
            .await?,
        ["eur-1"]
    );

    let usd = invoicer(
        &env,
        SIMPLE_SHEET,
        "usd.toml",
        Some(lane("USD", true)),
        &lock.path().join("lock"),
    )
    .await?;
    let eur = invoicer(
        &env,
        EURO_SHEET,
        "eur.toml",
        Some(lane("EUR", false)),
        &lock.path().join("lock"),
    )
    .await?;
    let now = at(2026, 11, 5);
    let usd_closed = usd
        .close_period(at(2026, 10, 1), now, false, &|_, _| {})
        .await?;
    let eur_closed = eur
        .close_period(at(2026, 10, 1), now, false, &|_, _| {})
        .await?;
    assert!(usd_closed.failed.is_empty() && eur_closed.failed.is_empty());
    assert_eq!(usd_closed.issued.len(), 1);
    assert_eq!(eur_closed.issued.len(), 1);
    let (dollars, euros) = (&usd_closed.issued[0], &eur_closed.issued[0]);
    // $1 x 10 = $10.00; EUR 0.90 x 10 = EUR 9.00 + 19 % VAT EUR 1.71.
    assert_eq!(
        (
            dollars.customer.as_str(),
            dollars.currency.as_str(),
            dollars.total
        ),
        ("usd-1", "USD", Decimal::new(1000, 2))
    );
    assert_eq!(
        (
            euros.customer.as_str(),
            euros.currency.as_str(),
            euros.subtotal,
            euros.tax,
            euros.total
        ),
        (
            "eur-1",
            "EUR",
            Decimal::new(900, 2),
            Decimal::new(171, 2),
            Decimal::new(1071, 2)
        )
    );
    // usd-1, invoiced in dollars before having a record, cannot be given
    // one in euros: its money is dollars.
    let moved = ledger
        .save_customer(
            ISSUER,
            &CustomerRecord {
                id: "usd-1".to_owned(),
                name: String::new(),
                currency: "EUR".to_owned(),
                tax_rate: None,
                tax_id: String::new(),
                billing_email: String::new(),
                spend_limit: None,
                metadata: serde_json::Map::new(),
            },
        )
        .await
        .expect_err("invoiced in USD");
    assert!(moved.to_string().contains("invoiced in USD"), "{moved}");
    // One gapless series per issuer, across currencies.
    let mut numbers = vec![dollars.number, euros.number];
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2]);

    // A single-sheet deployment meeting a EUR customer refuses to bill them
    // in dollars (reported), and bills everyone else.
    let env2 = TestEnv::new("currencies_refused").await?;
    env2.store.insert_samples(&samples).await?;
    let ledger2 = env2.ledger().await?;
    ledger2
        .save_customer(
            ISSUER,
            &CustomerRecord {
                id: "eur-1".to_owned(),
                name: String::new(),
                currency: "EUR".to_owned(),
                tax_rate: None,
                tax_id: String::new(),
                billing_email: String::new(),
                spend_limit: None,
                metadata: serde_json::Map::new(),
            },
        )
        .await?;
    ledger2.relay(&env2.store).await?;
    idlemeter_tests::rater_pass(&env2, SIMPLE_SHEET, "usd.toml", terms(), after).await?;
    let lock2 = tempfile::tempdir()?;
    let only_usd = invoicer(
        &env2,
        SIMPLE_SHEET,
        "usd.toml",
        None,
        &lock2.path().join("lock"),
    )
    .await?;
    let closed = only_usd
        .close_period(at(2026, 10, 1), now, false, &|_, _| {})
        .await?;
    assert_eq!(closed.issued.len(), 1);
    assert_eq!(closed.issued[0].customer, "usd-1");
    assert_eq!(closed.failed.len(), 1, "{:?}", closed.failed);
    assert!(
        closed.failed[0].1.contains("billed in EUR"),
        "{:?}",
        closed.failed
    );
    Ok(())
}
