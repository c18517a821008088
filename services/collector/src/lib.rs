//! The node collector: per-second usage of every sandbox on a node, as
//! cumulative counters that survive collector restarts, shipped to Kafka.
//!
//! Shape (source → transform → sink, plus an actuator):
//! - [`cgroup`] discovers sandbox cgroups (inotify on the parent) and reads
//!   them ([`reader::UsageReader`]): CPU, memory, frozen, network bytes of the
//!   sandbox's own network namespace, and every tenth tick the detail
//!   (pressure, peak memory, block I/O, GPU through [`gpu`]);
//! - [`counters`] (pure) turns raw readings into per-epoch cumulative counters;
//! - [`sampler`] runs a tick: read, advance, save [`state`], append to [`spool`];
//!   a sandbox whose cgroup vanished gets one final `stopped` sample;
//! - [`shipper`] drains the spool to `usage.samples`, oldest first;
//! - [`commands`] consumes `sandbox.commands` and freezes or thaws cgroups;
//! - [`gpu`] reads GPUs through NVML where present, behind a trait.
//!
//! [`Collector::build`] wires them; [`Collector::run_until_stopped`] runs them
//! until the shutdown future completes.

pub mod cgroup;
pub mod commands;
pub mod config;
pub mod counters;
pub mod gpu;
pub mod metrics;
pub mod reader;
pub mod sampler;
pub mod sandbox;
pub mod shipper;
pub mod spool;
pub mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idlemeter_bus::{KafkaSettings, Topics};
use idlemeter_core::NodeId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::cgroup::{CgroupLayout, CgroupReader};
pub use crate::config::CollectorConfig;
pub use crate::metrics::CollectorMetrics;
pub use crate::sampler::{Sampler, TickReport};

/// Everything that can go wrong in the collector, with the file, sandbox or
/// topic it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {name:?} is not a sandbox: {reason}")]
    SandboxName { name: String, reason: String },
    #[error("label file {file}: {reason}")]
    Labels { file: String, reason: String },
    #[error("state file {file}: {reason}")]
    State { file: String, reason: String },
    #[error("sandbox {sandbox} has no cgroup on this node")]
    UnknownSandbox { sandbox: String },
    #[error("collector configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Bus(#[from] idlemeter_bus::Error),
    #[error("kafka {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("sending to {topic} timed out")]
    SendTimedOut { topic: String },
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("gpu: {0}")]
    Gpu(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A node's collector, built and ready to run.
#[derive(Debug)]
pub struct Collector {
    config: CollectorConfig,
    node: NodeId,
    kafka: KafkaSettings,
    topics: Topics,
    metrics: CollectorMetrics,
    spool: Arc<spool::Spool>,
    sampler: Sampler<CgroupReader>,
}

impl Collector {
    /// Loads state and spool from `config.state_dir` and registers metrics.
    /// Nothing connects yet: Kafka may be down, the collector still samples.
    pub fn build(
        config: CollectorConfig,
        kafka: &KafkaSettings,
        topics: Topics,
        registry: &prometheus::Registry,
    ) -> Result<Self> {
        let node = node_id(&config.node)?;
        if config.interval_ms == 0 {
            return Err(Error::Config("interval_ms must be positive".to_owned()));
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|source| Error::Io {
            context: format!("creating {}", config.state_dir.display()),
            source,
        })?;
        let metrics = CollectorMetrics::register(registry)?;
        let spool = Arc::new(spool::Spool::open(
            &config.spool_dir(),
            config.spool_max_bytes,
        )?);
        let reader = CgroupReader::new(config.layout()).with_gpu(gpu::open_gpu_reader(config.gpu)?);
        let sampler = Sampler::new(
            reader,
            node.clone(),
            config.state_file(),
            Arc::clone(&spool),
            metrics.clone(),
        )?;
        Ok(Self {
            config,
            node,
            kafka: kafka.clone(),
            topics,
            metrics,
            spool,
            sampler,
        })
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Samples, ships and acts until `shutdown` completes.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let stop = CancellationToken::new();
        let spooled = Arc::new(Notify::new());
        let command_group = if self.config.command_group_id.is_empty() {
            format!("idlemeter-collector-{}", self.node)
        } else {
            self.config.command_group_id.clone()
        };
        let (control, controlled) = std::sync::mpsc::channel();
        let actor = commands::CommandActor {
            kafka: self.kafka.clone(),
            topic: self.topics.commands.clone(),
            group_id: command_group,
            node: self.node.clone(),
            layout: self.config.layout(),
            max_age_ms: self.config.command_max_age_ms,
            key: self.config.command_key.clone(),
            epochs: self.sampler.epochs(),
            metrics: self.metrics.clone(),
            seen: Default::default(),
            sampler: Some(control.clone()),
        };
        let shipper = shipper::Shipper {
            kafka: self.kafka.clone(),
            topic: self.topics.samples.clone(),
            node: self.node.clone(),
            send_timeout: Duration::from_millis(self.config.send_timeout_ms),
            spool: Arc::clone(&self.spool),
            spooled: Arc::clone(&spooled),
            metrics: self.metrics.clone(),
        };
        let interval = Duration::from_millis(self.config.interval_ms);
        let sampler = self.sampler;
        let sampler_thread = std::thread::Builder::new()
            .name("idlemeter-sampler".to_owned())
            .spawn(move || sampler::run_sampler(sampler, interval, controlled, spooled))
            .map_err(|source| Error::Io {
                context: "starting the sampler thread".to_owned(),
                source,
            })?;
        let shipping = tokio::spawn(shipper.run(stop.clone()));
        let acting = tokio::spawn(actor.run(stop.clone()));
        tracing::info!(node = %self.node, parent = %self.config.cgroup_parent.display(), interval_ms = self.config.interval_ms, "collector started");
        shutdown.await;
        stop.cancel();
        let _ = control.send(sampler::SamplerControl::Stop);
        let sampler_result = tokio::task::spawn_blocking(move || sampler_thread.join()).await;
        if !matches!(sampler_result, Ok(Ok(()))) {
            tracing::error!("sampler thread panicked");
        }
        let shipped = shipping.await;
        let acted = acting.await;
        for (task, result) in [("shipper", shipped), ("command consumer", acted)] {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(task, %error, "collector task failed"),
                Err(error) => tracing::error!(task, %error, "collector task panicked"),
            }
        }
        tracing::info!("collector stopped");
        Ok(())
    }
}

/// The configured node id, or the host name when none is configured.
fn node_id(configured: &str) -> Result<NodeId> {
    let name = if configured.is_empty() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .map_err(|source| Error::Io {
                context: "reading the host name for the node id".to_owned(),
                source,
            })?
    } else {
        configured.to_owned()
    };
    NodeId::parse(name).map_err(|error| Error::Config(format!("node: {error}")))
}
