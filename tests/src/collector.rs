//! Harness for the collector's black-box tests: real cgroups (removed on drop,
//! even when a test fails), CPU burner processes inside them, the collector run
//! in-process or as the built `idlemeter` binary, and a reader of the node
//! batches it puts on the samples topic.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idlemeter_bus::GroupConsumer;
use idlemeter_core::UsageSample;
use idlemeter_proto::decode_node_batch;
use rdkafka::consumer::Consumer;
use rdkafka::Message;

use crate::TestEnv;

/// Where tests create their cgroup trees (cgroup v2, hybrid mount on the dev machine).
pub const CGROUP_V2_ROOT: &str = "/sys/fs/cgroup/unified";

static NEXT_CGROUP: AtomicU32 = AtomicU32::new(0);

/// A private cgroup parent with sandbox children; on drop it kills the
/// processes it started, thaws and removes every cgroup it made.
#[derive(Debug)]
pub struct TestCgroups {
    pub parent: PathBuf,
    children: Vec<PathBuf>,
    processes: Vec<Child>,
    /// Host ends of veth pairs, deleted on drop.
    links: Vec<String>,
}

impl TestCgroups {
    pub fn new(test_name: &str) -> anyhow::Result<Self> {
        let parent = Path::new(CGROUP_V2_ROOT).join(format!(
            "idlemeter-test-{test_name}-{}-{}",
            std::process::id(),
            NEXT_CGROUP.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&parent).map_err(|error| {
            anyhow::anyhow!(
                "creating cgroup {} (tests need root and cgroup v2 at {CGROUP_V2_ROOT}): {error}",
                parent.display()
            )
        })?;
        Ok(Self {
            parent,
            children: Vec::new(),
            processes: Vec::new(),
            links: Vec::new(),
        })
    }

    /// Creates the sandbox cgroup `<customer>.<sandbox>` and returns its path.
    pub fn add_sandbox(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.parent.join(name);
        std::fs::create_dir(&path)?;
        self.children.push(path.clone());
        Ok(path)
    }

    /// Starts a busy-loop shell that moves itself into `cgroup` before burning,
    /// so every microsecond it burns is accounted to the cgroup. Returns its PID.
    pub fn spawn_burner(&mut self, cgroup: &Path) -> anyhow::Result<u32> {
        self.spawn_joined(cgroup, "sh -c 'while :; do :; done'")
    }

    /// Starts a process in `cgroup` with a network namespace of its own,
    /// joined to the host by a veth pair (`10.231.<n>.1` on the host side,
    /// `10.231.<n>.2` inside). Returns its PID and the inside address.
    pub fn spawn_with_own_network(&mut self, cgroup: &Path) -> anyhow::Result<(u32, String)> {
        let pid = self.spawn_joined(cgroup, "unshare --net sleep 600")?;
        let own = format!("/proc/{pid}/ns/net");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(&own)? == std::fs::read_link("/proc/self/ns/net")? {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "process {pid} never entered a namespace of its own"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let n = NEXT_CGROUP.fetch_add(1, Ordering::Relaxed) % 250 + 1 + std::process::id() % 4;
        let (host, inside) = (
            format!("imh{}-{n}", std::process::id() % 10_000),
            format!("ims{n}"),
        );
        let script = format!(
            "ip link add {host} type veth peer name {inside} && ip link set {inside} netns {pid} \
             && ip addr add 10.231.{n}.1/30 dev {host} && ip link set {host} up \
             && nsenter -t {pid} -n sh -c 'ip addr add 10.231.{n}.2/30 dev {inside} && ip link set {inside} up'"
        );
        let status = Command::new("sh").arg("-c").arg(&script).status()?;
        anyhow::ensure!(
            status.success(),
            "setting up the veth pair failed: {script}"
        );
        self.links.push(host);
        Ok((pid, format!("10.231.{n}.2")))
    }

    /// Starts `command` in a shell that first moves itself into `cgroup`, and
    /// waits until the kernel lists it there. Returns its PID.
    pub fn spawn_joined(&mut self, cgroup: &Path, command: &str) -> anyhow::Result<u32> {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {command}",
            cgroup.display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()?;
        let pid = child.id();
        self.processes.push(child);
        let procs = cgroup.join("cgroup.procs");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&procs)?
            .lines()
            .any(|line| line == pid.to_string())
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "process {pid} never joined {}",
                cgroup.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(pid)
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        for child in &self.children {
            let _ = std::fs::write(child.join("cgroup.freeze"), "0");
        }
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).status();
        }
        for process in &mut self.processes {
            let _ = process.kill();
            let _ = process.wait();
        }
        for child in self.children.iter().rev() {
            remove_cgroup(child);
        }
        remove_cgroup(&self.parent);
    }
}

/// rmdir, retried briefly: a killed process leaves its cgroup a moment later.
fn remove_cgroup(path: &Path) {
    for _ in 0..100 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("could not remove test cgroup {}", path.display());
}

/// `cpu.stat` usage_usec of a cgroup.
pub fn cgroup_usage_usec(cgroup: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(cgroup.join("cpu.stat"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("usage_usec "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no usage_usec in {}", cgroup.display()))
}

/// A process's own CPU accounting, user + system, in microseconds (/proc/PID/stat).
pub fn process_cpu_usec(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let after_name = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let utime: u64 = fields
        .get(11)
        .ok_or_else(|| anyhow::anyhow!("no utime"))?
        .parse()?;
    let stime: u64 = fields
        .get(12)
        .ok_or_else(|| anyhow::anyhow!("no stime"))?
        .parse()?;
    let ticks_per_second = 100; // USER_HZ on Linux
    Ok((utime + stime) * 1_000_000 / ticks_per_second)
}

/// One sample as read back from the samples topic, with its batch's sequence.
#[derive(Debug, Clone)]
pub struct ShippedSample {
    pub batch_seq: u64,
    pub sample: UsageSample,
}

/// The samples of one sandbox, in arrival order.
pub fn samples_of(samples: &[ShippedSample], sandbox: &str) -> Vec<UsageSample> {
    samples
        .iter()
        .filter(|s| s.sample.sandbox.as_str() == sandbox)
        .map(|s| s.sample.clone())
        .collect()
}

/// Reads every node batch on a test's samples topic, from the beginning.
pub struct SampleTail {
    consumer: GroupConsumer,
    pub samples: Vec<ShippedSample>,
}

impl std::fmt::Debug for SampleTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleTail")
            .field("samples", &self.samples.len())
            .finish_non_exhaustive()
    }
}

impl SampleTail {
    pub fn new(env: &TestEnv) -> anyhow::Result<Self> {
        // Prompt: the wake-time bench reads arrival times from it.
        let consumer = env
            .kafka
            .prompt_consumer("idlemeter-test-tail", &format!("{}.tail", env.group_id))?;
        consumer.subscribe(&[env.topics.samples.as_str()])?;
        Ok(Self {
            consumer,
            samples: Vec::new(),
        })
    }

    /// Reads batches until `condition` holds for all samples read so far (or 60 s pass).
    pub async fn wait_for(
        &mut self,
        what: &str,
        condition: impl Fn(&[ShippedSample]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !condition(&self.samples) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            anyhow::ensure!(
                !left.is_zero(),
                "timed out waiting for {what}; read {} samples",
                self.samples.len()
            );
            let Ok(message) = tokio::time::timeout(left, self.consumer.recv()).await else {
                continue;
            };
            let message = message?;
            let batch = decode_node_batch(message.payload().unwrap_or_default())?;
            anyhow::ensure!(
                batch.rejected.is_empty(),
                "collector sent bad samples: {:?}",
                batch.rejected
            );
            self.samples
                .extend(batch.samples.into_iter().map(|sample| ShippedSample {
                    batch_seq: batch.batch_seq,
                    sample,
                }));
        }
        Ok(())
    }
}

/// The `idlemeter` binary of this checkout's target directory. Cargo builds
/// it for the tests only when the tests depend on it, which they cannot (it is
/// a binary of another package), so `make test` builds it first.
pub fn idlemeter_binary() -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let binary = target.join("debug/idlemeter");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: run `cargo build -p idlemeter-cli` first (make test does)",
        binary.display()
    );
    Ok(binary)
}

/// A collector configuration for tests: the given cgroup parent, fast ticks,
/// every file under `work_dir`, a unique node.
pub fn collector_config(
    cgroup_parent: &Path,
    work_dir: &Path,
    node: &str,
) -> idlemeter_collector::CollectorConfig {
    idlemeter_collector::CollectorConfig {
        node: node.to_owned(),
        cgroup_parent: cgroup_parent.to_owned(),
        cgroup_v1_memory_parent: work_dir.join("no-v1-memory"),
        cgroup_v1_cpuacct_parent: work_dir.join("no-v1-cpuacct"),
        cgroup_v1_freezer_parent: work_dir.join("no-v1-freezer"),
        cgroup_v1_blkio_parent: work_dir.join("no-v1-blkio"),
        labels_dir: work_dir.join("labels"),
        activity_dir: work_dir.join("activity"),
        state_dir: work_dir.join("state"),
        interval_ms: 200,
        spool_max_bytes: 64 << 20,
        send_timeout_ms: 2_000,
        command_max_age_ms: 60_000,
        command_group_id: String::new(),
        command_key: idlemeter_core::Secret::new(TEST_COMMAND_KEY),
        gpu: idlemeter_collector::gpu::GpuMode::Off,
    }
}

/// A collector running inside the test process.
#[derive(Debug)]
pub struct RunningCollector {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<idlemeter_collector::Result<()>>,
    pub registry: prometheus::Registry,
}

impl RunningCollector {
    pub fn start(
        config: idlemeter_collector::CollectorConfig,
        kafka: &idlemeter_bus::KafkaSettings,
        topics: idlemeter_bus::Topics,
    ) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let collector = idlemeter_collector::Collector::build(config, kafka, topics, &registry)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(collector.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            stop,
            task,
            registry,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }

    /// Current value of an integer counter or gauge, 0 if absent.
    pub fn metric(&self, name: &str) -> i64 {
        self.registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().iter())
            // A metric is either a counter or a gauge; the other reads as 0.
            .map(|metric| {
                (metric.get_counter().get_value() + metric.get_gauge().get_value()) as i64
            })
            .sum()
    }
}

/// The command key of every test cluster (policy and collectors).
pub const TEST_COMMAND_KEY: &str = "test-cluster-command-key";

/// Produces a suspend or resume command for one sandbox on the commands
/// topic, signed with [`TEST_COMMAND_KEY`].
pub async fn send_command(
    env: &TestEnv,
    node: &str,
    customer: &str,
    sandbox: &str,
    action: idlemeter_proto::v1::CommandAction,
) -> anyhow::Result<()> {
    send_command_signed(
        env,
        Some(TEST_COMMAND_KEY.as_bytes()),
        node,
        customer,
        sandbox,
        action,
    )
    .await
}

/// Produces a command signed with `key`, or unsigned.
pub async fn send_command_signed(
    env: &TestEnv,
    key: Option<&[u8]>,
    node: &str,
    customer: &str,
    sandbox: &str,
    action: idlemeter_proto::v1::CommandAction,
) -> anyhow::Result<()> {
    use prost::Message as _;
    let command = idlemeter_proto::v1::SandboxCommand {
        schema_version: idlemeter_proto::SCHEMA_VERSION,
        command_id: format!("{sandbox}-{}", chrono::Utc::now().timestamp_millis()),
        node: node.to_owned(),
        customer: customer.to_owned(),
        sandbox: sandbox.to_owned(),
        epoch: 0,
        action: action as i32,
        reason: "test".to_owned(),
        policy_version: "test".to_owned(),
        issued_unix_ms: chrono::Utc::now().timestamp_millis(),
    };
    let payload = command.encode_to_vec();
    let signature =
        key.map(|key| idlemeter_proto::sign_command(key, chrono::Utc::now().timestamp(), &payload));
    let mut record = rdkafka::producer::FutureRecord::to(&env.topics.commands)
        .key(node)
        .payload(&payload);
    if let Some(signature) = &signature {
        record = record.headers(rdkafka::message::OwnedHeaders::new().insert(
            rdkafka::message::Header {
                key: idlemeter_proto::COMMAND_SIGNATURE_HEADER,
                value: Some(signature.as_str()),
            },
        ));
    }
    let producer = env.producer()?;
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(error, _)| anyhow::anyhow!("producing a command: {error}"))?;
    Ok(())
}

/// The `idlemeter collector` binary running as a child process; killed on drop.
#[derive(Debug)]
pub struct CollectorProcess {
    child: Child,
}

impl CollectorProcess {
    /// Starts `idlemeter collector` configured through `IDLEMETER_*` variables only.
    pub fn spawn(
        env: &TestEnv,
        config: &idlemeter_collector::CollectorConfig,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let path = |p: &Path| p.display().to_string();
        let child = Command::new(idlemeter_binary()?)
            .arg("collector")
            .env_remove("IDLEMETER_CONFIG")
            .env("IDLEMETER_KAFKA__BROKERS", &env.kafka.brokers)
            .env("IDLEMETER_TOPICS__SAMPLES", &env.topics.samples)
            .env("IDLEMETER_TOPICS__COMMANDS", &env.topics.commands)
            .env("IDLEMETER_METRICS__LISTEN", "127.0.0.1:0")
            .env("IDLEMETER_COLLECTOR__NODE", &config.node)
            .env(
                "IDLEMETER_COLLECTOR__COMMAND_KEY",
                config.command_key.expose(),
            )
            .env(
                "IDLEMETER_COLLECTOR__CGROUP_PARENT",
                path(&config.cgroup_parent),
            )
            .env(
                "IDLEMETER_COLLECTOR__CGROUP_V1_MEMORY_PARENT",
                path(&config.cgroup_v1_memory_parent),
            )
            .env(
                "IDLEMETER_COLLECTOR__CGROUP_V1_CPUACCT_PARENT",
                path(&config.cgroup_v1_cpuacct_parent),
            )
            .env(
                "IDLEMETER_COLLECTOR__CGROUP_V1_FREEZER_PARENT",
                path(&config.cgroup_v1_freezer_parent),
            )
            .env(
                "IDLEMETER_COLLECTOR__CGROUP_V1_BLKIO_PARENT",
                path(&config.cgroup_v1_blkio_parent),
            )
            .env("IDLEMETER_COLLECTOR__LABELS_DIR", path(&config.labels_dir))
            .env(
                "IDLEMETER_COLLECTOR__ACTIVITY_DIR",
                path(&config.activity_dir),
            )
            .env("IDLEMETER_COLLECTOR__STATE_DIR", path(&config.state_dir))
            .env(
                "IDLEMETER_COLLECTOR__INTERVAL_MS",
                config.interval_ms.to_string(),
            )
            .env(
                "IDLEMETER_COLLECTOR__SEND_TIMEOUT_MS",
                config.send_timeout_ms.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Self { child })
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill_hard(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
