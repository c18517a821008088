//! GPU usage per sandbox, behind [`GpuReader`].
//!
//! On GPU nodes the reader is [`NvmlGpu`] (in `gpu/nvml.rs`): it loads
//! `libnvidia-ml.so.1` at run time, so the collector builds and runs on nodes
//! without NVIDIA libraries, and reads per-process SM utilisation and used GPU
//! memory from every device; each process is then mapped to its sandbox
//! through `/proc/<pid>/cgroup` ([`attribute_to_sandboxes`]), which needs the
//! collector to see the host's pids.
//!
//! **`NvmlGpu` has not been verified on a real GPU in this project yet**: no
//! GPU machine was available when it was written, so only its loading failure
//! path and its pure helpers are tested. `examples/nvml_probe.rs` is the check
//! to run on a GPU node before relying on it.
//!
//! [`open_gpu_reader`] picks the reader from [`GpuMode`] (`gpu = "auto" | "off"
//! | "required"` in the collector configuration). Where NVML cannot be loaded,
//! `auto` gives [`NvmlUnavailable`], which says so once while everything else
//! goes on. [`StandInGpu`] is a **stand-in for tests only**: it returns the
//! processes it was given, so the attribution logic is tested without a GPU.
//!
//! Billing does not depend on this module: allocated GPUs come from the label
//! file (`gpu_count`, `gpu_model`) and accumulate in `gpu_alloc_ms`. Utilisation
//! and GPU memory go out as sample detail (`gpu_busy_ms`, `gpu_mem_used_bytes`):
//! the cgroup reader asks the configured reader every tenth tick
//! (`CgroupReader::with_gpu`) and the counters integrate the utilisation.

mod nvml;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::sandbox::SandboxKey;
use crate::{Error, Result};

pub use self::nvml::{GpuDevice, NvmlGpu, NVML_LIBRARY};

/// One process's use of one GPU, as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProcessUsage {
    pub pid: u32,
    pub gpu_model: String,
    /// Streaming-multiprocessor utilisation, percent: with NVML, the mean of
    /// the driver's samples since the previous read; 0 where the GPU does not
    /// report utilisation per process.
    pub sm_percent: u32,
    /// GPU memory the process holds on this device.
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

/// Whether this node reads GPU utilisation, from `gpu` in the collector
/// configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuMode {
    /// Read GPUs through NVML where it loads; without it, log once and go on.
    #[default]
    Auto,
    /// Do not read GPUs, even where NVML is present.
    Off,
    /// Fail to open a reader when NVML cannot be loaded (GPU nodes, where a
    /// missing driver is a fault to notice rather than a node without GPUs).
    Required,
}

/// The GPU reader for `mode`. Only [`GpuMode::Required`] fails, when NVML
/// cannot be loaded or initialised.
pub fn open_gpu_reader(mode: GpuMode) -> Result<Box<dyn GpuReader + Send>> {
    open_gpu_reader_from(mode, OsStr::new(NVML_LIBRARY))
}

/// [`open_gpu_reader`] with NVML loaded from `library`, so tests can name a
/// library that is absent on every machine.
fn open_gpu_reader_from(mode: GpuMode, library: &OsStr) -> Result<Box<dyn GpuReader + Send>> {
    match mode {
        GpuMode::Off => {
            tracing::info!("GPU collection is off by configuration (gpu = \"off\")");
            Ok(Box::new(GpuOff))
        }
        GpuMode::Required => Ok(Box::new(NvmlGpu::open_library(library)?)),
        GpuMode::Auto => match NvmlGpu::open_library(library) {
            Ok(reader) => Ok(Box::new(reader)),
            Err(error) => {
                let reason = match error {
                    Error::Gpu(reason) => reason,
                    other => other.to_string(),
                };
                let mut reader = NvmlUnavailable::new(reason);
                reader.report_once();
                Ok(Box::new(reader))
            }
        },
    }
}

/// The reader on a node without NVML: reports the absence once, then nothing.
#[derive(Debug, Default)]
pub struct NvmlUnavailable {
    /// Why NVML could not be loaded; empty when not known.
    reason: String,
    reported: bool,
}

impl NvmlUnavailable {
    pub fn new(reason: String) -> Self {
        Self {
            reason,
            reported: false,
        }
    }

    /// Logs the absence of NVML, the first time only.
    fn report_once(&mut self) {
        if self.reported {
            return;
        }
        self.reported = true;
        let reason = if self.reason.is_empty() {
            "reason not known"
        } else {
            &self.reason
        };
        tracing::warn!("NVML not available: {reason}; GPU utilisation is not collected on this node (allocations from labels still bill)");
    }
}

impl GpuReader for NvmlUnavailable {
    fn read_processes(&mut self) -> Result<Vec<GpuProcessUsage>> {
        self.report_once();
        Ok(Vec::new())
    }
}

/// The reader when GPU collection is configured off: nothing, silently.
#[derive(Debug, Default)]
pub struct GpuOff;

impl GpuReader for GpuOff {
    fn read_processes(&mut self) -> Result<Vec<GpuProcessUsage>> {
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

    /// A library path no machine has, so these tests hold on GPU nodes too.
    const ABSENT_NVML: &str = "/nonexistent/idlemeter-test/libnvidia-ml.so.1";

    #[test]
    fn auto_mode_without_nvml_reads_no_processes_and_does_not_fail() {
        let mut reader = open_gpu_reader_from(GpuMode::Auto, OsStr::new(ABSENT_NVML))
            .expect("auto mode never fails to open");
        assert_eq!(reader.read_processes().expect("first read"), Vec::new());
        assert_eq!(reader.read_processes().expect("second read"), Vec::new());
    }

    #[test]
    fn required_mode_without_nvml_fails_naming_nvml_and_the_library() {
        let Err(error) = open_gpu_reader_from(GpuMode::Required, OsStr::new(ABSENT_NVML)) else {
            panic!("required mode opened a reader without NVML");
        };
        let message = error.to_string();
        assert!(matches!(error, Error::Gpu(_)), "{message}");
        assert!(message.contains("NVML"), "{message}");
        assert!(message.contains(ABSENT_NVML), "{message}");
    }

    #[test]
    fn public_constructor_follows_whether_nvml_loads_on_this_machine() {
        let nvml_loads = NvmlGpu::open().is_ok();
        let mut auto = open_gpu_reader(GpuMode::Auto).expect("auto mode never fails to open");
        let auto_read = auto.read_processes().expect("auto mode reads");
        let required = open_gpu_reader(GpuMode::Required);
        if nvml_loads {
            let mut required = required.expect("NVML loads, so required mode opens");
            required.read_processes().expect("required mode reads");
        } else {
            assert_eq!(auto_read, Vec::new());
            let Err(error) = required else {
                panic!("required mode opened a reader where NVML does not load");
            };
            assert!(error.to_string().contains("NVML"), "{error}");
        }
    }

    #[test]
    fn off_mode_reads_no_processes() {
        let mut reader = open_gpu_reader(GpuMode::Off).expect("off mode never fails");
        assert_eq!(reader.read_processes().expect("read"), Vec::new());
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
