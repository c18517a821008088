//! Live cost latency (issue "Money from counters"): from the moment a sample
//! is taken to the moment `GET /customers/{c}/cost` shows the cost that
//! includes it, with the simulated fleet producing at full rate.
//!
//! Everything runs for real on this machine: the simulator produces node
//! batches to the test broker, ingest stores them in the test ClickHouse, the
//! rater rates the open hour every `LIVE_INTERVAL_S` (1) into live figures,
//! from the samples topic (the `kafka` live source), and the API serves
//! `/cost`. A probe polls `/cost` of each of `PROBED` customers every
//! 100 ms, one poller each; each time a customer's `as_of` (the second of the newest
//! sample rated) moves on, the newest tick taken in that second is rated,
//! and its latency is the time since that tick was taken.
//!
//! `make bench-live` (defaults: 100,000 sandboxes on 200 nodes, 1 Hz, 60
//! ticks, 1,000 customers). Not a test. Last line:
//! `live cost at N samples/s offered: sample -> /cost p50 X s, p99 Y s (target p99 <= 2 s)`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use idlemeter_api::auth::generate;
use idlemeter_api::{Api, ApiConfig};
use idlemeter_ingest::{Ingest, IngestConfig};
use idlemeter_proto::encode_node_batch;
use idlemeter_rater::{Period, Rater, RaterConfig};
use idlemeter_simulator::{Fleet, FleetShape};
use idlemeter_tests::bench::{percentile, setting};
use idlemeter_tests::TestEnv;
use rdkafka::producer::FutureRecord;

const SHEET: &str = include_str!("../../prices/sprites.toml");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sandboxes = setting("SANDBOXES", 100_000) as usize;
    let nodes = setting("NODES", 200) as usize;
    let customers = setting("CUSTOMERS", 1_000) as usize;
    let ticks = setting("TICKS", 60);
    let probed = setting("PROBED", 5) as usize;
    let live_interval = setting("LIVE_INTERVAL_S", 1);
    let env = TestEnv::new("live_bench").await?;
    env.kafka
        .ensure_topics(&[(env.topics.samples.as_str(), 8)])
        .await?;
    println!(
        "live bench: {sandboxes} sandboxes on {nodes} nodes, {customers} customers, {ticks} ticks at 1 Hz, database {}",
        env.clickhouse.database
    );

    let registry = prometheus::Registry::new();
    let ingest = Ingest::build(
        &env.kafka,
        &env.clickhouse,
        env.topics.clone(),
        IngestConfig {
            group_id: env.group_id.clone(),
            ..IngestConfig::default()
        },
        &registry,
    )?;
    let (stop_ingest, ingest_stopped) = tokio::sync::oneshot::channel::<()>();
    let ingest_task = tokio::spawn(ingest.run_until_stopped(async {
        let _ = ingest_stopped.await;
    }));

    let rater_registry = prometheus::Registry::new();
    let rater = Rater::new(
        env.store.clone(),
        SHEET,
        RaterConfig {
            sheet: "prices/sprites.toml".to_owned(),
            live_interval_seconds: live_interval,
            live_lateness_seconds: 2,
            ..RaterConfig::default()
        },
        &rater_registry,
    )?
    .with_terms(idlemeter_tests::terms(Period::Month))?;
    // Live figures from the stream, as `idlemeter rater` runs by default.
    let consumer = env.kafka.tail_consumer("idlemeter-rater-live")?;
    rdkafka::consumer::Consumer::subscribe(&consumer, &[env.topics.samples.as_str()])?;
    let (sender, feed) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(idlemeter_rater::feed_from_kafka(consumer, sender));
    let rater = rater.with_live_feed(feed);
    {
        let registry = rater_registry.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                println!(
                    "live bench: rater so far: {} live figures, {} samples read",
                    idlemeter_tests::counter_in(
                        &registry,
                        "idlemeter_rater_live_figures_written_total"
                    ),
                    idlemeter_tests::counter_in(&registry, "idlemeter_rater_samples_read_total")
                );
            }
        });
    }
    let (stop_rater, rater_stopped) = tokio::sync::oneshot::channel::<()>();
    let rater_task = tokio::spawn(rater.run_until_stopped(async {
        let _ = rater_stopped.await;
    }));

    let key = generate(None, "bench", 0);
    env.store.insert_api_key(&key.row).await?;
    let billing = idlemeter_api::Billing::new(
        idlemeter_tests::sheet_source(SHEET, "prices/sprites.toml"),
        idlemeter_core::BillingTerms::default(),
    )?;
    let api = Api::new(
        env.store.clone(),
        billing,
        ApiConfig {
            alert_interval_s: 0,
            rate_limit_per_s: 0,
            ..ApiConfig::default()
        },
        &prometheus::Registry::new(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(api.serve(listener, std::future::pending()));

    // Tick times by second, for the probe to find the tick an as_of covers.
    let taken: Arc<Mutex<BTreeMap<i64, DateTime<Utc>>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One poller per probed customer, so one slow answer delays no other.
    let probes: Vec<_> = (0..probed)
        .map(|customer| {
            let (taken, done, base, key) =
                (taken.clone(), done.clone(), base.clone(), key.key.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let url = format!("{base}/v1/customers/cust-{customer:05}/cost");
                let mut seen = i64::MIN;
                let mut latencies = Vec::new();
                let mut failures = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let answer = http.get(&url).bearer_auth(&key).send().await;
                    let Ok(Ok(body)) = answer.map(|response| response.error_for_status()) else {
                        failures += 1;
                        continue;
                    };
                    let Ok(body) = body.json::<serde_json::Value>().await else {
                        failures += 1;
                        continue;
                    };
                    let Some(as_of) = body["as_of"]
                        .as_str()
                        .and_then(|text| text.parse::<DateTime<Utc>>().ok())
                    else {
                        continue;
                    };
                    let now = Utc::now();
                    let second = as_of.timestamp();
                    if second <= seen || body["provisional"] != serde_json::Value::Bool(true) {
                        continue;
                    }
                    seen = second;
                    if let Some(tick) = taken.lock().expect("not poisoned").get(&second) {
                        latencies.push((now - *tick).num_milliseconds() as f64 / 1e3);
                    }
                }
                (latencies, failures)
            })
        })
        .collect();

    let producer = env.kafka.producer("idlemeter-live-bench")?;
    let mut fleet = Fleet::new(FleetShape {
        sandboxes,
        nodes,
        customers,
        seed: 7,
        epoch: u64::try_from(Utc::now().timestamp()).unwrap_or(1),
    });
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0usize;
    for tick in 1..=ticks {
        ticker.tick().await;
        let now = Utc::now();
        taken
            .lock()
            .expect("not poisoned")
            .insert(now.timestamp(), now);
        let mut deliveries = tokio::task::JoinSet::new();
        for (node, samples) in fleet.tick(now) {
            sent += samples.len();
            let payload = encode_node_batch(&node, now, tick, &samples);
            let (producer, topic) = (producer.clone(), env.topics.samples.clone());
            deliveries.spawn(async move {
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(node.as_str())
                            .payload(&payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(error, _)| error)
            });
        }
        while let Some(delivery) = deliveries.join_next().await {
            delivery??;
        }
        if tick % 10 == 0 {
            println!(
                "live bench: tick {tick}/{ticks}, {sent} samples produced in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let offered = sent as f64 / started.elapsed().as_secs_f64();
    // Let the last ticks through before stopping the probe.
    tokio::time::sleep(Duration::from_secs(10)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut latencies, mut failures) = (Vec::new(), 0);
    for probe in probes {
        let (more, failed) = probe.await?;
        latencies.extend(more);
        failures += failed;
    }
    stop_rater.send(()).ok();
    stop_ingest.send(()).ok();
    rater_task.await??;
    ingest_task.await??;
    let stored: u64 = env
        .store
        .client()
        .query("SELECT count() FROM usage_samples")
        .fetch_one()
        .await?;
    let figures = idlemeter_tests::counter_in(
        &rater_registry,
        "idlemeter_rater_live_figures_written_total",
    );
    println!(
        "live bench: {sent} samples produced, {stored} stored; {figures} live figures written ({:.1} per customer-second); {} latencies observed, {failures} probe failures",
        figures as f64 / customers as f64 / started.elapsed().as_secs_f64(),
        latencies.len()
    );
    anyhow::ensure!(!latencies.is_empty(), "no live figure was observed");
    latencies.sort_by(f64::total_cmp);
    println!(
        "live cost at {:.0} samples/s offered: sample -> /cost p50 {:.2} s, p99 {:.2} s (target p99 <= 2 s)",
        offered,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0)
    );
    Ok(())
}
