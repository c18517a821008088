//! Test harness: every test gets its own ClickHouse database and its own Kafka
//! topics and consumer group on the real servers that `scripts/services.sh start`
//! runs, so tests run in parallel without seeing each other.
//!
//! Servers are found through the same variables the services read:
//! `IDLEMETER_CLICKHOUSE__URL` (default `http://127.0.0.1:18123`) and
//! `IDLEMETER_KAFKA__BROKERS` (default `127.0.0.1:19092`). A test fails, never
//! skips, when they are not there.

pub mod bench;
pub mod collector;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use idlemeter_bus::{KafkaSettings, Topics};
use idlemeter_core::{
    CounterSet, CustomerId, Epoch, LifecycleState, NodeId, SandboxId, StateCounters, UsageSample,
    VcpuMillis,
};
use idlemeter_ingest::{Ingest, IngestConfig};
use idlemeter_store::{ClickHouseSettings, Store};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// One test's private slice of the real servers.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub kafka: KafkaSettings,
    pub clickhouse: ClickHouseSettings,
    pub topics: Topics,
    pub group_id: String,
    pub store: Store,
    /// This test's ledger: its own schema of the test PostgreSQL database.
    pub ledger_settings: idlemeter_ledger::LedgerSettings,
}

impl TestEnv {
    /// A fresh, migrated database and fresh topics named after `test_name`.
    pub async fn new(test_name: &str) -> anyhow::Result<Self> {
        let unique = format!(
            "{test_name}_{}_{}_{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed),
            Utc::now().timestamp_millis() % 100_000
        );
        let clickhouse = ClickHouseSettings {
            url: std::env::var("IDLEMETER_CLICKHOUSE__URL")
                .unwrap_or_else(|_| "http://127.0.0.1:18123".to_owned()),
            database: format!("test_{unique}"),
            user: "default".to_owned(),
            password: Default::default(),
            cluster: std::env::var("IDLEMETER_CLICKHOUSE__CLUSTER").ok(),
            max_replica_delay_s: idlemeter_store::DEFAULT_MAX_REPLICA_DELAY_S,
        };
        let kafka = KafkaSettings {
            brokers: std::env::var("IDLEMETER_KAFKA__BROKERS")
                .unwrap_or_else(|_| "127.0.0.1:19092".to_owned()),
            // The suite's broker is tansu (see tests/tests/broker_offsets.rs):
            // `make test` sets this; benchmarks keep librdkafka's batching.
            single_message_batches: std::env::var("IDLEMETER_KAFKA__SINGLE_MESSAGE_BATCHES")
                .is_ok_and(|value| value == "true"),
            ..KafkaSettings::default()
        };
        let topics = Topics {
            samples: format!("{unique}.usage.samples"),
            samples_dead_letter: format!("{unique}.usage.samples.dlq"),
            commands: format!("{unique}.sandbox.commands"),
            leases: format!("{unique}.sandbox.leases"),
            events: format!("{unique}.usage.events"),
            ..Topics::default()
        };
        let store = Store::new(&clickhouse);
        store.ping().await.map_err(|error| {
            anyhow::anyhow!("clickhouse at {} is not reachable ({error}); start it with `scripts/services.sh start`", clickhouse.url)
        })?;
        store.migrate(0).await?;
        kafka
            .ensure_topics(&[
                (topics.samples.as_str(), 3),
                (topics.samples_dead_letter.as_str(), 1),
            ])
            .await?;
        let ledger_settings = idlemeter_ledger::LedgerSettings {
            url: std::env::var("IDLEMETER_LEDGER__URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:15432/idlemeter".to_owned())
                .as_str()
                .into(),
            schema: format!("test_{}", unique.to_ascii_lowercase()),
            ..idlemeter_ledger::LedgerSettings::default()
        };
        Ok(Self {
            kafka,
            clickhouse,
            topics,
            group_id: format!("{unique}.ingest"),
            store,
            ledger_settings,
        })
    }

    /// This test's ledger (PostgreSQL), migrated.
    pub async fn ledger(&self) -> anyhow::Result<idlemeter_ledger::Ledger> {
        let ledger = idlemeter_ledger::Ledger::connect(&self.ledger_settings).await?;
        ledger.migrate().await.map_err(|error| {
            anyhow::anyhow!(
                "ledger at {} ({error}); start it with `scripts/services.sh start`",
                self.ledger_settings.url.expose()
            )
        })?;
        Ok(ledger)
    }

    /// Moves this test's Kafka side to another broker (a [`PrivateBroker`])
    /// and creates the test's topics there.
    pub async fn use_broker(&mut self, brokers: String) -> anyhow::Result<()> {
        self.kafka.brokers = brokers;
        self.kafka
            .ensure_topics(&[
                (self.topics.samples.as_str(), 3),
                (self.topics.samples_dead_letter.as_str(), 1),
            ])
            .await?;
        Ok(())
    }

    /// Ingest settings tuned for tests: small batches, short waits.
    pub fn ingest_config(&self) -> IngestConfig {
        IngestConfig {
            group_id: self.group_id.clone(),
            batch_max_samples: 1_000,
            batch_max_wait_ms: 50,
            compact: true,
            // A stream that stops is written out a second later.
            quiet_series_ms: 1_000,
            retry_initial_backoff_ms: 50,
            retry_max_backoff_ms: 500,
            // The fixtures' timestamps are fixed dates: the default window
            // (400 days) would refuse them once they age; `hardening.rs`
            // tests the window itself.
            max_sample_age_s: 100 * 365 * 86_400,
            ..IngestConfig::default()
        }
    }

    /// Starts an in-process ingest worker; stop it with [`RunningIngest::stop`].
    pub fn start_ingest(&self, clickhouse: &ClickHouseSettings) -> anyhow::Result<RunningIngest> {
        self.start_ingest_with(clickhouse, self.ingest_config())
    }

    /// Starts an in-process ingest worker with `config`.
    pub fn start_ingest_with(
        &self,
        clickhouse: &ClickHouseSettings,
        config: IngestConfig,
    ) -> anyhow::Result<RunningIngest> {
        let registry = prometheus::Registry::new();
        let ingest = Ingest::build(
            &self.kafka,
            clickhouse,
            self.topics.clone(),
            config,
            &registry,
        )?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            ingest
                .run_until_stopped(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(RunningIngest {
            stop,
            task,
            registry,
        })
    }

    pub fn producer(&self) -> anyhow::Result<FutureProducer> {
        Ok(self.kafka.producer("idlemeter-test-producer")?)
    }

    /// Produces raw bytes to the samples topic and waits for the broker's ack.
    pub async fn produce(
        &self,
        producer: &FutureProducer,
        key: &str,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        producer
            .send(
                FutureRecord::to(&self.topics.samples)
                    .key(key)
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| anyhow::anyhow!("produce to {}: {error}", self.topics.samples))?;
        Ok(())
    }

    /// Produces a keep-alive lease (JSON, keyed by sandbox) to the leases
    /// topic: the platform's wake request while the sandbox is suspended.
    pub async fn produce_lease(
        &self,
        producer: &FutureProducer,
        customer: &str,
        sandbox: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<()> {
        let lease = serde_json::json!({
            "customer": customer,
            "sandbox": sandbox,
            "until": until.to_rfc3339(),
            "holder": "platform",
        });
        producer
            .send(
                FutureRecord::to(&self.topics.leases)
                    .key(&format!("{customer}/{sandbox}"))
                    .payload(&serde_json::to_vec(&lease)?),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| anyhow::anyhow!("produce to {}: {error}", self.topics.leases))?;
        Ok(())
    }

    /// Reads `count` messages of the dead-letter topic from its start.
    pub async fn dead_letters(&self, count: usize) -> anyhow::Result<Vec<DeadLetterRead>> {
        use rdkafka::consumer::Consumer as _;
        use rdkafka::message::Headers as _;
        use rdkafka::Message as _;
        let consumer = self.kafka.consumer(
            "dlq-reader",
            &format!("{}.dlq-reader-{}", self.group_id, rand_suffix()),
        )?;
        consumer.subscribe(&[self.topics.samples_dead_letter.as_str()])?;
        let mut letters = Vec::new();
        while letters.len() < count {
            let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
            let header = |name: &str| {
                message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|header| header.key == name)
                        .and_then(|header| header.value)
                        .map(|value| String::from_utf8_lossy(value).into_owned())
                })
            };
            letters.push(DeadLetterRead {
                reason: header(idlemeter_bus::DEAD_LETTER_REASON_HEADER)
                    .ok_or_else(|| anyhow::anyhow!("dead letter without a reason header"))?,
                omitted: header(idlemeter_bus::DEAD_LETTER_OMITTED_HEADER),
                payload: message.payload().unwrap_or_default().to_vec(),
            });
        }
        Ok(letters)
    }

    /// Stores samples as ingest would: compacted, with their minute rows.
    pub async fn store_as_ingest(&self, samples: &[UsageSample]) -> anyhow::Result<()> {
        let compacted = idlemeter_core::compact_all(
            samples.iter().cloned(),
            idlemeter_core::CompactRule::EVERY_SHEET,
        );
        self.store.insert_compacted(&compacted).await?;
        Ok(())
    }

    /// Samples the minute rows account for: the sum over every
    /// sandbox-minute of its seq span (last - first + 1). With compaction
    /// this is how many samples reached ClickHouse.
    pub async fn samples_covered(&self) -> anyhow::Result<u64> {
        Ok(self
            .store
            .client()
            .query(
                "SELECT toUInt64(sum(span)) FROM (SELECT max(last_seq) - min(first_seq) + 1 AS span \
                 FROM usage_minutes GROUP BY customer, sandbox, epoch, minute)",
            )
            .fetch_one::<u64>()
            .await?)
    }

    /// Distinct sample identities in `usage_samples`.
    pub async fn distinct_samples(&self) -> anyhow::Result<u64> {
        Ok(self
            .store
            .client()
            .query("SELECT uniqExact(sandbox, epoch, seq) FROM usage_samples")
            .fetch_one::<u64>()
            .await?)
    }

    /// Reconciles a known stream: `sandboxes` sandboxes of customer `acme`, each
    /// sending `ticks` samples (seq 1 to `ticks`) within the hour starting at
    /// `hour`, whose CPU counters rose by `cpu_per_sandbox` in all. Fails on
    /// any sample the minute rows do not account for, on a kept sample stored
    /// twice, on a series whose first or last sample was not kept, and on any
    /// rollup that differs from what was sent.
    pub async fn assert_stream_reconciles(
        &self,
        hour: DateTime<Utc>,
        sandboxes: u64,
        ticks: u64,
        cpu_per_sandbox: u64,
    ) -> anyhow::Result<()> {
        let expected = sandboxes * ticks;
        let covered = self.samples_covered().await?;
        anyhow::ensure!(
            covered == expected,
            "minute rows account for {covered} samples, {expected} sent"
        );
        let (collapsed, distinct, ends): (u64, u64, u64) = self
            .store
            .client()
            .query(
                "SELECT count(), uniqExact(sandbox, epoch, seq), \
                 countIf(seq = 1 OR seq = ?) FROM usage_samples FINAL",
            )
            .bind(ticks)
            .fetch_one()
            .await?;
        anyhow::ensure!(
            collapsed == distinct && collapsed <= expected,
            "{collapsed} kept rows after collapsing, {distinct} distinct, {expected} sent"
        );
        anyhow::ensure!(
            ends == 2 * sandboxes,
            "{ends} first and last samples kept, {} expected",
            2 * sandboxes
        );
        let customer = CustomerId::parse("acme")?;
        let usage = self
            .store
            .usage_by_hour(&customer, hour, hour + chrono::Duration::hours(1))
            .await?;
        anyhow::ensure!(
            usage.len() as u64 == sandboxes,
            "{} sandboxes in the rollup, {sandboxes} sent",
            usage.len()
        );
        for row in &usage {
            anyhow::ensure!(
                row.usage.cpu_used_usec == cpu_per_sandbox && row.samples == ticks,
                "{}: {} µs in {} samples, sent {cpu_per_sandbox} µs in {ticks}",
                row.sandbox,
                row.usage.cpu_used_usec,
                row.samples
            );
        }
        Ok(())
    }

    /// Rows in `usage_samples`, duplicates included (no FINAL).
    pub async fn raw_sample_rows(&self) -> anyhow::Result<u64> {
        Ok(self
            .store
            .client()
            .query("SELECT count() FROM usage_samples")
            .fetch_one::<u64>()
            .await?)
    }

    /// Polls `condition` every 100 ms for up to 30 s.
    pub async fn eventually<F, Fut>(&self, what: &str, condition: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        self.eventually_within(Duration::from_secs(30), what, condition)
            .await
    }

    /// Polls `condition` every 100 ms for up to `limit`.
    pub async fn eventually_within<F, Fut>(
        &self,
        limit: Duration,
        what: &str,
        mut condition: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if condition().await? {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An ingest worker running inside the test process.
#[derive(Debug)]
pub struct RunningIngest {
    stop: oneshot::Sender<()>,
    task: JoinHandle<idlemeter_ingest::Result<()>>,
    pub registry: prometheus::Registry,
}

impl RunningIngest {
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }

    /// Current value of a counter metric, 0 if absent.
    pub fn counter(&self, name: &str) -> u64 {
        counter_in(&self.registry, name)
    }

    /// Current value of a gauge of this worker's registry (0 if absent).
    pub fn gauge(&self, name: &str) -> i64 {
        metric_sum(&self.registry, name, |metric| {
            metric.get_gauge().get_value()
        }) as i64
    }
}

/// Sum of a counter family's values in `registry`, 0 if absent.
pub fn counter_in(registry: &prometheus::Registry, name: &str) -> u64 {
    metric_sum(registry, name, |metric| metric.get_counter().get_value()) as u64
}

fn metric_sum(
    registry: &prometheus::Registry,
    name: &str,
    value: impl Fn(&prometheus::proto::Metric) -> f64,
) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .map(value)
        .sum()
}

/// A price sheet for tests: $1 per vCPU-hour allocated, no plan, so amounts
/// are easy to check by hand.
pub const SIMPLE_SHEET: &str = r#"
[sheet]
platform = "test"
currency = "USD"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "1"
basis = "allocated"
increment_seconds = 1
idle = "billed"
"#;

/// A running sandbox's sample with the given counters; everything else fixed.
pub fn sample(
    sandbox: &str,
    epoch: u64,
    seq: u64,
    ts: DateTime<Utc>,
    cpu_used_usec: u64,
    net_tx_bytes: u64,
) -> UsageSample {
    UsageSample {
        vcpu: VcpuMillis(2000),
        mem_bytes: 4 << 30,
        disk_bytes: 10 << 30,
        cpu_used_usec,
        net_tx_bytes,
        vcpu_alloc_usec: seq * 2_000_000,
        mem_used_bytes: 1 << 30,
        exec_sessions: 1,
        ..UsageSample::blank(
            CustomerId::parse("acme").expect("valid id"),
            NodeId::parse("node-1").expect("valid id"),
            SandboxId::parse(sandbox).expect("valid id"),
            Epoch(epoch),
            seq,
            ts,
        )
    }
}

/// Two samples of `customer`'s sandbox `sbx` running with `vcpu_milli`
/// and `mem_bytes` allocated from `from` for `hours` (allocation-based
/// sheets bill allocation x time; the counters only need to rise).
pub fn running_span(
    customer: &str,
    epoch: u64,
    from: DateTime<Utc>,
    hours: i64,
    vcpu_milli: u32,
    mem_bytes: u64,
) -> Vec<UsageSample> {
    [(1, from), (2, from + chrono::Duration::hours(hours))]
        .into_iter()
        .map(|(seq, ts)| UsageSample {
            customer: CustomerId::parse(customer).expect("valid id"),
            vcpu: VcpuMillis(vcpu_milli),
            mem_bytes,
            disk_bytes: 0,
            cpu_used_usec: seq * 1_000,
            net_tx_bytes: 0,
            vcpu_alloc_usec: seq * 1_000_000,
            mem_used_bytes: 0,
            ..sample("sbx", epoch, seq, ts, 0, 0)
        })
        .collect()
}

/// [`sample`] with the full set of counters, as a collector of today sends
/// it: a running, active sandbox with a constant allocation, sampled every
/// second from seq 1, so compaction keeps only what rating needs.
pub fn counted(mut sample: UsageSample) -> UsageSample {
    let ms = (sample.seq - 1) * 1_000;
    let vcpu_usec = u64::from(sample.vcpu.0) * ms;
    let mem_kib_ms = (sample.mem_bytes >> 10) * ms;
    let used_kib_ms = (sample.mem_used_bytes >> 10) * ms;
    let disk_mib_ms = (sample.disk_bytes >> 20) * ms;
    sample.vcpu_alloc_usec = vcpu_usec;
    sample.mem_alloc_kib_ms = mem_kib_ms;
    sample.mem_used_kib_ms = used_kib_ms;
    sample.disk_mib_ms = disk_mib_ms;
    sample.state_counters = StateCounters {
        running_ms: ms,
        suspended_ms: 0,
        active_ms: ms,
        vcpu_alloc_active_usec: vcpu_usec,
        vcpu_max_usec: vcpu_usec.max(sample.cpu_used_usec),
        vcpu_max_active_usec: vcpu_usec.max(sample.cpu_used_usec),
        cpu_used_active_usec: sample.cpu_used_usec,
        mem_alloc_active_kib_ms: mem_kib_ms,
        mem_max_kib_ms: mem_kib_ms,
        mem_max_active_kib_ms: mem_kib_ms,
        mem_used_active_kib_ms: used_kib_ms,
        gpu_alloc_active_ms: 0,
        disk_running_mib_ms: disk_mib_ms,
        disk_active_mib_ms: disk_mib_ms,
    };
    sample.counters_present = CounterSet::ALL;
    sample
}

/// One sandbox epoch sampled every `step_s` seconds from `from` for `ticks`
/// ticks, its counters integrated the way the collector does
/// (`services/collector/src/counters.rs`): each tick closes the interval
/// since the previous one with the state and allocation seen at the tick.
/// The trace resizes (2 vCPU / 4 GiB, then 4 / 8 from the second third on),
/// is suspended for `step_s * 7` seconds out of every `step_s * 37`, and has
/// an exec session open (active) in the ticks where `tick % 5 != 0`; every
/// sample carries every counter.
pub fn counted_trace(
    customer: &str,
    sandbox: &str,
    from: DateTime<Utc>,
    step_s: u64,
    ticks: u64,
) -> Vec<UsageSample> {
    let mut current = sample(sandbox, 1, 1, from, 0, 0);
    current.customer = CustomerId::parse(customer).expect("valid id");
    current.vcpu_alloc_usec = 0;
    current.counters_present = CounterSet::ALL;
    let mut trace = vec![current.clone()];
    for tick in 1..=ticks {
        let elapsed = step_s * 1000;
        let big = tick * 3 >= ticks;
        current.seq += 1;
        current.ts += chrono::Duration::milliseconds(elapsed as i64);
        current.state = if tick % 37 < 30 {
            LifecycleState::Running
        } else {
            LifecycleState::Suspended
        };
        current.vcpu = VcpuMillis(if big { 4000 } else { 2000 });
        current.mem_bytes = if big { 8 << 30 } else { 4 << 30 };
        let running = current.state == LifecycleState::Running;
        current.exec_sessions = u32::from(running && tick % 5 != 0);
        let disk = (current.disk_bytes >> 20) * elapsed;
        current.disk_mib_ms += disk;
        let counters = &mut current.state_counters;
        if !running {
            counters.suspended_ms += elapsed;
            trace.push(current.clone());
            continue;
        }
        let alloc = u64::from(current.vcpu.0) * elapsed;
        let used = alloc / 2;
        let mem_kib = (current.mem_bytes >> 10) * elapsed;
        let used_kib = mem_kib / 4;
        current.vcpu_alloc_usec += alloc;
        current.cpu_used_usec += used;
        current.mem_alloc_kib_ms += mem_kib;
        current.mem_used_kib_ms += used_kib;
        counters.running_ms += elapsed;
        counters.vcpu_max_usec += alloc;
        counters.mem_max_kib_ms += mem_kib;
        counters.disk_running_mib_ms += disk;
        if current.exec_sessions > 0 {
            counters.active_ms += elapsed;
            counters.vcpu_alloc_active_usec += alloc;
            counters.vcpu_max_active_usec += alloc;
            counters.cpu_used_active_usec += used;
            counters.mem_alloc_active_kib_ms += mem_kib;
            counters.mem_max_active_kib_ms += mem_kib;
            counters.mem_used_active_kib_ms += used_kib;
            counters.disk_active_mib_ms += disk;
        }
        trace.push(current.clone());
    }
    trace
}

/// A ClickHouse server of the test's own, for tests that stop and restart it
/// (the shared server must stay up for the tests running beside them). Same
/// binary and settings as `scripts/services.sh`, on a free port, in a
/// temporary directory; killed on drop.
#[derive(Debug)]
pub struct PrivateClickHouse {
    dir: std::path::PathBuf,
    pub http_port: u16,
    server: Option<std::process::Child>,
}

impl PrivateClickHouse {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("idlemeter-ch-{name}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("data"))?;
        let http_port = free_port()?;
        let tcp_port = free_port()?;
        let config = format!(
            "<yandex><logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/server.err.log</errorlog></logger>\
             <http_port>{http_port}</http_port><tcp_port>{tcp_port}</tcp_port><listen_host>127.0.0.1</listen_host>\
             <path>{d}/data/</path><tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/user_files/</user_files_path>\
             <users_config>{d}/users.xml</users_config><default_profile>default</default_profile>\
             <default_database>default</default_database><mark_cache_size>67108864</mark_cache_size>\
             <mlock_executable>false</mlock_executable><timezone>UTC</timezone></yandex>",
            d = dir.display()
        );
        std::fs::write(dir.join("config.xml"), config)?;
        std::fs::write(
            dir.join("users.xml"),
            "<yandex><profiles><default></default></profiles><users><default><password></password>\
             <networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default></users>\
             <quotas><default></default></quotas></yandex>",
        )?;
        let mut private = Self {
            dir,
            http_port,
            server: None,
        };
        private.resume().await?;
        Ok(private)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Starts (or restarts, on the same data) the server and waits until it answers.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let server = std::process::Command::new("clickhouse-server")
            .arg(format!("--config-file={}", self.dir.join("config.xml").display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|error| anyhow::anyhow!("starting clickhouse-server: {error} (run scripts/services.sh start once to install it)"))?;
        self.server = Some(server);
        let store = Store::new(&ClickHouseSettings {
            url: self.url(),
            database: "default".to_owned(),
            user: "default".to_owned(),
            password: Default::default(),
            cluster: None,
            max_replica_delay_s: idlemeter_store::DEFAULT_MAX_REPLICA_DELAY_S,
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while store.ping().await.is_err() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "private clickhouse did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A tansu broker of the test's own, with durable (sqlite) storage, that a
/// test can kill and start again on the same data: for broker restarts, and
/// for cutting a collector off from Kafka. The shared test broker keeps memory
/// storage (faster, and a cold CI run need not build tansu with libsql).
///
/// The binary is `IDLEMETER_TANSU_DURABLE_BIN`, else the cached durable build
/// `scripts/services.sh durable-broker` makes (`~/.cache/idlemeter/tansu-0.6.0`).
#[derive(Debug)]
pub struct PrivateBroker {
    dir: std::path::PathBuf,
    binary: std::path::PathBuf,
    pub port: u16,
    server: Option<std::process::Child>,
}

impl PrivateBroker {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let binary = match std::env::var_os("IDLEMETER_TANSU_DURABLE_BIN") {
            Some(path) => std::path::PathBuf::from(path),
            None => {
                let cache = std::env::var_os("IDLEMETER_CACHE_DIR")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| {
                        std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                            .join(".cache/idlemeter")
                    });
                cache.join("tansu-0.6.0/bin/tansu")
            }
        };
        anyhow::ensure!(
            binary.is_file(),
            "no durable tansu at {} (build it with `scripts/services.sh durable-broker`, or set IDLEMETER_TANSU_DURABLE_BIN)",
            binary.display()
        );
        let dir = std::env::temp_dir().join(format!(
            "idlemeter-broker-{name}-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let mut broker = Self {
            dir,
            binary,
            port: free_port()?,
            server: None,
        };
        broker.resume().await?;
        Ok(broker)
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts (or restarts, on the same sqlite file) the broker and waits
    /// until it accepts connections.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://{}", self.address());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))?;
        let server = std::process::Command::new(&self.binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|error| anyhow::anyhow!("starting {}: {error}", self.binary.display()))?;
        self.server = Some(server);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            // Our broker must still be running: after a restart another test
            // may have taken the port, and a bare connect would then succeed.
            if let Some(status) = self
                .server
                .as_mut()
                .and_then(|s| s.try_wait().ok().flatten())
            {
                anyhow::bail!(
                    "private broker exited ({status}); port {} taken? see {}",
                    self.port,
                    self.dir.join("tansu.log").display()
                );
            }
            if tokio::net::TcpStream::connect(self.address()).await.is_ok() {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "private broker did not start; see {}",
                self.dir.join("tansu.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the broker (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A sheet (and no idle policy) as the services that bill take it.
/// A price sheet of $1 per allocated vCPU-second, idle or not, and nothing
/// else: amounts in tests are then seconds times vCPUs.
pub const ONE_DOLLAR_A_VCPU_SECOND: &str = r#"
[sheet]
platform = "whatif"
currency = "USD"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-second"
unit_price = "1"
basis = "allocated"
increment_seconds = 1
idle = "billed"
"#;

pub fn sheet_source<'a>(sheet: &'a str, path: &'a str) -> idlemeter_store::SheetSource<'a> {
    idlemeter_store::SheetSource {
        sheet_text: sheet,
        sheet_label: path,
        policy: None,
    }
}

/// Billing terms for a test: the default issuer, no tax, `period`.
pub fn terms(period: idlemeter_core::Period) -> idlemeter_core::BillingTerms {
    idlemeter_core::BillingTerms {
        period,
        ..idlemeter_core::BillingTerms::default()
    }
}

/// Serves `api` on a loopback port for the rest of the test; returns its
/// base URL (`http://127.0.0.1:port`).
pub async fn serve(api: idlemeter_api::Api) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(api.serve(listener, std::future::pending()));
    Ok(base)
}

/// An API over `env`'s store billing with `sheet` under `terms`, alerts
/// off (the tests that need them start their own).
pub async fn api(
    env: &TestEnv,
    sheet: &str,
    terms: idlemeter_core::BillingTerms,
) -> anyhow::Result<idlemeter_api::Api> {
    Ok(idlemeter_api::Api::new(
        env.store.clone(),
        idlemeter_api::Billing::new(sheet_source(sheet, "test.toml"), terms)?,
        idlemeter_api::ApiConfig {
            alert_interval_s: 0,
            ..idlemeter_api::ApiConfig::default()
        },
        &prometheus::Registry::new(),
    )
    .await?)
}

/// One pass of the rater at `now`, as `idlemeter rater` runs them every
/// minute (default grace): the closed hours of `now`'s period and of the one
/// before, and finished periods that received samples since they were rated.
/// The close bills what these passes rated.
pub async fn rater_pass(
    env: &TestEnv,
    sheet: &str,
    sheet_path: &str,
    terms: idlemeter_core::BillingTerms,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<idlemeter_rater::RatingPass> {
    let rater = idlemeter_rater::Rater::new(
        env.store.clone(),
        sheet,
        idlemeter_rater::RaterConfig {
            sheet: sheet_path.to_owned(),
            ..idlemeter_rater::RaterConfig::default()
        },
        &prometheus::Registry::new(),
    )?
    .with_terms(terms)?;
    Ok(rater.rate_closed_hours(now).await?)
}

/// Writes, for every customer of `samples`, the state the rater stores at
/// the end of the period starting at `period_start` (its period-end
/// `rating_state` row): the samples carried by [`idlemeter_core::RatingState`],
/// the rater's own function, in one step instead of hour by hour (the state
/// is the same). For fixtures and benchmarks that need a rated period
/// without running the rater over each of its hours. Returns the rows.
pub fn period_end_states(
    sheet_text: &str,
    samples: &[UsageSample],
    period: idlemeter_core::Period,
    period_start: DateTime<Utc>,
) -> anyhow::Result<Vec<idlemeter_store::RatingStateRow>> {
    let sheet = idlemeter_core::PriceSheet::from_toml(sheet_text, "fixture")?;
    let end = period.next(period_start);
    let mut by_customer: std::collections::BTreeMap<&idlemeter_core::CustomerId, Vec<UsageSample>> =
        std::collections::BTreeMap::new();
    for sample in samples
        .iter()
        .filter(|s| s.ts >= period_start && s.ts < end)
    {
        by_customer
            .entry(&sample.customer)
            .or_default()
            .push(sample.clone());
    }
    let checksum = idlemeter_store::ratings_checksum(sheet_text, None);
    let mut rows = Vec::new();
    for (customer, own) in by_customer {
        let count = own.len() as u64;
        let numbered: Vec<idlemeter_core::NumberedSample> = own
            .into_iter()
            .enumerate()
            .map(|(index, sample)| idlemeter_core::NumberedSample {
                line: index as u64 + 1,
                sample,
            })
            .collect();
        let mut state = idlemeter_core::RatingState::new(&sheet);
        state.advance(&sheet, &numbered, &idlemeter_core::SessionOrConnection);
        let usage = state
            .usage(&sheet, &idlemeter_core::SessionOrConnection)
            .customers
            .into_iter()
            .find(|usage| &usage.customer == customer)
            .map(|usage| usage.to_text())
            .unwrap_or_default();
        rows.push(idlemeter_store::RatingStateRow {
            customer: customer.to_string(),
            period_start: period_start.timestamp() as u32,
            sheet_checksum: checksum.clone(),
            as_of: end.timestamp() as u32,
            series: state.series_count() as u32,
            state: state.to_json(),
            rated_at: end.timestamp() as u32,
            usage,
            samples: count,
            revision: 1,
            counts_rated: 1,
        });
    }
    Ok(rows)
}

/// One message read back from the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetterRead {
    pub reason: String,
    /// The payload's size, where it was left out.
    pub omitted: Option<String>,
    pub payload: Vec<u8>,
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0)
}
