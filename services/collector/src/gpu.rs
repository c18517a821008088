//! GPU usage per sandbox, behind [`GpuReader`].
//!
//! On GPU nodes the reader is NVML (per-process utilisation and memory); each
//! process is mapped to its sandbox through `/proc/<pid>/cgroup`. This build
//! does not link or load NVML yet: [`NvmlUnavailable`] is the production reader
//! and says once that GPU collection is off while everything else goes on.
//! [`StandInGpu`] is a **stand-in for tests only**: it returns the processes it
//! was given, so the attribution logic is tested without a GPU.
//!
//! Billing does not depend on this module: allocated GPUs come from the label
//! file (`gpu_count`, `gpu_model`) and accumulate in `gpu_alloc_ms`. Utilisation
//! is an activity signal and a future wire field.

use std::collections::HashMap;
use std::path::Path;

use crate::sandbox::SandboxKey;
use crate::{Error, Result};

/// One process's use of one GPU, as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProcessUsage {
    pub pid: u32,
    pub gpu_model: String,
    /// Streaming-multiprocessor utilisation over the last sampling period, percent.
    pub sm_percent: u32,
    pub memory_bytes: u64,
}

/// GPU usage summed over a sandbox's processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxGpuUsage {
    pub sm_percent: u32,
    pub memory_bytes: u64,
    pub processes: u32,
}

/// Something that lists processes using GPUs.
pub trait GpuReader {
    fn read_processes(&mut self) -> Result<Vec<GpuProcessUsage>>;
}

/// The reader on a node without NVML: reports the absence once, then nothing.
#[derive(Debug, Default)]
pub struct NvmlUnavailable {
    reported: bool,
}

impl GpuReader for NvmlUnavailable {
    fn read_processes(&mut self) -> Result<Vec<GpuProcessUsage>> {
        if !self.reported {
            self.reported = true;
            tracing::warn!("NVML not available: GPU utilisation is not collected on this node (allocations from labels still bill)");
        }
        Ok(Vec::new())
    }
}

/// Stand-in reader for tests: returns the processes it holds. Never used in production.
#[derive(Debug, Default)]
pub struct StandInGpu {
    pub processes: Vec<GpuProcessUsage>,
    pub fail_with: Option<String>,
}

impl GpuReader for StandInGpu {
    fn read_processes(&mut self) -> Result<Vec<GpuProcessUsage>> {
        match &self.fail_with {
            Some(reason) => Err(Error::Gpu(reason.clone())),
            None => Ok(self.processes.clone()),
        }
    }
}

/// The sandbox a process belongs to, from the text of `/proc/<pid>/cgroup`:
/// the cgroup v2 line (`0::/path`) must lie directly under `parent` (the
/// configured parent relative to the v2 mount, e.g. `/idlemeter`), possibly in
/// a nested cgroup of the sandbox.
pub fn sandbox_of_process(proc_cgroup: &str, parent: &str) -> Option<SandboxKey> {
    let path = proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))?;
    let below = path.strip_prefix(parent)?.strip_prefix('/')?;
    let name = below.split('/').next()?;
    SandboxKey::from_cgroup_name(name).ok()
}

/// Sums GPU processes by sandbox; processes outside any sandbox are dropped.
pub fn attribute_to_sandboxes(
    processes: &[GpuProcessUsage],
    proc_root: &Path,
    parent: &str,
) -> HashMap<SandboxKey, SandboxGpuUsage> {
    let mut usage: HashMap<SandboxKey, SandboxGpuUsage> = HashMap::new();
    for process in processes {
        let Ok(text) =
            std::fs::read_to_string(proc_root.join(process.pid.to_string()).join("cgroup"))
        else {
            continue;
        };
        let Some(key) = sandbox_of_process(&text, parent) else {
            continue;
        };
        let entry = usage.entry(key).or_default();
        entry.sm_percent += process.sm_percent;
        entry.memory_bytes += process.memory_bytes;
        entry.processes += 1;
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, sm_percent: u32) -> GpuProcessUsage {
        GpuProcessUsage {
            pid,
            gpu_model: "H100".to_owned(),
            sm_percent,
            memory_bytes: 1 << 30,
        }
    }

    #[test]
    fn process_cgroup_line_maps_to_its_sandbox() {
        let text = "12:memory:/idlemeter/acme.sbx-1\n0::/idlemeter/acme.sbx-1/job\n";
        let key = sandbox_of_process(text, "/idlemeter").expect("inside a sandbox");
        assert_eq!(key.to_string(), "acme.sbx-1");
        assert_eq!(
            sandbox_of_process("0::/system.slice/sshd.service\n", "/idlemeter"),
            None
        );
        assert_eq!(
            sandbox_of_process("0::/idlemeterx/acme.a\n", "/idlemeter"),
            None
        );
    }

    #[test]
    fn stand_in_processes_are_summed_per_sandbox_and_strangers_dropped() {
        let proc_root = tempfile::tempdir().expect("tempdir");
        for (pid, cgroup) in [
            (10, "/idlemeter/acme.a"),
            (11, "/idlemeter/acme.a/worker"),
            (12, "/init.scope"),
        ] {
            let directory = proc_root.path().join(pid.to_string());
            std::fs::create_dir_all(&directory).expect("mkdir");
            std::fs::write(directory.join("cgroup"), format!("0::{cgroup}\n")).expect("write");
        }
        let mut reader = StandInGpu {
            processes: vec![
                process(10, 30),
                process(11, 25),
                process(12, 99),
                process(13, 1),
            ],
            fail_with: None,
        };
        let processes = reader.read_processes().expect("stand-in reads");
        let usage = attribute_to_sandboxes(&processes, proc_root.path(), "/idlemeter");
        assert_eq!(usage.len(), 1);
        let sandbox = SandboxKey::from_cgroup_name("acme.a").expect("valid");
        assert_eq!(
            usage[&sandbox],
            SandboxGpuUsage {
                sm_percent: 55,
                memory_bytes: 2 << 30,
                processes: 2
            }
        );
    }

    #[test]
    fn missing_nvml_reports_nothing_and_does_not_fail() {
        let mut reader = NvmlUnavailable::default();
        assert_eq!(reader.read_processes().expect("no error"), Vec::new());
        assert_eq!(reader.read_processes().expect("no error"), Vec::new());
        let mut failing = StandInGpu {
            fail_with: Some("driver gone".to_owned()),
            ..Default::default()
        };
        assert!(failing.read_processes().is_err());
    }
}
