//! One tick: every discovered sandbox's CPU, memory, state and labels read
//! into a [`SandboxReading`] (the [`UsageReader`] of real cgroups).

use super::*;

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

pub(super) fn read_activity(path: &Path) -> Activity {
    let mut buffer = [0_u8; 256];
    match read_small(path, &mut buffer) {
        Ok(text) => Activity::parse(std::str::from_utf8(text).unwrap_or_default()),
        Err(_) => Activity::default(),
    }
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
pub(super) fn refresh_labels(sandbox: &mut Discovered) {
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
