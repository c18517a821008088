//! Checks the NVML GPU reader on a real GPU node, which this project has not
//! done yet: loads NVML as `gpu = "required"` does, then for 5 reads one second
//! apart prints every device (index, name, UUID), every process usage the
//! reader sees, and those usages attributed to sandboxes through `/proc`.
//!
//! Run: `cargo run -p idlemeter-collector --example nvml_probe [-- <cgroup parent>]`
//! where the parent is relative to the cgroup v2 mount (default `/idlemeter`).
//! Exits 1 when NVML cannot be loaded, 2 when a read fails. Set `RUST_LOG`
//! (default `info`) to see the reader's once-only warnings.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use idlemeter_collector::gpu::{attribute_to_sandboxes, sandbox_of_process, GpuReader, NvmlGpu};

const READS: u32 = 5;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let parent = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/idlemeter".to_owned());
    // What `open_gpu_reader(GpuMode::Required)` does, kept concrete so the
    // devices can be listed too.
    let mut reader = match NvmlGpu::open() {
        Ok(reader) => reader,
        Err(error) => {
            eprintln!(
                "nvml_probe: NVML is not available on this machine, nothing was probed: {error}"
            );
            eprintln!("nvml_probe: is the NVIDIA driver installed and libnvidia-ml.so.1 on the loader path?");
            return ExitCode::from(1);
        }
    };
    match reader.driver_version() {
        Ok(version) => println!("NVML loaded, driver {version}"),
        Err(error) => println!("NVML loaded, driver version unknown: {error}"),
    }
    let proc_root = Path::new("/proc");
    for read in 1..=READS {
        if read > 1 {
            std::thread::sleep(Duration::from_secs(1));
        }
        println!("--- read {read} of {READS}");
        if let Err(error) = probe_once(&mut reader, proc_root, &parent) {
            eprintln!("nvml_probe: read {read} failed: {error}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

fn probe_once(
    reader: &mut NvmlGpu,
    proc_root: &Path,
    parent: &str,
) -> idlemeter_collector::Result<()> {
    let devices = reader.devices()?;
    println!("devices: {}", devices.len());
    for device in &devices {
        println!(
            "  device {} name={:?} uuid={}",
            device.index, device.name, device.uuid
        );
    }
    let processes = reader.read_processes()?;
    println!("process usages: {}", processes.len());
    for process in &processes {
        let sandbox =
            std::fs::read_to_string(proc_root.join(process.pid.to_string()).join("cgroup"))
                .ok()
                .and_then(|text| sandbox_of_process(&text, parent))
                .map_or_else(|| "-".to_owned(), |key| key.to_string());
        println!(
            "  pid {} gpu_model={:?} sm_percent={} memory_bytes={} sandbox={sandbox}",
            process.pid, process.gpu_model, process.sm_percent, process.memory_bytes
        );
    }
    let mut by_sandbox: Vec<_> = attribute_to_sandboxes(&processes, proc_root, parent)
        .into_iter()
        .collect();
    by_sandbox.sort_by_key(|(key, _)| key.to_string());
    println!("sandboxes under {parent}: {}", by_sandbox.len());
    for (key, usage) in &by_sandbox {
        println!(
            "  {key} sm_percent={} memory_bytes={} processes={}",
            usage.sm_percent, usage.memory_bytes, usage.processes
        );
    }
    Ok(())
}
