//! The ledger on a real PostgreSQL: migrations apply once, an issued
//! invoice cannot be changed by anyone, and a refused document leaves
//! nothing behind, not even a number.

use chrono::{TimeZone, Utc};
use idlemeter_ledger::{InvoiceRecord, Series, INVOICES_TOPIC};
use idlemeter_tests::TestEnv;
use rust_decimal::Decimal;

fn record(customer: &str) -> InvoiceRecord {
    InvoiceRecord {
        customer: customer.to_owned(),
        period_start: Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap(),
        period_end: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        currency: "USD".to_owned(),
        total: Decimal::new(1234, 2),
        wallet_applied: Decimal::ZERO,
        balance_applied: Decimal::ZERO,
        balance_carried: Decimal::ZERO,
        document: serde_json::json!({ "customer": customer }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_invoices_are_numbered_once_immutable_and_queued() -> anyhow::Result<()> {
    let env = TestEnv::new("ledger").await?;
    let ledger = env.ledger().await?;
    assert!(ledger.migrate().await?.is_empty(), "applied once only");
    let start = record("x").period_start;

    // A document refused while numbering: nothing written, no number used.
    let mut drafts = vec!["a-cust".to_owned(), "b-cust".to_owned()];
    let refused = ledger
        .issue(
            "acme",
            start,
            &mut drafts,
            |d| d.as_str(),
            |draft, _| {
                if draft == "b-cust" {
                    Err("b-cust's amount does not fit".to_owned())
                } else {
                    Ok(record(draft))
                }
            },
        )
        .await;
    assert!(refused.is_err());
    assert!(ledger.invoice_numbers("acme").await?.is_empty());
    assert_eq!(ledger.next_number("acme", Series::Invoice).await?, 1);

    // Draws on wallets the ledger does not hold: refused, nothing used.
    let overdrawn = ledger
        .issue(
            "acme",
            start,
            &mut drafts,
            |d| d.as_str(),
            |draft, _| {
                Ok(InvoiceRecord {
                    wallet_applied: Decimal::new(100, 2),
                    ..record(draft)
                })
            },
        )
        .await?;
    assert!(overdrawn.numbered.is_empty());
    assert_eq!(overdrawn.refused.len(), 2, "no deposit covers either");
    assert!(
        overdrawn.refused[0].1.contains("wallet holding 0"),
        "{:?}",
        overdrawn.refused
    );
    assert_eq!(ledger.next_number("acme", Series::Invoice).await?, 1);
    // Nor may an invoice take a credit balance the customer does not have.
    let no_balance = ledger
        .issue(
            "acme",
            start,
            &mut drafts,
            |d| d.as_str(),
            |draft, _| {
                Ok(InvoiceRecord {
                    balance_applied: Decimal::new(100, 2),
                    ..record(draft)
                })
            },
        )
        .await?;
    assert_eq!(no_balance.refused.len(), 2);
    assert!(
        no_balance.refused[0].1.contains("credit balance holding 0"),
        "{:?}",
        no_balance.refused
    );
    assert_eq!(ledger.next_number("acme", Series::Invoice).await?, 1);
    // With a deposit of 1.50, a-cust's 1.00 draw passes.
    assert!(
        ledger
            .deposit(
                "acme",
                "a-cust",
                "dep-1",
                Decimal::new(150, 2),
                start,
                &serde_json::json!({})
            )
            .await?
    );
    let issued = ledger
        .issue(
            "acme",
            start,
            &mut drafts,
            |d| d.as_str(),
            |draft, _| {
                Ok(InvoiceRecord {
                    wallet_applied: if draft == "a-cust" {
                        Decimal::ONE
                    } else {
                        Decimal::ZERO
                    },
                    ..record(draft)
                })
            },
        )
        .await?;
    assert_eq!(
        ledger.wallet_balance("acme", "a-cust").await?,
        Decimal::new(50, 2)
    );
    assert_eq!(issued.numbered, vec![(0, 1), (1, 2)]);
    // The same customers again: already invoiced, nothing new.
    let again = ledger
        .issue(
            "acme",
            start,
            &mut drafts,
            |d| d.as_str(),
            |draft, _| Ok(record(draft)),
        )
        .await?;
    assert!(again.numbered.is_empty());
    assert_eq!(again.already.len(), 2);
    assert_eq!(again.already[0].1["customer"], "a-cust");
    assert_eq!(ledger.pending(INVOICES_TOPIC, 10).await?.len(), 2);

    // Nobody changes an issued invoice, not even with SQL.
    let mut config: tokio_postgres::Config = env.ledger_settings.url.expose().parse()?;
    config.options(format!("-c search_path={}", env.ledger_settings.schema));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    for statement in [
        "UPDATE invoices SET total = 0 WHERE number = 1",
        "DELETE FROM invoices WHERE number = 2",
    ] {
        let error = client
            .execute(statement, &[])
            .await
            .expect_err("refused by the trigger");
        assert!(
            error.to_string().contains("immutable") || format!("{error:?}").contains("immutable"),
            "{error:?}"
        );
    }
    assert_eq!(ledger.invoice_numbers("acme").await?, vec![1, 2]);
    Ok(())
}

/// API keys created and revoked through an API with a ledger are recorded
/// there, one immutable row per version, and reach ClickHouse (where keys
/// are checked) before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_versions_in_the_ledger() -> anyhow::Result<()> {
    let env = idlemeter_tests::TestEnv::new("ledger_keys").await?;
    let ledger = env.ledger().await?;
    let admin = idlemeter_api::auth::generate(None, "root", 0);
    env.store.insert_api_key(&admin.row).await?;
    let base = idlemeter_tests::serve(
        idlemeter_tests::api(
            &env,
            idlemeter_tests::SIMPLE_SHEET,
            idlemeter_core::BillingTerms::default(),
        )
        .await?
        .with_ledger(ledger.clone()),
    )
    .await?;
    let http = reqwest::Client::new();
    let created: serde_json::Value = http
        .post(format!("{base}/v1/keys"))
        .bearer_auth(&admin.key)
        .json(&serde_json::json!({ "customer": "acme", "name": "ci" }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let key_id = created["key_id"].as_str().expect("a key id").to_owned();
    assert_eq!(
        http.delete(format!("{base}/v1/keys/{key_id}"))
            .bearer_auth(&admin.key)
            .send()
            .await?
            .status(),
        204
    );
    let mut config: tokio_postgres::Config = env.ledger_settings.url.expose().parse()?;
    config.options(format!("-c search_path={}", env.ledger_settings.schema));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let versions: Vec<(i64, i64)> = client
        .query(
            "SELECT version, revoked_at FROM api_keys WHERE key_id = $1 ORDER BY version",
            &[&key_id],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert_eq!(versions[0].1, 0);
    assert!(versions[1].1 > 0, "the second version revokes");
    let stored = env.store.api_keys().await?;
    assert!(stored
        .iter()
        .any(|row| row.key_id == key_id && row.revoked_at > 0));
    let changed = client
        .execute("DELETE FROM api_keys WHERE key_id = $1", &[&key_id])
        .await;
    assert!(changed.is_err(), "key versions are immutable");
    Ok(())
}
