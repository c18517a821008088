//! `idlemeter invoices close` SIGKILLed at eight points of a run, then run
//! to completion, issues exactly the invoices (numbers, customers, lines,
//! totals) that an uninterrupted run issues on the same data. Real process
//! deaths, real ClickHouse and PostgreSQL (the ledger).

use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use idlemeter_core::{CustomerId, Epoch, NodeId, SandboxId, UsageSample, VcpuMillis};
use idlemeter_invoicer::Invoice;
use idlemeter_tests::TestEnv;

const CUSTOMERS: u64 = 2000;

const SHEET: &str = r#"
[sheet]
platform = "test"
currency = "USD"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "0.37"
basis = "allocated"
increment_seconds = 1
idle = "billed"
"#;

fn samples() -> Vec<UsageSample> {
    let start = Utc
        .with_ymd_and_hms(2026, 10, 1, 0, 0, 0)
        .single()
        .expect("time");
    (0..CUSTOMERS)
        .flat_map(|index| {
            (1..=2u64).map(move |seq| UsageSample {
                vcpu: VcpuMillis(1500),
                cpu_used_usec: seq,
                vcpu_alloc_usec: seq,
                exec_sessions: 1,
                ..UsageSample::blank(
                    CustomerId::parse(format!("cust-{index:04}")).expect("id"),
                    NodeId::parse("node-1").expect("id"),
                    SandboxId::parse("sbx").expect("id"),
                    Epoch(1),
                    seq,
                    start + chrono::Duration::minutes((seq as i64 - 1) * (60 + index as i64 * 7)),
                )
            })
        })
        .collect()
}

fn close_command(env: &TestEnv, dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idlemeter"));
    command
        .args(["invoices", "close", "--period", "2026-10"])
        .env("IDLEMETER_CLICKHOUSE__URL", &env.clickhouse.url)
        .env("IDLEMETER_CLICKHOUSE__DATABASE", &env.clickhouse.database)
        // On the ledger (PostgreSQL), each run of its own schema, as
        // deployments issue; the numbers are then claimed there.
        .env("IDLEMETER_LEDGER__URL", env.ledger_settings.url.expose())
        .env("IDLEMETER_LEDGER__SCHEMA", &env.ledger_settings.schema)
        .env("IDLEMETER_RATER__SHEET", dir.join("sheet.toml"))
        .env("IDLEMETER_BILLING__ISSUER", "acme-cloud")
        .env(
            "IDLEMETER_INVOICER__LOCK_FILE",
            dir.join(format!("{}.lock", env.group_id)),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Every stored invoice; lines are read for one invoice in 50 (headers carry
/// the totals and line counts of all).
async fn stored(env: &TestEnv) -> anyhow::Result<Vec<Invoice>> {
    let mut invoices = Vec::new();
    for header in env.store.invoices("acme-cloud").await? {
        let lines = if header.number % 50 == 2 {
            env.store.invoice_lines(&header).await?
        } else {
            Vec::new()
        };
        invoices.push(Invoice::from_rows(&header, &lines)?.normalized());
    }
    invoices.sort_by_key(|invoice| invoice.number);
    Ok(invoices)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_close_rerun_issues_the_same_invoices_as_an_uninterrupted_one(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("sheet.toml"), SHEET)?;
    let reference = TestEnv::new("invoices_reference").await?;
    let crashed = TestEnv::new("invoices_crashed").await?;
    let data = samples();
    reference.store.insert_samples(&data).await?;
    crashed.store.insert_samples(&data).await?;
    // What the rater would have stored by October's end: the close bills it.
    let october = Utc
        .with_ymd_and_hms(2026, 10, 1, 0, 0, 0)
        .single()
        .expect("time");
    let states =
        idlemeter_tests::period_end_states(SHEET, &data, idlemeter_core::Period::Month, october)?;
    reference.store.insert_rating_states(&states).await?;
    crashed.store.insert_rating_states(&states).await?;
    // cust-0001 prepaid 0.25 before October, recorded through the CLI in
    // the ledger (twice: the same id is one deposit).
    for env in [&reference, &crashed, &crashed] {
        let output = Command::new(env!("CARGO_BIN_EXE_idlemeter"))
            .args([
                "invoices",
                "deposit",
                "--customer",
                "cust-0001",
                "--amount",
                "0.25",
            ])
            .args(["--id", "dep-1", "--at", "2026-09-30T00:00:00Z"])
            .env("IDLEMETER_CLICKHOUSE__URL", &env.clickhouse.url)
            .env("IDLEMETER_CLICKHOUSE__DATABASE", &env.clickhouse.database)
            .env("IDLEMETER_LEDGER__URL", env.ledger_settings.url.expose())
            .env("IDLEMETER_LEDGER__SCHEMA", &env.ledger_settings.schema)
            .env("IDLEMETER_BILLING__ISSUER", "acme-cloud")
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let status = close_command(&reference, dir.path()).status()?;
    assert!(status.success(), "reference close failed: {status}");
    let expected = stored(&reference).await?;
    assert_eq!(expected.len() as u64, CUSTOMERS);

    let mut kills = 0;
    for delay_ms in [40, 80, 120, 180, 250, 350, 500, 700] {
        let mut child = close_command(&crashed, dir.path()).spawn()?;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if child.try_wait()?.is_none() {
            child.kill()?; // SIGKILL: no shutdown path runs
            kills += 1;
        }
        child.wait()?;
    }
    eprintln!("{kills} of 8 runs killed before they finished");
    assert!(
        kills > 0,
        "no run was killed: the close is faster than every delay"
    );
    let status = close_command(&crashed, dir.path()).status()?;
    assert!(status.success(), "final close failed: {status}");
    let got = stored(&crashed).await?;
    assert_eq!(got.len(), expected.len());
    for (got, expected) in got.iter().zip(&expected) {
        assert_eq!(got.number, expected.number);
        assert_eq!(got.customer, expected.customer);
        assert_eq!(got.lines, expected.lines, "invoice {}", got.number);
        assert_eq!(got.total, expected.total, "invoice {}", got.number);
        assert_eq!(got.subtotal, expected.subtotal, "invoice {}", got.number);
    }

    // `invoices show` renders what is stored: CSV lines and a printable page.
    let show = |format: &str| -> anyhow::Result<String> {
        let output = Command::new(env!("CARGO_BIN_EXE_idlemeter"))
            .args(["invoices", "show", "--number", "2", "--format", format])
            .env("IDLEMETER_CLICKHOUSE__URL", &crashed.clickhouse.url)
            .env(
                "IDLEMETER_CLICKHOUSE__DATABASE",
                &crashed.clickhouse.database,
            )
            .env("IDLEMETER_RATER__SHEET", dir.path().join("sheet.toml"))
            .env("IDLEMETER_BILLING__ISSUER", "acme-cloud")
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    };
    let second = &expected[1];
    let csv = show("csv")?;
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].starts_with("issuer,number,customer,"), "{csv}");
    assert_eq!(rows.len(), 1 + second.lines.len(), "{csv}");
    assert!(
        rows[1].contains(&format!(",{},", second.lines[0].amount)),
        "{csv}"
    );
    assert!(
        csv.contains(",wallet,wallet,1,payment,-0.25,-0.25,"),
        "{csv}"
    );
    let html = show("html")?;
    assert!(html.contains("<h1>Invoice acme-cloud-2</h1>"), "{html}");
    assert!(html.contains(&second.customer), "{html}");
    assert!(
        html.contains(&format!("<th class=n>{}</th>", second.total)),
        "{html}"
    );
    Ok(())
}
