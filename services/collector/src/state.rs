//! The collector's local state: every sandbox's counters and the node's batch
//! sequence, persisted after each tick so that a restarted (or killed) collector
//! continues the same counters instead of starting new epochs.
//!
//! Written to a temporary file and renamed over the old one: a crash leaves
//! either the old or the new state, never half of one (see
//! [`CollectorState::save`] for why it is not fsynced). The format is a small fixed-layout binary record per sandbox
//! with a checksum (see [`encode`]): it is written every tick, and JSON cost
//! about 3 µs of CPU per sandbox. JSON state files of earlier versions are
//! still read. The state is saved *before* the tick's batch is spooled, so a
//! crash between the two loses that batch's samples (a gap in `seq`, which costs
//! resolution only: the next sample's cumulative counters carry the usage) but
//! can never send two different samples under one (sandbox, epoch, seq).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use idlemeter_core::StateCounters;

use crate::counters::SandboxCounters;
use crate::{Error, Result};

/// What survives a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CollectorState {
    /// Sequence of the last node batch produced.
    pub batch_seq: u64,
    /// The kernel's boot id when saved (`/proc/sys/kernel/random/boot_id`).
    /// After a reboot cgroup inode numbers are handed out again, so a saved
    /// `instance` could match a new cgroup: a state from another boot starts
    /// new epochs for every sandbox (see `Sampler::new`). Empty: unknown.
    pub boot_id: String,
    /// Counters by cgroup name (`<customer>.<sandbox>`).
    pub sandboxes: BTreeMap<String, SandboxCounters>,
}

impl CollectorState {
    /// Loads the state file; a missing file is a first start. An unreadable
    /// one is moved aside to `<file>.corrupt` and the collector starts afresh:
    /// new epochs are numbered by the clock, so no identity is reused.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(source) => return Err(io_error("reading", path, source)),
        };
        let parsed = if bytes.starts_with(MAGIC) || bytes.starts_with(MAGIC_V1) {
            decode(&bytes)
        } else {
            // A state file written by an earlier version (JSON).
            serde_json::from_slice(&bytes).map_err(|error| error.to_string())
        };
        match parsed {
            Ok(state) => Ok(state),
            Err(error) => {
                let mut aside = path.as_os_str().to_owned();
                aside.push(".corrupt");
                let aside = std::path::PathBuf::from(aside);
                tracing::error!(file = %path.display(), %error, aside = %aside.display(), "state file unreadable: starting new epochs");
                std::fs::rename(path, &aside)
                    .map_err(|source| io_error("moving aside", path, source))?;
                Ok(Self::default())
            }
        }
    }

    /// Replaces the state file atomically, without fsync.
    ///
    /// Not syncing is deliberate: it halves a tick's file-system work, and a
    /// sync would only matter if the machine itself crashed. A killed
    /// collector's writes are in the page cache and survive it. A machine
    /// crash ends every sandbox on it and is a reboot: the state carries the
    /// boot id, and a state from another boot starts a new epoch for every
    /// sandbox (cgroup inode numbers repeat across boots, so instances alone
    /// would not do), so an older state file can never reuse a (sandbox,
    /// epoch, seq) identity. The spool, which holds unsent usage, is synced
    /// (see `spool.rs`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = encode(self).map_err(|reason| Error::State {
            file: path.display().to_string(),
            reason,
        })?;
        replace_file(path, &bytes, false)
    }
}

const MAGIC: &[u8; 8] = b"IMSTATE2";
/// The layout before the counters by state: 22 fields per sandbox. Read, so
/// that an upgraded collector continues its epochs; the new counters start
/// at zero there, and the first interval after the upgrade is rated from
/// gauges because the sample before it carries no counters by state.
const MAGIC_V1: &[u8; 8] = b"IMSTATE1";

/// The binary layout, all integers little-endian: `IMSTATE2`, batch_seq (u64),
/// boot id (u16 length, UTF-8 bytes), sandbox count (u32), then per sandbox its name (u16 length, UTF-8 bytes)
/// and the 42 counter fields of [`SandboxCounters`] (u64 each, in the order of
/// [`fields`]; `last_ts_ms` as its two's-complement bits), and last an FNV-1a 64
/// checksum (u64) of everything before it. `IMSTATE1` files have the first 22.
pub fn encode(state: &CollectorState) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(24 + state.sandboxes.len() * (2 + 40 + FIELDS * 8));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&state.batch_seq.to_le_bytes());
    let boot_id_length =
        u16::try_from(state.boot_id.len()).map_err(|_| "boot id too long".to_owned())?;
    out.extend_from_slice(&boot_id_length.to_le_bytes());
    out.extend_from_slice(state.boot_id.as_bytes());
    let count = u32::try_from(state.sandboxes.len()).map_err(|_| "too many sandboxes")?;
    out.extend_from_slice(&count.to_le_bytes());
    for (name, counters) in &state.sandboxes {
        let length = u16::try_from(name.len()).map_err(|_| format!("name too long: {name}"))?;
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        for field in fields(counters) {
            out.extend_from_slice(&field.to_le_bytes());
        }
    }
    let checksum = fnv1a(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    Ok(out)
}

/// Reads what [`encode`] wrote; any truncation or damage is an error.
pub fn decode(bytes: &[u8]) -> std::result::Result<CollectorState, String> {
    let body_length = bytes
        .len()
        .checked_sub(8)
        .ok_or("shorter than its checksum")?;
    let (body, checksum) = bytes.split_at(body_length);
    if fnv1a(body).to_le_bytes() != checksum {
        return Err("checksum mismatch: the file is damaged".to_owned());
    }
    let mut reader = Cursor { bytes: body, at: 0 };
    let field_count = match reader.take(MAGIC.len())? {
        magic if magic == MAGIC => FIELDS,
        magic if magic == MAGIC_V1 => FIELDS_V1,
        _ => return Err("not an idlemeter state file".to_owned()),
    };
    let batch_seq = reader.u64()?;
    let boot_id_length = usize::from(u16::from_le_bytes(reader.array()?));
    let boot_id = std::str::from_utf8(reader.take(boot_id_length)?)
        .map_err(|_| "the boot id is not UTF-8")?
        .to_owned();
    let mut state = CollectorState {
        batch_seq,
        boot_id,
        ..CollectorState::default()
    };
    let count = u32::from_le_bytes(reader.array()?);
    for _ in 0..count {
        let length = usize::from(u16::from_le_bytes(reader.array()?));
        let name = std::str::from_utf8(reader.take(length)?)
            .map_err(|_| "a sandbox name is not UTF-8")?
            .to_owned();
        let mut values = [0_u64; FIELDS];
        for value in &mut values[..field_count] {
            *value = reader.u64()?;
        }
        state.sandboxes.insert(name, from_fields(values));
    }
    if reader.at != body.len() {
        return Err(format!(
            "{} bytes after the last sandbox",
            body.len() - reader.at
        ));
    }
    Ok(state)
}

const FIELDS: usize = 42;
const FIELDS_V1: usize = 22;

fn fields(c: &SandboxCounters) -> [u64; FIELDS] {
    [
        c.instance,
        c.epoch,
        c.seq,
        c.last_ts_ms as u64,
        c.cpu_used_usec,
        c.vcpu_alloc_usec,
        c.mem_alloc_kib_ms,
        c.mem_used_kib_ms,
        c.gpu_alloc_ms,
        c.disk_mib_ms,
        c.api_calls,
        c.api_calls_seen,
        c.mem_alloc_rem,
        c.mem_used_rem,
        c.disk_rem,
        c.net_rx_bytes,
        c.net_tx_bytes,
        c.net_namespace,
        c.net_rx_seen,
        c.net_tx_seen,
        c.gpu_busy_ms,
        c.gpu_busy_rem,
        c.by_state.running_ms,
        c.by_state.suspended_ms,
        c.by_state.active_ms,
        c.by_state.vcpu_alloc_active_usec,
        c.by_state.vcpu_max_usec,
        c.by_state.vcpu_max_active_usec,
        c.by_state.cpu_used_active_usec,
        c.by_state.mem_alloc_active_kib_ms,
        c.by_state.mem_max_kib_ms,
        c.by_state.mem_max_active_kib_ms,
        c.by_state.mem_used_active_kib_ms,
        c.by_state.gpu_alloc_active_ms,
        c.by_state.disk_running_mib_ms,
        c.by_state.disk_active_mib_ms,
        c.mem_alloc_active_rem,
        c.mem_max_rem,
        c.mem_max_active_rem,
        c.mem_used_active_rem,
        c.disk_running_rem,
        c.disk_active_rem,
    ]
}

fn from_fields(v: [u64; FIELDS]) -> SandboxCounters {
    SandboxCounters {
        instance: v[0],
        epoch: v[1],
        seq: v[2],
        last_ts_ms: v[3] as i64,
        cpu_used_usec: v[4],
        vcpu_alloc_usec: v[5],
        mem_alloc_kib_ms: v[6],
        mem_used_kib_ms: v[7],
        gpu_alloc_ms: v[8],
        disk_mib_ms: v[9],
        api_calls: v[10],
        api_calls_seen: v[11],
        mem_alloc_rem: v[12],
        mem_used_rem: v[13],
        disk_rem: v[14],
        net_rx_bytes: v[15],
        net_tx_bytes: v[16],
        net_namespace: v[17],
        net_rx_seen: v[18],
        net_tx_seen: v[19],
        gpu_busy_ms: v[20],
        gpu_busy_rem: v[21],
        by_state: StateCounters {
            running_ms: v[22],
            suspended_ms: v[23],
            active_ms: v[24],
            vcpu_alloc_active_usec: v[25],
            vcpu_max_usec: v[26],
            vcpu_max_active_usec: v[27],
            cpu_used_active_usec: v[28],
            mem_alloc_active_kib_ms: v[29],
            mem_max_kib_ms: v[30],
            mem_max_active_kib_ms: v[31],
            mem_used_active_kib_ms: v[32],
            gpu_alloc_active_ms: v[33],
            disk_running_mib_ms: v[34],
            disk_active_mib_ms: v[35],
        },
        mem_alloc_active_rem: v[36],
        mem_max_rem: v[37],
        mem_max_active_rem: v[38],
        mem_used_active_rem: v[39],
        disk_running_rem: v[40],
        disk_active_rem: v[41],
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, length: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(length)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let slice = self.take(N)?;
        Ok(slice.try_into().expect("take returned N bytes"))
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// FNV-1a, 64 bits: detects damage, not tampering.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_file(path, bytes, true)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader
/// sees the old or the new content, never a mix; with `durable`, the file and
/// its directory are also fsynced.
fn replace_file(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let directory = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = directory.join(format!(".{file_name}.tmp"));
    let mut file =
        File::create(&temporary).map_err(|source| io_error("creating", &temporary, source))?;
    file.write_all(bytes)
        .and_then(|()| if durable { file.sync_all() } else { Ok(()) })
        .map_err(|source| io_error("writing", &temporary, source))?;
    std::fs::rename(&temporary, path).map_err(|source| io_error("renaming onto", path, source))?;
    if !durable {
        return Ok(());
    }
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

    fn full_state() -> CollectorState {
        let mut state = CollectorState {
            batch_seq: 41,
            boot_id: "0f5c1c5e-7d52-4a4c-9d1e-2b8f3c4d5e6f".to_owned(),
            ..Default::default()
        };
        for (index, name) in ["acme.sbx-1", "globex.é"].into_iter().enumerate() {
            let base = index as u64 * 100;
            state.sandboxes.insert(
                name.to_owned(),
                SandboxCounters {
                    instance: base + 1,
                    epoch: base + 2,
                    seq: base + 3,
                    last_ts_ms: -(base as i64) - 4,
                    cpu_used_usec: base + 5,
                    vcpu_alloc_usec: base + 6,
                    mem_alloc_kib_ms: base + 7,
                    mem_used_kib_ms: base + 8,
                    gpu_alloc_ms: base + 9,
                    disk_mib_ms: base + 10,
                    api_calls: base + 11,
                    api_calls_seen: base + 12,
                    mem_alloc_rem: base + 13,
                    mem_used_rem: u64::MAX - base,
                    disk_rem: base + 15,
                    net_rx_bytes: base + 16,
                    net_tx_bytes: base + 17,
                    net_namespace: base + 18,
                    net_rx_seen: base + 19,
                    net_tx_seen: base + 20,
                    gpu_busy_ms: base + 21,
                    gpu_busy_rem: base + 22,
                    by_state: StateCounters {
                        running_ms: base + 23,
                        suspended_ms: base + 24,
                        active_ms: base + 25,
                        vcpu_alloc_active_usec: base + 26,
                        vcpu_max_usec: base + 27,
                        vcpu_max_active_usec: base + 28,
                        cpu_used_active_usec: base + 29,
                        mem_alloc_active_kib_ms: base + 30,
                        mem_max_kib_ms: base + 31,
                        mem_max_active_kib_ms: base + 32,
                        mem_used_active_kib_ms: base + 33,
                        gpu_alloc_active_ms: base + 34,
                        disk_running_mib_ms: base + 35,
                        disk_active_mib_ms: base + 36,
                    },
                    mem_alloc_active_rem: base + 37,
                    mem_max_rem: base + 38,
                    mem_max_active_rem: base + 39,
                    mem_used_active_rem: base + 40,
                    disk_running_rem: base + 41,
                    disk_active_rem: base + 42,
                },
            );
        }
        state
    }

    #[test]
    fn every_counter_field_survives_the_binary_format() {
        let state = full_state();
        let bytes = encode(&state).expect("encodes");
        assert_eq!(decode(&bytes).expect("decodes"), state);
    }

    #[test]
    fn a_version_1_binary_state_loads_with_the_counters_by_state_at_zero() {
        let state = full_state();
        let current = encode(&state).expect("encodes");
        // Rebuild the same state in the 22-field layout of version 1.
        let mut legacy = Vec::new();
        legacy.extend_from_slice(MAGIC_V1);
        let mut at = MAGIC.len();
        let header = 8 + 2 + state.boot_id.len() + 4;
        legacy.extend_from_slice(&current[at..at + header]);
        at += header;
        for name in state.sandboxes.keys() {
            let named = 2 + name.len();
            legacy.extend_from_slice(&current[at..at + named + FIELDS_V1 * 8]);
            at += named + FIELDS * 8;
        }
        let checksum = fnv1a(&legacy);
        legacy.extend_from_slice(&checksum.to_le_bytes());
        let loaded = decode(&legacy).expect("a version 1 file decodes");
        for (name, counters) in &state.sandboxes {
            let expected = SandboxCounters {
                by_state: StateCounters::default(),
                mem_alloc_active_rem: 0,
                mem_max_rem: 0,
                mem_max_active_rem: 0,
                mem_used_active_rem: 0,
                disk_running_rem: 0,
                disk_active_rem: 0,
                ..counters.clone()
            };
            assert_eq!(loaded.sandboxes[name], expected);
        }
    }

    #[test]
    fn damaged_or_truncated_binary_state_is_refused_and_moved_aside() {
        let bytes = encode(&full_state()).expect("encodes");
        for cut in [0, 7, 8, 30, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert!(decode(&flipped).expect_err("damaged").contains("checksum"));

        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("counters.state");
        std::fs::write(&path, &flipped).expect("write");
        assert_eq!(
            CollectorState::load(&path).expect("loads"),
            CollectorState::default()
        );
        assert!(directory.path().join("counters.state.corrupt").exists());
    }

    #[test]
    fn the_json_state_of_version_0_1_loads_with_the_new_counters_at_zero() {
        // Written by the collector at commit 85aec5c (before network, GPU busy
        // time and the boot id existed).
        let text = r#"{"batch_seq":12,"sandboxes":{"acme.a":{"instance":77,"epoch":1790000000000,"seq":12,"last_ts_ms":1790000011000,"cpu_used_usec":5000,"vcpu_alloc_usec":11000000,"mem_alloc_kib_ms":0,"mem_used_kib_ms":0,"gpu_alloc_ms":0,"disk_mib_ms":11000,"api_calls":0,"api_calls_seen":0,"mem_alloc_rem":0,"mem_used_rem":0,"disk_rem":0}}}"#;
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("state.json");
        std::fs::write(&path, text).expect("write");
        let state = CollectorState::load(&path).expect("loads");
        assert!(!directory.path().join("state.json.corrupt").exists());
        assert_eq!(state.batch_seq, 12);
        assert_eq!(state.boot_id, "");
        let counters = &state.sandboxes["acme.a"];
        assert_eq!(
            (counters.instance, counters.seq, counters.disk_mib_ms),
            (77, 12, 11_000)
        );
        assert_eq!((counters.net_rx_bytes, counters.gpu_busy_ms), (0, 0));
    }

    #[test]
    fn a_json_state_file_of_an_earlier_version_still_loads() {
        let state = full_state();
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("state.json");
        std::fs::write(&path, serde_json::to_vec(&state).expect("json")).expect("write");
        assert_eq!(CollectorState::load(&path).expect("loads"), state);
        state.save(&path).expect("saves");
        assert!(std::fs::read(&path).expect("read").starts_with(MAGIC));
        assert_eq!(CollectorState::load(&path).expect("loads"), state);
    }
}
