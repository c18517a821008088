//! One bill everywhere: at every rated hour, the cost so far (`/cost`), the
//! invoice preview, the spend that alerts and budget caps compare and the
//! invoice that closing at that instant would issue are the same numbers,
//! with a plan fee, a monthly credit, what is left of a one-time credit
//! after an earlier invoice, tax and a prepaid wallet; and the invoice the
//! close issues is the offline rating of the same samples billed by the
//! same function.

use chrono::{DateTime, Duration, TimeZone, Utc};
use idlemeter_api::auth::generate;
use idlemeter_api::{Api, ApiConfig, Billing};
use idlemeter_core::{
    rate_report, Account, BillingOptions, BillingTerms, CustomerId, NumberedSample, Period,
    PriceSheet, SessionOrConnection, UsageSample,
};
use idlemeter_invoicer::{Invoice, Invoicer, InvoicerConfig};
use idlemeter_rater::{Rater, RaterConfig};
use idlemeter_store::{to_column, WalletDepositRow};
use idlemeter_tests::{sample, sheet_source, TestEnv, SIMPLE_SHEET};
use rust_decimal::Decimal;
use serde_json::Value;

/// $1 per vCPU-hour; the plan: a $1 fee and a $0.50 credit every period,
/// and a $3 one-time credit.
fn sheet() -> String {
    SIMPLE_SHEET.replace(
        "line_rounding = \"half_up\"",
        "line_rounding = \"half_up\"\ndefault_plan = \"pro\"",
    ) + r#"
[plans.pro]
monthly_fee = "1"

[[plans.pro.credits]]
kind = "monthly"
amount = "0.50"

[[plans.pro.credits]]
kind = "one_time"
amount = "3"
"#
}

const ISSUER: &str = "one-bill";

fn terms() -> BillingTerms {
    BillingTerms {
        issuer: ISSUER.to_owned(),
        period: Period::Day,
        tax_rates: idlemeter_core::TaxRates::parse([("acme", "0.2")]).expect("valid rates"),
        ..BillingTerms::default()
    }
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("rfc3339")
}

fn decimal(value: &Value) -> Decimal {
    value
        .as_str()
        .unwrap_or_else(|| panic!("a decimal string, not {value}"))
        .parse()
        .expect("decimal")
}

/// Samples of one 2-vCPU sandbox every 10 minutes from `from` to `to`.
fn running(epoch: u64, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<UsageSample> {
    let mut samples = Vec::new();
    let (mut ts, mut seq) = (from, 1);
    while ts <= to {
        samples.push(sample("sbx", epoch, seq, ts, seq * 1_000, 0));
        ts += Duration::minutes(10);
        seq += 1;
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_preview_spend_and_the_invoice_are_one_bill_at_every_rated_hour() -> anyhow::Result<()>
{
    let env = TestEnv::new("one_bill").await?;
    let sheet = sheet();
    let lock = tempfile::tempdir()?;
    let day_1 = at("2026-11-02T00:00:00Z");
    let day_2 = at("2026-11-03T00:00:00Z");
    let day_3 = at("2026-11-04T00:00:00Z");
    // Day 1: one hour ($2) and the fee: the one-time credit pays $2.50 of it.
    // Day 2: six hours, $2 each.
    let first_day = running(1, day_1, day_1 + Duration::hours(1));
    let second_day = running(2, day_2, day_2 + Duration::hours(6));
    env.store.insert_samples(&first_day).await?;
    env.store.insert_samples(&second_day).await?;
    env.store
        .insert_wallet_deposit(&WalletDepositRow {
            issuer: ISSUER.to_owned(),
            customer: "acme".to_owned(),
            deposit_id: "d-1".to_owned(),
            amount: to_column(Decimal::new(500, 2))?,
            deposited_at: (day_1 + Duration::hours(12)).timestamp() as u32,
        })
        .await?;

    let rater = Rater::new(
        env.store.clone(),
        &sheet,
        RaterConfig {
            sheet: "one-bill.toml".to_owned(),
            grace_seconds: 0,
            live_interval_seconds: 0,
            ..RaterConfig::default()
        },
        &prometheus::Registry::new(),
    )?
    .with_terms(terms())?;
    let invoicer = Invoicer::new(
        env.store.clone(),
        sheet_source(&sheet, "one-bill.toml"),
        InvoicerConfig {
            grace_seconds: 0,
            lock_file: lock.path().join("lock").display().to_string(),
            ..InvoicerConfig::default()
        },
        terms(),
    )?;
    rater.rate_closed_hours(day_2).await?;
    let first = invoicer
        .close_period(day_1, day_2, false, &|_, _| {})
        .await?;
    assert_eq!(first.issued.len(), 1);
    assert_eq!(first.issued[0].total, Decimal::ZERO);
    assert_eq!(first.issued[0].one_time_credit_left, Decimal::new(50, 2));

    // The API, its clock set by the test.
    let clock = std::sync::Arc::new(std::sync::Mutex::new(day_2));
    let key = generate(Some(&CustomerId::parse("acme")?), "acme", 0);
    env.store.insert_api_key(&key.row).await?;
    let api = Api::new(
        env.store.clone(),
        Billing::new(sheet_source(&sheet, "one-bill.toml"), terms())?,
        ApiConfig {
            alert_interval_s: 0,
            rate_limit_per_s: 0,
            ..ApiConfig::default()
        },
        &prometheus::Registry::new(),
    )
    .await?
    .with_clock({
        let clock = clock.clone();
        std::sync::Arc::new(move || *clock.lock().expect("not poisoned"))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(api.serve(listener, std::future::pending()));
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let (http, base, key) = (http.clone(), base.clone(), key.key.clone());
        async move {
            let response = http
                .get(format!("{base}/v1/customers/acme/{path}"))
                .bearer_auth(key)
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
            Ok::<Value, anyhow::Error>(response.json().await?)
        }
    };

    for hour in 1..=7 {
        let now = if hour == 7 {
            // The period's end: its last hours are quiet.
            day_3
        } else {
            day_2 + Duration::hours(hour)
        };
        rater.rate_closed_hours(now).await?;
        // Asked a second before the period ends, at the end of day 2.
        let asked = now.min(day_3 - Duration::seconds(1));
        *clock.lock().expect("not poisoned") = asked;
        let cost = get("cost").await?;
        let preview = get("invoice-preview").await?;
        let alerts = env.store.latest_spend("acme").await?.expect("rated");
        let (_, caps) = env.store.period_spend("acme").await?.expect("rated");
        let closing = invoicer.preview("acme", asked).await?.expect("a bill");
        assert_eq!(
            time(&cost["as_of"]),
            now,
            "hour {hour}: /cost shows the hour just rated: {cost}"
        );
        let total = decimal(&cost["total"]);
        let spend = decimal(&cost["spend"]);
        assert_eq!(decimal(&preview["total"]), total, "hour {hour}: preview");
        assert_eq!(closing.total, total, "hour {hour}: closing now");
        assert_eq!(alerts.spend, spend, "hour {hour}: alerts");
        assert_eq!(caps, spend, "hour {hour}: budget caps");
        assert_eq!(
            closing.total + closing.wallet_applied,
            spend,
            "hour {hour}: spend is the bill before the wallet pays"
        );
        let lines = |invoice: &Value| -> Vec<(String, String, Decimal)> {
            invoice["lines"]
                .as_array()
                .expect("lines")
                .iter()
                .map(|line| {
                    (
                        line["kind"].as_str().unwrap_or_default().to_owned(),
                        line["resource"].as_str().unwrap_or_default().to_owned(),
                        decimal(&line["amount"]),
                    )
                })
                .collect()
        };
        assert_eq!(
            lines(&preview),
            lines(&serde_json::to_value(&closing)?),
            "hour {hour}: preview lines"
        );
        assert_eq!(lines(&cost), lines(&preview), "hour {hour}: /cost lines");
        if hour == 1 {
            // 50 minutes of 2 vCPU ($1.67; the interval closing at 01:00 is
            // the next hour's) + $1 fee - $0.50 monthly - the $0.50 left of
            // the one-time credit = $1.67, + $0.33 tax = $2.00, all paid by
            // the wallet. (A fresh $3 one-time credit would have covered
            // everything: $0 spent.)
            assert!(
                lines(&cost).contains(&(
                    "credit".to_owned(),
                    "credit.one_time".to_owned(),
                    Decimal::new(-50, 2)
                )),
                "{cost}"
            );
            assert_eq!(spend, Decimal::new(200, 2), "{cost}");
            assert_eq!(total, Decimal::ZERO, "{cost}");
        }
        if hour == 3 {
            // 170 minutes: $5.67 + $1 - $1 = $5.67, + $1.13 tax = $6.80: the
            // wallet pays $5 and $1.80 is due.
            assert_eq!(spend, Decimal::new(680, 2), "{cost}");
            assert_eq!(total, Decimal::new(180, 2), "{cost}");
        }
    }

    // Closing day 2 issues what every figure said at its end, which is the
    // offline rating of its samples billed by the same function.
    let closed = invoicer
        .close_period(day_2, day_3, false, &|_, _| {})
        .await?;
    assert_eq!(closed.issued.len(), 1);
    let invoice: &Invoice = &closed.issued[0];
    let cost = get("cost").await?;
    assert_eq!(invoice.total, decimal(&cost["total"]));
    let parsed = PriceSheet::from_toml(&sheet, "one-bill.toml")?;
    let numbered: Vec<NumberedSample> = second_day
        .iter()
        .cloned()
        .enumerate()
        .map(|(index, sample)| NumberedSample {
            line: index as u64 + 1,
            sample,
        })
        .collect();
    let offline = rate_report(
        &parsed,
        &numbered,
        &SessionOrConnection,
        &BillingOptions {
            accounts: [(
                CustomerId::parse("acme")?,
                Account {
                    one_time_credit_left: Some(Decimal::new(50, 2)),
                    adjustments: Vec::new(),
                    tax_rate: Decimal::new(2, 1),
                    wallet_balance: Decimal::new(500, 2),
                    ..Account::default()
                },
            )]
            .into(),
        },
        Vec::new(),
    )?;
    let bill = &offline.customers[0];
    assert_eq!(invoice.total, bill.total);
    assert_eq!(invoice.wallet_applied, bill.wallet_applied);
    assert_eq!(invoice.tax, bill.tax);
    let amounts: Vec<(String, Decimal)> = invoice
        .lines
        .iter()
        .map(|line| (line.resource.clone(), line.amount))
        .collect();
    let offline_amounts: Vec<(String, Decimal)> = bill
        .lines
        .iter()
        .map(|line| (line.resource.clone(), line.amount))
        .collect();
    assert_eq!(amounts, offline_amounts);
    // 12 vCPU-hours: $12 + $1 - $0.50 - $0.50 = $12, $2.40 tax, $5 wallet.
    assert_eq!(invoice.total, Decimal::new(940, 2));
    Ok(())
}

fn time(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| Utc.timestamp_opt(0, 0).single().expect("epoch"))
}

/// Resident memory of process `pid`, bytes.
fn rss_bytes(pid: u32) -> u64 {
    idlemeter_tests::bench::process_use(pid).rss_mib << 20
}

/// A thousand previews of one customer at once, against `idlemeter api` in
/// its own process: each is answered or refused with 429 (the key's rate
/// limit, then the tenant's in-flight limit), and the API's resident memory
/// grows by less than 64 MiB meanwhile (64 KiB per connection: what grows is
/// the thousand connections' buffers; a preview holds one figure's lines and
/// one account, never the customer's samples, and at most
/// `max_in_flight_per_tenant` of them run at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_previews_are_answered_or_refused_within_a_memory_bound(
) -> anyhow::Result<()> {
    const BOUND: u64 = 64 << 20;
    let env = TestEnv::new("one_bill_burst").await?;
    let dir = tempfile::tempdir()?;
    let sheet = sheet();
    let sheet_path = dir.path().join("sheet.toml");
    std::fs::write(&sheet_path, &sheet)?;
    // A live figure of the open month (the API reads the wall clock): the
    // last ten minutes of a sandbox, rated by the rater's live pass.
    let now = Utc::now();
    env.store
        .insert_samples(&running(1, now - Duration::minutes(10), now))
        .await?;
    let rater = Rater::new(
        env.store.clone(),
        &sheet,
        RaterConfig {
            sheet: sheet_path.display().to_string(),
            live_source: idlemeter_rater::LiveSource::Clickhouse,
            live_interval_seconds: 5,
            live_lateness_seconds: 900,
            ..RaterConfig::default()
        },
        &prometheus::Registry::new(),
    )?;
    rater.rate_live(now).await?;
    let key = generate(Some(&CustomerId::parse("acme")?), "acme", 0);
    env.store.insert_api_key(&key.row).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut api = std::process::Command::new(idlemeter_tests::collector::idlemeter_binary()?)
        .arg("api")
        .env("IDLEMETER_CLICKHOUSE__URL", &env.clickhouse.url)
        .env("IDLEMETER_CLICKHOUSE__DATABASE", &env.clickhouse.database)
        .env("IDLEMETER_RATER__SHEET", &sheet_path)
        .env("IDLEMETER_API__LISTEN", format!("127.0.0.1:{port}"))
        .env("IDLEMETER_API__LIVE_STATE", "false")
        .env("IDLEMETER_API__ALERT_INTERVAL_S", "0")
        .env("IDLEMETER_METRICS__LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = api.id();
    let url = format!("http://127.0.0.1:{port}/v1/customers/acme/invoice-preview");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1_000)
        .build()?;
    let result = async {
        // Up, and the first answer (which also warms the allocator).
        let mut draft = Value::Null;
        for _ in 0..300 {
            if let Ok(response) = http.get(&url).bearer_auth(&key.key).send().await {
                anyhow::ensure!(response.status().is_success(), "{}", response.status());
                draft = response.json().await?;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        anyhow::ensure!(decimal(&draft["subtotal"]) > Decimal::ZERO, "{draft}");
        let before = rss_bytes(pid);
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
        let sampling = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss_bytes(pid), std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            })
        };
        let requests = (0..1_000).map(|_| {
            let (http, url, key) = (http.clone(), url.clone(), key.key.clone());
            tokio::spawn(async move {
                let response = http.get(&url).bearer_auth(key).send().await?;
                let status = response.status();
                let body: Value = response.json().await?;
                Ok::<_, anyhow::Error>((status, body))
            })
        });
        let (mut answered, mut refused) = (0, 0);
        for request in futures::future::join_all(requests).await {
            let (status, body) = request??;
            match status {
                reqwest::StatusCode::OK => {
                    anyhow::ensure!(body["total"] == draft["total"], "another draft: {body}");
                    answered += 1;
                }
                reqwest::StatusCode::TOO_MANY_REQUESTS => refused += 1,
                other => anyhow::bail!("a preview answered {other}: {body}"),
            }
        }
        sampling.abort();
        let grown = peak
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(before);
        eprintln!(
            "1000 previews: {answered} answered, {refused} refused; the API grew by {} KiB",
            grown >> 10
        );
        anyhow::ensure!(answered + refused == 1_000);
        anyhow::ensure!(
            answered > 0 && refused > 0,
            "{answered} answered, {refused} refused"
        );
        anyhow::ensure!(grown < BOUND, "the API grew by {grown} bytes");
        Ok(())
    }
    .await;
    let _ = api.kill();
    let _ = api.wait();
    result
}
