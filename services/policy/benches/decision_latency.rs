//! Idle policy benchmark (not a test): prints figures, asserts nothing.
//!
//! 1. Engine alone: samples per second through `Engine::observe` for
//!    `SANDBOXES` sandboxes (pure CPU, no servers).
//! 2. Service end to end, against the broker and ClickHouse named by
//!    `IDLEMETER_KAFKA__BROKERS` / `IDLEMETER_CLICKHOUSE__URL`: `SANDBOXES`
//!    sandboxes on `NODES` nodes tick once a second with real timestamps; each
//!    sandbox's session closes at a staggered second, so from tick `WINDOW_S`
//!    on about `SANDBOXES / WINDOW_S` windows close every second. For every
//!    command read back from Kafka: read time minus the timestamp of the sample
//!    that closed the window (which is also when it was produced). Prints p50,
//!    p99 and max.
//!
//! `SANDBOXES` is a comma-separated list of fleet sizes (default
//! `100000,1000000`), each run in turn. Last line:
//! `bench: policy sample -> command readable: <n> sandboxes p50 <a> ms p99 <b> ms, ...`
//!
//!   scripts/bench-policy.sh        (starts the test servers, then this)
//!   SANDBOXES=100000 NODES=100 WINDOW_S=10 TICKS=25 cargo bench -p idlemeter-policy --bench decision_latency

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use idlemeter_bus::{KafkaSettings, Topics};
use idlemeter_core::policy::{Engine, Input, Policy};
use idlemeter_core::{CustomerId, Epoch, NodeId, SandboxId, UsageSample, VcpuMillis};
use idlemeter_policy::{PolicyConfig, PolicyService};
use idlemeter_proto::{decode_command, encode_node_batch};
use idlemeter_store::{ClickHouseSettings, Store};
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;
use rdkafka::Message;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn policy_text(window_s: u64) -> String {
    format!(
        "[policy]\nname = \"bench\"\nversion = \"1\"\n[rules]\nidle_window_s = {window_s}\nreissue_after_s = 3600\n"
    )
}

/// Sandbox `index`'s sample at `tick`: a session open until tick `index % window`.
fn sample(
    index: u64,
    nodes: u64,
    tick: u64,
    window_s: u64,
    ts: chrono::DateTime<Utc>,
) -> UsageSample {
    UsageSample {
        vcpu: VcpuMillis(1000),
        mem_bytes: 1 << 30,
        cpu_used_usec: tick * 10_000,
        vcpu_alloc_usec: tick * 1_000_000,
        exec_sessions: u32::from(tick <= index % window_s),
        ..UsageSample::blank(
            CustomerId::parse(format!("cust-{:04}", index % 1000)).expect("id"),
            NodeId::parse(format!("node-{:03}", index % nodes)).expect("id"),
            SandboxId::parse(format!("sbx-{index:07}")).expect("id"),
            Epoch(1),
            tick + 1,
            ts,
        )
    }
}

fn engine_alone(sandboxes: u64, window_s: u64) {
    let policy = Policy::from_toml(&policy_text(window_s), "bench.toml").expect("valid policy");
    let start = Utc
        .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .single()
        .expect("time");
    let ticks = 2 * window_s + 2;
    // One tick's samples at a time (a million sandboxes' whole run would not
    // fit in memory); only `observe` is timed.
    let tick_inputs = |tick: u64| -> Vec<Input> {
        (0..sandboxes)
            .map(|index| {
                Input::Sample(sample(
                    index,
                    100,
                    tick,
                    window_s,
                    start + chrono::Duration::seconds(tick as i64),
                ))
            })
            .collect()
    };
    let mut rates = Vec::new();
    for _ in 0..3 {
        let mut engine = Engine::new(policy.clone());
        let mut observing = Duration::ZERO;
        let mut decisions = 0usize;
        for tick in 0..ticks {
            let inputs = tick_inputs(tick);
            let began = Instant::now();
            for input in &inputs {
                decisions += engine.observe(input).len();
            }
            observing += began.elapsed();
        }
        assert_eq!(decisions as u64, sandboxes, "one decision per sandbox");
        rates.push((ticks * sandboxes) as f64 / observing.as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "engine: {} samples of {sandboxes} sandboxes, median of 3 runs: {:.0} samples/s ({:.2} µs/sample)",
        ticks * sandboxes,
        rates[1],
        1e6 / rates[1]
    );
}

/// Sandbox `index` goes idle at tick `index % window_s` and is decided once
/// it has been idle for `window_s` ticks, if the run lasts that long.
fn expected_commands(sandboxes: u64, window_s: u64, ticks: u64) -> usize {
    (0..sandboxes)
        .filter(|index| index % window_s + window_s < ticks)
        .count()
}

fn quantile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank]
}

async fn service_end_to_end(
    sandboxes: u64,
    nodes: u64,
    window_s: u64,
    ticks: u64,
) -> anyhow::Result<(i64, i64)> {
    let run = format!("bench_policy_{}_{sandboxes}", std::process::id());
    let kafka = KafkaSettings {
        brokers: std::env::var("IDLEMETER_KAFKA__BROKERS")
            .unwrap_or_else(|_| "127.0.0.1:29092".to_owned()),
        ..KafkaSettings::default()
    };
    let clickhouse = ClickHouseSettings {
        url: std::env::var("IDLEMETER_CLICKHOUSE__URL")
            .unwrap_or_else(|_| "http://127.0.0.1:28123".to_owned()),
        database: run.clone(),
        user: "default".to_owned(),
        password: Default::default(),
        cluster: None,
        max_replica_delay_s: idlemeter_store::DEFAULT_MAX_REPLICA_DELAY_S,
    };
    let topics = Topics {
        samples: format!("{run}.samples"),
        samples_dead_letter: format!("{run}.dlq"),
        commands: format!("{run}.commands"),
        leases: format!("{run}.leases"),
        events: format!("{run}.events"),
        ..Topics::default()
    };
    let store = Store::new(&clickhouse);
    store.migrate(0).await?;
    kafka
        .ensure_topics(&[
            (topics.samples.as_str(), 8),
            (topics.commands.as_str(), 8),
            (topics.leases.as_str(), 1),
        ])
        .await?;
    let registry = prometheus::Registry::new();
    let service = PolicyService::build(
        &kafka,
        store,
        topics.clone(),
        PolicyConfig {
            file: "bench.toml".to_owned(),
            group_id: run.clone(),
            ..PolicyConfig::default()
        },
        &policy_text(window_s),
        &registry,
    )
    .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(service.run_until_stopped(async {
        let _ = stopped.await;
    }));
    // Read as a collector reads its commands.
    let reader = kafka.prompt_consumer("bench-reader", &format!("{run}.reader"))?;
    reader.subscribe(&[topics.commands.as_str()])?;
    // A saturated service (a million sandboxes on two cores) sends its first
    // command long after the first sample: read until every expected command
    // arrived, giving up only after two minutes without one.
    let expected = expected_commands(sandboxes, window_s, ticks);
    let collect = tokio::spawn(async move {
        let mut delays_ms = Vec::new();
        while delays_ms.len() < expected {
            let Ok(Ok(message)) =
                tokio::time::timeout(Duration::from_secs(120), reader.recv()).await
            else {
                break;
            };
            let command = decode_command(message.payload().unwrap_or_default()).expect("a command");
            delays_ms.push(Utc::now().timestamp_millis() - command.issued_unix_ms);
            if delays_ms.len() % 10_000 == 0 {
                eprintln!("bench: {} of {expected} commands read", delays_ms.len());
            }
        }
        delays_ms
    });

    let producer = kafka.producer("bench-producer")?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut late_ticks = 0;
    for tick in 0..ticks {
        ticker.tick().await;
        let began = Instant::now();
        let now = Utc::now();
        let mut by_node: Vec<Vec<UsageSample>> = vec![Vec::new(); nodes as usize];
        for index in 0..sandboxes {
            by_node[(index % nodes) as usize].push(sample(index, nodes, tick, window_s, now));
        }
        let sends = by_node.iter().enumerate().map(|(node, samples)| {
            let node_id = NodeId::parse(format!("node-{node:03}")).expect("id");
            let payload = encode_node_batch(&node_id, now, tick, samples);
            let producer = producer.clone();
            let topic = topics.samples.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(node_id.as_str())
                            .payload(&payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(error, _)| error)
            }
        });
        for sent in futures::future::join_all(sends).await {
            sent?;
        }
        if began.elapsed() > Duration::from_secs(1) {
            late_ticks += 1;
        }
        eprintln!(
            "bench: tick {tick}/{ticks} produced in {} ms",
            began.elapsed().as_millis()
        );
    }
    let mut delays = collect.await?;
    let _ = stop.send(());
    service.await??;
    delays.sort_unstable();
    let mean_ms = |name: &str| {
        let (sum, count) = registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().iter())
            .map(|metric| {
                (
                    metric.get_histogram().get_sample_sum(),
                    metric.get_histogram().get_sample_count(),
                )
            })
            .fold((0.0, 0), |(s, c), (ms, mc)| (s + ms, c + mc));
        1000.0 * sum / (count.max(1) as f64)
    };
    println!(
        "service: inside the policy service: message produced -> consumed mean {:.0} ms; deciding sample -> command and row acknowledged mean {:.0} ms",
        mean_ms("idlemeter_policy_consume_delay_seconds"),
        mean_ms("idlemeter_policy_decision_delay_seconds"),
    );
    println!(
        "service: {sandboxes} sandboxes on {nodes} nodes, window {window_s} s, {ticks} ticks: {} commands ({} expected)",
        delays.len(),
        expected
    );
    println!(
        "service: sample -> command readable on Kafka: p50 {} ms, p99 {} ms, max {} ms; {late_ticks} ticks took longer than 1 s to produce",
        quantile(&delays, 0.5),
        quantile(&delays, 0.99),
        delays.last().copied().unwrap_or(0)
    );
    Ok((quantile(&delays, 0.5), quantile(&delays, 0.99)))
}

fn main() -> anyhow::Result<()> {
    let fleets: Vec<u64> = std::env::var("SANDBOXES")
        .unwrap_or_else(|_| "100000,1000000".to_owned())
        .split(',')
        .map(|count| count.trim().parse())
        .collect::<Result<_, _>>()?;
    // Default: a thousand sandboxes a node.
    let nodes_setting = env_or("NODES", 0);
    let window_s = env_or("WINDOW_S", 10);
    let ticks = env_or("TICKS", 25);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut summary = Vec::new();
    for sandboxes in fleets {
        engine_alone(sandboxes, window_s);
        if std::env::var("ENGINE_ONLY").is_ok() {
            continue;
        }
        let nodes = match nodes_setting {
            0 => (sandboxes / 1000).max(1),
            nodes => nodes,
        };
        let (p50, p99) = runtime.block_on(service_end_to_end(sandboxes, nodes, window_s, ticks))?;
        summary.push(format!("{sandboxes} sandboxes p50 {p50} ms p99 {p99} ms"));
    }
    println!(
        "bench: policy sample -> command readable: {}",
        summary.join(", ")
    );
    Ok(())
}
