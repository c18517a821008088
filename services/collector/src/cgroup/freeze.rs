//! Suspend and resume (v2 `cgroup.freeze`, v1 `freezer.state`) and stop
//! (kill every process, remove the cgroup tree).

use super::*;

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
