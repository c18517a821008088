//! Reading and freezing sandbox cgroups.
//!
//! Layout (see [`crate::sandbox`] for the naming rule): each sandbox is a child
//! of the configured cgroup v2 parent. From the v2 child the collector reads
//! `cpu.stat` (usage_usec, present in every v2 cgroup even with no controller
//! enabled), `cgroup.events` (frozen) and `memory.current` when v2's memory
//! controller covers it; otherwise memory comes from the v1 memory hierarchy
//! (`<v1 memory parent>/<same name>/memory.usage_in_bytes`), as on hybrid hosts.
//!
//! A read costs a few small-file reads per sandbox, into a stack buffer: no
//! allocation on the steady-state path. Discovery is one `readdir` of the parent
//! per tick, so new and vanished sandboxes are noticed within one interval.
//!
//! **cgroup v1.** Where the discovered directory has no `cpu.stat` (a host
//! without cgroup v2, whose discovery directory is then the v1 cpuacct
//! parent), CPU comes from `<v1 cpuacct parent>/<name>/cpuacct.usage`
//! (nanoseconds, reported in microseconds), and where it has no
//! `cgroup.events`, the frozen state from `<v1 freezer parent>/<name>/freezer.state`
//! (read every tick: the v1 freezer raises no events). Suspend and resume
//! write `cgroup.freeze` on v2 and `freezer.state` on v1.
//!
//! **Network.** A sandbox with a network namespace of its own (a microVM's tap
//! device lives in the host's namespace; this covers containers and gVisor-
//! style sandboxes) is metered from `/proc/<pid>/net/dev` of one of its
//! processes: bytes through every interface but `lo`. The pid comes from the
//! sandbox's `cgroup.procs` (or, if empty, a child cgroup's), and is looked up
//! again when it exits, at most every tenth tick. A sandbox in the collector's
//! own namespace cannot be told apart from the host: its network counters stay
//! at zero and this is logged once per sandbox. The collector must therefore
//! run in the host's network namespace.
//!
//! **Detail** (wire fields 40-47) is read every [`DETAIL_EVERY`] ticks and
//! repeated in between: pressure stall totals (`cpu.pressure`,
//! `memory.pressure`, `io.pressure`, "some" line), peak memory (v2
//! `memory.peak`, else v1 `memory.max_usage_in_bytes`), block I/O (v2
//! `io.stat` rbytes/wbytes; 0 where v2 has no io controller, as on hybrid
//! hosts, v1 `blkio.throttle.io_service_bytes`), and GPU utilisation and
//! memory from the [`GpuReader`], attributed to sandboxes through
//! `/proc/<pid>/cgroup`.
//!
//! `cgroup.events` is not read every tick: the kernel raises an inotify
//! modify event on it whenever its content changes (frozen, populated), so it
//! is read once at discovery and again only after such an event (or after the
//! event queue overflowed, or where no watch could be added). A change is still
//! seen within one interval; steady-state ticks save a third of the reads.
//!
//! Files: this one holds the layout and the reader's state; `discovery`
//! finds sandboxes and their files, `read` reads a tick, `detail` the
//! detail fields, `network` the network bytes, `freeze` suspends, resumes
//! and stops, `files` keeps kernel files open and parses them.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{DirEntryExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use idlemeter_core::SampleDetail;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::counters::counter_since;
use crate::gpu::{attribute_to_sandboxes, GpuReader};
use crate::reader::{NetBytes, SandboxReading, UsageReader};
use crate::sandbox::{Activity, Allocation, SandboxKey};
use crate::{Error, Result};

mod detail;
mod discovery;
mod files;
mod freeze;
mod network;
mod read;
#[cfg(test)]
mod tests;

pub use detail::{blkio_service_bytes, io_stat_bytes, pressure_total};
pub use files::field_value;
pub use freeze::{set_frozen, stop_sandbox};
pub use network::{interface_rises, parse_net_dev};

use detail::read_detail_files;
use files::{parse_number, read_small, KernelFile};
use network::{namespace_of, read_net};
use read::{read_activity, refresh_labels};

/// Where the collector looks for sandboxes and what the platform tells it.
#[derive(Debug, Clone)]
pub struct CgroupLayout {
    /// Where sandboxes are discovered: the cgroup v2 parent, or on a host
    /// without cgroup v2 the v1 cpuacct parent.
    pub v2_parent: PathBuf,
    pub v1_memory_parent: PathBuf,
    /// v1 fallbacks for a sandbox whose discovered directory has no `cpu.stat`
    /// (CPU from `cpuacct.usage`) or no `cgroup.events` (frozen from
    /// `freezer.state`), as on hosts without cgroup v2.
    pub v1_cpuacct_parent: PathBuf,
    pub v1_freezer_parent: PathBuf,
    /// v1 blkio, for block I/O bytes where the sandbox has no v2 `io.stat`.
    pub v1_blkio_parent: PathBuf,
    pub labels_dir: PathBuf,
    pub activity_dir: PathBuf,
}

/// Which file tells a sandbox's CPU time.
#[derive(Debug)]
enum CpuSource {
    /// v2 `cpu.stat` usage_usec.
    V2Stat(KernelFile),
    /// v1 `cpuacct.usage`, nanoseconds.
    V1Cpuacct(KernelFile),
}

/// Which file tells a sandbox's memory in use.
#[derive(Debug)]
enum MemorySource {
    V2Current(KernelFile),
    V1UsageInBytes(KernelFile),
    Unavailable,
}

/// A discovered sandbox and the paths it is read from.
#[derive(Debug)]
struct Discovered {
    key: SandboxKey,
    name: Arc<str>,
    instance: u64,
    /// The sandbox's directory in the discovered hierarchy.
    directory: PathBuf,
    cpu: CpuSource,
    events: KernelFile,
    /// v1 `freezer.state`, read every tick, where there is no `cgroup.events`.
    v1_freezer: Option<KernelFile>,
    /// Neither: reported running, never frozen.
    no_freezer: bool,
    memory: MemorySource,
    labels: PathBuf,
    labels_modified: Option<SystemTime>,
    allocation: Arc<Allocation>,
    activity_file: PathBuf,
    activity: Activity,
    /// `cgroup.events` as last read.
    frozen: bool,
    populated: bool,
    /// Whether `cgroup.events` must be read at the next tick: set at
    /// discovery, on an inotify event, and always when unwatched.
    events_stale: bool,
    events_watch: Option<WatchDescriptor>,
    net: NetSource,
    host_network_logged: bool,
    /// The last read failed (logged once until it reads again).
    read_failing: bool,
    detail_files: DetailFiles,
    /// Detail as last read (GPU busy time is integrated by the counters).
    detail: SampleDetail,
    gpu_sm_percent: u32,
}

/// Which file tells a sandbox's block I/O bytes.
#[derive(Debug)]
enum IoSource {
    /// v2 `io.stat` (`rbytes=`/`wbytes=` per device).
    V2Stat(KernelFile),
    /// v1 `blkio.throttle.io_service_bytes` (`8:0 Read N` per device).
    V1ServiceBytes(KernelFile),
}

/// The files detail is read from; `None` where the kernel has no such file.
#[derive(Debug)]
struct DetailFiles {
    cpu_pressure: KernelFile,
    memory_pressure: KernelFile,
    io_pressure: KernelFile,
    peak: Option<KernelFile>,
    io: Option<IoSource>,
}

/// Where a sandbox's network bytes are read from.
#[derive(Debug)]
enum NetSource {
    /// No process found yet (or it exited): look again at `retry_at` reads.
    Unresolved { retry_at: u64 },
    /// Its process shares the collector's namespace: not attributable. Looked
    /// at again from `recheck_at` (a runtime may unshare after starting).
    HostNamespace { recheck_at: u64 },
    /// A process in the sandbox's own namespace.
    Own(OwnNetwork),
}

/// The network namespace a sandbox's bytes are read from.
#[derive(Debug)]
struct OwnNetwork {
    pid: String,
    namespace: u64,
    /// `/proc/<pid>/net/dev`, kept open. An open file keeps its namespace
    /// alive even after the process exits, so the pid's namespace is checked
    /// again from `recheck_at`.
    dev: KernelFile,
    recheck_at: u64,
    /// Raw (received, sent) per interface at the last read.
    interfaces: HashMap<String, (u64, u64)>,
    /// Bytes since this namespace was first read: each interface's rise
    /// between reads (a fall is a reset: all of the new value counts). An
    /// interface seen for the first time is its own baseline, so traffic from
    /// before it was seen is never billed, nor a moved-in interface's past.
    rx: u64,
    tx: u64,
}

/// Reads every sandbox cgroup under a parent; the production [`UsageReader`].
#[derive(Debug)]
pub struct CgroupReader {
    layout: CgroupLayout,
    discovered: HashMap<String, Discovered>,
    /// Children that are not sandboxes, warned about once.
    ignored: HashSet<String>,
    seen: HashSet<String>,
    /// Reads done; label files are checked every [`LABEL_CHECK_EVERY`] reads.
    reads: u64,
    /// Modification time of the activity directory at the last read.
    activity_modified: Option<SystemTime>,
    /// Watches every sandbox's `cgroup.events`; `None` where inotify is
    /// unavailable (then the files are read every tick).
    events: Option<Inotify>,
    /// Sandbox (cgroup name) by watch descriptor number.
    watched: HashMap<i32, Arc<str>>,
    /// The watch on the parent directory (children created or removed);
    /// without it the parent is listed every tick.
    parent_watch: Option<i32>,
    /// Whether the parent changed since it was last listed.
    parent_changed: bool,
    /// The collector's own network namespace (inode).
    host_namespace: Option<u64>,
    /// GPU processes, read on detail ticks; `None` reads no GPU.
    gpu: Option<GpuSource>,
    /// The sandboxes' parent as `/proc/<pid>/cgroup` names it (relative to
    /// the cgroup2 mount), for attributing GPU processes.
    gpu_parent: Option<String>,
    /// Distinct GPU read errors already logged.
    gpu_errors_logged: HashSet<String>,
    /// Sandboxes present but unreadable at the last read.
    unreadable: Vec<Arc<str>>,
}

/// The GPU reader, behind a name for `Debug`.
struct GpuSource(Box<dyn GpuReader + Send>);

impl std::fmt::Debug for GpuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GpuReader")
    }
}

/// Detail is read every this many ticks (10 s at the default interval):
/// pressure totals and I/O are cumulative, so nothing is lost in between.
pub const DETAIL_EVERY: u64 = 10;

/// Label files change rarely (resizes): checking them every tenth read keeps a
/// `stat` per sandbox off most ticks; a resize is seen within ten intervals.
const LABEL_CHECK_EVERY: u64 = 10;
