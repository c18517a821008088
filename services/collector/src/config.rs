//! The `[collector]` configuration section: where sandboxes live on this node,
//! where the collector keeps its state, and how often it samples.
//!
//! Every field has a production default, so a node needs to set only what its
//! layout differs in (usually `node`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::gpu::GpuMode;

/// Tuning and layout of one node's collector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    /// This node's id (the Kafka key of its batches). Empty: the host name.
    pub node: String,
    /// cgroup v2 directory whose children are the sandboxes, one child each,
    /// named `<customer>.<sandbox>` (see `sandbox.rs`).
    pub cgroup_parent: PathBuf,
    /// The matching cgroup v1 memory directory, read for memory when the v2
    /// child has no `memory.current` (no memory controller in v2's subtree).
    pub cgroup_v1_memory_parent: PathBuf,
    /// v1 cpuacct and freezer directories, used for a sandbox whose directory
    /// under `cgroup_parent` has no `cpu.stat` or no `cgroup.events`. On a
    /// host without cgroup v2, set `cgroup_parent` to the cpuacct directory.
    pub cgroup_v1_cpuacct_parent: PathBuf,
    pub cgroup_v1_freezer_parent: PathBuf,
    /// v1 blkio directory, for block I/O bytes where v2 has no io controller.
    pub cgroup_v1_blkio_parent: PathBuf,
    /// Per-sandbox allocation files `<customer>.<sandbox>.toml` written by the
    /// platform when it creates the sandbox.
    pub labels_dir: PathBuf,
    /// Per-sandbox activity files `<customer>.<sandbox>` that the platform's
    /// agent rewrites when sessions and connections open or close.
    pub activity_dir: PathBuf,
    /// Counter state (`counters.state`) and the outgoing spool (`spool/`).
    pub state_dir: PathBuf,
    /// Time between two samples of every sandbox.
    pub interval_ms: u64,
    /// Bound of the on-disk spool; past it the oldest batches are dropped.
    pub spool_max_bytes: u64,
    /// How long one send to Kafka may take before the batch stays spooled and
    /// is retried.
    pub send_timeout_ms: u64,
    /// Commands issued longer ago than this are ignored: a collector joining
    /// late must not replay yesterday's suspends.
    pub command_max_age_ms: u64,
    /// Consumer group of `sandbox.commands`. Empty: `idlemeter-collector-<node>`,
    /// one group per node so every node sees every command.
    pub command_group_id: String,
    /// The cluster's command key (the policy service's `command_key`): a
    /// command is acted on only if its `idlemeter-signature` header verifies
    /// with it. Empty: every command is refused (and the start says so).
    pub command_key: idlemeter_core::Secret,
    /// Whether GPU utilisation is read through NVML: `"auto"` where NVML
    /// loads, `"off"`, or `"required"` (fail to start without NVML). GPU
    /// allocations bill from the label files whatever this says.
    pub gpu: GpuMode,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            node: String::new(),
            cgroup_parent: PathBuf::from("/sys/fs/cgroup/unified/idlemeter"),
            cgroup_v1_memory_parent: PathBuf::from("/sys/fs/cgroup/memory/idlemeter"),
            cgroup_v1_cpuacct_parent: PathBuf::from("/sys/fs/cgroup/cpuacct/idlemeter"),
            cgroup_v1_freezer_parent: PathBuf::from("/sys/fs/cgroup/freezer/idlemeter"),
            cgroup_v1_blkio_parent: PathBuf::from("/sys/fs/cgroup/blkio/idlemeter"),
            labels_dir: PathBuf::from("/etc/idlemeter/sandboxes"),
            activity_dir: PathBuf::from("/run/idlemeter/activity"),
            state_dir: PathBuf::from("/var/lib/idlemeter/collector"),
            interval_ms: 1_000,
            spool_max_bytes: 256 << 20,
            send_timeout_ms: 5_000,
            command_max_age_ms: 60_000,
            command_group_id: String::new(),
            command_key: idlemeter_core::Secret::default(),
            gpu: GpuMode::Auto,
        }
    }
}

impl CollectorConfig {
    /// Where the sandboxes' cgroups and the platform's files are.
    pub fn layout(&self) -> crate::cgroup::CgroupLayout {
        crate::cgroup::CgroupLayout {
            v2_parent: self.cgroup_parent.clone(),
            v1_memory_parent: self.cgroup_v1_memory_parent.clone(),
            v1_cpuacct_parent: self.cgroup_v1_cpuacct_parent.clone(),
            v1_freezer_parent: self.cgroup_v1_freezer_parent.clone(),
            v1_blkio_parent: self.cgroup_v1_blkio_parent.clone(),
            labels_dir: self.labels_dir.clone(),
            activity_dir: self.activity_dir.clone(),
        }
    }

    /// The file that carries counters across restarts.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("counters.state")
    }

    /// The directory of batches not yet acknowledged by Kafka.
    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CollectorConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn gpu_mode_defaults_to_auto_and_parses_each_lowercase_name() {
        assert_eq!(parse("").expect("empty section").gpu, GpuMode::Auto);
        for (text, mode) in [
            ("auto", GpuMode::Auto),
            ("off", GpuMode::Off),
            ("required", GpuMode::Required),
        ] {
            let config = parse(&format!("gpu = \"{text}\"")).expect("known mode");
            assert_eq!(config.gpu, mode, "gpu = {text:?}");
        }
    }

    #[test]
    fn unknown_gpu_mode_is_rejected_naming_the_modes() {
        let error = parse("gpu = \"sometimes\"").expect_err("not a mode");
        let message = error.to_string();
        assert!(message.contains("sometimes"), "{message}");
        assert!(message.contains("required"), "{message}");
    }
}
