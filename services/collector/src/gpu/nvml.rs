//! The production GPU reader: NVML, loaded at run time through `nvml-wrapper`.
//!
//! Not yet verified on a real GPU in this project (see the `gpu` module doc);
//! `examples/nvml_probe.rs` is the check to run on a GPU node.
//!
//! Each read goes over every device and reports one entry per (process,
//! device): SM utilisation from the samples the driver took since the previous
//! read, and used memory from the running compute and graphics processes. A
//! fault on one device is logged once per distinct message and the other
//! devices are still read, so one GPU fallen off the bus does not blind the
//! node. MIG instances are not enumerated on their own: NVML does not give
//! per-process utilisation under MIG, so such processes report 0 SM percent.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::{ProcessInfo, ProcessUtilizationSample};
use nvml_wrapper::{Device, Nvml};

use super::{GpuProcessUsage, GpuReader};
use crate::{Error, Result};

/// The library the NVIDIA driver installs on Linux. The unversioned
/// `libnvidia-ml.so` ships only with development packages, so it is not asked for.
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// One GPU as NVML enumerates it. NVML's index order is not guaranteed to
/// match CUDA's or to survive a reboot; the UUID is the stable name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    pub index: u32,
    pub name: String,
    pub uuid: String,
}

/// Reads every GPU on the node through NVML, initialised once in [`NvmlGpu::open`].
pub struct NvmlGpu {
    nvml: Nvml,
    library: String,
    devices: HashMap<u32, DeviceProgress>,
    /// Device failures already logged, so a lasting fault is logged once.
    logged_failures: HashSet<String>,
}

/// What the reader remembers of one device between reads.
#[derive(Debug, Default)]
struct DeviceProgress {
    /// CPU timestamp (µs) of the newest utilisation sample seen; the next
    /// read asks the driver only for samples after it.
    last_sample_us: Option<u64>,
    /// Queries this device answered `NotSupported`, already logged.
    logged_unsupported: HashSet<&'static str>,
}

impl DeviceProgress {
    /// `Ok(None)` where the device answers `NotSupported` (logged once per
    /// device and query); other NVML errors become [`Error::Gpu`] naming the device.
    fn unless_unsupported<T>(
        &mut self,
        result: std::result::Result<T, NvmlError>,
        index: u32,
        name: &str,
        what: &'static str,
    ) -> Result<Option<T>> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(NvmlError::NotSupported) => {
                if self.logged_unsupported.insert(what) {
                    tracing::warn!(
                        gpu = index,
                        model = name,
                        "GPU {index} ({name}) does not support {what}, so its processes are reported without it (as 0)"
                    );
                }
                Ok(None)
            }
            Err(error) => Err(device_error(index, name, what, error)),
        }
    }
}

impl fmt::Debug for NvmlGpu {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("NvmlGpu")
            .field("library", &self.library)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl NvmlGpu {
    /// NVML from [`NVML_LIBRARY`]; what `GpuMode::Required` opens.
    pub fn open() -> Result<Self> {
        Self::open_library(OsStr::new(NVML_LIBRARY))
    }

    /// NVML from `library`: a file name the dynamic loader searches for, or a path.
    pub fn open_library(library: &OsStr) -> Result<Self> {
        let library = library.to_string_lossy().into_owned();
        let nvml = Nvml::builder()
            .lib_path(OsStr::new(&library))
            .init()
            .map_err(|error| {
                Error::Gpu(format!("NVML could not be loaded from {library}: {error}"))
            })?;
        Ok(Self {
            nvml,
            library,
            devices: HashMap::new(),
            logged_failures: HashSet::new(),
        })
    }

    /// The NVIDIA driver's version, as NVML reports it.
    pub fn driver_version(&self) -> Result<String> {
        self.nvml.sys_driver_version().map_err(|error| {
            Error::Gpu(format!(
                "reading the NVIDIA driver version through NVML: {error}"
            ))
        })
    }

    /// Every GPU NVML sees, in NVML's index order.
    pub fn devices(&self) -> Result<Vec<GpuDevice>> {
        let count = device_count(&self.nvml)?;
        (0..count)
            .map(|index| {
                let device = open_device(&self.nvml, index)?;
                let name = device_name(&device, index)?;
                let uuid = device
                    .uuid()
                    .map_err(|error| device_error(index, &name, "reading the UUID", error))?;
                Ok(GpuDevice { index, name, uuid })
            })
            .collect()
    }
}

impl GpuReader for NvmlGpu {
    fn read_processes(&mut self) -> Result<Vec<GpuProcessUsage>> {
        let count = device_count(&self.nvml)?;
        let mut processes = Vec::new();
        for index in 0..count {
            let progress = self.devices.entry(index).or_default();
            match read_device(&self.nvml, index, progress) {
                Ok(mut device_processes) => processes.append(&mut device_processes),
                Err(error) => {
                    let message = error.to_string();
                    if self.logged_failures.insert(message.clone()) {
                        tracing::warn!(gpu = index, error = %message, "reading a GPU failed; the other GPUs are still read (each distinct error is logged once)");
                    }
                }
            }
        }
        Ok(processes)
    }
}

/// One device's processes: memory from the running process lists, SM percent
/// from the utilisation samples since the previous read.
fn read_device(
    nvml: &Nvml,
    index: u32,
    progress: &mut DeviceProgress,
) -> Result<Vec<GpuProcessUsage>> {
    let device = open_device(nvml, index)?;
    let name = device_name(&device, index)?;
    let compute = progress.unless_unsupported(
        device.running_compute_processes(),
        index,
        &name,
        "listing running compute processes",
    )?;
    let graphics = progress.unless_unsupported(
        device.running_graphics_processes(),
        index,
        &name,
        "listing running graphics processes",
    )?;
    let memory = memory_bytes_by_pid(compute.as_deref(), graphics.as_deref());
    let sm_percent = sm_percent_since_last_read(&device, index, &name, progress)?;
    Ok(device_processes(&name, &memory, &sm_percent))
}

/// Mean SM percent per pid over the samples taken since the previous read
/// (the first read gets whatever the driver still buffers). A device without
/// per-process utilisation reports none (logged once).
fn sm_percent_since_last_read(
    device: &Device<'_>,
    index: u32,
    name: &str,
    progress: &mut DeviceProgress,
) -> Result<HashMap<u32, u32>> {
    let samples = match device.process_utilization_stats(progress.last_sample_us) {
        // The driver's answer when no process was busy since the timestamp.
        Err(NvmlError::NotFound) => return Ok(HashMap::new()),
        result => progress
            .unless_unsupported(result, index, name, "reading per-process utilisation")?
            .unwrap_or_default(),
    };
    let newest = samples.iter().map(|sample| sample.timestamp).max();
    progress.last_sample_us = progress.last_sample_us.max(newest);
    Ok(mean_sm_percent_by_pid(&samples))
}

fn device_count(nvml: &Nvml) -> Result<u32> {
    nvml.device_count()
        .map_err(|error| Error::Gpu(format!("counting GPUs through NVML: {error}")))
}

fn open_device(nvml: &Nvml, index: u32) -> Result<Device<'_>> {
    nvml.device_by_index(index)
        .map_err(|error| Error::Gpu(format!("opening GPU {index} through NVML: {error}")))
}

fn device_name(device: &Device<'_>, index: u32) -> Result<String> {
    device
        .name()
        .map_err(|error| Error::Gpu(format!("reading the name of GPU {index}: {error}")))
}

fn device_error(index: u32, name: &str, what: &str, error: NvmlError) -> Error {
    Error::Gpu(format!("{what} of GPU {index} ({name}): {error}"))
}

/// Used memory per pid. A process with both a compute and a graphics context
/// is listed twice with the same memory, so the larger figure is kept rather
/// than the sum. Memory NVML cannot tell (`Unavailable`) counts as 0.
fn memory_bytes_by_pid(
    compute: Option<&[ProcessInfo]>,
    graphics: Option<&[ProcessInfo]>,
) -> HashMap<u32, u64> {
    let mut memory: HashMap<u32, u64> = HashMap::new();
    let listed = compute.unwrap_or_default().iter();
    for process in listed.chain(graphics.unwrap_or_default()) {
        let bytes = match process.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => bytes,
            UsedGpuMemory::Unavailable => 0,
        };
        let entry = memory.entry(process.pid).or_default();
        *entry = (*entry).max(bytes);
    }
    memory
}

/// Mean SM percent per pid, rounded to the nearest percent. The driver keeps
/// several samples per process between two reads of a one-second tick.
fn mean_sm_percent_by_pid(samples: &[ProcessUtilizationSample]) -> HashMap<u32, u32> {
    let mut sums: HashMap<u32, (u64, u64)> = HashMap::new();
    for sample in samples {
        let (sum, count) = sums.entry(sample.pid).or_default();
        *sum += u64::from(sample.sm_util);
        *count += 1;
    }
    sums.into_iter()
        .map(|(pid, (sum, count))| {
            let mean = (sum + count / 2) / count;
            (pid, u32::try_from(mean).unwrap_or(u32::MAX))
        })
        .collect()
}

/// One entry per pid seen in either source, in pid order: a process listed
/// without samples was idle (0 percent); one sampled but no longer listed has
/// exited and holds no memory.
fn device_processes(
    gpu_model: &str,
    memory: &HashMap<u32, u64>,
    sm_percent: &HashMap<u32, u32>,
) -> Vec<GpuProcessUsage> {
    let pids: BTreeSet<u32> = memory.keys().chain(sm_percent.keys()).copied().collect();
    pids.into_iter()
        .map(|pid| GpuProcessUsage {
            pid,
            gpu_model: gpu_model.to_owned(),
            sm_percent: sm_percent.get(&pid).copied().unwrap_or(0),
            memory_bytes: memory.get(&pid).copied().unwrap_or(0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(pid: u32, used_gpu_memory: UsedGpuMemory) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory,
            gpu_instance_id: None,
            compute_instance_id: None,
        }
    }

    fn sample(pid: u32, timestamp: u64, sm_util: u32) -> ProcessUtilizationSample {
        ProcessUtilizationSample {
            pid,
            timestamp,
            sm_util,
            mem_util: 0,
            enc_util: 0,
            dec_util: 0,
        }
    }

    #[test]
    fn process_in_both_lists_counts_its_memory_once() {
        let compute = [
            listed(10, UsedGpuMemory::Used(4 << 30)),
            listed(11, UsedGpuMemory::Unavailable),
        ];
        let graphics = [listed(10, UsedGpuMemory::Used(4 << 30))];
        let memory = memory_bytes_by_pid(Some(&compute), Some(&graphics));
        assert_eq!(memory, HashMap::from([(10, 4 << 30), (11, 0)]));
        assert_eq!(
            memory_bytes_by_pid(None, Some(&graphics)),
            HashMap::from([(10, 4 << 30)])
        );
    }

    #[test]
    fn several_samples_of_a_process_average_to_the_nearest_percent() {
        // pid 10: (30 + 41) / 2 = 35.5 → 36; pid 11: one sample of 7.
        let samples = [sample(10, 100, 30), sample(11, 150, 7), sample(10, 200, 41)];
        assert_eq!(
            mean_sm_percent_by_pid(&samples),
            HashMap::from([(10, 36), (11, 7)])
        );
        assert_eq!(mean_sm_percent_by_pid(&[]), HashMap::new());
    }

    #[test]
    fn listed_and_sampled_processes_merge_into_one_entry_per_pid() {
        let memory = HashMap::from([(12, 1 << 30), (10, 2 << 30)]);
        let sm_percent = HashMap::from([(10, 55), (13, 9)]);
        let processes = device_processes("NVIDIA H200", &memory, &sm_percent);
        let summary: Vec<(u32, u32, u64)> = processes
            .iter()
            .map(|process| (process.pid, process.sm_percent, process.memory_bytes))
            .collect();
        // 12 was listed but idle; 13 was sampled but has exited.
        assert_eq!(summary, [(10, 55, 2 << 30), (12, 0, 1 << 30), (13, 9, 0)]);
        assert!(processes
            .iter()
            .all(|process| process.gpu_model == "NVIDIA H200"));
    }
}
