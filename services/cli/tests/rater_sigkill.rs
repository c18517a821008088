//! The online rater rates hour by hour from its carried state, and what it
//! writes equals rating every hour from scratch, even when the process is
//! SIGKILLed mid-pass and restarted (issue "Money from counters").
//!
//! Thirty customers with two sandboxes each send a sample a minute for five
//! hours (resizes, suspends, sessions opening and closing, every counter).
//! `idlemeter rater` is started and killed at staggered moments, then run
//! until every hour is rated. Each stored snapshot must then equal, line by
//! line, `rate_report` over the samples its hour and every hour before it
//! closed (the pre-incremental rater's computation), under CodeSandbox's
//! sheet, which rounds spans up to a minute (open spans are carried across
//! hours).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use idlemeter_core::{
    rate_report, BillingOptions, CustomerId, NumberedSample, PriceSheet, SessionOrConnection,
};
use idlemeter_tests::{counted_trace, TestEnv};
use rust_decimal::Decimal;

const SHEET: &str = include_str!("../../../prices/codesandbox.toml");
const CUSTOMERS: usize = 30;

fn rater_command(env: &TestEnv, dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idlemeter"));
    command
        .arg("rater")
        .env("IDLEMETER_CLICKHOUSE__URL", &env.clickhouse.url)
        .env("IDLEMETER_CLICKHOUSE__DATABASE", &env.clickhouse.database)
        .env("IDLEMETER_RATER__SHEET", dir.join("sheet.toml"))
        .env("IDLEMETER_BILLING__PERIOD", "day")
        .env("IDLEMETER_RATER__GRACE_SECONDS", "0")
        .env("IDLEMETER_RATER__INTERVAL_SECONDS", "1")
        .env("IDLEMETER_RATER__LIVE_INTERVAL_SECONDS", "0")
        .env("IDLEMETER_METRICS__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// (customer, period start, as_of) -> lines as (kind, resource, amount).
type Snapshots = BTreeMap<(String, u32, u32), Vec<(String, String, Decimal)>>;

async fn stored_snapshots(env: &TestEnv) -> anyhow::Result<Snapshots> {
    let rows: Vec<(String, u32, u32, u16, String, String, i128)> = env
        .store
        .client()
        .query(
            "SELECT customer, toUInt32(period_start), toUInt32(as_of), line_no, kind, resource, amount \
             FROM rated_usage FINAL ORDER BY customer, period_start, as_of, line_no",
        )
        .fetch_all()
        .await?;
    let mut snapshots = Snapshots::new();
    for (customer, period, as_of, _, kind, resource, amount) in rows {
        snapshots
            .entry((customer, period, as_of))
            .or_default()
            .push((
                kind,
                resource,
                idlemeter_store::from_column(amount)?.normalize(),
            ));
    }
    Ok(snapshots)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_rater_resumes_and_every_hour_equals_rating_from_scratch() -> anyhow::Result<()>
{
    let env = TestEnv::new("rater_sigkill").await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("sheet.toml"), SHEET)?;
    // Five closed hours ending at the last full hour: the rater's clock is
    // the wall clock. They may straddle midnight: the rater then rates two
    // daily periods, and so does the reference below.
    let now = Utc::now();
    let hour = now.duration_trunc(chrono::Duration::hours(1))?;
    let from = hour - chrono::Duration::hours(5);
    let mut samples = Vec::new();
    for customer in 0..CUSTOMERS {
        for sandbox in 0..2 {
            samples.extend(counted_trace(
                &format!("cust-{customer:02}"),
                &format!("sbx-{customer:02}-{sandbox}"),
                from + chrono::Duration::seconds(customer as i64 + 7 * sandbox),
                60,
                5 * 60 - 2,
            ));
        }
    }
    env.store.insert_samples(&samples).await?;

    let mut kills = 0;
    for delay_ms in [400, 900, 1500, 2300, 3400] {
        let mut child = rater_command(&env, dir.path()).spawn()?;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if child.try_wait()?.is_none() {
            child.kill()?; // SIGKILL: no shutdown path runs
            kills += 1;
        }
        child.wait()?;
    }
    let killed_with = stored_snapshots(&env).await?.len();
    eprintln!("{kills} of 5 runs killed; {killed_with} snapshots stored before the last run");
    assert!(kills > 0, "no run was killed");

    // The reference: every hour of every customer from scratch.
    let sheet = PriceSheet::from_toml(SHEET, "sheet.toml")?;
    let mut expected = Snapshots::new();
    for customer in 0..CUSTOMERS {
        let id = CustomerId::parse(format!("cust-{customer:02}"))?;
        let mut as_of = from + chrono::Duration::hours(1);
        while as_of <= hour {
            let last_hour = as_of - chrono::Duration::hours(1);
            let period = last_hour.duration_trunc(chrono::Duration::days(1))?;
            let stored = env
                .store
                .samples_for_rating(&id, ms(period), ms(as_of))
                .await?;
            let numbered: Vec<NumberedSample> = stored
                .into_iter()
                .enumerate()
                .map(|(index, sample)| NumberedSample {
                    line: index as u64 + 1,
                    sample,
                })
                .collect();
            let report = rate_report(
                &sheet,
                &numbered,
                &SessionOrConnection,
                &BillingOptions::default(),
                Vec::new(),
            )?;
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            let bill = report
                .customers
                .iter()
                .find(|bill| bill.customer == id)
                .expect("the customer has usage");
            expected.insert(
                (id.to_string(), secs(period), secs(as_of)),
                bill.lines
                    .iter()
                    .map(|line| {
                        (
                            line.kind.as_str().to_owned(),
                            line.resource.clone(),
                            line.amount.normalize(),
                        )
                    })
                    .collect(),
            );
            as_of += chrono::Duration::hours(1);
        }
    }

    let mut child = rater_command(&env, dir.path()).spawn()?;
    let finished = env
        .eventually_within(Duration::from_secs(180), "every hour rated", || async {
            Ok(stored_snapshots(&env).await?.len() >= expected.len())
        })
        .await;
    child.kill()?;
    child.wait()?;
    finished?;
    // Should the clock pass the next hour meanwhile, that hour is rated too.
    let mut got = stored_snapshots(&env).await?;
    got.retain(|(_, _, as_of), _| *as_of <= secs(hour));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (key, lines) in &expected {
        assert_eq!(&got[key], lines, "snapshot {key:?}");
    }
    // One carried state per customer and period once merged (FINAL), the
    // newest: the table does not grow with the hours.
    let states: Vec<(String, u32, u32)> = env
        .store
        .client()
        .query(
            "SELECT customer, toUInt32(period_start), toUInt32(as_of) FROM rating_state FINAL \
             ORDER BY customer, period_start",
        )
        .fetch_all()
        .await?;
    let mut newest: BTreeMap<(String, u32), u32> = BTreeMap::new();
    for (customer, period, as_of) in expected.keys() {
        let entry = newest.entry((customer.clone(), *period)).or_default();
        *entry = (*entry).max(*as_of);
    }
    let stored: BTreeMap<(String, u32), u32> = states
        .into_iter()
        .map(|(customer, period, as_of)| ((customer, period), as_of))
        .collect();
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        newest.keys().collect::<Vec<_>>()
    );
    for (key, as_of) in &newest {
        // Later only if the clock passed the next hour meanwhile.
        assert!(stored[key] == *as_of || stored[key] > secs(hour), "{key:?}");
    }
    Ok(())
}

fn ms(time: DateTime<Utc>) -> u64 {
    time.timestamp_millis() as u64
}

fn secs(time: DateTime<Utc>) -> u32 {
    time.timestamp() as u32
}
