//! Network bytes of a sandbox with a namespace of its own, from
//! `/proc/<pid>/net/dev` of one of its processes.

use super::*;

/// The namespace inode of `/proc/<pid>/ns/net` (`net:[4026531840]`).
pub(super) fn namespace_of(pid: &str) -> Option<u64> {
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
pub(super) fn read_net(
    sandbox: &mut Discovered,
    reads: u64,
    host: Option<u64>,
) -> Option<NetBytes> {
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
