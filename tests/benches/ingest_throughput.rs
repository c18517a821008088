//! Ingest throughput (issue "Ingest at a million samples a second"): the
//! simulated fleet offers load at 1 Hz to the test broker for a warm-up and
//! then a measured window, while `idlemeter ingest` (the release binary, its
//! own process) compacts it into the test ClickHouse.
//!
//! This process is the simulator: it ticks the fleet once a second, encodes
//! one node batch per node and produces them (lz4, the bus default). It
//! prints, for the measured window: samples/s offered and consumed,
//! ClickHouse rows/s per table, CPU seconds and RSS of each process (this
//! one, ingest, ClickHouse, the broker), and the consumer lag at the start
//! and end. After the load it waits for ingest to write the last minutes and
//! checks exactness: the sum of the minute rows' seq spans equals the
//! samples sent, and for `CHECK_CUSTOMERS` customers the offline rating of
//! every sample sent equals the rating of what ClickHouse kept (the rater's
//! input), line by line, to the cent.
//!
//! `KILL_AT_S=n` SIGKILLs ingest at tick n of the load and starts it again
//! once its group session has expired (11 s), for the exactness check under
//! a crash; the rates of such a run are not comparable (ingest's counters
//! restart).
//!
//! `INGEST_REPLICAS=n` runs n ingest processes in one consumer group (their
//! metrics on consecutive ports, summed); with `IDLEMETER_CLICKHOUSE__CLUSTER`
//! set they write to a ClickHouse cluster, whose servers' CPU is read from
//! the pid files under `CLUSTER_RUN_DIR` (`make bench-scale-out`).
//!
//! `make bench` (defaults: 1,000,000 sandboxes on 2,000 nodes, 100,000
//! customers, 20 s warm-up, 120 s measured). Not a test. Last line:
//! `bench: <N> samples/s sustained over <S> s, exact: <yes|no>`, where N is
//! what ingest consumed per second over the window.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use idlemeter_core::{
    rate_report, BillingOptions, NumberedSample, PriceSheet, SessionOrConnection, UsageSample,
};
use idlemeter_simulator::{Fleet, FleetShape};
use idlemeter_tests::bench::{
    metric, pid_file, process_use, processes_use, produce_tick, setting, spawn_ingest, ProcessUse,
};
use idlemeter_tests::TestEnv;

/// The simulator allocates and frees a million samples a second, like
/// ingest, which runs on mimalloc too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SHEET_PATH: &str = "prices/e2b.toml";
const SHEET: &str = include_str!("../../prices/e2b.toml");

struct Snapshot {
    at: Instant,
    offered: u64,
    produced_messages: u64,
    consumed: f64,
    consumed_messages: f64,
    committed_lag: f64,
    samples_rows: u64,
    minute_rows: u64,
    me: ProcessUse,
    ingest: ProcessUse,
    clickhouse: ProcessUse,
    broker: ProcessUse,
}

/// The sum of one metric over the ingest replicas on `ports`.
async fn total(http: &reqwest::Client, ports: &[u16], name: &str) -> f64 {
    let mut sum = 0.0;
    for port in ports {
        sum += metric(http, *port, name).await;
    }
    sum
}

async fn rows(env: &TestEnv, table: &str) -> u64 {
    env.store
        .client()
        .query(&format!("SELECT count() FROM {table}"))
        .fetch_one::<u64>()
        .await
        .unwrap_or(0)
}

type Lines = BTreeMap<(String, String, String), (String, String)>;

fn lines(sheet: &PriceSheet, samples: Vec<UsageSample>) -> anyhow::Result<Lines> {
    let numbered: Vec<NumberedSample> = samples
        .into_iter()
        .enumerate()
        .map(|(index, sample)| NumberedSample {
            line: index as u64 + 1,
            sample,
        })
        .collect();
    let report = rate_report(
        sheet,
        &numbered,
        &SessionOrConnection,
        &BillingOptions::default(),
        Vec::new(),
    )?;
    let mut all = Lines::new();
    for bill in &report.customers {
        for line in &bill.lines {
            all.insert(
                (
                    bill.customer.to_string(),
                    format!("{}:{}", line.kind.as_str(), line.resource),
                    format!("{:?}", line.price_version),
                ),
                (
                    line.quantity_base.clone().unwrap_or_default(),
                    line.amount.to_string(),
                ),
            );
        }
        all.insert(
            (bill.customer.to_string(), "total".to_owned(), String::new()),
            (String::new(), bill.total.to_string()),
        );
    }
    Ok(all)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sandboxes = setting("SANDBOXES", 1_000_000) as usize;
    let nodes = setting("NODES", 2_000) as usize;
    let customers = setting("CUSTOMERS", 100_000) as usize;
    let warmup_s = setting("WARMUP_S", 20);
    let measure_s = setting("MEASURE_S", 120);
    let checked = setting("CHECK_CUSTOMERS", 100) as usize;
    let partitions = setting("PARTITIONS", 8) as i32;
    let metrics_port = setting("METRICS_PORT", 29465) as u16;
    let kill_at = setting("KILL_AT_S", 0);
    let replicas = setting("INGEST_REPLICAS", 1).max(1) as u16;
    let ports: Vec<u16> = (0..replicas).map(|n| metrics_port + n).collect();
    anyhow::ensure!(checked <= customers, "CHECK_CUSTOMERS above CUSTOMERS");

    let env = TestEnv::new("ingest_bench").await?;
    env.kafka
        .ensure_topics(&[
            (env.topics.samples.as_str(), partitions),
            (env.topics.samples_dead_letter.as_str(), 1),
        ])
        .await?;
    let cluster = env.clickhouse.cluster.clone();
    println!(
        "bench: {sandboxes} sandboxes on {nodes} nodes, {customers} customers, 1 Hz, {warmup_s} s warm-up + {measure_s} s measured, {partitions} partitions, {replicas} ingest replica(s), ClickHouse {}, database {}",
        cluster.as_deref().map_or("one server".to_owned(), |name| format!("cluster {name}")),
        env.clickhouse.database
    );
    let mut ingests = Vec::new();
    for port in &ports {
        ingests.push(spawn_ingest(&env, *port, SHEET_PATH)?);
    }
    let mut ingest_pids: Vec<u32> = ingests.iter().map(std::process::Child::id).collect();
    let mut restart_at: Option<Instant> = None;
    let clickhouse_pids: Vec<u32> = if cluster.is_some() {
        let dir = std::path::PathBuf::from(
            std::env::var("CLUSTER_RUN_DIR").unwrap_or_else(|_| ".run/cluster".to_owned()),
        );
        ["ch1.pid", "ch2.pid", "ch3.pid", "zookeeper.pid"]
            .iter()
            .filter_map(|name| std::fs::read_to_string(dir.join(name)).ok())
            .filter_map(|text| text.trim().parse().ok())
            .collect()
    } else {
        pid_file("clickhouse.pid").into_iter().collect()
    };
    let broker_pid = pid_file("tansu.pid").unwrap_or(0);
    let me = std::process::id();
    let http = reqwest::Client::new();

    let producer = env.kafka.producer("idlemeter-ingest-bench")?;
    let mut fleet = Fleet::new(FleetShape {
        sandboxes,
        nodes,
        customers,
        seed: 7,
        epoch: 1,
    });
    // The checked customers are cust-00000 .. : every sample sent for them
    // is kept here for the offline rating.
    let checked_ids: Vec<String> = (0..checked).map(|c| format!("cust-{c:05}")).collect();
    let last_checked = checked_ids.last().cloned().unwrap_or_default();
    let mut sent_for_checked: Vec<UsageSample> = Vec::new();

    let total_ticks = warmup_s + measure_s;
    let mut offered: u64 = 0;
    let mut produced_messages: u64 = 0;
    let mut behind_ticks = 0u64;
    let mut tick_seconds: Vec<f64> = Vec::new();
    let started = tokio::time::Instant::now();
    let mut window_start: Option<Snapshot> = None;
    let mut window_end: Option<Snapshot> = None;
    for tick in 0..=total_ticks {
        if tick == warmup_s || tick == total_ticks {
            let snapshot = Snapshot {
                at: Instant::now(),
                offered,
                produced_messages,
                consumed: total(&http, &ports, "idlemeter_ingest_samples_consumed_total").await,
                consumed_messages: total(&http, &ports, "idlemeter_ingest_messages_consumed_total")
                    .await,
                committed_lag: total(&http, &ports, "idlemeter_ingest_lag_messages").await,
                samples_rows: rows(&env, "usage_samples").await,
                minute_rows: rows(&env, "usage_minutes").await,
                me: process_use(me),
                ingest: processes_use(&ingest_pids),
                clickhouse: processes_use(&clickhouse_pids),
                broker: process_use(broker_pid),
            };
            if tick == warmup_s {
                window_start = Some(snapshot);
            } else {
                window_end = Some(snapshot);
                break;
            }
        }
        let due = started + Duration::from_secs(tick);
        if tokio::time::Instant::now() > due + Duration::from_millis(500) {
            behind_ticks += 1;
        }
        tokio::time::sleep_until(due).await;
        let begun = Instant::now();
        let now = chrono::Utc::now();
        let batches = fleet.tick(now);
        for (_, samples) in &batches {
            for sample in samples {
                if sample.customer.as_str() <= last_checked.as_str() {
                    sent_for_checked.push(sample.clone());
                }
            }
        }
        let (sent, messages) =
            produce_tick(&producer, &env.topics.samples, now, tick, &batches).await?;
        offered += sent;
        produced_messages += messages;
        tick_seconds.push(begun.elapsed().as_secs_f64());
        if kill_at > 0 && tick == kill_at {
            ingests[0].kill()?; // SIGKILL: no shutdown path runs
            ingests[0].wait()?;
            println!("bench: ingest SIGKILLed at tick {tick}; restarting it in 11 s");
            restart_at = Some(Instant::now() + Duration::from_secs(11));
        }
        if restart_at.is_some_and(|at| Instant::now() >= at) {
            restart_at = None;
            ingests[0] = spawn_ingest(&env, ports[0], SHEET_PATH)?;
            ingest_pids[0] = ingests[0].id();
            println!("bench: ingest restarted at tick {tick}");
        }
        if tick % 10 == 0 {
            let consumed = total(&http, &ports, "idlemeter_ingest_samples_consumed_total").await;
            println!(
                "bench: tick {tick}/{total_ticks}: {offered} offered, {consumed} consumed, tick took {:.2} s",
                begun.elapsed().as_secs_f64()
            );
        }
    }
    if restart_at.is_some() {
        ingests[0] = spawn_ingest(&env, ports[0], SHEET_PATH)?;
        println!("bench: ingest restarted after the load");
    }
    let (start, end) = (
        window_start.expect("the window starts after the warm-up"),
        window_end.expect("the window ends"),
    );
    let window_s = end.at.duration_since(start.at).as_secs_f64();
    let per_s = |a: f64, b: f64| (b - a) / window_s;
    let consumed_rate = per_s(start.consumed, end.consumed);
    println!(
        "bench: window {window_s:.1} s: offered {:.0} samples/s, consumed {consumed_rate:.0} samples/s ({} ticks started late)",
        per_s(start.offered as f64, end.offered as f64),
        behind_ticks
    );
    let mut sorted = tick_seconds.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "bench: producing a tick took median {:.2} s, max {:.2} s",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    println!(
        "bench: clickhouse usage_samples {:.0} rows/s, usage_minutes {:.0} rows/s",
        per_s(start.samples_rows as f64, end.samples_rows as f64),
        per_s(start.minute_rows as f64, end.minute_rows as f64)
    );
    for (name, a, b) in [
        ("simulator (this process)", start.me, end.me),
        ("ingest (every replica)", start.ingest, end.ingest),
        (
            "clickhouse (every server)",
            start.clickhouse,
            end.clickhouse,
        ),
        ("broker", start.broker, end.broker),
    ] {
        println!(
            "bench: {name}: {:.1} cpu s in the window ({:.2} cores), rss {} MiB at the end, peak {} MiB",
            b.cpu_s - a.cpu_s,
            (b.cpu_s - a.cpu_s) / window_s,
            b.rss_mib,
            b.peak_mib
        );
    }
    println!(
        "bench: consumer lag at the window's start: {:.0} messages unconsumed ({:.0} behind the committed offsets); at its end: {:.0} ({:.0})",
        start.produced_messages as f64 - start.consumed_messages,
        start.committed_lag,
        end.produced_messages as f64 - end.consumed_messages,
        end.committed_lag
    );

    // Drain: ingest consumes the rest, ends the quiet series and writes them.
    let drain_started = Instant::now();
    let mut covered = 0u64;
    while drain_started.elapsed() < Duration::from_secs(900) {
        covered = env.samples_covered().await.unwrap_or(0);
        if covered >= offered {
            break;
        }
        println!("bench: draining: {covered} of {offered} samples in the minute rows");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let spans_exact = covered == offered;
    println!(
        "bench: seq spans of the minute rows: {covered}, samples sent: {offered} ({})",
        if spans_exact { "equal" } else { "DIFFERENT" }
    );
    // Everything is written once the last series went quiet.
    tokio::time::sleep(Duration::from_secs(12)).await;

    let sheet = PriceSheet::from_toml(SHEET, SHEET_PATH)?;
    let first = checked_ids.first().cloned().unwrap_or_default();
    let stored = env
        .store
        .samples_for_rating_range(&first, &last_checked, 0, u64::MAX)
        .await?;
    let kept_rows = stored.len();
    let sent_count = sent_for_checked.len();
    let sent_lines = lines(&sheet, sent_for_checked)?;
    let stored_lines = lines(&sheet, stored)?;
    let differing: Vec<_> = sent_lines
        .iter()
        .filter(|(key, value)| stored_lines.get(*key) != Some(*value))
        .map(|(key, _)| key.clone())
        .collect();
    let customers_rated = sent_lines
        .keys()
        .filter(|(_, kind, _)| kind == "total")
        .count();
    let rating_exact = differing.is_empty() && sent_lines.len() == stored_lines.len();
    println!(
        "bench: {customers_rated} customers rated from {sent_count} samples sent and from the {kept_rows} ClickHouse kept: {} ({} of {} lines differ)",
        if rating_exact { "same lines, same cents" } else { "DIFFERENT" },
        differing.len(),
        sent_lines.len()
    );
    for key in differing.iter().take(5) {
        println!(
            "bench:   {key:?}: sent {:?}, stored {:?}",
            sent_lines.get(key),
            stored_lines.get(key)
        );
    }
    for ingest in &mut ingests {
        let _ = ingest.kill();
        let _ = ingest.wait();
    }
    println!(
        "bench: {replicas} ingest replica(s) on {}",
        cluster
            .as_deref()
            .map_or("one ClickHouse server".to_owned(), |name| format!(
                "ClickHouse cluster {name}"
            ))
    );
    let exact = spans_exact && rating_exact && customers_rated >= checked.min(100);
    println!(
        "bench: {:.0} samples/s sustained over {:.0} s, exact: {}",
        consumed_rate,
        window_s,
        if exact { "yes" } else { "no" }
    );
    Ok(())
}
