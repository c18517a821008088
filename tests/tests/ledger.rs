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
