//! Credit notes and the credit balance, on the real ledger (PostgreSQL) and
//! ClickHouse: a note on an issued invoice carried into the next invoice,
//! a note refunded to the wallet, refusals that use no number, and a
//! negative total carried forward instead of issued.

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_core::credit_note::{CreditRequest, Settlement};
use idlemeter_core::UsageSample;
use idlemeter_invoicer::{Invoice, Invoicer, InvoicerConfig};
use idlemeter_ledger::{Series, BILLING_EVENTS_TOPIC};
use idlemeter_rater::Period;
use idlemeter_store::{to_column, InvoiceLineRow, InvoiceRow};
use idlemeter_tests::{TestEnv, SIMPLE_SHEET};
use rust_decimal::Decimal;

const ISSUER: &str = "acme-cloud";

fn at(year: i32, month: u32, day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, 0, 0, 0)
        .single()
        .expect("valid date")
}

fn dec(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

/// One vCPU allocated from `from` for `hours`: `hours` dollars on
/// [`SIMPLE_SHEET`].
fn running(customer: &str, epoch: u64, from: DateTime<Utc>, hours: i64) -> Vec<UsageSample> {
    idlemeter_tests::running_span(customer, epoch, from, hours, 1000, 0)
}

fn terms(tax: &[(&str, &str)]) -> idlemeter_core::BillingTerms {
    idlemeter_core::BillingTerms {
        issuer: ISSUER.to_owned(),
        period: Period::Month,
        tax_rates: idlemeter_core::TaxRates::parse(tax.iter().copied()).expect("valid rates"),
        ..idlemeter_core::BillingTerms::default()
    }
}

async fn invoicer(
    env: &TestEnv,
    terms: idlemeter_core::BillingTerms,
    lock: &std::path::Path,
) -> anyhow::Result<Invoicer> {
    Ok(Invoicer::new(
        env.store.clone(),
        idlemeter_tests::sheet_source(SIMPLE_SHEET, "test.toml"),
        InvoicerConfig {
            lock_file: lock.display().to_string(),
            ..InvoicerConfig::default()
        },
        terms,
    )?
    .with_ledger(env.ledger().await?))
}

/// The start of the `index`th month after `first`.
fn month(first: DateTime<Utc>, index: u32) -> DateTime<Utc> {
    first
        .checked_add_months(chrono::Months::new(index))
        .expect("a month in range")
}

/// The rater's pass just after the month starting at `start` ended.
async fn rate_month(
    env: &TestEnv,
    terms: idlemeter_core::BillingTerms,
    start: DateTime<Utc>,
) -> anyhow::Result<()> {
    let after = month(start, 1);
    idlemeter_tests::rater_pass(
        env,
        SIMPLE_SHEET,
        "test.toml",
        terms,
        after + chrono::Duration::hours(1),
    )
    .await?;
    Ok(())
}

fn never_billed(_: usize, _: usize) {}

fn amount(invoice: &Invoice, resource: &str) -> Decimal {
    invoice
        .lines
        .iter()
        .filter(|line| line.resource == resource)
        .map(|line| line.amount)
        .sum()
}

async fn close(invoicer: &Invoicer, start: DateTime<Utc>) -> anyhow::Result<Invoice> {
    let now = month(start, 1) + chrono::Duration::days(5);
    let mut outcome = invoicer
        .close_period(start, now, false, &never_billed)
        .await?;
    anyhow::ensure!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    anyhow::ensure!(outcome.issued.len() == 1, "{:?}", outcome.issued);
    let invoice = outcome.issued.remove(0);
    let lines: Decimal = invoice.lines.iter().map(|line| line.amount).sum();
    assert_eq!(lines, invoice.total, "{invoice:?}");
    Ok(invoice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_note_is_carried_into_the_next_invoice_and_a_full_one_refunds_the_wallet(
) -> anyhow::Result<()> {
    let env = TestEnv::new("credit_notes").await?;
    let lock = tempfile::tempdir()?;
    let terms = terms(&[("credit-1", "0.2")]);
    // Three months, the first starting next month: a note issued now (as
    // notes are) falls before the first month's end, so it is applied by
    // the next invoice closed, the second month's, whatever today's date.
    let today = Utc::now().date_naive();
    let first = month(
        at(
            today.format("%Y").to_string().parse()?,
            today.format("%m").to_string().parse()?,
            1,
        ),
        1,
    );
    let (m1, m2, m3) = (first, month(first, 1), month(first, 2));
    let mut samples = running("credit-1", 10, m1, 60);
    samples.extend(running("credit-1", 11, m2, 70));
    samples.extend(running("credit-1", 12, m3, 10));
    env.store.insert_samples(&samples).await?;
    let invoicer = invoicer(&env, terms.clone(), &lock.path().join("lock")).await?;
    let ledger = env.ledger().await?;

    // Month 1: 60 vCPU-hours = $60.00, 20 % tax $12.00: $72.00.
    rate_month(&env, terms.clone(), m1).await?;
    let first_invoice = close(&invoicer, m1).await?;
    assert_eq!(first_invoice.total, dec("72"));

    // $25 of the first invoice's vCPU line credited (an outage), to the next invoice:
    // 25.00 + 20 % = 30.00.
    let first = invoicer
        .credit_note(
            first_invoice.number,
            &CreditRequest::Lines(vec![(1, Some(dec("25")))]),
            Settlement::NextInvoice,
            "outage on 2026-10-14",
        )
        .await?;
    assert_eq!(first.number, 1);
    assert_eq!(
        (first.net, first.tax, first.total),
        (dec("25"), dec("5"), dec("30"))
    );
    assert_eq!(first.lines.len(), 1);
    assert_eq!(first.lines[0].invoice_line_no, 1);
    assert_eq!(ledger.credit_balance(ISSUER, "credit-1").await?, dec("30"));
    // Copied to ClickHouse, where accounts and dashboards read it.
    let stored = env.store.credit_notes_of(ISSUER, "credit-1").await?;
    assert_eq!(stored.len(), 1);
    let stored_lines = env.store.credit_note_lines(&stored[0]).await?;
    assert_eq!(
        idlemeter_store::CreditNote::from_rows(&stored[0], &stored_lines)?.total,
        dec("30")
    );

    // A tax line is not a charge; nothing is written and no number used.
    let refused = invoicer
        .credit_note(
            first_invoice.number,
            &CreditRequest::Lines(vec![(2, None)]),
            Settlement::NextInvoice,
            "wrong line",
        )
        .await
        .expect_err("a tax line is not credited");
    assert!(refused.to_string().contains("not a charge"), "{refused}");
    assert_eq!(ledger.next_number(ISSUER, Series::CreditNote).await?, 2);

    // A record that gives only an email (no tax rate) leaves the 20 % of
    // [billing] tax_rates in force.
    ledger
        .save_customer(
            ISSUER,
            &idlemeter_ledger::CustomerRecord {
                id: "credit-1".to_owned(),
                name: "Credit One".to_owned(),
                currency: "USD".to_owned(),
                tax_rate: None,
                tax_id: String::new(),
                billing_email: "ap@credit.test".to_owned(),
                spend_limit: None,
                metadata: serde_json::Map::new(),
            },
        )
        .await?;
    ledger.relay(&env.store).await?;
    // Month 2: $70.00 + $14.00 tax = $84.00; the $30.00 balance pays
    // first: $54.00 due, and the balance is spent.
    rate_month(&env, terms.clone(), m2).await?;
    let second_invoice = close(&invoicer, m2).await?;
    assert_eq!(amount(&second_invoice, "balance.applied"), dec("-30"));
    assert_eq!(second_invoice.balance_applied, dec("30"));
    assert_eq!(second_invoice.total, dec("54"));
    assert_eq!(ledger.credit_balance(ISSUER, "credit-1").await?, dec("0"));

    // The rest of the first invoice, in full, refunded to the wallet: 35.00 + 7.00
    // (exactly the tax left: 5.00 + 7.00 = its 12.00).
    let rest = invoicer
        .credit_note(
            first_invoice.number,
            &CreditRequest::Full,
            Settlement::Wallet,
            "month waived",
        )
        .await?;
    assert_eq!(rest.number, 2);
    assert_eq!(
        (rest.net, rest.tax, rest.total),
        (dec("35"), dec("7"), dec("42"))
    );
    assert_eq!(first.tax + rest.tax, first_invoice.tax);
    assert_eq!(ledger.wallet_balance(ISSUER, "credit-1").await?, dec("42"));
    // Nothing is left to credit on the first invoice.
    let nothing = invoicer
        .credit_note(
            first_invoice.number,
            &CreditRequest::Full,
            Settlement::Wallet,
            "again",
        )
        .await
        .expect_err("the first invoice is fully credited");
    assert!(nothing.to_string().contains("nothing is left"), "{nothing}");
    assert_eq!(ledger.next_number(ISSUER, Series::CreditNote).await?, 3);

    // Month 3: $10.00 + $2.00 tax, paid by the refunded wallet.
    rate_month(&env, terms.clone(), m3).await?;
    let third_invoice = close(&invoicer, m3).await?;
    assert_eq!(amount(&third_invoice, "wallet"), dec("-12"));
    assert_eq!(third_invoice.total, dec("0"));
    assert_eq!(ledger.wallet_balance(ISSUER, "credit-1").await?, dec("30"));

    // The customer sees both notes over the API.
    let reader = idlemeter_api::auth::generate(None, "finance", 0);
    env.store.insert_api_key(&reader.row).await?;
    let base =
        idlemeter_tests::serve(idlemeter_tests::api(&env, SIMPLE_SHEET, terms.clone()).await?)
            .await?;
    let listed: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/v1/customers/credit-1/credit-notes"))
        .bearer_auth(&reader.key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let totals: Vec<(&str, &str)> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|note| {
            (
                note["settlement"].as_str().unwrap_or_default(),
                note["total"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(totals, [("next_invoice", "30"), ("wallet", "42")]);

    // Both notes are events; an issued note cannot be changed.
    let events: Vec<String> = ledger
        .pending(BILLING_EVENTS_TOPIC, 100)
        .await?
        .iter()
        .map(|item| item.key.clone())
        .collect();
    for number in [1, 2] {
        assert!(
            events.contains(&format!("credit_note.issued:{ISSUER}:{number}")),
            "{events:?}"
        );
    }
    let client =
        tokio_postgres::connect(env.ledger_settings.url.expose(), tokio_postgres::NoTls).await?;
    let (client, connection) = client;
    tokio::spawn(connection);
    let changed = client
        .execute(
            &format!(
                "UPDATE {}.credit_notes SET total = 0 WHERE issuer = $1",
                env.ledger_settings.schema
            ),
            &[&ISSUER],
        )
        .await
        .expect_err("issued credit notes are immutable");
    assert!(changed.to_string().contains("db error"), "{changed}");
    Ok(())
}

/// October was billed $200 before the ledger (imported); rated now it
/// bills $60. November's $70 less the -$140 adjustment is -$70: not issued
/// as a negative total but carried to the credit balance, which pays
/// December.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_total_is_carried_forward_and_pays_the_next_invoice() -> anyhow::Result<()> {
    let env = TestEnv::new("credit_carried").await?;
    let lock = tempfile::tempdir()?;
    let terms = terms(&[]);
    let mut samples = running("carry-1", 10, at(2026, 10, 1), 60);
    samples.extend(running("carry-1", 11, at(2026, 11, 1), 70));
    samples.extend(running("carry-1", 12, at(2026, 12, 1), 10));
    env.store.insert_samples(&samples).await?;
    rate_month(&env, terms.clone(), at(2026, 10, 1)).await?;
    // The legacy October invoice, over-billed, in ClickHouse.
    let checksum = idlemeter_tests::sheet_source(SIMPLE_SHEET, "test.toml").checksum();
    let money = |text: &str| to_column(dec(text));
    env.store
        .insert_invoice_lines(&[InvoiceLineRow {
            issuer: ISSUER.to_owned(),
            number: 1,
            line_no: 1,
            customer: "carry-1".to_owned(),
            kind: "usage".to_owned(),
            resource: "vcpu".to_owned(),
            quantity: money("200")?,
            unit: "vcpu-hour".to_owned(),
            unit_price: money("1")?,
            amount: money("200")?,
            for_period: at(2026, 10, 1).timestamp() as u32,
            note: String::new(),
            written_ms: 1,
        }])
        .await?;
    env.store
        .insert_invoices(&[InvoiceRow {
            issuer: ISSUER.to_owned(),
            number: 1,
            customer: "carry-1".to_owned(),
            period_start: at(2026, 10, 1).timestamp() as u32,
            period_end: at(2026, 11, 1).timestamp() as u32,
            currency: "USD".to_owned(),
            plan: String::new(),
            sheet: "test.toml".to_owned(),
            sheet_checksum: checksum,
            subtotal: money("200")?,
            fees: 0,
            adjustments: 0,
            credits: 0,
            monthly_credits: 0,
            tax_rate: 0,
            tax: 0,
            total: money("200")?,
            one_time_credit_left: money("-1")?,
            line_count: 1,
            wallet_applied: 0,
            issued_at: at(2026, 11, 2).timestamp() as u32,
            balance_applied: 0,
            balance_carried: 0,
            buyer: String::new(),
        }])
        .await?;
    let invoicer = invoicer(&env, terms.clone(), &lock.path().join("lock")).await?;
    let imported = invoicer.import_to_ledger(&never_billed).await?;
    assert_eq!(imported.imported, 1, "{imported:?}");

    rate_month(&env, terms.clone(), at(2026, 11, 1)).await?;
    let november = close(&invoicer, at(2026, 11, 1)).await?;
    assert_eq!(amount(&november, "adjustment.2026-10-01"), dec("-140"));
    assert_eq!(amount(&november, "balance.carried"), dec("70"));
    assert_eq!(
        (november.balance_carried, november.total),
        (dec("70"), dec("0"))
    );
    let ledger = env.ledger().await?;
    assert_eq!(ledger.credit_balance(ISSUER, "carry-1").await?, dec("70"));

    rate_month(&env, terms.clone(), at(2026, 12, 1)).await?;
    let december = close(&invoicer, at(2026, 12, 1)).await?;
    assert_eq!(amount(&december, "balance.applied"), dec("-10"));
    assert_eq!(december.total, dec("0"));
    assert_eq!(ledger.credit_balance(ISSUER, "carry-1").await?, dec("60"));
    Ok(())
}
