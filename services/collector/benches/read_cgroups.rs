//! CPU time per sandbox-sample with 1,000 real cgroups at 1 Hz.
//!
//! Creates `SANDBOXES` (default 1,000) sandbox cgroups under a private cgroup v2
//! parent (removed at the end, also on Ctrl-C-free failure paths), each with a
//! label file, then ticks `TICKS` times (default 15) one second apart. For each
//! tick it measures the sampling thread's own CPU time (CLOCK_THREAD_CPUTIME_ID,
//! nanoseconds) for (1) reading every cgroup and (2) a whole tick: read, advance
//! counters, save state (rename, no fsync), encode and spool the node batch (fsync).
//! Prints the medians per sandbox-sample. Needs root and cgroup v2 at
//! /sys/fs/cgroup/unified (or `IDLEMETER_BENCH_CGROUP_ROOT`).
//!
//! Run: `cargo bench -p idlemeter-collector --bench read_cgroups`
//! (`SANDBOXES=200 TICKS=5 cargo bench ...` for a quicker look).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idlemeter_collector::reader::{SandboxReading, UsageReader};
use idlemeter_collector::spool::Spool;
use idlemeter_collector::{CgroupLayout, CgroupReader, CollectorMetrics, Sampler};
use idlemeter_core::NodeId;

struct BenchCgroups {
    parent: PathBuf,
    children: Vec<PathBuf>,
}

impl Drop for BenchCgroups {
    fn drop(&mut self) {
        for child in &self.children {
            let _ = std::fs::remove_dir(child);
        }
        let _ = std::fs::remove_dir(&self.parent);
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// CPU time this thread has run, in nanoseconds: `CLOCK_THREAD_CPUTIME_ID`,
/// which brings the thread's accounting up to date when read (schedstat is
/// only updated at scheduler events, so it charged one phase's CPU to the next).
fn thread_cpu_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn create_cgroups(root: &Path, labels: &Path, count: usize) -> BenchCgroups {
    let parent = root.join(format!("idlemeter-bench-{}", std::process::id()));
    std::fs::create_dir(&parent)
        .expect("creating the bench cgroup parent (root and cgroup v2 needed)");
    let mut cgroups = BenchCgroups {
        parent,
        children: Vec::with_capacity(count),
    };
    for index in 0..count {
        let name = format!("bench.sbx-{index:05}");
        let child = cgroups.parent.join(&name);
        std::fs::create_dir(&child).expect("creating a sandbox cgroup");
        cgroups.children.push(child);
        std::fs::write(
            labels.join(format!("{name}.toml")),
            "vcpu_milli = 2000\nmem_bytes = 4294967296\ndisk_bytes = 10737418240\n",
        )
        .expect("writing a label file");
    }
    cgroups
}

fn main() {
    let sandboxes = env_number("SANDBOXES", 1_000);
    let ticks = env_number("TICKS", 15).max(3);
    let root = std::env::var("IDLEMETER_BENCH_CGROUP_ROOT")
        .unwrap_or_else(|_| "/sys/fs/cgroup/unified".to_owned());
    let work = tempfile::tempdir().expect("tempdir");
    let labels = work.path().join("labels");
    std::fs::create_dir_all(&labels).expect("labels dir");
    let cgroups = create_cgroups(Path::new(&root), &labels, sandboxes);
    let layout = CgroupLayout {
        v2_parent: cgroups.parent.clone(),
        v1_memory_parent: work.path().join("no-v1"),
        v1_cpuacct_parent: work.path().join("no-v1"),
        v1_freezer_parent: work.path().join("no-v1"),
        v1_blkio_parent: work.path().join("no-v1"),
        labels_dir: labels,
        activity_dir: work.path().join("activity"),
    };

    let mut reader = CgroupReader::new(layout.clone());
    let mut readings: Vec<SandboxReading> = Vec::new();
    let spool = Arc::new(Spool::open(&work.path().join("spool"), 1 << 30).expect("spool"));
    let metrics = CollectorMetrics::register(&prometheus::Registry::new()).expect("metrics");
    let node = NodeId::parse("bench-node").expect("valid id");
    let mut sampler = Sampler::new(
        CgroupReader::new(layout),
        node,
        work.path().join("counters.state"),
        spool,
        metrics,
    )
    .expect("sampler");

    let mut read_ns_per_sample = Vec::new();
    let mut tick_ns_per_sample = Vec::new();
    let mut next = Instant::now();
    for tick in 0..ticks {
        let started = thread_cpu_ns();
        reader.read_node(&mut readings).expect("read");
        let read_ns = thread_cpu_ns() - started;
        assert_eq!(readings.len(), sandboxes, "every cgroup read");

        let started = thread_cpu_ns();
        let report = sampler.sample_once(chrono::Utc::now()).expect("tick");
        let tick_ns = thread_cpu_ns() - started;
        assert_eq!(report.samples, sandboxes);
        // The first tick discovers everything (label files, allocations): report steady state.
        if tick > 0 {
            read_ns_per_sample.push(read_ns as f64 / sandboxes as f64);
            tick_ns_per_sample.push(tick_ns as f64 / sandboxes as f64);
        }
        next += Duration::from_secs(1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    println!("sandboxes: {sandboxes}, ticks: {ticks} at 1 Hz (first tick, discovery, excluded)");
    println!(
        "read only:  median {:.2} µs CPU per sandbox-sample (min {:.2}, max {:.2})",
        median(&mut read_ns_per_sample) / 1_000.0,
        read_ns_per_sample[0] / 1_000.0,
        read_ns_per_sample[read_ns_per_sample.len() - 1] / 1_000.0
    );
    println!(
        "full tick:  median {:.2} µs CPU per sandbox-sample (min {:.2}, max {:.2}; read + counters + state save + encode + spool fsync)",
        median(&mut tick_ns_per_sample) / 1_000.0,
        tick_ns_per_sample[0] / 1_000.0,
        tick_ns_per_sample[tick_ns_per_sample.len() - 1] / 1_000.0
    );
    drop(cgroups);
}
