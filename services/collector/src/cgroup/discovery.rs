//! Finding the sandboxes under the parent (one `readdir` per tick, or an
//! inotify event on the parent) and the files each is read from; inotify
//! watches on `cgroup.events`; the GPU reader's attribution root.

use super::*;

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
    pub(super) fn read_gpus(&mut self) {
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
    pub(super) fn drain_events(&mut self) {
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
    pub(super) fn watch_events(&mut self, sandbox: &mut Discovered) {
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
    pub(super) fn activity_changed(&mut self) -> bool {
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
    pub(super) fn discover_if_changed(&mut self, safety_net: bool) -> Result<()> {
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

    pub(super) fn watch_parent(&mut self) {
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

    pub(super) fn discover(&mut self) -> Result<()> {
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
    pub(super) fn unwatch(&mut self, sandbox: Discovered) {
        let Some(watch) = sandbox.events_watch else {
            return;
        };
        self.watched.remove(&watch.get_watch_descriptor_id());
        if let Some(inotify) = self.events.as_mut() {
            let _ = inotify.watches().remove(watch);
        }
    }

    pub(super) fn notice(&mut self, name: String, instance: u64) {
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

    pub(super) fn describe(&self, key: SandboxKey, name: &str, instance: u64) -> Discovered {
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
