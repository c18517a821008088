//! Helpers shared by the benches that run the real processes: settings from
//! the environment, CPU and memory of a process, the release binary.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::TestEnv;

pub fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// CPU seconds (user + system) and resident / peak resident MiB of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessUse {
    pub cpu_s: f64,
    pub rss_mib: u64,
    pub peak_mib: u64,
}

impl std::ops::Add for ProcessUse {
    type Output = ProcessUse;

    /// Several processes as one: CPU and memory summed.
    fn add(self, other: ProcessUse) -> ProcessUse {
        ProcessUse {
            cpu_s: self.cpu_s + other.cpu_s,
            rss_mib: self.rss_mib + other.rss_mib,
            peak_mib: self.peak_mib + other.peak_mib,
        }
    }
}

/// The use of several processes together.
pub fn processes_use(pids: &[u32]) -> ProcessUse {
    pids.iter()
        .map(|pid| process_use(*pid))
        .fold(ProcessUse::default(), |total, one| total + one)
}

pub fn process_use(pid: u32) -> ProcessUse {
    let ticks_per_s = 100.0; // CLK_TCK on Linux
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the name: state is field 0, utime 11, stime 12.
    let cpu_s = (field(11) + field(12)) / ticks_per_s;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|line| line.starts_with(key))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    ProcessUse {
        cpu_s,
        rss_mib: kib("VmRSS:") / 1024,
        peak_mib: kib("VmHWM:") / 1024,
    }
}

pub fn pid_file(name: &str) -> Option<u32> {
    let run_dir = std::env::var("IDLEMETER_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".run/test"));
    std::fs::read_to_string(run_dir.join(name))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// One metric's value from ingest's `/metrics`.
pub async fn metric(http: &reqwest::Client, port: u16, name: &str) -> f64 {
    let Ok(response) = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    else {
        return f64::NAN;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Starts the release `idlemeter ingest` on `env`'s topic and database, its
/// metrics on `metrics_port`, its compaction rule from `sheet_path`.
pub fn spawn_ingest(env: &TestEnv, metrics_port: u16, sheet_path: &str) -> anyhow::Result<Child> {
    let binary = root().join("target/release/idlemeter");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: `make bench` builds it (cargo build --release)",
        binary.display()
    );
    let log = root().join(format!(".run/{}.ingest-{metrics_port}.log", env.group_id));
    Ok(Command::new(binary)
        .arg("ingest")
        .current_dir(root())
        .env("IDLEMETER_CLICKHOUSE__URL", &env.clickhouse.url)
        .env("IDLEMETER_CLICKHOUSE__DATABASE", &env.clickhouse.database)
        .env("IDLEMETER_KAFKA__BROKERS", &env.kafka.brokers)
        .env("IDLEMETER_TOPICS__SAMPLES", &env.topics.samples)
        .env(
            "IDLEMETER_TOPICS__SAMPLES_DEAD_LETTER",
            &env.topics.samples_dead_letter,
        )
        .env("IDLEMETER_INGEST__GROUP_ID", &env.group_id)
        .env("IDLEMETER_INGEST__QUIET_SERIES_MS", "10000")
        .env("IDLEMETER_RATER__SHEET", sheet_path)
        .env(
            "IDLEMETER_METRICS__LISTEN",
            format!("127.0.0.1:{metrics_port}"),
        )
        .env("RUST_LOG", "warn,idlemeter_ingest=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?)
}

/// Produces one tick of a simulated fleet (one message per node, keyed by
/// node) to `topic` and waits for every acknowledgement; returns the
/// samples and messages sent.
pub async fn produce_tick(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    now: chrono::DateTime<chrono::Utc>,
    tick: u64,
    batches: &[(idlemeter_core::NodeId, Vec<idlemeter_core::UsageSample>)],
) -> anyhow::Result<(u64, u64)> {
    let payloads: Vec<_> = batches
        .iter()
        .map(|(node, samples)| {
            (
                node,
                idlemeter_proto::encode_node_batch(node, now, tick, samples),
            )
        })
        .collect();
    let deliveries = payloads.iter().map(|(node, payload)| {
        producer.send(
            rdkafka::producer::FutureRecord::to(topic)
                .key(node.as_str())
                .payload(payload),
            std::time::Duration::from_secs(60),
        )
    });
    for delivery in futures::future::join_all(deliveries).await {
        delivery.map_err(|(error, _)| anyhow::anyhow!("produce: {error}"))?;
    }
    let samples = batches
        .iter()
        .map(|(_, samples)| samples.len() as u64)
        .sum();
    Ok((samples, batches.len() as u64))
}

/// The `p`th percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Serves the usage API for `env` on a free loopback port with its live
/// view fed from the samples topic (a tail consumer), as `idlemeter api`
/// runs it, and without rate limits or alert delivery. Returns the base URL
/// and the view.
pub async fn serve_api_with_live(
    env: &TestEnv,
    sheet: &str,
    sheet_path: &str,
) -> anyhow::Result<(String, std::sync::Arc<idlemeter_api::live::LiveView>)> {
    use rdkafka::consumer::Consumer;
    let billing = idlemeter_api::Billing::new(
        crate::sheet_source(sheet, sheet_path),
        idlemeter_core::BillingTerms::default(),
    )?;
    let view = std::sync::Arc::new(idlemeter_api::live::LiveView::new());
    let consumer = env.kafka.tail_consumer("idlemeter-test-live")?;
    consumer.subscribe(&[env.topics.samples.as_str()])?;
    let (sender, receiver) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(idlemeter_rater::feed_from_kafka(consumer, sender));
    tokio::spawn(idlemeter_api::live::follow(
        view.clone(),
        receiver,
        std::time::Duration::from_secs(300),
    ));
    let api = idlemeter_api::Api::new(
        env.store.clone(),
        billing,
        idlemeter_api::ApiConfig {
            alert_interval_s: 0,
            rate_limit_per_s: 0,
            ..idlemeter_api::ApiConfig::default()
        },
        &prometheus::Registry::new(),
    )
    .await?
    .with_live(view.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(api.serve(listener, std::future::pending()));
    Ok((base, view))
}
