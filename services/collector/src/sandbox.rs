//! What the platform tells the collector about a sandbox, apart from its cgroup.
//!
//! **Naming rule.** A sandbox is a child cgroup of the configured parent named
//! `<customer>.<sandbox>`: the customer id is everything before the first `.`,
//! the sandbox id everything after it (so customer ids cannot contain `.`, sandbox
//! ids can). Both must be valid ids (printable ASCII, no spaces). Children with
//! other names are not sandboxes and are ignored (with one warning each).
//!
//! **Allocation labels.** The platform writes `<labels_dir>/<customer>.<sandbox>.toml`
//! when it creates or resizes a sandbox:
//! ```toml
//! vcpu_milli = 2000          # allocated vCPUs x 1000
//! mem_bytes = 4294967296     # allocated memory
//! disk_bytes = 10737418240   # persistent disk
//! gpu_model = "H100"         # optional
//! gpu_count = 1              # optional
//! ```
//! The collector rereads it when its modification time changes. Without the file
//! a sandbox is still metered (CPU and memory used, state, activity) with a zero
//! allocation, and `idlemeter_collector_unlabelled_sandboxes` counts it.
//!
//! **Activity signals.** The platform's agent (which terminates exec/PTY sessions
//! and proxies inbound connections, so it knows both exactly) rewrites
//! `<activity_dir>/<customer>.<sandbox>` on every change, atomically (temp file +
//! rename), as `key value` lines:
//! ```text
//! exec_sessions 1
//! open_conns 3
//! api_calls 1742
//! ```
//! `exec_sessions` and `open_conns` are gauges; `api_calls` is the agent's own
//! monotonic count, turned into a per-epoch counter by the collector. A missing
//! file or key reads as zero. This was chosen over scanning /proc: the agent is
//! where sessions are created, and /proc cannot tell an exec session from any
//! other process of the sandbox.

use std::fmt;

use idlemeter_core::{CustomerId, SandboxId, VcpuMillis};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which sandbox of which customer a cgroup holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxKey {
    pub customer: CustomerId,
    pub sandbox: SandboxId,
}

impl SandboxKey {
    /// Applies the naming rule to a cgroup directory name.
    pub fn from_cgroup_name(name: &str) -> Result<Self> {
        let bad = |reason: String| Error::SandboxName {
            name: name.to_owned(),
            reason,
        };
        let (customer, sandbox) = name
            .split_once('.')
            .ok_or_else(|| bad("expected `<customer>.<sandbox>`".to_owned()))?;
        Ok(Self {
            customer: CustomerId::parse(customer).map_err(|error| bad(error.to_string()))?,
            sandbox: SandboxId::parse(sandbox).map_err(|error| bad(error.to_string()))?,
        })
    }

    /// The cgroup (and label and activity file) name of this sandbox.
    pub fn cgroup_name(&self) -> String {
        format!("{}.{}", self.customer, self.sandbox)
    }
}

impl fmt::Display for SandboxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.customer, self.sandbox)
    }
}

/// Resources a sandbox holds, from its label file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allocation {
    #[serde(default)]
    pub vcpu_milli: u32,
    #[serde(default)]
    pub mem_bytes: u64,
    #[serde(default)]
    pub disk_bytes: u64,
    #[serde(default)]
    pub gpu_model: Option<String>,
    #[serde(default)]
    pub gpu_count: u32,
}

impl Allocation {
    /// Parses a label file's text; `file` names it in the error.
    pub fn from_label_file(file: &str, text: &str) -> Result<Self> {
        let allocation: Allocation = toml::from_str(text).map_err(|error| Error::Labels {
            file: file.to_owned(),
            reason: error.to_string(),
        })?;
        if allocation.gpu_count > 0 && allocation.gpu_model.is_none() {
            return Err(Error::Labels {
                file: file.to_owned(),
                reason: format!(
                    "gpu_count is {} but gpu_model is missing",
                    allocation.gpu_count
                ),
            });
        }
        Ok(allocation)
    }

    pub fn vcpu(&self) -> VcpuMillis {
        VcpuMillis(self.vcpu_milli)
    }
}

/// Activity signals of a sandbox at sample time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    pub exec_sessions: u32,
    pub open_conns: u32,
    /// The agent's monotonic count of API calls naming the sandbox.
    pub api_calls_total: u64,
}

impl Activity {
    /// Parses an activity file; unknown keys and malformed lines are skipped so
    /// a newer agent never blinds an older collector.
    pub fn parse(text: &str) -> Self {
        let mut activity = Activity::default();
        for line in text.lines() {
            let Some((key, value)) = line.trim().split_once(char::is_whitespace) else {
                continue;
            };
            let value = value.trim();
            match key {
                "exec_sessions" => activity.exec_sessions = value.parse().unwrap_or(0),
                "open_conns" => activity.open_conns = value.parse().unwrap_or(0),
                "api_calls" => activity.api_calls_total = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        activity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_name_splits_at_the_first_dot() {
        let key = SandboxKey::from_cgroup_name("acme.sbx.42").expect("valid");
        assert_eq!(key.customer.as_str(), "acme");
        assert_eq!(key.sandbox.as_str(), "sbx.42");
        assert_eq!(key.cgroup_name(), "acme.sbx.42");
    }

    #[test]
    fn cgroup_names_without_both_ids_are_not_sandboxes() {
        for name in ["nodot", ".sbx", "acme.", "ac me.sbx"] {
            assert!(SandboxKey::from_cgroup_name(name).is_err(), "{name}");
        }
    }

    #[test]
    fn label_file_gives_allocation_and_refuses_gpu_without_model() {
        let allocation = Allocation::from_label_file(
            "a.toml",
            "vcpu_milli = 1500\nmem_bytes = 1024\ndisk_bytes = 2048\n",
        )
        .expect("valid");
        assert_eq!(allocation.vcpu(), VcpuMillis(1500));
        assert_eq!(allocation.disk_bytes, 2048);
        let error = Allocation::from_label_file("b.toml", "gpu_count = 2\n").expect_err("refused");
        assert!(error.to_string().contains("b.toml"), "{error}");
        assert!(Allocation::from_label_file("c.toml", "vcpus = 2\n").is_err());
    }

    #[test]
    fn activity_file_reads_known_keys_and_skips_the_rest() {
        let activity = Activity::parse("exec_sessions 2\nopen_conns  5\nfuture 9\ngarbage\n");
        assert_eq!(
            activity,
            Activity {
                exec_sessions: 2,
                open_conns: 5,
                api_calls_total: 0
            }
        );
    }
}
