//! The collector's local state: every sandbox's counters and the node's batch
//! sequence, persisted after each tick so that a restarted (or killed) collector
//! continues the same counters instead of starting new epochs.
//!
//! Written as JSON to a temporary file, fsynced, renamed over the old file and
//! the directory fsynced: a crash leaves either the old or the new state, never
//! half of one. The state is saved *before* the tick's batch is spooled, so a
//! crash between the two loses that batch's samples (a gap in `seq`, which costs
//! resolution only: the next sample's cumulative counters carry the usage) but
//! can never send two different samples under one (sandbox, epoch, seq).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::counters::SandboxCounters;
use crate::{Error, Result};

/// What survives a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectorState {
    /// Sequence of the last node batch produced.
    pub batch_seq: u64,
    /// Counters by cgroup name (`<customer>.<sandbox>`).
    pub sandboxes: BTreeMap<String, SandboxCounters>,
}

impl CollectorState {
    /// Loads the state file; a missing file is a first start. An unreadable
    /// one is moved aside to `<file>.corrupt` and the collector starts afresh:
    /// new epochs are numbered by the clock, so no identity is reused.
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(source) => return Err(io_error("reading", path, source)),
        };
        match serde_json::from_str(&text) {
            Ok(state) => Ok(state),
            Err(error) => {
                let aside = path.with_extension("json.corrupt");
                tracing::error!(file = %path.display(), %error, aside = %aside.display(), "state file unreadable: starting new epochs");
                std::fs::rename(path, &aside)
                    .map_err(|source| io_error("moving aside", path, source))?;
                Ok(Self::default())
            }
        }
    }

    /// Replaces the state file atomically and durably.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).map_err(|error| Error::State {
            file: path.display().to_string(),
            reason: error.to_string(),
        })?;
        write_atomically(path, &bytes)
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = directory.join(format!(".{file_name}.tmp"));
    let mut file =
        File::create(&temporary).map_err(|source| io_error("creating", &temporary, source))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| io_error("writing", &temporary, source))?;
    std::fs::rename(&temporary, path).map_err(|source| io_error("renaming onto", path, source))?;
    File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(|source| io_error("syncing", directory, source))
}

fn io_error(action: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        context: format!("{action} {}", path.display()),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_loads_back_identically() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("state.json");
        let mut state = CollectorState {
            batch_seq: 41,
            ..Default::default()
        };
        state.sandboxes.insert(
            "acme.sbx-1".to_owned(),
            SandboxCounters {
                epoch: 7,
                seq: 3,
                cpu_used_usec: 99,
                ..Default::default()
            },
        );
        state.save(&path).expect("saves");
        assert_eq!(CollectorState::load(&path).expect("loads"), state);
    }

    #[test]
    fn missing_state_is_a_first_start_and_corrupt_state_is_moved_aside() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("state.json");
        assert_eq!(
            CollectorState::load(&path).expect("loads"),
            CollectorState::default()
        );
        std::fs::write(&path, "{ half a stat").expect("write");
        assert_eq!(
            CollectorState::load(&path).expect("loads"),
            CollectorState::default()
        );
        assert!(directory.path().join("state.json.corrupt").exists());
    }
}
