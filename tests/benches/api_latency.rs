//! Sample to API latency (issue "Ingest at a million samples a second"):
//! how long after a sample is taken the usage API shows it.
//!
//! The simulated fleet (this process) produces at 1 Hz to the test broker;
//! `idlemeter ingest` (the release binary) compacts into the test
//! ClickHouse; the API runs here with its live view fed by a tail consumer,
//! as `idlemeter api` runs it. `PROBED` pollers, one per probed sandbox, ask
//! `GET /v1/customers/{c}/sandboxes/{s}` every 50 ms; each time a sandbox's
//! `last_seen` moves on during the measured window, the latency of that
//! sample is the time since it was taken (its timestamp, the tick time).
//! The 50 ms poll is part of the figure.
//!
//! `make bench-latency` (defaults: 100,000 sandboxes on 200 nodes, 1,000
//! customers, 10 s warm-up + 120 s measured, 20 probed sandboxes). Not a
//! test. Last line: `bench: sample to API p50 <x> s, p99 <y> s at <N> samples/s`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use idlemeter_api::auth::generate;
use idlemeter_simulator::{Fleet, FleetShape};
use idlemeter_tests::bench::{
    percentile, process_use, produce_tick, serve_api_with_live, setting, spawn_ingest,
};
use idlemeter_tests::TestEnv;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SHEET_PATH: &str = "prices/e2b.toml";
const SHEET: &str = include_str!("../../prices/e2b.toml");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sandboxes = setting("SANDBOXES", 100_000) as usize;
    let nodes = setting("NODES", 200) as usize;
    let customers = setting("CUSTOMERS", 1_000) as usize;
    let warmup_s = setting("WARMUP_S", 10);
    let measure_s = setting("MEASURE_S", 120);
    let probed = setting("PROBED", 20) as usize;
    let metrics_port = setting("METRICS_PORT", 29468) as u16;
    let env = TestEnv::new("latency_bench").await?;
    env.kafka
        .ensure_topics(&[
            (env.topics.samples.as_str(), 8),
            (env.topics.samples_dead_letter.as_str(), 1),
        ])
        .await?;
    println!(
        "bench: {sandboxes} sandboxes on {nodes} nodes, {customers} customers, 1 Hz, {warmup_s} s warm-up + {measure_s} s measured, {probed} probed, database {}",
        env.clickhouse.database
    );
    let mut ingest = spawn_ingest(&env, metrics_port, SHEET_PATH)?;

    let key = generate(None, "bench", 0);
    env.store.insert_api_key(&key.row).await?;
    let (base, view) = serve_api_with_live(&env, SHEET, SHEET_PATH).await?;

    // Sandboxes spread over the fleet; sandbox i belongs to cust-(i % customers).
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let probes: Vec<_> = (0..probed)
        .map(|probe| {
            let index = probe * (sandboxes / probed.max(1)).max(1) + probe % 7;
            let url = format!(
                "{base}/v1/customers/cust-{:05}/sandboxes/sbx-{index:07}",
                index % customers.max(1)
            );
            let (measuring, done, key) = (measuring.clone(), done.clone(), key.key.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut seen: Option<DateTime<Utc>> = None;
                let mut latencies = Vec::new();
                let mut failures = 0u64;
                while !done.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let Ok(response) = http.get(&url).bearer_auth(&key).send().await else {
                        failures += 1;
                        continue;
                    };
                    if !response.status().is_success() {
                        continue;
                    }
                    let Ok(body) = response.json::<serde_json::Value>().await else {
                        failures += 1;
                        continue;
                    };
                    let Some(last_seen) = body["last_seen"]
                        .as_str()
                        .and_then(|text| text.parse::<DateTime<Utc>>().ok())
                    else {
                        continue;
                    };
                    if seen.is_some_and(|seen| last_seen <= seen) {
                        continue;
                    }
                    let first = seen.is_none();
                    seen = Some(last_seen);
                    if !first && measuring.load(Ordering::Relaxed) {
                        let latency = (Utc::now() - last_seen).num_milliseconds() as f64 / 1e3;
                        latencies.push(latency);
                    }
                }
                (latencies, failures)
            })
        })
        .collect();

    let producer = env.kafka.producer("idlemeter-latency-bench")?;
    let mut fleet = Fleet::new(FleetShape {
        sandboxes,
        nodes,
        customers,
        seed: 11,
        epoch: 1,
    });
    let started = tokio::time::Instant::now();
    let mut offered = 0u64;
    let mut window: Option<(Instant, u64, f64, f64)> = None;
    let ingest_pid = ingest.id();
    let me = std::process::id();
    for tick in 0..warmup_s + measure_s {
        if tick == warmup_s {
            measuring.store(true, Ordering::Relaxed);
            window = Some((
                Instant::now(),
                offered,
                process_use(me).cpu_s,
                process_use(ingest_pid).cpu_s,
            ));
        }
        tokio::time::sleep_until(started + Duration::from_secs(tick)).await;
        let now = Utc::now();
        let batches = fleet.tick(now);
        let (sent, _) = produce_tick(&producer, &env.topics.samples, now, tick, &batches).await?;
        offered += sent;
        if tick % 10 == 0 {
            println!(
                "bench: tick {tick}: {offered} offered, {} sandboxes in the live view",
                view.len()
            );
        }
    }
    let (window_started, offered_before, my_cpu, ingest_cpu) =
        window.expect("the window starts after the warm-up");
    let window_s = window_started.elapsed().as_secs_f64();
    let rate = (offered - offered_before) as f64 / window_s;
    measuring.store(false, Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut failures = 0;
    for probe in probes {
        let (mut some, failed) = probe.await?;
        latencies.append(&mut some);
        failures += failed;
    }
    println!(
        "bench: this process (simulator, API, live view): {:.2} cores; ingest {:.2} cores",
        (process_use(me).cpu_s - my_cpu) / window_s,
        (process_use(ingest_pid).cpu_s - ingest_cpu) / window_s
    );
    let _ = ingest.kill();
    let _ = ingest.wait();
    anyhow::ensure!(
        !latencies.is_empty(),
        "no sample observed ({failures} failed polls)"
    );
    latencies.sort_by(f64::total_cmp);
    println!(
        "bench: {} samples observed by {probed} pollers, {failures} failed polls, max {:.3} s",
        latencies.len(),
        latencies[latencies.len() - 1]
    );
    println!(
        "bench: sample to API p50 {:.3} s, p99 {:.3} s at {rate:.0} samples/s",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0)
    );
    Ok(())
}
