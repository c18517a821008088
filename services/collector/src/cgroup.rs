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

/// A cgroup file kept open and re-read with `pread` at offset 0 (the kernel
/// regenerates its content on every read from the start): one syscall per
/// read instead of three. The collector holds two or three descriptors per
/// sandbox; if the process runs out (EMFILE) the file is opened per read.
#[derive(Debug)]
struct KernelFile {
    path: PathBuf,
    file: Option<File>,
}

/// `EMFILE`: the process has no descriptor left.
const TOO_MANY_OPEN_FILES: i32 = 24;

impl KernelFile {
    fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }

    /// The kept-open file, opened on first use; `None` when the process has
    /// no descriptor left (EMFILE), in which case the caller reads by path.
    fn open(&mut self) -> std::io::Result<Option<&File>> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(error) if error.raw_os_error() == Some(TOO_MANY_OPEN_FILES) => return Ok(None),
                Err(error) => return Err(error),
            }
        }
        Ok(self.file.as_ref())
    }

    fn read<'a>(&mut self, buffer: &'a mut [u8]) -> std::io::Result<&'a [u8]> {
        let Some(file) = self.open()? else {
            return read_small(&self.path, buffer);
        };
        let length = file.read_at(buffer, 0)?;
        Ok(&buffer[..length])
    }

    /// Reads the whole file into `out`. Kernel files generated in records
    /// (`/proc/net/dev`, `io.stat`) return only whole lines per read, so one
    /// read of a fixed buffer may silently stop early: read on until the end.
    fn read_all(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        let Some(file) = self.open()? else {
            out.extend_from_slice(&std::fs::read(&self.path)?);
            return Ok(());
        };
        let mut chunk = [0_u8; 4096];
        loop {
            let length = file.read_at(&mut chunk, out.len() as u64)?;
            if length == 0 {
                return Ok(());
            }
            out.extend_from_slice(&chunk[..length]);
        }
    }
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

impl CgroupReader {
    pub fn new(layout: CgroupLayout) -> Self {
        let own_namespace = namespace_of("self");
        if own_namespace.is_some() && own_namespace != namespace_of("1") {
            tracing::warn!("the collector does not run in the host's network namespace: a sandbox in the host namespace would look like one of its own and be metered the host's traffic; run it with the host network");
        }
        Self {
            layout,
            discovered: HashMap::new(),
            ignored: HashSet::new(),
            seen: HashSet::new(),
            reads: 0,
            activity_modified: None,
            events: Inotify::init()
                .inspect_err(|error| tracing::warn!(%error, "inotify unavailable: cgroup.events is read every tick"))
                .ok(),
            watched: HashMap::new(),
            parent_watch: None,
            parent_changed: true,
            host_namespace: own_namespace,
            gpu: None,
            gpu_parent: None,
            gpu_errors_logged: HashSet::new(),
            unreadable: Vec::new(),
        }
    }

    /// Reads GPU processes through `gpu` on detail ticks and attributes them
    /// to sandboxes.
    pub fn with_gpu(mut self, gpu: Box<dyn GpuReader + Send>) -> Self {
        self.gpu_parent = cgroup2_relative(&self.layout.v2_parent);
        if self.gpu_parent.is_none() {
            tracing::warn!(parent = %self.layout.v2_parent.display(), "the sandbox parent is not under a cgroup2 mount: GPU processes cannot be attributed");
        }
        self.gpu = Some(GpuSource(gpu));
        self
    }

    /// Reads GPU processes and sets every sandbox's GPU use (0 for a sandbox
    /// with no GPU process).
    fn read_gpus(&mut self) {
        let (Some(gpu), Some(parent)) = (self.gpu.as_mut(), self.gpu_parent.as_deref()) else {
            return;
        };
        let processes = match gpu.0.read_processes() {
            Ok(processes) => processes,
            Err(error) => {
                let text = error.to_string();
                if self.gpu_errors_logged.insert(text.clone()) {
                    tracing::warn!(error = %text, "reading GPU processes failed (logged once per distinct error)");
                }
                // Unknown is not busy: the last utilisation must not go on accruing.
                for sandbox in self.discovered.values_mut() {
                    sandbox.gpu_sm_percent = 0;
                    sandbox.detail.gpu_mem_used_bytes = 0;
                }
                return;
            }
        };
        let usage = attribute_to_sandboxes(&processes, Path::new("/proc"), parent);
        for sandbox in self.discovered.values_mut() {
            let used = usage.get(&sandbox.key).cloned().unwrap_or_default();
            sandbox.gpu_sm_percent = used.sm_percent;
            sandbox.detail.gpu_mem_used_bytes = used.memory_bytes;
        }
    }

    /// Marks the sandboxes whose `cgroup.events` changed since the last tick.
    fn drain_events(&mut self) {
        let Some(inotify) = self.events.as_mut() else {
            return;
        };
        let mut buffer = [0_u8; 4096];
        loop {
            let events = match inotify.read_events(&mut buffer) {
                Ok(events) => events,
                Err(error) if error.kind() == ErrorKind::WouldBlock => return,
                Err(error) => {
                    tracing::warn!(%error, "reading inotify events failed: rereading every cgroup.events");
                    self.parent_changed = true;
                    self.discovered
                        .values_mut()
                        .for_each(|sandbox| sandbox.events_stale = true);
                    return;
                }
            };
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    tracing::warn!("inotify queue overflowed: rereading every cgroup.events");
                    self.parent_changed = true;
                    self.discovered
                        .values_mut()
                        .for_each(|sandbox| sandbox.events_stale = true);
                    continue;
                }
                let id = event.wd.get_watch_descriptor_id();
                if Some(id) == self.parent_watch {
                    self.parent_changed = true;
                    if event.mask.contains(EventMask::IGNORED) {
                        // The parent itself was removed: list (and watch) it again.
                        self.parent_watch = None;
                    }
                    continue;
                }
                let Some(name) = self.watched.get(&id) else {
                    continue;
                };
                if event.mask.contains(EventMask::IGNORED) {
                    // The cgroup is gone (or the watch was removed).
                    self.watched.remove(&id);
                    continue;
                }
                if let Some(sandbox) = self.discovered.get_mut(name.as_ref()) {
                    sandbox.events_stale = true;
                }
            }
        }
    }

    /// Watches a new sandbox's `cgroup.events`; without a watch it is read every tick.
    fn watch_events(&mut self, sandbox: &mut Discovered) {
        let Some(inotify) = self.events.as_mut() else {
            return;
        };
        if sandbox.v1_freezer.is_some() || sandbox.no_freezer {
            return;
        }
        match inotify
            .watches()
            .add(&sandbox.events.path, WatchMask::MODIFY)
        {
            Ok(watch) => {
                self.watched
                    .insert(watch.get_watch_descriptor_id(), Arc::clone(&sandbox.name));
                sandbox.events_watch = Some(watch);
            }
            Err(error) => {
                tracing::warn!(sandbox = %sandbox.key, %error, "no inotify watch on cgroup.events (fs.inotify.max_user_watches?): read every tick")
            }
        }
    }

    /// The agent replaces activity files by rename, which changes the
    /// directory's modification time: one `stat` per tick tells whether any
    /// activity file needs reading again.
    fn activity_changed(&mut self) -> bool {
        let modified = std::fs::metadata(&self.layout.activity_dir)
            .and_then(|metadata| metadata.modified())
            .ok();
        let changed = modified != self.activity_modified;
        self.activity_modified = modified;
        changed
    }

    /// Lists the parent when a child was created or removed since the last
    /// listing (inotify), when the parent is not watched, and every
    /// [`LABEL_CHECK_EVERY`] reads as a safety net.
    fn discover_if_changed(&mut self, safety_net: bool) -> Result<()> {
        if self.parent_watch.is_none() {
            self.watch_parent();
        }
        if !(self.parent_changed || self.parent_watch.is_none() || safety_net) {
            return Ok(());
        }
        // Cleared before listing: a change during the listing raises it again.
        self.parent_changed = false;
        let listed = self.discover();
        if listed.is_err() {
            self.parent_changed = true;
        }
        listed
    }

    fn watch_parent(&mut self) {
        let Some(inotify) = self.events.as_mut() else {
            return;
        };
        let mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::ONLYDIR;
        if let Ok(watch) = inotify.watches().add(&self.layout.v2_parent, mask) {
            self.parent_watch = Some(watch.get_watch_descriptor_id());
            self.parent_changed = true;
        }
    }

    fn discover(&mut self) -> Result<()> {
        let entries = std::fs::read_dir(&self.layout.v2_parent).map_err(|source| Error::Io {
            context: format!("listing sandboxes in {}", self.layout.v2_parent.display()),
            source,
        })?;
        self.seen.clear();
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            self.notice(name, entry.ino());
        }
        let vanished: Vec<String> = self
            .discovered
            .keys()
            .filter(|name| !self.seen.contains(*name))
            .cloned()
            .collect();
        for name in vanished {
            if let Some(sandbox) = self.discovered.remove(&name) {
                self.unwatch(sandbox);
            }
        }
        Ok(())
    }

    /// Forgets a sandbox's watch. The kernel drops the watch itself when the
    /// cgroup is removed; removing it here covers a sandbox that is only
    /// replaced (a new instance under the same name).
    fn unwatch(&mut self, sandbox: Discovered) {
        let Some(watch) = sandbox.events_watch else {
            return;
        };
        self.watched.remove(&watch.get_watch_descriptor_id());
        if let Some(inotify) = self.events.as_mut() {
            let _ = inotify.watches().remove(watch);
        }
    }

    fn notice(&mut self, name: String, instance: u64) {
        if self.ignored.contains(&name) {
            return;
        }
        let known = self
            .discovered
            .get(&name)
            .is_some_and(|sandbox| sandbox.instance == instance);
        if !known {
            match SandboxKey::from_cgroup_name(&name) {
                Ok(key) => {
                    tracing::info!(sandbox = %key, instance, "sandbox cgroup discovered");
                    let mut sandbox = self.describe(key, &name, instance);
                    refresh_labels(&mut sandbox);
                    sandbox.activity = read_activity(&sandbox.activity_file);
                    self.watch_events(&mut sandbox);
                    if let Some(replaced) = self.discovered.insert(name.clone(), sandbox) {
                        self.unwatch(replaced);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cgroup ignored");
                    self.ignored.insert(name);
                    return;
                }
            }
        }
        self.seen.insert(name);
    }

    fn describe(&self, key: SandboxKey, name: &str, instance: u64) -> Discovered {
        let v2 = self.layout.v2_parent.join(name);
        let v2_memory = v2.join("memory.current");
        let v1_memory = self
            .layout
            .v1_memory_parent
            .join(name)
            .join("memory.usage_in_bytes");
        let memory = if v2_memory.exists() {
            MemorySource::V2Current(KernelFile::new(v2_memory))
        } else if v1_memory.exists() {
            MemorySource::V1UsageInBytes(KernelFile::new(v1_memory))
        } else {
            MemorySource::Unavailable
        };
        let v1_peak = self
            .layout
            .v1_memory_parent
            .join(name)
            .join("memory.max_usage_in_bytes");
        let peak = [v2.join("memory.peak"), v1_peak]
            .into_iter()
            .find(|path| path.exists())
            .map(KernelFile::new);
        let v1_io = self
            .layout
            .v1_blkio_parent
            .join(name)
            .join("blkio.throttle.io_service_bytes");
        let io = if v2.join("io.stat").exists() {
            Some(IoSource::V2Stat(KernelFile::new(v2.join("io.stat"))))
        } else if v1_io.exists() {
            Some(IoSource::V1ServiceBytes(KernelFile::new(v1_io)))
        } else {
            None
        };
        let cpu = if v2.join("cpu.stat").exists() {
            CpuSource::V2Stat(KernelFile::new(v2.join("cpu.stat")))
        } else {
            CpuSource::V1Cpuacct(KernelFile::new(
                self.layout
                    .v1_cpuacct_parent
                    .join(name)
                    .join("cpuacct.usage"),
            ))
        };
        let has_events = v2.join("cgroup.events").exists();
        let v1_freezer_state = self
            .layout
            .v1_freezer_parent
            .join(name)
            .join("freezer.state");
        let v1_freezer =
            (!has_events && v1_freezer_state.exists()).then(|| KernelFile::new(v1_freezer_state));
        let no_freezer = !has_events && v1_freezer.is_none();
        if no_freezer {
            tracing::warn!(sandbox = %key, "neither cgroup.events (v2) nor freezer.state (v1): the sandbox is reported running and cannot be suspended");
        }
        let detail_files = DetailFiles {
            cpu_pressure: KernelFile::new(v2.join("cpu.pressure")),
            memory_pressure: KernelFile::new(v2.join("memory.pressure")),
            io_pressure: KernelFile::new(v2.join("io.pressure")),
            peak,
            io,
        };
        Discovered {
            key,
            name: Arc::from(name),
            instance,
            directory: v2.clone(),
            cpu,
            events: KernelFile::new(v2.join("cgroup.events")),
            v1_freezer,
            no_freezer,
            memory,
            labels: self.layout.labels_dir.join(format!("{name}.toml")),
            labels_modified: None,
            allocation: Arc::new(Allocation::default()),
            activity_file: self.layout.activity_dir.join(name),
            activity: Activity::default(),
            frozen: false,
            populated: false,
            events_stale: true,
            events_watch: None,
            net: NetSource::Unresolved { retry_at: 0 },
            host_network_logged: false,
            read_failing: false,
            detail_files,
            detail: SampleDetail::default(),
            gpu_sm_percent: 0,
        }
    }
}

impl UsageReader for CgroupReader {
    fn read_node(&mut self, readings: &mut Vec<SandboxReading>) -> Result<()> {
        let check_labels = self.reads.is_multiple_of(LABEL_CHECK_EVERY);
        self.drain_events();
        self.discover_if_changed(check_labels)?;
        let read_detail = self.reads.is_multiple_of(DETAIL_EVERY);
        if read_detail {
            self.read_gpus();
        }
        let reread_activity = self.activity_changed() || check_labels;
        self.reads += 1;
        readings.clear();
        self.unreadable.clear();
        for sandbox in self.discovered.values_mut() {
            if check_labels {
                refresh_labels(sandbox);
            }
            if reread_activity {
                sandbox.activity = read_activity(&sandbox.activity_file);
            }
            if read_detail {
                read_detail_files(sandbox);
            }
            let net = read_net(sandbox, self.reads, self.host_namespace);
            match read_sandbox(sandbox, net) {
                Ok(reading) => {
                    sandbox.read_failing = false;
                    readings.push(reading);
                }
                // Removed between listing and reading: it is gone, not broken.
                Err(_) if !sandbox.directory.exists() => {}
                // Still there but unreadable (a missing v1 file, a transient
                // error): no sample this tick, but not gone either, so its
                // epoch and counters carry on.
                Err(error) => {
                    if !sandbox.read_failing {
                        sandbox.read_failing = true;
                        tracing::warn!(sandbox = %sandbox.key, %error, "reading sandbox cgroup failed: no samples until it reads again (logged once)");
                    }
                    self.unreadable.push(Arc::clone(&sandbox.name));
                }
            }
        }
        Ok(())
    }

    fn unreadable(&self) -> &[Arc<str>] {
        &self.unreadable
    }

    fn unlabelled_sandboxes(&self) -> usize {
        self.discovered
            .values()
            .filter(|sandbox| sandbox.labels_modified.is_none())
            .count()
    }
}

fn read_activity(path: &Path) -> Activity {
    let mut buffer = [0_u8; 256];
    match read_small(path, &mut buffer) {
        Ok(text) => Activity::parse(std::str::from_utf8(text).unwrap_or_default()),
        Err(_) => Activity::default(),
    }
}

/// Rereads the detail files into `sandbox.detail` (GPU fields untouched); a
/// file that cannot be read leaves its value as it was.
fn read_detail_files(sandbox: &mut Discovered) {
    let mut buffer = [0_u8; 512];
    let files = &mut sandbox.detail_files;
    let detail = &mut sandbox.detail;
    for (file, value) in [
        (&mut files.cpu_pressure, &mut detail.cpu_pressure_usec),
        (&mut files.memory_pressure, &mut detail.mem_pressure_usec),
        (&mut files.io_pressure, &mut detail.io_pressure_usec),
    ] {
        if let Some(total) = file.read(&mut buffer).ok().and_then(pressure_total) {
            *value = total;
        }
    }
    if let Some(peak) = files.peak.as_mut() {
        if let Some(bytes) = peak.read(&mut buffer).ok().and_then(parse_number) {
            detail.mem_peak_bytes = bytes;
        }
    }
    let mut text = Vec::new();
    let bytes = match files.io.as_mut() {
        Some(IoSource::V2Stat(file)) => file.read_all(&mut text).map(|()| io_stat_bytes(&text)),
        Some(IoSource::V1ServiceBytes(file)) => file
            .read_all(&mut text)
            .map(|()| blkio_service_bytes(&text)),
        None => return,
    };
    if let Ok((read, written)) = bytes {
        (detail.io_read_bytes, detail.io_write_bytes) = (read, written);
    }
}

/// `total=` of the `some` line of a PSI file, microseconds.
pub fn pressure_total(text: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(text).ok()?;
    let some = text.lines().find(|line| line.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Bytes read and written over every device of a v2 `io.stat`
/// (`8:0 rbytes=1 wbytes=2 rios=..`).
pub fn io_stat_bytes(text: &[u8]) -> (u64, u64) {
    let text = std::str::from_utf8(text).unwrap_or_default();
    let (mut read, mut written) = (0_u64, 0_u64);
    for field in text.split_whitespace() {
        if let Some(value) = field
            .strip_prefix("rbytes=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            read = read.saturating_add(value);
        } else if let Some(value) = field
            .strip_prefix("wbytes=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            written = written.saturating_add(value);
        }
    }
    (read, written)
}

/// Bytes read and written over every device of a v1
/// `blkio.throttle.io_service_bytes` (`8:0 Read 4096`; the `Total` line and
/// other operations are left out).
pub fn blkio_service_bytes(text: &[u8]) -> (u64, u64) {
    let text = std::str::from_utf8(text).unwrap_or_default();
    let (mut read, mut written) = (0_u64, 0_u64);
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_device), Some(operation), Some(value)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        match operation {
            "Read" => read = read.saturating_add(value),
            "Write" => written = written.saturating_add(value),
            _ => {}
        }
    }
    (read, written)
}

/// A cgroup directory as `/proc/<pid>/cgroup` names it: its path below the
/// cgroup2 mount that holds it (from `/proc/self/mountinfo`).
fn cgroup2_relative(directory: &Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo
        .lines()
        .filter(|line| {
            line.split(" - ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with("cgroup2 "))
        })
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter_map(|mount| directory.strip_prefix(mount).ok())
        .map(|below| format!("/{}", below.display()))
        .min_by_key(String::len)
}

/// The namespace inode of `/proc/<pid>/ns/net` (`net:[4026531840]`).
fn namespace_of(pid: &str) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let text = link.to_str()?;
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The first pid in the sandbox's cgroup, or in one of its child cgroups.
fn first_pid(cgroup: &Path) -> Option<String> {
    let first_in = |directory: &Path| -> Option<String> {
        let text = std::fs::read_to_string(directory.join("cgroup.procs")).ok()?;
        text.lines().next().map(str::to_owned)
    };
    first_in(cgroup).or_else(|| {
        std::fs::read_dir(cgroup)
            .ok()?
            .flatten()
            .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
            .find_map(|entry| first_in(&entry.path()))
    })
}

/// Reads the sandbox's network counters, finding its namespace first when needed.
fn read_net(sandbox: &mut Discovered, reads: u64, host: Option<u64>) -> Option<NetBytes> {
    // A namespace to look at again goes back to unresolved and is resolved now.
    match &mut sandbox.net {
        NetSource::HostNamespace { recheck_at } if reads >= *recheck_at => {
            sandbox.net = NetSource::Unresolved { retry_at: reads };
        }
        NetSource::Own(own) if reads >= own.recheck_at => {
            if namespace_of(&own.pid) == Some(own.namespace) {
                own.recheck_at = reads + LABEL_CHECK_EVERY;
            } else {
                // Exited, or the pid now names another process.
                sandbox.net = NetSource::Unresolved { retry_at: reads };
            }
        }
        _ => {}
    }
    if let NetSource::Unresolved { retry_at } = sandbox.net {
        // An empty cgroup has no process to ask (populated 0 in cgroup.events,
        // whose change raises an inotify event).
        if reads < retry_at || !sandbox.populated {
            return None;
        }
        let later = reads + LABEL_CHECK_EVERY;
        sandbox.net = match first_pid(&sandbox.directory) {
            None => NetSource::Unresolved { retry_at: later },
            Some(pid) => match namespace_of(&pid) {
                None => NetSource::Unresolved { retry_at: later },
                Some(namespace) if Some(namespace) == host => {
                    if !sandbox.host_network_logged {
                        sandbox.host_network_logged = true;
                        tracing::info!(sandbox = %sandbox.key, "sandbox shares the collector's network namespace: its network bytes are not metered");
                    }
                    NetSource::HostNamespace { recheck_at: later }
                }
                Some(namespace) => NetSource::Own(OwnNetwork {
                    dev: KernelFile::new(PathBuf::from(format!("/proc/{pid}/net/dev"))),
                    pid,
                    namespace,
                    recheck_at: later,
                    interfaces: HashMap::new(),
                    rx: 0,
                    tx: 0,
                }),
            },
        };
    }
    let NetSource::Own(own) = &mut sandbox.net else {
        return None;
    };
    let mut text = Vec::with_capacity(1024);
    if own.dev.read_all(&mut text).is_err() {
        sandbox.net = NetSource::Unresolved {
            retry_at: reads + 1,
        };
        return None;
    }
    let interfaces = parse_net_dev(&text)?;
    let (rx, tx) = interface_rises(&own.interfaces, &interfaces);
    own.rx += rx;
    own.tx += tx;
    own.interfaces = interfaces
        .into_iter()
        .map(|(name, rx, tx)| (name, (rx, tx)))
        .collect();
    Some(NetBytes {
        namespace: own.namespace,
        rx: own.rx,
        tx: own.tx,
    })
}

/// Bytes received and sent since the last read, summed per interface: an
/// interface's rise, or all of its value if it fell (reset); an interface not
/// seen before is a baseline (nothing), and one that went counts nothing.
pub fn interface_rises(
    last: &HashMap<String, (u64, u64)>,
    now: &[(String, u64, u64)],
) -> (u64, u64) {
    now.iter()
        .filter_map(|(name, rx, tx)| {
            let (last_rx, last_tx) = last.get(name)?;
            Some((counter_since(*last_rx, *rx), counter_since(*last_tx, *tx)))
        })
        .fold((0, 0), |(rx, tx), (drx, dtx)| (rx + drx, tx + dtx))
}

/// Every interface but `lo` with its received and sent bytes, from the text
/// of `/proc/net/dev` (two header lines, then `name: rx_bytes ... tx_bytes ...`
/// with tx_bytes the ninth number). `None` when a line is malformed.
pub fn parse_net_dev(text: &[u8]) -> Option<Vec<(String, u64, u64)>> {
    let text = std::str::from_utf8(text).ok()?;
    let mut interfaces = Vec::new();
    for line in text.lines().skip(2) {
        let (name, numbers) = line.split_once(':')?;
        let name = name.trim();
        if name == "lo" {
            continue;
        }
        let mut numbers = numbers.split_whitespace().map(str::parse::<u64>);
        let received = numbers.next()?.ok()?;
        let sent = numbers.nth(7)?.ok()?;
        interfaces.push((name.to_owned(), received, sent));
    }
    Some(interfaces)
}

fn read_sandbox(
    sandbox: &mut Discovered,
    net: Option<NetBytes>,
) -> std::io::Result<SandboxReading> {
    let mut buffer = [0_u8; 128];
    let cpu_usage_usec = match &mut sandbox.cpu {
        CpuSource::V2Stat(file) => {
            field_value(file.read(&mut buffer)?, "usage_usec").ok_or_else(|| {
                std::io::Error::new(ErrorKind::InvalidData, "cpu.stat has no usage_usec")
            })?
        }
        CpuSource::V1Cpuacct(file) => parse_number(file.read(&mut buffer)?)
            .map(|nanoseconds| nanoseconds / 1_000)
            .ok_or_else(|| {
                std::io::Error::new(ErrorKind::InvalidData, "cpuacct.usage is not a number")
            })?,
    };
    if sandbox.no_freezer {
        sandbox.frozen = false;
        sandbox.populated = true;
    } else if let Some(freezer) = sandbox.v1_freezer.as_mut() {
        // FREEZING counts as frozen: the collector only asks for it to suspend.
        let state = freezer.read(&mut buffer)?;
        sandbox.frozen = !state.starts_with(b"THAWED");
        sandbox.populated = true;
    } else if sandbox.events_stale || sandbox.events_watch.is_none() {
        let events = sandbox.events.read(&mut buffer)?;
        sandbox.frozen = field_value(events, "frozen") == Some(1);
        sandbox.populated = field_value(events, "populated") != Some(0);
        sandbox.events_stale = false;
    }
    let frozen = sandbox.frozen;
    let mem_used_bytes = match &mut sandbox.memory {
        MemorySource::V2Current(file) | MemorySource::V1UsageInBytes(file) => {
            parse_number(file.read(&mut buffer)?)
        }
        MemorySource::Unavailable => None,
    };
    let activity = sandbox.activity;
    Ok(SandboxReading {
        key: sandbox.key.clone(),
        name: Arc::clone(&sandbox.name),
        instance: sandbox.instance,
        net,
        detail: sandbox.detail,
        gpu_sm_percent: sandbox.gpu_sm_percent,
        cpu_usage_usec,
        mem_used_bytes,
        frozen,
        allocation: Arc::clone(&sandbox.allocation),
        activity,
    })
}

/// Rereads the label file when its modification time changed.
fn refresh_labels(sandbox: &mut Discovered) {
    let modified = std::fs::metadata(&sandbox.labels)
        .and_then(|metadata| metadata.modified())
        .ok();
    if modified == sandbox.labels_modified {
        return;
    }
    sandbox.labels_modified = modified;
    if modified.is_none() {
        sandbox.allocation = Arc::new(Allocation::default());
        tracing::warn!(sandbox = %sandbox.key, file = %sandbox.labels.display(), "no label file: allocation is zero");
        return;
    }
    let file = sandbox.labels.display().to_string();
    let parsed = std::fs::read_to_string(&sandbox.labels)
        .map_err(|error| Error::Labels {
            file: file.clone(),
            reason: error.to_string(),
        })
        .and_then(|text| Allocation::from_label_file(&file, &text));
    match parsed {
        Ok(allocation) => sandbox.allocation = Arc::new(allocation),
        Err(error) => {
            tracing::warn!(sandbox = %sandbox.key, %error, "label file refused: allocation is zero");
            sandbox.allocation = Arc::new(Allocation::default());
        }
    }
}

/// Reads a small kernel file into `buffer` with one `read` call.
fn read_small<'a>(path: &Path, buffer: &'a mut [u8]) -> std::io::Result<&'a [u8]> {
    let mut file = File::open(path)?;
    let length = file.read(buffer)?;
    Ok(&buffer[..length])
}

/// The number after `key ` on the line starting with it (`cpu.stat`, `cgroup.events`).
pub fn field_value(text: &[u8], key: &str) -> Option<u64> {
    text.split(|byte| *byte == b'\n').find_map(|line| {
        let rest = line.strip_prefix(key.as_bytes())?.strip_prefix(b" ")?;
        parse_number(rest)
    })
}

fn parse_number(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text).ok()?.trim().parse().ok()
}

/// Freezes (suspend) or thaws (resume) a sandbox's cgroup: `cgroup.freeze`
/// on v2, else `freezer.state` under the v1 freezer parent.
pub fn set_frozen(
    v2_parent: &Path,
    v1_freezer_parent: &Path,
    key: &SandboxKey,
    frozen: bool,
) -> Result<()> {
    let name = key.cgroup_name();
    let v2 = v2_parent.join(&name).join("cgroup.freeze");
    let v1 = v1_freezer_parent.join(&name).join("freezer.state");
    let (path, value) = if v2.exists() {
        (v2, if frozen { "1" } else { "0" })
    } else if v1.exists() {
        (v1, if frozen { "FROZEN" } else { "THAWED" })
    } else {
        return Err(Error::UnknownSandbox {
            sandbox: key.to_string(),
        });
    };
    std::fs::write(&path, value).map_err(|source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

/// Ends a sandbox for good (a `stop` command): kills every process in its
/// cgroup and its children (`cgroup.kill` on v2; elsewhere SIGKILL to each
/// pid in `cgroup.procs`, then a thaw, since frozen v1 tasks die only once
/// thawed), waits up to `wait` for the cgroup to empty, and removes its
/// directories in every hierarchy the collector reads. The next tick then
/// finds the sandbox gone and sends its final `stopped` sample; the platform
/// creates the cgroup again to start a new epoch.
pub fn stop_sandbox(layout: &CgroupLayout, key: &SandboxKey, wait: Duration) -> Result<()> {
    let name = key.cgroup_name();
    let directory = layout.v2_parent.join(&name);
    if !directory.is_dir() {
        return Err(Error::UnknownSandbox {
            sandbox: key.to_string(),
        });
    }
    let io = |context: String| move |source| Error::Io { context, source };
    let kill_file = directory.join("cgroup.kill");
    let v1_freezer = layout.v1_freezer_parent.join(&name).join("freezer.state");
    let deadline = std::time::Instant::now() + wait;
    loop {
        let remaining = processes_under(&directory);
        if remaining.is_empty() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Io {
                context: format!(
                    "stopping {key}: {} process(es) still in {} after {} ms",
                    remaining.len(),
                    directory.display(),
                    wait.as_millis()
                ),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            });
        }
        if kill_file.exists() {
            std::fs::write(&kill_file, "1")
                .map_err(io(format!("writing {}", kill_file.display())))?;
        } else {
            for pid in remaining {
                let Some(pid) = rustix::process::Pid::from_raw(pid) else {
                    continue;
                };
                // Gone already, or not ours to signal: the wait reports it.
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            if v1_freezer.exists() {
                let _ = std::fs::write(&v1_freezer, "THAWED");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    remove_tree(&directory).map_err(io(format!("removing {}", directory.display())))?;
    for parent in [
        &layout.v1_memory_parent,
        &layout.v1_cpuacct_parent,
        &layout.v1_freezer_parent,
        &layout.v1_blkio_parent,
    ] {
        let path = parent.join(&name);
        if path != directory && path.is_dir() {
            remove_tree(&path).map_err(io(format!("removing {}", path.display())))?;
        }
    }
    Ok(())
}

/// Every pid in the `cgroup.procs` of `directory` and its child cgroups.
fn processes_under(directory: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(directory.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(directory) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                pids.extend(processes_under(&entry.path()));
            }
        }
    }
    pids
}

/// Removes an empty cgroup and its empty children, deepest first (a cgroup
/// directory is removed with `rmdir`, its control files go with it).
fn remove_tree(directory: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(directory)?.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    match std::fs::remove_dir(directory) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_value_finds_whole_keys_only() {
        let cpu_stat = b"usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(field_value(cpu_stat, "usage_usec"), Some(1234));
        assert_eq!(field_value(cpu_stat, "system_usec"), Some(234));
        assert_eq!(field_value(cpu_stat, "usage"), None);
        assert_eq!(field_value(b"populated 1\nfrozen 1\n", "frozen"), Some(1));
    }

    #[test]
    fn net_dev_sums_every_interface_but_loopback() {
        let text = b"Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:  500 5 0 0 0 0 0 0  500 5 0 0 0 0 0 0\n  eth0: 10728 14 0 0 0 0 0 0 3758 9 0 0 0 0 0 0\n  eth1: 2 1 0 0 0 0 0 0 40 1 0 0 0 0 0 0\n";
        assert_eq!(
            parse_net_dev(text),
            Some(vec![
                ("eth0".to_owned(), 10_728, 3_758),
                ("eth1".to_owned(), 2, 40)
            ])
        );
        assert_eq!(
            parse_net_dev(b"h\nh\n  eth0: 1 2\n"),
            None,
            "a short line is refused"
        );
    }

    #[test]
    fn detail_files_are_read_on_detail_ticks_and_repeated_between() {
        let root = tempfile::tempdir().expect("tempdir");
        fake_cgroup(root.path(), "acme.a", 1, false);
        let v2 = root.path().join("v2/acme.a");
        let psi = |total: u64| {
            format!("some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=1\n")
        };
        std::fs::write(v2.join("cpu.pressure"), psi(11)).expect("write");
        std::fs::write(v2.join("memory.pressure"), psi(22)).expect("write");
        std::fs::write(v2.join("io.pressure"), psi(33)).expect("write");
        std::fs::write(v2.join("memory.peak"), "4096\n").expect("write");
        std::fs::write(
            v2.join("io.stat"),
            "8:0 rbytes=100 wbytes=10 rios=1 wios=1 dbytes=0 dios=0\n8:16 rbytes=5 wbytes=1 rios=1 wios=1 dbytes=0 dios=0\n",
        )
        .expect("write");
        let mut reader = CgroupReader::new(fake_layout(root.path()));
        let mut readings = Vec::new();
        reader.read_node(&mut readings).expect("reads");
        let expected = SampleDetail {
            cpu_pressure_usec: 11,
            mem_pressure_usec: 22,
            io_pressure_usec: 33,
            mem_peak_bytes: 4096,
            io_read_bytes: 105,
            io_write_bytes: 11,
            ..SampleDetail::default()
        };
        assert_eq!(readings[0].detail, expected);
        std::fs::write(v2.join("cpu.pressure"), psi(99)).expect("write");
        for _ in 1..DETAIL_EVERY {
            reader.read_node(&mut readings).expect("reads");
            assert_eq!(
                readings[0].detail, expected,
                "repeated between detail ticks"
            );
        }
        reader.read_node(&mut readings).expect("reads");
        assert_eq!(
            readings[0].detail.cpu_pressure_usec, 99,
            "reread on the next detail tick"
        );
    }

    #[test]
    fn block_io_falls_back_to_v1_blkio_where_v2_has_no_io_stat() {
        let root = tempfile::tempdir().expect("tempdir");
        fake_cgroup(root.path(), "acme.a", 1, false);
        let blkio = root.path().join("v1-blkio/acme.a");
        std::fs::create_dir_all(&blkio).expect("mkdir");
        std::fs::write(
            blkio.join("blkio.throttle.io_service_bytes"),
            "8:0 Read 4096\n8:0 Write 512\n8:0 Total 4608\nTotal 4608\n",
        )
        .expect("write");
        let mut reader = CgroupReader::new(fake_layout(root.path()));
        let mut readings = Vec::new();
        reader.read_node(&mut readings).expect("reads");
        let detail = readings[0].detail;
        assert_eq!((detail.io_read_bytes, detail.io_write_bytes), (4_096, 512));
    }

    #[test]
    fn pressure_and_io_stat_parsers_take_the_right_numbers() {
        assert_eq!(
            pressure_total(b"some avg10=1.00 avg60=0.50 avg300=0.10 total=12345\nfull avg10=0 avg60=0 avg300=0 total=7\n"),
            Some(12_345)
        );
        assert_eq!(pressure_total(b"full avg10=0 total=7\n"), None);
        assert_eq!(io_stat_bytes(b""), (0, 0));
        assert_eq!(
            blkio_service_bytes(b"8:0 Read 4096\n8:0 Write 512\n8:0 Sync 1\n8:0 Async 2\n8:0 Total 4608\n8:16 Read 4\nTotal 4612\n"),
            (4_100, 512)
        );
        assert_eq!(
            io_stat_bytes(b"259:0 rbytes=7 wbytes=9 rios=1 wios=2 dbytes=100 dios=1\n"),
            (7, 9)
        );
    }

    #[test]
    fn interface_rises_never_count_a_vanished_or_new_interface_twice() {
        let last: HashMap<String, (u64, u64)> = [
            ("eth0".to_owned(), (1_000, 100)),
            ("eth1".to_owned(), (5_000, 500)),
        ]
        .into();
        // eth0 rose, eth1 went away, veth9 appeared with old counters.
        let now = [
            ("eth0".to_owned(), 1_500, 130),
            ("veth9".to_owned(), 90_000, 9_000),
        ];
        assert_eq!(interface_rises(&last, &now), (500, 30));
        // eth0 was reset (recreated under the same name): all of it is new.
        assert_eq!(
            interface_rises(&last, &[("eth0".to_owned(), 200, 10)]),
            (200, 10)
        );
    }

    fn fake_layout(root: &Path) -> CgroupLayout {
        CgroupLayout {
            v2_parent: root.join("v2"),
            v1_memory_parent: root.join("v1"),
            v1_cpuacct_parent: root.join("v1-cpuacct"),
            v1_freezer_parent: root.join("v1-freezer"),
            v1_blkio_parent: root.join("v1-blkio"),
            labels_dir: root.join("labels"),
            activity_dir: root.join("activity"),
        }
    }

    fn fake_cgroup(root: &Path, name: &str, usage_usec: u64, frozen: bool) {
        let v2 = root.join("v2").join(name);
        std::fs::create_dir_all(&v2).expect("mkdir");
        std::fs::write(v2.join("cpu.stat"), format!("usage_usec {usage_usec}\n")).expect("write");
        std::fs::write(
            v2.join("cgroup.events"),
            format!("populated 1\nfrozen {}\n", u8::from(frozen)),
        )
        .expect("write");
    }

    #[test]
    fn reader_maps_children_to_sandboxes_with_labels_memory_and_activity() {
        let root = tempfile::tempdir().expect("tempdir");
        fake_cgroup(root.path(), "acme.sbx-1", 42, false);
        fake_cgroup(root.path(), "not-a-sandbox", 1, false);
        let v1 = root.path().join("v1/acme.sbx-1");
        std::fs::create_dir_all(&v1).expect("mkdir");
        std::fs::write(v1.join("memory.usage_in_bytes"), "8192\n").expect("write");
        std::fs::create_dir_all(root.path().join("labels")).expect("mkdir");
        std::fs::write(
            root.path().join("labels/acme.sbx-1.toml"),
            "vcpu_milli = 250\n",
        )
        .expect("write");
        std::fs::create_dir_all(root.path().join("activity")).expect("mkdir");
        std::fs::write(root.path().join("activity/acme.sbx-1"), "exec_sessions 1\n")
            .expect("write");

        let mut reader = CgroupReader::new(fake_layout(root.path()));
        let mut readings = Vec::new();
        reader.read_node(&mut readings).expect("reads");
        assert_eq!(readings.len(), 1);
        let reading = &readings[0];
        assert_eq!(reading.key.to_string(), "acme.sbx-1");
        assert_eq!(reading.cpu_usage_usec, 42);
        assert_eq!(reading.mem_used_bytes, Some(8192));
        assert_eq!(reading.allocation.vcpu_milli, 250);
        assert_eq!(reading.activity.exec_sessions, 1);
        assert!(!reading.frozen);
        assert_eq!(reader.unlabelled_sandboxes(), 0);
    }

    #[test]
    fn a_changed_cgroup_events_file_is_read_again_at_the_next_tick() {
        let root = tempfile::tempdir().expect("tempdir");
        fake_cgroup(root.path(), "acme.a", 1, false);
        let mut reader = CgroupReader::new(fake_layout(root.path()));
        assert!(reader.events.is_some(), "inotify is available here");
        let mut readings = Vec::new();
        reader.read_node(&mut readings).expect("reads");
        assert!(!readings[0].frozen);
        reader.read_node(&mut readings).expect("reads");
        assert!(!readings[0].frozen);
        // As the kernel does when the cgroup freezes: rewrite the file in place.
        std::fs::write(
            root.path().join("v2/acme.a/cgroup.events"),
            "populated 1\nfrozen 1\n",
        )
        .expect("write");
        reader.read_node(&mut readings).expect("reads");
        assert!(readings[0].frozen, "the modify event makes it read again");
        reader.read_node(&mut readings).expect("reads");
        assert!(readings[0].frozen, "and the value is kept between events");
        assert_eq!(reader.watched.len(), 1);
        std::fs::remove_dir_all(root.path().join("v2/acme.a")).expect("rm");
        reader.read_node(&mut readings).expect("reads");
        assert!(readings.is_empty());
        assert!(
            reader.watched.is_empty(),
            "a vanished sandbox's watch is forgotten"
        );
    }

    #[test]
    fn reader_notices_new_and_vanished_sandboxes() {
        let root = tempfile::tempdir().expect("tempdir");
        fake_cgroup(root.path(), "acme.a", 1, false);
        let mut reader = CgroupReader::new(fake_layout(root.path()));
        let mut readings = Vec::new();
        reader.read_node(&mut readings).expect("reads");
        assert_eq!(readings.len(), 1);
        fake_cgroup(root.path(), "acme.b", 1, true);
        std::fs::remove_dir_all(root.path().join("v2/acme.a")).expect("rm");
        reader.read_node(&mut readings).expect("reads");
        assert_eq!(readings.len(), 1);
        assert_eq!(readings[0].key.sandbox.as_str(), "b");
        assert!(readings[0].frozen);
        assert_eq!(readings[0].mem_used_bytes, None);
        assert_eq!(reader.unlabelled_sandboxes(), 1);
    }
}
