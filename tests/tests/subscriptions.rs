//! Customers and subscriptions as data, on the real ledger and ClickHouse:
//! a mid-month E2B upgrade from Hobby to Pro, prorated per second on the
//! invoice, and the rules the ledger keeps once a period is invoiced.

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_invoicer::{Invoice, Invoicer, InvoicerConfig};
use idlemeter_ledger::{CustomerRecord, SubscriptionRecord};
use idlemeter_rater::Period;
use idlemeter_tests::TestEnv;
use rust_decimal::Decimal;

const ISSUER: &str = "e2b-test";
const E2B: &str = include_str!("../../prices/e2b.toml");

fn at(year: i32, month: u32, day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, 0, 0, 0)
        .single()
        .expect("valid date")
}

fn dec(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

fn terms() -> idlemeter_core::BillingTerms {
    idlemeter_core::BillingTerms {
        issuer: ISSUER.to_owned(),
        period: Period::Month,
        ..idlemeter_core::BillingTerms::default()
    }
}

fn line<'a>(invoice: &'a Invoice, resource: &str) -> &'a idlemeter_invoicer::Line {
    invoice
        .lines
        .iter()
        .find(|line| line.resource == resource)
        .unwrap_or_else(|| panic!("a {resource} line in {:?}", invoice.lines))
}

fn record(id: &str) -> CustomerRecord {
    CustomerRecord {
        id: id.to_owned(),
        name: "Upgrader Inc.".to_owned(),
        currency: "USD".to_owned(),
        tax_rate: None,
        tax_id: "US-123".to_owned(),
        billing_email: "billing@upgrader.test".to_owned(),
        spend_limit: Some(dec("500")),
        metadata: serde_json::Map::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_e2b_upgrade_from_hobby_to_pro_mid_month_is_prorated_per_second() -> anyhow::Result<()> {
    let env = TestEnv::new("subscriptions").await?;
    let lock = tempfile::tempdir()?;
    let ledger = env.ledger().await?;
    // 2 vCPU and 512 MiB for 10 hours on the 5th and on the 20th.
    let mut samples =
        idlemeter_tests::running_span("upgrader", 1, at(2026, 11, 5), 10, 2000, 512 << 20);
    samples.extend(idlemeter_tests::running_span(
        "upgrader",
        2,
        at(2026, 11, 20),
        10,
        2000,
        512 << 20,
    ));
    env.store.insert_samples(&samples).await?;
    // On Hobby (the sheet's default) until the 14th, then Pro.
    let saved = ledger.save_customer(ISSUER, &record("upgrader")).await?;
    assert!(saved.created);
    ledger
        .subscribe(
            ISSUER,
            "upgrader",
            &SubscriptionRecord {
                plan: "pro".to_owned(),
                effective_from: at(2026, 11, 14),
            },
        )
        .await?;
    ledger.relay(&env.store).await?;
    idlemeter_tests::rater_pass(
        &env,
        E2B,
        "e2b.toml",
        terms(),
        at(2026, 12, 1) + chrono::Duration::hours(1),
    )
    .await?;
    let invoicer = Invoicer::new(
        env.store.clone(),
        idlemeter_tests::sheet_source(E2B, "e2b.toml"),
        InvoicerConfig {
            lock_file: lock.path().join("lock").display().to_string(),
            ..InvoicerConfig::default()
        },
        terms(),
    )?
    .with_ledger(ledger.clone());
    let closed = invoicer
        .close_period(at(2026, 11, 1), at(2026, 12, 5), false, &|_, _| {})
        .await?;
    assert!(closed.failed.is_empty(), "{:?}", closed.failed);
    let invoice = &closed.issued[0];
    // Usage: 2 vCPU x 72,000 s = 144,000 vCPU-s x $0.000014 = $2.016 ->
    // $2.02; 0.5 GiB x 72,000 s = 36,000 GiB-s x $0.0000045 = $0.162 ->
    // $0.16.
    assert_eq!(line(invoice, "vcpu").amount, dec("2.02"));
    assert_eq!(line(invoice, "memory").amount, dec("0.16"));
    // Pro's $150 for the 17 of November's 30 days from the 14th: exactly
    // $85.00, the quantity showing the share; no Hobby fee (it has none).
    let pro = line(invoice, "plan.pro");
    assert_eq!(
        (pro.quantity, pro.unit_price, pro.amount),
        (dec("0.566667"), dec("150"), dec("85.00"))
    );
    assert!(invoice
        .lines
        .iter()
        .all(|line| line.resource != "plan.hobby"));
    assert_eq!(invoice.plan, "pro");
    // The buyer as issued: the record's name, id, tax id and email.
    assert_eq!(
        invoice.buyer,
        [
            "Upgrader Inc.",
            "Customer upgrader",
            "Tax ID US-123",
            "billing@upgrader.test"
        ]
    );
    // Hobby's $100 one-time credit, granted in the period, pays the
    // $87.18: $12.82 of it is left for December.
    assert_eq!(line(invoice, "credit.one_time").amount, dec("-87.18"));
    assert_eq!(invoice.one_time_credit_left, dec("12.82"));
    assert_eq!(invoice.total, dec("0"));
    let lines: Decimal = invoice.lines.iter().map(|line| line.amount).sum();
    assert_eq!(lines, invoice.total);

    // The record reached ClickHouse, where every service reads it.
    let rows = env
        .store
        .customers_between(ISSUER, "upgrader", "upgrader")
        .await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].billing_email, "billing@upgrader.test");

    // November is invoiced: a change inside it is refused, one after it is
    // taken; the currency cannot change any more.
    let inside = ledger
        .subscribe(
            ISSUER,
            "upgrader",
            &SubscriptionRecord {
                plan: "hobby".to_owned(),
                effective_from: at(2026, 11, 20),
            },
        )
        .await
        .expect_err("November is invoiced");
    assert!(inside.to_string().contains("invoiced until"), "{inside}");
    ledger
        .subscribe(
            ISSUER,
            "upgrader",
            &SubscriptionRecord {
                plan: "hobby".to_owned(),
                effective_from: at(2026, 12, 1),
            },
        )
        .await?;
    let euro = ledger
        .save_customer(
            ISSUER,
            &CustomerRecord {
                currency: "EUR".to_owned(),
                ..record("upgrader")
            },
        )
        .await
        .expect_err("invoiced in USD");
    assert!(euro.to_string().contains("cannot change"), "{euro}");
    let (_, version, plans) = ledger
        .customer(ISSUER, "upgrader")
        .await?
        .expect("the customer");
    assert_eq!(version, 1);
    assert_eq!(
        plans
            .iter()
            .map(|change| change.plan.as_str())
            .collect::<Vec<_>>(),
        ["pro", "hobby"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_records_refuse_what_could_not_bill() -> anyhow::Result<()> {
    let env = TestEnv::new("customer_records").await?;
    let ledger = env.ledger().await?;
    for (bad, field) in [
        (
            CustomerRecord {
                tax_rate: Some(dec("1.5")),
                ..record("c-1")
            },
            "tax_rate",
        ),
        (
            CustomerRecord {
                currency: "usd".to_owned(),
                ..record("c-1")
            },
            "currency",
        ),
        (
            CustomerRecord {
                spend_limit: Some(dec("0")),
                ..record("c-1")
            },
            "spend_limit",
        ),
        (
            CustomerRecord {
                id: "Not An Id".to_owned(),
                ..record("c-1")
            },
            "id",
        ),
    ] {
        let error = ledger
            .save_customer(ISSUER, &bad)
            .await
            .expect_err("refused");
        assert!(error.to_string().contains(field), "{field}: {error}");
    }
    let unknown = ledger
        .subscribe(
            ISSUER,
            "nobody",
            &SubscriptionRecord {
                plan: "pro".to_owned(),
                effective_from: at(2026, 11, 1),
            },
        )
        .await
        .expect_err("no record");
    assert!(unknown.to_string().contains("save their record first"));
    assert!(ledger.customer_ids(ISSUER).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_manage_customers_and_plans_through_the_ledger() -> anyhow::Result<()> {
    let env = TestEnv::new("customer_routes").await?;
    let admin = idlemeter_api::auth::generate(None, "finance", 0);
    env.store.insert_api_key(&admin.row).await?;
    let with_ledger = idlemeter_tests::serve(
        idlemeter_tests::api(&env, E2B, terms())
            .await?
            .with_ledger(env.ledger().await?),
    )
    .await?;
    let without = idlemeter_tests::serve(idlemeter_tests::api(&env, E2B, terms()).await?).await?;
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "name": "Route Co",
        "currency": "USD",
        "tax_rate": "0.2",
        "billing_email": "ap@route.test",
        "spend_limit": "250",
        "metadata": { "crm": "42" }
    });
    let put = |base: &str| {
        http.put(format!("{base}/v1/admin/customers/route-co"))
            .bearer_auth(&admin.key)
            .json(&body)
    };
    assert_eq!(put(&without).send().await?.status(), 503);
    let saved: serde_json::Value = put(&with_ledger)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(saved, serde_json::json!({ "version": 1, "created": true }));
    let bad = http
        .put(format!("{with_ledger}/v1/admin/customers/route-co"))
        .bearer_auth(&admin.key)
        .json(&serde_json::json!({ "currency": "USD", "tax_rate": "2" }))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    let plan = |name: &str| {
        http.post(format!(
            "{with_ledger}/v1/admin/customers/route-co/subscriptions"
        ))
        .bearer_auth(&admin.key)
        .json(&serde_json::json!({ "plan": name, "effective_from": "2026-11-14T00:00:00Z" }))
    };
    assert_eq!(plan("platinum").send().await?.status(), 400);
    assert_eq!(plan("pro").send().await?.status(), 201);
    let view: serde_json::Value = http
        .get(format!("{with_ledger}/v1/admin/customers/route-co"))
        .bearer_auth(&admin.key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(view["customer"]["tax_rate"], "0.2");
    assert_eq!(view["customer"]["spend_limit"], "250");
    assert_eq!(view["subscriptions"][0]["plan"], "pro");
    // Copied to ClickHouse before the answer: the next bill reads it.
    let rows = env
        .store
        .subscriptions_between(ISSUER, "route-co", "route-co", u32::MAX)
        .await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        http.get(format!("{with_ledger}/v1/admin/customers/nobody"))
            .bearer_auth(&admin.key)
            .send()
            .await?
            .status(),
        404
    );
    Ok(())
}
