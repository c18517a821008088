//! Invoicing against a real ClickHouse: credits across months, monthly credits
//! that reset, late usage as an adjustment on the next invoice (the issued one
//! unchanged), idempotent reruns and concurrent runs without double issue.

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_core::{CustomerId, Epoch, NodeId, SandboxId, UsageSample, VcpuMillis};
use idlemeter_invoicer::{Invoice, Invoicer, InvoicerConfig};
use idlemeter_rater::Period;
use idlemeter_store::{to_column, InvoiceLineRow, WalletDepositRow};
use idlemeter_tests::{TestEnv, SIMPLE_SHEET};
use rust_decimal::Decimal;

fn at(year: i32, month: u32, day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, 0, 0, 0)
        .single()
        .expect("valid date")
}

/// A running sample of `sandbox` with `vcpu_milli` allocated; the counters
/// only need to rise (allocation-based sheets bill allocation x time).
fn sample(
    customer: &str,
    sandbox: &str,
    epoch: u64,
    seq: u64,
    ts: DateTime<Utc>,
    vcpu_milli: u32,
) -> UsageSample {
    UsageSample {
        vcpu: VcpuMillis(vcpu_milli),
        cpu_used_usec: seq * 1_000,
        vcpu_alloc_usec: seq * 1_000_000,
        exec_sessions: 1,
        ..UsageSample::blank(
            CustomerId::parse(customer).expect("id"),
            NodeId::parse("node-1").expect("id"),
            SandboxId::parse(sandbox).expect("id"),
            Epoch(epoch),
            seq,
            ts,
        )
    }
}

/// An invoicer issuing through the test's ledger (PostgreSQL), as a
/// deployment with `[ledger] url` does.
async fn invoicer(
    env: &TestEnv,
    sheet_path: &str,
    sheet: &str,
    lock: &std::path::Path,
) -> anyhow::Result<Invoicer> {
    Ok(Invoicer::new(
        env.store.clone(),
        idlemeter_tests::sheet_source(sheet, sheet_path),
        InvoicerConfig {
            lock_file: lock.display().to_string(),
            ..InvoicerConfig::default()
        },
        idlemeter_core::BillingTerms {
            issuer: "acme-cloud".to_owned(),
            period: Period::Month,
            ..idlemeter_core::BillingTerms::default()
        },
    )?
    .with_ledger(env.ledger().await?))
}

fn terms() -> idlemeter_core::BillingTerms {
    idlemeter_core::BillingTerms {
        issuer: "acme-cloud".to_owned(),
        period: Period::Month,
        ..idlemeter_core::BillingTerms::default()
    }
}

/// The rater's pass just after `month` of 2026 ended: it rates the month
/// (and re-rates earlier ones that received late samples).
async fn rate_month(env: &TestEnv, sheet: &str, month: u32) -> anyhow::Result<()> {
    let after = if month == 12 {
        at(2027, 1, 1)
    } else {
        at(2026, month + 1, 1)
    };
    idlemeter_tests::rater_pass(
        env,
        sheet,
        "test.toml",
        terms(),
        after + chrono::Duration::hours(1),
    )
    .await?;
    Ok(())
}

fn amount(invoice: &Invoice, resource: &str) -> Decimal {
    invoice
        .lines
        .iter()
        .filter(|line| line.resource == resource)
        .map(|line| line.amount)
        .sum()
}

fn never_billed(_: usize, _: usize) {}

const NOW: fn() -> DateTime<Utc> = || at(2027, 1, 5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_hobby_credit_is_consumed_across_months_and_never_goes_negative() -> anyhow::Result<()>
{
    let env = TestEnv::new("invoice_e2b_credit").await?;
    let lock = tempfile::tempdir()?;
    // October: 2 vCPU for 28 days = 4,838,400 vCPU-s x $0.000014 = $67.7376 -> $67.74.
    // November: 2 vCPU for 21 days = 3,628,800 vCPU-s -> $50.8032 -> $50.80.
    // December: 2 vCPU for 1 day = 172,800 vCPU-s -> $2.4192 -> $2.42.
    let samples = [
        sample("hobby-1", "sbx", 1, 1, at(2026, 10, 1), 2000),
        sample("hobby-1", "sbx", 1, 2, at(2026, 10, 29), 2000),
        sample("hobby-1", "sbx", 2, 1, at(2026, 11, 1), 2000),
        sample("hobby-1", "sbx", 2, 2, at(2026, 11, 22), 2000),
        sample("hobby-1", "sbx", 3, 1, at(2026, 12, 1), 2000),
        sample("hobby-1", "sbx", 3, 2, at(2026, 12, 2), 2000),
    ];
    env.store.insert_samples(&samples).await?;
    let sheet =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../prices/e2b.toml"))?;
    let invoicer = invoicer(&env, "prices/e2b.toml", &sheet, &lock.path().join("lock")).await?;

    let mut invoices = Vec::new();
    for month in [10, 11, 12] {
        rate_month(&env, &sheet, month).await?;
        let outcome = invoicer
            .close_period(at(2026, month, 1), NOW(), false, &never_billed)
            .await?;
        assert_eq!(outcome.issued.len(), 1, "month {month}");
        invoices.push(outcome.issued[0].clone());
    }
    let [october, november, december] = [&invoices[0], &invoices[1], &invoices[2]];
    let cents = |value: &str| -> Decimal { value.parse().expect("decimal") };

    assert_eq!(amount(october, "vcpu"), cents("67.74"));
    assert_eq!(amount(october, "credit.one_time"), cents("-67.74"));
    assert_eq!(october.total, Decimal::ZERO);
    assert_eq!(october.one_time_credit_left, cents("32.26"));

    assert_eq!(amount(november, "vcpu"), cents("50.80"));
    assert_eq!(
        amount(november, "credit.one_time"),
        cents("-32.26"),
        "only what was left"
    );
    assert_eq!(november.total, cents("18.54"));
    assert_eq!(november.one_time_credit_left, Decimal::ZERO);

    assert_eq!(amount(december, "vcpu"), cents("2.42"));
    assert_eq!(amount(december, "credit.one_time"), Decimal::ZERO);
    assert_eq!(december.total, cents("2.42"));
    for invoice in &invoices {
        assert!(invoice.one_time_credit_left >= Decimal::ZERO);
        assert!(invoice.total >= Decimal::ZERO);
        let lines: Decimal = invoice.lines.iter().map(|line| line.amount).sum();
        assert_eq!(lines, invoice.total, "lines add up to the total");
    }
    // Numbers without gaps, and what is stored reads back identically.
    let numbers: Vec<u64> = invoices.iter().map(|invoice| invoice.number).collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    for invoice in &invoices {
        let stored = read_back(&env, invoice.number).await?;
        assert_eq!(stored.normalized(), invoice.normalized());
    }
    Ok(())
}

async fn read_back(env: &TestEnv, number: u64) -> anyhow::Result<Invoice> {
    let header = env
        .store
        .invoices("acme-cloud")
        .await?
        .into_iter()
        .find(|row| row.number == number)
        .ok_or_else(|| anyhow::anyhow!("invoice {number} not stored"))?;
    let lines = env.store.invoice_lines(&header).await?;
    Ok(Invoice::from_rows(&header, &lines)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modal_monthly_credit_resets_every_month() -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_modal_credit").await?;
    let lock = tempfile::tempdir()?;
    // 8 vCPU for 10 days each month: far more than the $30 monthly credit.
    let samples = [
        sample("starter-1", "sbx", 1, 1, at(2026, 10, 1), 8000),
        sample("starter-1", "sbx", 1, 2, at(2026, 10, 11), 8000),
        sample("starter-1", "sbx", 2, 1, at(2026, 11, 1), 8000),
        sample("starter-1", "sbx", 2, 2, at(2026, 11, 11), 8000),
    ];
    env.store.insert_samples(&samples).await?;
    let sheet =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../prices/modal.toml"))?;
    let invoicer = invoicer(&env, "prices/modal.toml", &sheet, &lock.path().join("lock")).await?;
    for month in [10, 11] {
        rate_month(&env, &sheet, month).await?;
        let outcome = invoicer
            .close_period(at(2026, month, 1), NOW(), false, &never_billed)
            .await?;
        let invoice = &outcome.issued[0];
        assert!(invoice.subtotal > Decimal::from(30), "{}", invoice.subtotal);
        assert_eq!(
            amount(invoice, "credit.monthly"),
            Decimal::from(-30),
            "month {month}"
        );
        assert_eq!(
            invoice.total,
            invoice.subtotal + invoice.fees - Decimal::from(30)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_usage_is_an_adjustment_on_the_next_invoice_and_the_issued_one_never_changes(
) -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_late").await?;
    let lock = tempfile::tempdir()?;
    // October: 1 vCPU from the 1st to the 11th = 240 vCPU-hours = $240.
    env.store
        .insert_samples(&[
            sample("late-1", "sbx", 1, 1, at(2026, 10, 1), 1000),
            sample("late-1", "sbx", 1, 2, at(2026, 10, 11), 1000),
        ])
        .await?;
    let invoicer = invoicer(&env, "test.toml", SIMPLE_SHEET, &lock.path().join("lock")).await?;
    rate_month(&env, SIMPLE_SHEET, 10).await?;
    let october = invoicer
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?
        .issued
        .remove(0);
    assert_eq!(october.total, Decimal::from(240));
    let october_stored = read_back(&env, october.number).await?;

    // A sample of October arrives after the close (10 more days: $240 more),
    // and November has 1 day of its own ($24).
    env.store
        .insert_samples(&[
            sample("late-1", "sbx", 1, 3, at(2026, 10, 21), 1000),
            sample("late-1", "sbx", 2, 1, at(2026, 11, 1), 1000),
            sample("late-1", "sbx", 2, 2, at(2026, 11, 2), 1000),
        ])
        .await?;
    // The rater's pass after November re-rates October: its sample count
    // changed after its last hour was rated.
    rate_month(&env, SIMPLE_SHEET, 11).await?;
    // What the API and alerts read for October is the re-rated figure.
    let rated = october_rated(&env, "late-1").await?;
    assert_eq!(rated, Decimal::from(480), "October's snapshot re-rated");
    // Rerunning October's close changes nothing: it is issued.
    let rerun = invoicer
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?;
    assert!(rerun.issued.is_empty());
    assert_eq!(rerun.already_issued.len(), 1);
    // A dry run says what a re-issue would total now.
    let dry = invoicer
        .close_period(at(2026, 10, 1), NOW(), true, &never_billed)
        .await?;
    assert_eq!(
        dry.differences,
        vec![(
            october.number,
            "late-1".to_owned(),
            Decimal::from(240),
            Decimal::from(480)
        )]
    );

    let november = invoicer
        .close_period(at(2026, 11, 1), NOW(), false, &never_billed)
        .await?
        .issued
        .remove(0);
    assert_eq!(amount(&november, "vcpu"), Decimal::from(24));
    let adjustment = november
        .lines
        .iter()
        .find(|line| line.kind == "adjustment")
        .expect("an adjustment line");
    assert_eq!(adjustment.amount, Decimal::from(240));
    assert_eq!(adjustment.resource, "adjustment.2026-10-01");
    assert_eq!(adjustment.for_period, at(2026, 10, 1));
    assert_eq!(november.total, Decimal::from(264));
    assert_eq!(november.number, october.number + 1);
    assert_eq!(
        read_back(&env, october.number).await?,
        october_stored,
        "issued invoices never change"
    );

    // December, with no new late usage: no second adjustment for October.
    env.store
        .insert_samples(&[
            sample("late-1", "sbx", 3, 1, at(2026, 12, 1), 1000),
            sample("late-1", "sbx", 3, 2, at(2026, 12, 2), 1000),
        ])
        .await?;
    rate_month(&env, SIMPLE_SHEET, 12).await?;
    let december = invoicer
        .close_period(at(2026, 12, 1), NOW(), false, &never_billed)
        .await?
        .issued
        .remove(0);
    assert!(
        december.lines.iter().all(|line| line.kind != "adjustment"),
        "{:?}",
        december.lines
    );
    assert_eq!(december.total, Decimal::from(24));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_and_repeated_runs_issue_each_invoice_once_without_gaps() -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_concurrent").await?;
    let lock = tempfile::tempdir()?;
    let customers = 40;
    let samples: Vec<UsageSample> = (0..customers)
        .flat_map(|index| {
            let customer = format!("cust-{index:03}");
            [
                sample(&customer, "sbx", 1, 1, at(2026, 10, 1), 1000),
                sample(
                    &customer,
                    "sbx",
                    1,
                    2,
                    at(2026, 10, 2) + chrono::Duration::hours(index),
                    1000,
                ),
            ]
        })
        .collect();
    env.store.insert_samples(&samples).await?;
    rate_month(&env, SIMPLE_SHEET, 10).await?;
    let one = invoicer(&env, "test.toml", SIMPLE_SHEET, &lock.path().join("lock")).await?;
    let two = invoicer(&env, "test.toml", SIMPLE_SHEET, &lock.path().join("lock")).await?;
    let (first, second) = tokio::join!(
        one.close_period(at(2026, 10, 1), NOW(), false, &never_billed),
        two.close_period(at(2026, 10, 1), NOW(), false, &never_billed),
    );
    let (first, second) = (first?, second?);
    assert_eq!(first.issued.len() + second.issued.len(), customers as usize);
    let third = one
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?;
    assert!(third.issued.is_empty());
    let stored = env.store.invoices("acme-cloud").await?;
    let mut numbers: Vec<u64> = stored.iter().map(|row| row.number).collect();
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=customers as u64).collect::<Vec<_>>(),
        "one invoice each, no gaps"
    );
    // Numbered in customer order: cust-000 is 1, cust-039 is 40; each bills
    // 24 + index vCPU-hours.
    for row in &stored {
        let index: i64 = row.customer["cust-".len()..].parse()?;
        assert_eq!(row.number, index as u64 + 1);
        let invoice = read_back(&env, row.number).await?;
        assert_eq!(invoice.total, Decimal::from(24 + index));
    }
    Ok(())
}

/// A run killed between writing lines and writing headers leaves lines without
/// a header. Here that crashed run is written by hand, and made as awkward as
/// possible: invoice 1 with more lines than the rerun will give it, and
/// invoice 2 for a customer the rerun numbers differently. The rerun's
/// invoices read back exactly as computed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_left_by_a_crashed_run_never_leak_into_issued_invoices() -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_orphans").await?;
    let lock = tempfile::tempdir()?;
    env.store
        .insert_samples(&[
            sample("a-cust", "sbx", 1, 1, at(2026, 10, 1), 1000),
            sample("a-cust", "sbx", 1, 2, at(2026, 10, 2), 1000),
            sample("b-cust", "sbx", 1, 1, at(2026, 10, 1), 1000),
            sample("b-cust", "sbx", 1, 2, at(2026, 10, 3), 1000),
        ])
        .await?;
    let orphan = |number: u64, customer: &str, line_no: u16| -> anyhow::Result<InvoiceLineRow> {
        Ok(InvoiceLineRow {
            issuer: "acme-cloud".to_owned(),
            number,
            line_no,
            customer: customer.to_owned(),
            kind: "usage".to_owned(),
            resource: "vcpu".to_owned(),
            quantity: to_column(Decimal::from(999))?,
            unit: "vcpu-hour".to_owned(),
            unit_price: to_column(Decimal::ONE)?,
            amount: to_column(Decimal::from(999))?,
            for_period: at(2026, 10, 1).timestamp() as u32,
            note: "crashed run".to_owned(),
            written_ms: 1,
        })
    };
    env.store
        .insert_invoice_lines(&[
            orphan(1, "a-cust", 1)?,
            orphan(1, "a-cust", 2)?,
            orphan(1, "a-cust", 3)?,
            orphan(2, "z-cust", 1)?,
        ])
        .await?;
    let invoicer = invoicer(&env, "test.toml", SIMPLE_SHEET, &lock.path().join("lock")).await?;
    rate_month(&env, SIMPLE_SHEET, 10).await?;
    let outcome = invoicer
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?;
    assert_eq!(outcome.issued.len(), 2);
    for invoice in &outcome.issued {
        assert_eq!(
            read_back(&env, invoice.number).await?.normalized(),
            invoice.normalized()
        );
    }
    assert_eq!(outcome.issued[0].total, Decimal::from(24));
    assert_eq!(outcome.issued[1].total, Decimal::from(48));
    Ok(())
}

/// The scheduler: with a daily period, no grace and a cron firing every
/// second, yesterday is closed within a few seconds of starting, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cron_schedule_closes_the_last_ended_period() -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_schedule").await?;
    let lock = tempfile::tempdir()?;
    let today = Period::Day.start_of(Utc::now());
    let yesterday = today - chrono::Duration::days(1);
    env.store
        .insert_samples(&[
            sample("daily-1", "sbx", 1, 1, yesterday, 1000),
            sample(
                "daily-1",
                "sbx",
                1,
                2,
                yesterday + chrono::Duration::hours(3),
                1000,
            ),
        ])
        .await?;
    let daily = idlemeter_core::BillingTerms {
        issuer: "acme-cloud".to_owned(),
        period: Period::Day,
        ..idlemeter_core::BillingTerms::default()
    };
    idlemeter_tests::rater_pass(&env, SIMPLE_SHEET, "test.toml", daily, Utc::now()).await?;
    let invoicer = Invoicer::new(
        env.store.clone(),
        idlemeter_tests::sheet_source(SIMPLE_SHEET, "test.toml"),
        InvoicerConfig {
            grace_seconds: 0,
            schedule: "* * * * * *".parse()?,
            lock_file: lock.path().join("lock").display().to_string(),
            ..InvoicerConfig::default()
        },
        idlemeter_core::BillingTerms {
            issuer: "acme-cloud".to_owned(),
            period: Period::Day,
            ..idlemeter_core::BillingTerms::default()
        },
    )?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(invoicer.run_until_stopped(async {
        let _ = stopped.await;
    }));
    env.eventually("yesterday's invoice", || async {
        Ok(!env.store.invoices("acme-cloud").await?.is_empty())
    })
    .await?;
    // Let it fire a few more times: still one invoice.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let _ = stop.send(());
    task.await??;
    let stored = env.store.invoices("acme-cloud").await?;
    assert_eq!(stored.len(), 1);
    assert_eq!(i64::from(stored[0].period_start), yesterday.timestamp());
    assert_eq!(
        read_back(&env, stored[0].number).await?.total,
        Decimal::from(3)
    );
    // A schedule that is not cron is refused as the settings are read,
    // with the reason.
    let refused = serde_json::from_str::<InvoicerConfig>(r#"{"schedule": "every hour"}"#);
    assert!(
        refused.is_err_and(|error| error.to_string().contains("not a cron expression")),
        "a bad schedule must be refused"
    );
    Ok(())
}

/// A prepaid wallet pays what is due after credits and tax, across invoices,
/// and never more than was deposited before the period ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepaid_wallet_pays_invoices_until_it_is_empty() -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_wallet").await?;
    let lock = tempfile::tempdir()?;
    // October: 60 vCPU-hours = $60; November: 70 = $70.
    env.store
        .insert_samples(&[
            sample("wallet-1", "sbx", 1, 1, at(2026, 10, 1), 1000),
            sample(
                "wallet-1",
                "sbx",
                1,
                2,
                at(2026, 10, 1) + chrono::Duration::hours(60),
                1000,
            ),
            sample("wallet-1", "sbx", 2, 1, at(2026, 11, 1), 1000),
            sample(
                "wallet-1",
                "sbx",
                2,
                2,
                at(2026, 11, 1) + chrono::Duration::hours(70),
                1000,
            ),
        ])
        .await?;
    let deposit =
        |id: &str, amount: i64, when: DateTime<Utc>| -> anyhow::Result<WalletDepositRow> {
            Ok(WalletDepositRow {
                issuer: "acme-cloud".to_owned(),
                customer: "wallet-1".to_owned(),
                deposit_id: id.to_owned(),
                amount: to_column(Decimal::from(amount))?,
                deposited_at: when.timestamp() as u32,
            })
        };
    // $100 before October, recorded twice (one deposit); $500 after
    // November; in the ledger, which copies them to ClickHouse.
    let invoicer = invoicer(&env, "test.toml", SIMPLE_SHEET, &lock.path().join("lock")).await?;
    assert!(
        invoicer
            .deposit(&deposit("d-1", 100, at(2026, 9, 30))?)
            .await?
    );
    assert!(
        !invoicer
            .deposit(&deposit("d-1", 100, at(2026, 9, 30))?)
            .await?
    );
    assert!(
        invoicer
            .deposit(&deposit("d-2", 500, at(2026, 12, 5))?)
            .await?
    );
    let mut issued = Vec::new();
    for month in [10, 11] {
        rate_month(&env, SIMPLE_SHEET, month).await?;
        issued.extend(
            invoicer
                .close_period(at(2026, month, 1), NOW(), false, &never_billed)
                .await?
                .issued,
        );
    }
    let (october, november) = (&issued[0], &issued[1]);
    assert_eq!(amount(october, "wallet"), Decimal::from(-60));
    assert_eq!(october.total, Decimal::ZERO);
    assert_eq!(
        amount(november, "wallet"),
        Decimal::from(-40),
        "what was left of the $100"
    );
    assert_eq!(november.total, Decimal::from(30));
    // The ledger's wallet: 100 + 500 deposited, 60 + 40 drawn.
    let ledger = env.ledger().await?;
    assert_eq!(
        ledger.wallet_balance("acme-cloud", "wallet-1").await?,
        Decimal::from(500)
    );
    for invoice in &issued {
        let lines: Decimal = invoice.lines.iter().map(|line| line.amount).sum();
        assert_eq!(lines, invoice.total);
        assert_eq!(
            read_back(&env, invoice.number).await?.normalized(),
            invoice.normalized()
        );
    }
    Ok(())
}

/// Late usage of a period whose monthly credit was not used up is covered by
/// that period's credit (it expired with the period, but the usage belongs to
/// it); only what exceeds it is adjusted, and the next period's monthly credit
/// is not spent on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_usage_is_netted_of_its_own_periods_monthly_credit() -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_late_monthly").await?;
    let lock = tempfile::tempdir()?;
    let sheet = format!(
        "{SIMPLE_SHEET}\n[sheet.plans]\n\n[plans.starter]\n[[plans.starter.credits]]\nkind = \"monthly\"\namount = \"30\"\n"
    );
    let sheet = sheet.replace(
        "line_rounding = \"half_up\"",
        "line_rounding = \"half_up\"\ndefault_plan = \"starter\"",
    );
    let sheet = sheet.replace("\n[sheet.plans]\n", "\n");
    // October: 20 vCPU-hours ($20, all covered by the $30 credit).
    env.store
        .insert_samples(&[
            sample("m-1", "sbx", 1, 1, at(2026, 10, 1), 1000),
            sample(
                "m-1",
                "sbx",
                1,
                2,
                at(2026, 10, 1) + chrono::Duration::hours(20),
                1000,
            ),
        ])
        .await?;
    let invoicer = invoicer(&env, "test.toml", &sheet, &lock.path().join("lock")).await?;
    rate_month(&env, &sheet, 10).await?;
    let october = invoicer
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?
        .issued
        .remove(0);
    assert_eq!(october.total, Decimal::ZERO);
    assert_eq!(amount(&october, "credit.monthly"), Decimal::from(-20));
    // 15 more October hours arrive late (October now owes 35 - 30 = 5);
    // November has 40 hours of its own.
    env.store
        .insert_samples(&[
            sample(
                "m-1",
                "sbx",
                1,
                3,
                at(2026, 10, 1) + chrono::Duration::hours(35),
                1000,
            ),
            sample("m-1", "sbx", 2, 1, at(2026, 11, 1), 1000),
            sample(
                "m-1",
                "sbx",
                2,
                2,
                at(2026, 11, 1) + chrono::Duration::hours(40),
                1000,
            ),
        ])
        .await?;
    rate_month(&env, &sheet, 11).await?;
    let november = invoicer
        .close_period(at(2026, 11, 1), NOW(), false, &never_billed)
        .await?
        .issued
        .remove(0);
    assert_eq!(amount(&november, "adjustment.2026-10-01"), Decimal::from(5));
    assert_eq!(
        amount(&november, "credit.monthly"),
        Decimal::from(-30),
        "November's own credit, on November"
    );
    assert_eq!(november.total, Decimal::from(15), "40 - 30 + 5");
    Ok(())
}

/// Two `idlemeter invoices close` processes with their own lock files (two
/// hosts sharing only ClickHouse and the ledger), small chunks so that
/// their transactions interleave, and a third one SIGKILLed mid-run: every
/// customer is invoiced once, numbers run 1..=N without a gap, and the
/// ClickHouse copy (through the outbox) is the ledger's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoicer_processes_sharing_no_lock_never_share_or_skip_a_number() -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_processes").await?;
    let customers: u64 = 60;
    let samples: Vec<UsageSample> = (0..customers)
        .flat_map(|index| {
            let customer = format!("cust-{index:03}");
            [
                sample(&customer, "sbx", 1, 1, at(2026, 10, 1), 1000),
                sample(
                    &customer,
                    "sbx",
                    1,
                    2,
                    at(2026, 10, 2) + chrono::Duration::hours(index as i64),
                    1000,
                ),
            ]
        })
        .collect();
    env.store.insert_samples(&samples).await?;
    rate_month(&env, SIMPLE_SHEET, 10).await?;
    let ledger = env.ledger().await?;
    let work = tempfile::tempdir()?;
    let sheet_path = work.path().join("test.toml");
    std::fs::write(&sheet_path, SIMPLE_SHEET)?;
    let close = |host: &str| -> anyhow::Result<std::process::Child> {
        Ok(
            std::process::Command::new(idlemeter_tests::collector::idlemeter_binary()?)
                .args(["invoices", "close", "--period", "2026-10"])
                .env("IDLEMETER_CLICKHOUSE__URL", &env.clickhouse.url)
                .env("IDLEMETER_CLICKHOUSE__DATABASE", &env.clickhouse.database)
                .env("IDLEMETER_LEDGER__URL", env.ledger_settings.url.expose())
                .env("IDLEMETER_LEDGER__SCHEMA", &env.ledger_settings.schema)
                .env("IDLEMETER_RATER__SHEET", &sheet_path)
                .env("IDLEMETER_BILLING__ISSUER", "acme-cloud")
                .env("IDLEMETER_BILLING__PERIOD", "month")
                .env("IDLEMETER_INVOICER__CHUNK_CUSTOMERS", "3")
                .env(
                    "IDLEMETER_INVOICER__LOCK_FILE",
                    work.path().join(host).join("invoicer.lock"),
                )
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()?,
        )
    };
    let mut killed = close("host-c")?;
    let (mut one, mut two) = (close("host-a")?, close("host-b")?);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    killed.kill()?; // SIGKILL
    killed.wait()?;
    eprintln!(
        "invoices issued when one run was killed: {}",
        ledger.invoice_numbers("acme-cloud").await?.len()
    );
    for child in [&mut one, &mut two] {
        let output = tokio::task::block_in_place(|| {
            let status = child.wait()?;
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
            }
            anyhow::Ok((status, stderr))
        })?;
        anyhow::ensure!(output.0.success(), "close failed: {}", output.1);
    }
    // Whatever the killed run left queued is copied by the next run.
    let rerun = invoicer(&env, "test.toml", SIMPLE_SHEET, &work.path().join("lock"))
        .await?
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?;
    assert_eq!(rerun.issued_count, 0, "everyone was invoiced already");
    assert_eq!(
        ledger.invoice_numbers("acme-cloud").await?,
        (1..=customers).collect::<Vec<_>>(),
        "one number each, none shared or skipped"
    );
    assert_eq!(
        ledger
            .next_number("acme-cloud", idlemeter_ledger::Series::Invoice)
            .await?,
        customers + 1
    );
    assert!(ledger
        .pending(idlemeter_ledger::INVOICES_TOPIC, 10)
        .await?
        .is_empty());
    let stored = env.store.invoices("acme-cloud").await?;
    let mut numbers: Vec<u64> = stored.iter().map(|row| row.number).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=customers).collect::<Vec<_>>());
    let mut invoiced: Vec<&str> = stored.iter().map(|row| row.customer.as_str()).collect();
    invoiced.sort_unstable();
    invoiced.dedup();
    assert_eq!(invoiced.len() as u64, customers, "each customer once");
    for row in &stored {
        let index: i64 = row.customer["cust-".len()..].parse()?;
        assert_eq!(
            read_back(&env, row.number).await?.total,
            Decimal::from(24 + index)
        );
    }
    Ok(())
}

/// Invoices issued before the ledger existed (ClickHouse only) move into it
/// under their own numbers, a second import changes nothing, and the next
/// close continues the series without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_invoices_import_into_the_ledger_and_the_series_continues() -> anyhow::Result<()>
{
    let env = TestEnv::new("invoice_import").await?;
    let lock = tempfile::tempdir()?;
    let mut samples = Vec::new();
    for customer in ["a-cust", "b-cust", "c-cust"] {
        for month in [10, 11] {
            samples.push(sample(
                customer,
                "sbx",
                month,
                1,
                at(2026, month as u32, 1),
                1000,
            ));
            samples.push(sample(
                customer,
                "sbx",
                month,
                2,
                at(2026, month as u32, 2),
                1000,
            ));
        }
    }
    env.store.insert_samples(&samples).await?;
    rate_month(&env, SIMPLE_SHEET, 10).await?;
    rate_month(&env, SIMPLE_SHEET, 11).await?;
    // October, issued the old way: ClickHouse under the lock file.
    let before = Invoicer::new(
        env.store.clone(),
        idlemeter_tests::sheet_source(SIMPLE_SHEET, "test.toml"),
        InvoicerConfig {
            lock_file: lock.path().join("lock").display().to_string(),
            ..InvoicerConfig::default()
        },
        terms(),
    )?;
    let october = before
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?;
    assert_eq!(october.issued_count, 3);
    let ledger = env.ledger().await?;
    let after = invoicer(&env, "test.toml", SIMPLE_SHEET, &lock.path().join("lock")).await?;
    let first = after.import_to_ledger(&never_billed).await?;
    assert_eq!((first.imported, first.present), (3, 0), "{first:?}");
    assert!(first.conflicts.is_empty());
    let again = after.import_to_ledger(&never_billed).await?;
    assert_eq!((again.imported, again.present), (0, 3), "{again:?}");
    assert_eq!(ledger.invoice_numbers("acme-cloud").await?, vec![1, 2, 3]);
    // Closing October again through the ledger finds them issued.
    let rerun = after
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?;
    assert_eq!(rerun.issued_count, 0);
    let november = after
        .close_period(at(2026, 11, 1), NOW(), false, &never_billed)
        .await?;
    let mut numbers: Vec<u64> = november.issued.iter().map(|i| i.number).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, vec![4, 5, 6]);
    assert_eq!(
        ledger.invoice_numbers("acme-cloud").await?,
        (1..=6).collect::<Vec<_>>()
    );
    let mut stored: Vec<u64> = env
        .store
        .invoices("acme-cloud")
        .await?
        .iter()
        .map(|row| row.number)
        .collect();
    stored.sort_unstable();
    assert_eq!(stored, (1..=6).collect::<Vec<_>>());
    Ok(())
}

/// A wallet balance the ledger does not hold (a deposit written to
/// ClickHouse behind its back) is not spent: that customer's invoice is
/// refused and reported, the others are issued, and no number is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draw_the_ledgers_wallet_cannot_cover_fails_only_that_customer() -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_overdraw").await?;
    let lock = tempfile::tempdir()?;
    let mut samples = Vec::new();
    for customer in ["a-cust", "b-cust", "c-cust"] {
        samples.push(sample(customer, "sbx", 1, 1, at(2026, 10, 1), 1000));
        samples.push(sample(customer, "sbx", 1, 2, at(2026, 10, 2), 1000));
    }
    env.store.insert_samples(&samples).await?;
    env.store
        .insert_wallet_deposit(&WalletDepositRow {
            issuer: "acme-cloud".to_owned(),
            customer: "b-cust".to_owned(),
            deposit_id: "behind-the-ledger".to_owned(),
            amount: to_column(Decimal::from(10))?,
            deposited_at: at(2026, 9, 1).timestamp() as u32,
        })
        .await?;
    rate_month(&env, SIMPLE_SHEET, 10).await?;
    let invoicer = invoicer(&env, "test.toml", SIMPLE_SHEET, &lock.path().join("lock")).await?;
    let outcome = invoicer
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?;
    let customers: Vec<(&str, u64)> = outcome
        .issued
        .iter()
        .map(|invoice| (invoice.customer.as_str(), invoice.number))
        .collect();
    assert_eq!(customers, vec![("a-cust", 1), ("c-cust", 2)]);
    assert_eq!(outcome.failed.len(), 1, "{:?}", outcome.failed);
    assert_eq!(outcome.failed[0].0, "b-cust");
    assert!(
        outcome.failed[0].1.contains("wallet holding 0"),
        "{:?}",
        outcome.failed
    );
    let errors = env.store.rating_errors_of("b-cust").await?;
    assert!(
        errors.iter().any(|row| row.reason.contains("wallet")),
        "{errors:?}"
    );
    Ok(())
}

/// October's rated figure through the end of the period, as the API and
/// spend alerts read it.
async fn october_rated(env: &TestEnv, customer: &str) -> anyhow::Result<Decimal> {
    Ok(env
        .store
        .rated_lines(
            &CustomerId::parse(customer.to_owned())?,
            at(2026, 10, 1).timestamp() as u32,
            &idlemeter_store::ratings_checksum(SIMPLE_SHEET, None),
            at(2026, 11, 1).timestamp() as u32,
        )
        .await?
        .iter()
        .map(|line| idlemeter_store::from_column(line.amount))
        .sum::<Result<Decimal, _>>()?)
}

/// Half an hour of a second sandbox, 1 vCPU, in October's hour ending
/// 11 October 01:00 (an hour the first pass below rates): $0.50.
fn late_half_hour(customer: &str) -> Vec<UsageSample> {
    let hour = at(2026, 10, 11);
    vec![
        sample(customer, "sbx-b", 1, 1, hour, 1000),
        sample(
            customer,
            "sbx-b",
            1,
            2,
            hour + chrono::Duration::minutes(30),
            1000,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_late_for_an_hour_already_rated_are_in_the_period_end_figure() -> anyhow::Result<()>
{
    let env = TestEnv::new("invoice_late_hour").await?;
    // 1 vCPU from the 1st to the 11th: $240, with a sample half an hour in
    // (so the period's first hour has a snapshot of its own).
    env.store
        .insert_samples(&[
            sample("late-2", "sbx", 1, 1, at(2026, 10, 1), 1000),
            sample(
                "late-2",
                "sbx",
                1,
                2,
                at(2026, 10, 1) + chrono::Duration::minutes(30),
                1000,
            ),
            sample("late-2", "sbx", 1, 3, at(2026, 10, 11), 1000),
        ])
        .await?;
    // The rater rates October's hours through the 15th, the hour ending
    // 11 October 01:00 among them.
    let pass = |now| idlemeter_tests::rater_pass(&env, SIMPLE_SHEET, "test.toml", terms(), now);
    pass(at(2026, 10, 15) + chrono::Duration::hours(1)).await?;
    // Samples of that hour arrive late, before the period ends: no pass
    // rates that hour again, and the next hours' reads start after it.
    env.store.insert_samples(&late_half_hour("late-2")).await?;
    let last = pass(at(2026, 11, 1) + chrono::Duration::hours(1)).await?;
    assert_eq!(last.periods_rerated, 1, "{last:?}");
    assert_eq!(
        october_rated(&env, "late-2").await?,
        Decimal::new(24050, 2),
        "the period-end figure counts the late half hour"
    );
    // Nothing more to re-rate: the re-rated state counts every sample.
    let again = pass(at(2026, 11, 1) + chrono::Duration::hours(2)).await?;
    assert_eq!(again.periods_rerated, 0, "{again:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_close_bills_samples_the_raters_period_end_state_has_not_rated() -> anyhow::Result<()> {
    let env = TestEnv::new("invoice_unrated").await?;
    let lock = tempfile::tempdir()?;
    env.store
        .insert_samples(&[
            sample("late-3", "sbx", 1, 1, at(2026, 10, 1), 1000),
            sample("late-3", "sbx", 1, 2, at(2026, 10, 11), 1000),
        ])
        .await?;
    rate_month(&env, SIMPLE_SHEET, 10).await?;
    assert_eq!(october_rated(&env, "late-3").await?, Decimal::from(240));
    // October's samples arrive after the rater's period-end state, before
    // the close; the rater has not passed since.
    env.store.insert_samples(&late_half_hour("late-3")).await?;
    let invoicer = invoicer(&env, "test.toml", SIMPLE_SHEET, &lock.path().join("lock")).await?;
    let october = invoicer
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?
        .issued
        .remove(0);
    assert_eq!(
        october.total,
        Decimal::new(24050, 2),
        "the close rates the period from its samples"
    );
    // The rater's next pass re-rates October to the same figure, so
    // November adjusts nothing for it.
    rate_month(&env, SIMPLE_SHEET, 11).await?;
    assert_eq!(october_rated(&env, "late-3").await?, Decimal::new(24050, 2));
    env.store
        .insert_samples(&[
            sample("late-3", "sbx", 2, 1, at(2026, 11, 1), 1000),
            sample("late-3", "sbx", 2, 2, at(2026, 11, 2), 1000),
        ])
        .await?;
    rate_month(&env, SIMPLE_SHEET, 11).await?;
    let november = invoicer
        .close_period(at(2026, 11, 1), NOW(), false, &never_billed)
        .await?
        .issued
        .remove(0);
    assert_eq!(november.total, Decimal::from(24));
    assert!(
        november.lines.iter().all(|line| line.kind != "adjustment"),
        "{:?}",
        november.lines
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_written_before_states_counted_what_they_rated_is_not_trusted() -> anyhow::Result<()>
{
    let env = TestEnv::new("invoice_old_count").await?;
    let lock = tempfile::tempdir()?;
    let rated = vec![
        sample("late-4", "sbx", 1, 1, at(2026, 10, 1), 1000),
        sample("late-4", "sbx", 1, 2, at(2026, 10, 11), 1000),
    ];
    let mut stored = rated.clone();
    stored.extend(late_half_hour("late-4"));
    env.store.insert_samples(&stored).await?;
    // A period-end state as the release before migration 0017 wrote it:
    // rated without the late half hour, but counting every stored row (the
    // count taken when its pass began).
    let mut states =
        idlemeter_tests::period_end_states(SIMPLE_SHEET, &rated, Period::Month, at(2026, 10, 1))?;
    for state in &mut states {
        state.samples = stored.len() as u64;
        state.counts_rated = 0;
    }
    env.store.insert_rating_states(&states).await?;
    let invoicer = invoicer(&env, "test.toml", SIMPLE_SHEET, &lock.path().join("lock")).await?;
    let october = invoicer
        .close_period(at(2026, 10, 1), NOW(), false, &never_billed)
        .await?
        .issued
        .remove(0);
    assert_eq!(
        october.total,
        Decimal::new(24050, 2),
        "the close rates the period from its samples"
    );
    Ok(())
}
