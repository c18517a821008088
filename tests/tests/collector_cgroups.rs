//! The collector against real cgroups: CPU burners in a sandbox cgroup, the
//! collected CPU seconds checked against the kernel's and the burners' own
//! accounting, and a suspend/resume command round trip through Kafka.

use idlemeter_core::LifecycleState;
use idlemeter_proto::v1::CommandAction;
use idlemeter_tests::collector::{
    cgroup_usage_usec, collector_config, process_cpu_usec, samples_of, send_command,
    send_command_signed, RunningCollector, SampleTail, ShippedSample, TestCgroups,
};
use idlemeter_tests::TestEnv;

fn within_two_percent(measured: u64, reference: u64) -> bool {
    measured.abs_diff(reference) * 50 <= reference
}

fn last(samples: &[ShippedSample]) -> Option<&ShippedSample> {
    samples.last()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burner_cpu_matches_kernel_accounting_and_suspend_stops_the_counter() -> anyhow::Result<()>
{
    let env = TestEnv::new("collector_burn").await?;
    env.kafka
        .ensure_topics(&[(env.topics.commands.as_str(), 1)])
        .await?;
    let mut cgroups = TestCgroups::new("burn")?;
    let sandbox = cgroups.add_sandbox("acme.burner")?;
    let burners = [
        cgroups.spawn_burner(&sandbox)?,
        cgroups.spawn_burner(&sandbox)?,
    ];
    let work = tempfile::tempdir()?;
    std::fs::create_dir_all(work.path().join("labels"))?;
    std::fs::write(
        work.path().join("labels/acme.burner.toml"),
        "vcpu_milli = 2000\n",
    )?;
    let node = format!("node-burn-{}", std::process::id());
    let collector = RunningCollector::start(
        collector_config(&cgroups.parent, work.path(), &node),
        &env.kafka,
        env.topics.clone(),
    )?;
    let mut tail = SampleTail::new(&env)?;

    // Burn at least 1.5 CPU-seconds while running.
    tail.wait_for("1.5 s of collected cpu", |samples| {
        last(samples).is_some_and(|s| s.sample.cpu_used_usec > 1_500_000)
    })
    .await?;
    // Finding "forged ids reach the node's filesystem": unsigned and
    // wrongly signed commands are refused before the real one is applied.
    send_command_signed(&env, None, &node, "acme", "burner", CommandAction::Suspend).await?;
    send_command_signed(
        &env,
        Some(b"a guessed key"),
        &node,
        "acme",
        "burner",
        CommandAction::Suspend,
    )
    .await?;
    send_command(&env, &node, "acme", "burner", CommandAction::Suspend).await?;
    tail.wait_for("three suspended samples", |samples| {
        samples
            .iter()
            .filter(|s| s.sample.state == LifecycleState::Suspended)
            .count()
            >= 3
    })
    .await?;

    let suspended: Vec<_> = tail
        .samples
        .iter()
        .filter(|s| s.sample.state == LifecycleState::Suspended)
        .collect();
    let frozen_cpu = suspended[0].sample.cpu_used_usec;
    let frozen_vcpu = suspended[0].sample.vcpu_alloc_usec;
    for sample in &suspended {
        assert_eq!(
            sample.sample.cpu_used_usec, frozen_cpu,
            "cpu advanced while suspended"
        );
        assert_eq!(
            sample.sample.vcpu_alloc_usec, frozen_vcpu,
            "allocation billed while suspended"
        );
    }
    // While frozen nothing moves, so the three accountings can be compared at rest.
    let kernel_usec = cgroup_usage_usec(&sandbox)?;
    let burners_usec: u64 = burners
        .iter()
        .map(|pid| process_cpu_usec(*pid))
        .sum::<anyhow::Result<u64>>()?;
    eprintln!("collected {frozen_cpu} µs, burners {burners_usec} µs, cgroup {kernel_usec} µs");
    assert!(
        within_two_percent(frozen_cpu, burners_usec),
        "collected {frozen_cpu} µs, burners' own accounting {burners_usec} µs"
    );
    assert!(
        within_two_percent(frozen_cpu, kernel_usec),
        "collected {frozen_cpu} µs, cgroup usage_usec {kernel_usec} µs"
    );

    send_command(&env, &node, "acme", "burner", CommandAction::Resume).await?;
    tail.wait_for("cpu advancing again after resume", |samples| {
        last(samples).is_some_and(|s| {
            s.sample.state == LifecycleState::Running
                && s.sample.cpu_used_usec > frozen_cpu + 200_000
        })
    })
    .await?;
    let resumed = last(&tail.samples)
        .map(|s| s.sample.clone())
        .expect("waited for it");
    assert!(
        resumed.vcpu_alloc_usec > frozen_vcpu,
        "allocation bills again once running"
    );
    // One epoch throughout: a freeze is not a restart.
    assert!(tail.samples.iter().all(|s| s.sample.epoch == resumed.epoch));
    assert_eq!(
        collector.metric("idlemeter_collector_commands_applied_total"),
        2
    );
    assert_eq!(
        collector.metric("idlemeter_collector_commands_ignored_total"),
        2,
        "the unsigned and the forged suspend"
    );
    collector.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_sandbox_gets_one_final_stopped_sample_that_bills_nothing_more(
) -> anyhow::Result<()> {
    let env = TestEnv::new("collector_stop").await?;
    let mut cgroups = TestCgroups::new("stop")?;
    let sandbox = cgroups.add_sandbox("acme.leaving")?;
    let staying = cgroups.add_sandbox("acme.staying")?;
    let work = tempfile::tempdir()?;
    std::fs::create_dir_all(work.path().join("labels"))?;
    for name in ["acme.leaving", "acme.staying"] {
        std::fs::write(
            work.path().join(format!("labels/{name}.toml")),
            "vcpu_milli = 1000\n",
        )?;
    }
    let node = format!("node-stop-{}", std::process::id());
    let collector = RunningCollector::start(
        collector_config(&cgroups.parent, work.path(), &node),
        &env.kafka,
        env.topics.clone(),
    )?;
    let mut tail = SampleTail::new(&env)?;
    let of = samples_of;
    tail.wait_for("two samples of the leaving sandbox", |samples| {
        of(samples, "leaving").len() >= 2
    })
    .await?;
    // The platform deletes the sandbox: its cgroup goes (no process in it).
    std::fs::remove_dir(&sandbox)?;
    tail.wait_for("a stopped sample, then three more ticks", |samples| {
        of(samples, "leaving")
            .iter()
            .any(|s| s.state == LifecycleState::Stopped)
            && of(samples, "staying").len() >= of(samples, "leaving").len() + 3
    })
    .await?;
    let leaving = of(&tail.samples, "leaving");
    let stopped: Vec<_> = leaving
        .iter()
        .filter(|s| s.state == LifecycleState::Stopped)
        .collect();
    assert_eq!(stopped.len(), 1, "exactly one final sample: {leaving:?}");
    let last = stopped[0];
    assert_eq!(
        leaving.last().map(|s| s.seq),
        Some(last.seq),
        "nothing after the final sample"
    );
    let before = &leaving[leaving.len() - 2];
    assert_eq!(last.seq, before.seq + 1, "the next seq of the same epoch");
    assert_eq!(last.epoch, before.epoch);
    assert_eq!(
        (last.vcpu_alloc_usec, last.cpu_used_usec),
        (before.vcpu_alloc_usec, before.cpu_used_usec),
        "no usage after the last reading is billed"
    );
    assert!(last.ts > before.ts);
    assert_eq!(
        collector.metric("idlemeter_collector_sandboxes_stopped_total"),
        1
    );
    let _ = staying;
    collector.stop().await?;
    Ok(())
}

/// Issue "Idle policy", actions on the node: a stop command ends every
/// process of the sandbox, frozen ones included, removes its cgroup, and the
/// collector sends the final stopped sample; the sandbox beside it runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_command_ends_the_sandboxs_processes_and_sends_its_final_stopped_sample(
) -> anyhow::Result<()> {
    let env = TestEnv::new("collector_stop_command").await?;
    env.kafka
        .ensure_topics(&[(env.topics.commands.as_str(), 1)])
        .await?;
    let mut cgroups = TestCgroups::new("stopcmd")?;
    let doomed = cgroups.add_sandbox("acme.doomed")?;
    let neighbour = cgroups.add_sandbox("acme.neighbour")?;
    let pids = [
        cgroups.spawn_burner(&doomed)?,
        cgroups.spawn_joined(&doomed, "sleep 600")?,
    ];
    let neighbour_pid = cgroups.spawn_joined(&neighbour, "sleep 600")?;
    let work = tempfile::tempdir()?;
    std::fs::create_dir_all(work.path().join("labels"))?;
    let node = format!("node-stopcmd-{}", std::process::id());
    let collector = RunningCollector::start(
        collector_config(&cgroups.parent, work.path(), &node),
        &env.kafka,
        env.topics.clone(),
    )?;
    let mut tail = SampleTail::new(&env)?;
    let of = samples_of;
    // Suspended first: a frozen sandbox must be stoppable too.
    send_command(&env, &node, "acme", "doomed", CommandAction::Suspend).await?;
    tail.wait_for("the doomed sandbox suspended", |samples| {
        of(samples, "doomed")
            .iter()
            .any(|s| s.state == LifecycleState::Suspended)
    })
    .await?;
    send_command(&env, &node, "acme", "doomed", CommandAction::Stop).await?;
    tail.wait_for("the final stopped sample, then two more ticks", |samples| {
        let doomed = of(samples, "doomed");
        doomed.iter().any(|s| s.state == LifecycleState::Stopped)
            && of(samples, "neighbour").len() >= doomed.len() + 2
    })
    .await?;
    let doomed_samples = of(&tail.samples, "doomed");
    let last = doomed_samples.last().expect("waited for it");
    assert_eq!(last.state, LifecycleState::Stopped, "{doomed_samples:?}");
    assert_eq!(
        doomed_samples
            .iter()
            .filter(|s| s.state == LifecycleState::Stopped)
            .count(),
        1,
        "one final sample, nothing after it"
    );
    for pid in pids {
        assert!(
            !alive(pid),
            "process {pid} of the stopped sandbox still runs"
        );
    }
    assert!(!doomed.exists(), "the stopped sandbox's cgroup is removed");
    assert!(alive(neighbour_pid), "the neighbour runs on");
    assert_eq!(
        collector.metric("idlemeter_collector_commands_applied_total"),
        2
    );
    collector.stop().await?;
    Ok(())
}

/// True while `pid` runs (a zombie, killed but not yet reaped, does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Network bytes from a sandbox's own network namespace: a process in the
/// sandbox cgroup with its own namespace and a veth pair to the host receives
/// a known number of bytes, and the collector's `net_rx_bytes` rises by at
/// least that much (and not much more: headers, ARP). A sandbox in the host's
/// namespace cannot be told apart and reports none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_bytes_come_from_the_sandboxs_own_namespace() -> anyhow::Result<()> {
    const DATAGRAMS: u64 = 200;
    const PAYLOAD: usize = 1_000;
    let env = TestEnv::new("collector_net").await?;
    env.kafka
        .ensure_topics(&[(env.topics.commands.as_str(), 1)])
        .await?;
    let mut cgroups = TestCgroups::new("net")?;
    let isolated = cgroups.add_sandbox("acme.isolated")?;
    let (_, address) = cgroups.spawn_with_own_network(&isolated)?;
    let shared = cgroups.add_sandbox("acme.shared")?;
    cgroups.spawn_burner(&shared)?;
    let work = tempfile::tempdir()?;
    let node = format!("node-net-{}", std::process::id());
    let collector = RunningCollector::start(
        collector_config(&cgroups.parent, work.path(), &node),
        &env.kafka,
        env.topics.clone(),
    )?;
    let mut tail = SampleTail::new(&env)?;
    let of = samples_of;
    tail.wait_for("two samples of each sandbox", |samples| {
        of(samples, "isolated").len() >= 2 && of(samples, "shared").len() >= 2
    })
    .await?;
    let before = of(&tail.samples, "isolated")
        .last()
        .map(|s| s.net_rx_bytes)
        .unwrap_or_default();

    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    for _ in 0..DATAGRAMS {
        socket.send_to(&[7_u8; PAYLOAD], format!("{address}:9"))?;
    }
    let sent = DATAGRAMS * PAYLOAD as u64;
    tail.wait_for("the datagrams metered", |samples| {
        of(samples, "isolated")
            .last()
            .is_some_and(|s| s.net_rx_bytes >= before + sent)
    })
    .await?;
    collector.stop().await?;

    let isolated_samples = of(&tail.samples, "isolated");
    let last = isolated_samples.last().expect("waited for it");
    let received = last.net_rx_bytes - before;
    // Each datagram carries 28 bytes of IP/UDP and 14 of Ethernet headers.
    let framed = DATAGRAMS * (PAYLOAD as u64 + 42);
    assert!(
        received >= framed && received <= framed + 4_096,
        "received {received} bytes for {framed} framed bytes sent"
    );
    assert!(last.net_tx_bytes > 0, "the sandbox answered ARP at least");
    assert!(
        isolated_samples
            .windows(2)
            .all(|w| w[1].net_rx_bytes >= w[0].net_rx_bytes),
        "a counter never goes back"
    );
    assert!(
        of(&tail.samples, "shared")
            .iter()
            .all(|s| s.net_rx_bytes == 0 && s.net_tx_bytes == 0),
        "a sandbox in the host namespace reports no network bytes"
    );
    Ok(())
}

/// GPU processes are attributed to sandboxes through the real
/// `/proc/<pid>/cgroup` of real processes in real cgroups. The GPU itself is a
/// stand-in (`StandInGpu`: no GPU on this machine); the production reader is
/// NVML behind the same trait.
#[test]
fn gpu_processes_are_attributed_to_their_sandbox_through_proc() -> anyhow::Result<()> {
    use idlemeter_collector::gpu::{GpuProcessUsage, StandInGpu};
    use idlemeter_collector::reader::UsageReader;
    use idlemeter_collector::{CgroupLayout, CgroupReader};

    let mut cgroups = TestCgroups::new("gpu")?;
    let sandbox = cgroups.add_sandbox("acme.trainer")?;
    let worker = cgroups.spawn_joined(&sandbox, "sleep 600")?;
    let idle = cgroups.add_sandbox("acme.idle")?;
    cgroups.spawn_joined(&idle, "sleep 600")?;
    let process = |pid, sm_percent| GpuProcessUsage {
        pid,
        gpu_model: "H100".to_owned(),
        sm_percent,
        memory_bytes: 3 << 30,
    };
    let stand_in = StandInGpu {
        // The worker on two GPUs, and this test process, which is in no sandbox.
        processes: vec![
            process(worker, 40),
            process(worker, 25),
            process(std::process::id(), 90),
        ],
        fail_with: None,
    };
    let work = tempfile::tempdir()?;
    let mut reader = CgroupReader::new(CgroupLayout {
        v2_parent: cgroups.parent.clone(),
        v1_memory_parent: work.path().join("no-v1"),
        v1_cpuacct_parent: work.path().join("no-v1"),
        v1_freezer_parent: work.path().join("no-v1"),
        v1_blkio_parent: work.path().join("no-v1"),
        labels_dir: work.path().join("labels"),
        activity_dir: work.path().join("activity"),
    })
    .with_gpu(Box::new(stand_in));
    let mut readings = Vec::new();
    reader.read_node(&mut readings)?;
    let of = |name: &str| {
        readings
            .iter()
            .find(|reading| reading.key.sandbox.as_str() == name)
            .map(|reading| (reading.gpu_sm_percent, reading.detail.gpu_mem_used_bytes))
    };
    assert_eq!(of("trainer"), Some((65, 6 << 30)));
    assert_eq!(of("idle"), Some((0, 0)));
    // Pressure files exist in every v2 cgroup on this kernel: read, not left at zero
    // because of a parse failure (a sleeping process may have no stall, so only
    // the parse is checked against the file itself).
    let text = std::fs::read(sandbox.join("cpu.pressure"))?;
    assert!(idlemeter_collector::cgroup::pressure_total(&text).is_some());
    Ok(())
}

/// Discovery lists the parent only when inotify says a child was created or
/// removed (or every tenth tick as a safety net): on real cgroupfs a new and
/// a removed sandbox are each noticed at the very next read.
#[test]
fn sandboxes_created_and_removed_on_cgroupfs_are_noticed_at_the_next_read() -> anyhow::Result<()> {
    use idlemeter_collector::reader::UsageReader;
    use idlemeter_collector::{CgroupLayout, CgroupReader};

    let mut cgroups = TestCgroups::new("discover")?;
    cgroups.add_sandbox("acme.first")?;
    let work = tempfile::tempdir()?;
    let mut reader = CgroupReader::new(CgroupLayout {
        v2_parent: cgroups.parent.clone(),
        v1_memory_parent: work.path().join("no-v1"),
        v1_cpuacct_parent: work.path().join("no-v1"),
        v1_freezer_parent: work.path().join("no-v1"),
        v1_blkio_parent: work.path().join("no-v1"),
        labels_dir: work.path().join("labels"),
        activity_dir: work.path().join("activity"),
    });
    let mut readings = Vec::new();
    let names = |readings: &[idlemeter_collector::reader::SandboxReading]| {
        let mut names: Vec<String> = readings.iter().map(|r| r.name.to_string()).collect();
        names.sort();
        names
    };
    // Reads 1 and 2; neither of the next two is a safety-net listing.
    reader.read_node(&mut readings)?;
    reader.read_node(&mut readings)?;
    assert_eq!(names(&readings), ["acme.first"]);
    let second = cgroups.add_sandbox("acme.second")?;
    reader.read_node(&mut readings)?;
    assert_eq!(names(&readings), ["acme.first", "acme.second"]);
    assert_eq!(reader.unlabelled_sandboxes(), 2, "two discovered");
    std::fs::remove_dir(&second)?;
    reader.read_node(&mut readings)?;
    assert_eq!(names(&readings), ["acme.first"]);
    // Forgotten by discovery, not merely unreadable.
    assert_eq!(reader.unlabelled_sandboxes(), 1, "one discovered");
    Ok(())
}

/// A host without cgroup v2 (simulated on this hybrid host by discovering in
/// the v1 cpuacct hierarchy): CPU from `cpuacct.usage`, frozen from and
/// suspend through the v1 freezer, stop by signals, on real v1 cgroups with a
/// real burner.
#[test]
fn cgroup_v1_cpuacct_and_freezer_serve_a_host_without_v2() -> anyhow::Result<()> {
    use idlemeter_collector::cgroup::{set_frozen, stop_sandbox};
    use idlemeter_collector::reader::UsageReader;
    use idlemeter_collector::sandbox::SandboxKey;
    use idlemeter_collector::{CgroupLayout, CgroupReader};

    let unique = format!("idlemeter-test-v1-{}", std::process::id());
    let cpuacct = std::path::Path::new("/sys/fs/cgroup/cpuacct").join(&unique);
    let freezer = std::path::Path::new("/sys/fs/cgroup/freezer").join(&unique);
    let name = "acme.legacy";
    let mut v1 = V1Cgroups::default();
    for parent in [&cpuacct, &freezer] {
        std::fs::create_dir(parent)?;
        v1.dirs.push(parent.clone());
        std::fs::create_dir(parent.join(name))?;
        v1.dirs.push(parent.join(name));
    }
    let burner = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && echo $$ > {}/cgroup.procs && exec sh -c 'while :; do :; done'",
            cpuacct.join(name).display(),
            freezer.join(name).display()
        ))
        .spawn()?;
    v1.burner = Some(burner);

    let work = tempfile::tempdir()?;
    let layout = CgroupLayout {
        v2_parent: cpuacct.clone(),
        v1_memory_parent: work.path().join("no-v1"),
        v1_cpuacct_parent: cpuacct.clone(),
        v1_freezer_parent: freezer.clone(),
        v1_blkio_parent: work.path().join("no-v1"),
        labels_dir: work.path().join("labels"),
        activity_dir: work.path().join("activity"),
    };
    let mut reader = CgroupReader::new(layout.clone());
    let mut readings = Vec::new();
    let kernel_usec = || -> anyhow::Result<u64> {
        let text = std::fs::read_to_string(cpuacct.join(name).join("cpuacct.usage"))?;
        Ok(text.trim().parse::<u64>()? / 1_000)
    };
    // Wait for some CPU (the machine is shared: no fixed sleep).
    let until =
        |what: &str, done: &mut dyn FnMut() -> anyhow::Result<bool>| -> anyhow::Result<()> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !done()? {
                anyhow::ensure!(std::time::Instant::now() < deadline, "timed out: {what}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(())
        };
    until("the burner used 100 ms", &mut || {
        Ok(kernel_usec()? > 100_000)
    })?;
    let before = kernel_usec()?;
    reader.read_node(&mut readings)?;
    let after = kernel_usec()?;
    assert_eq!(readings.len(), 1);
    let read = readings[0].cpu_usage_usec;
    assert!(
        (before..=after).contains(&read) && read > 100_000,
        "{read} µs read, kernel said {before}..{after}"
    );
    assert!(!readings[0].frozen);

    let key = SandboxKey::from_cgroup_name(name)?;
    set_frozen(&work.path().join("no-v2"), &freezer, &key, true)?;
    until("frozen", &mut || {
        Ok(std::fs::read_to_string(freezer.join(name).join("freezer.state"))?.trim() == "FROZEN")
    })?;
    reader.read_node(&mut readings)?;
    assert!(readings[0].frozen);
    let frozen_at = readings[0].cpu_usage_usec;
    std::thread::sleep(std::time::Duration::from_millis(300));
    reader.read_node(&mut readings)?;
    assert_eq!(readings[0].cpu_usage_usec, frozen_at, "no CPU while frozen");
    set_frozen(&work.path().join("no-v2"), &freezer, &key, false)?;
    until("CPU again once thawed", &mut || {
        reader.read_node(&mut readings)?;
        Ok(!readings[0].frozen && readings[0].cpu_usage_usec > frozen_at + 50_000)
    })?;

    // Stop on v1, frozen first: no cgroup.kill, so each pid is killed and
    // the freezer thawed for the kill to land; then the directories go.
    set_frozen(&work.path().join("no-v2"), &freezer, &key, true)?;
    let pid = v1
        .burner
        .as_ref()
        .map(std::process::Child::id)
        .expect("spawned");
    stop_sandbox(&layout, &key, std::time::Duration::from_secs(10))?;
    assert!(!alive(pid), "the burner outlived stop");
    assert!(!cpuacct.join(name).exists() && !freezer.join(name).exists());
    reader.read_node(&mut readings)?;
    assert!(
        readings.is_empty(),
        "the stopped sandbox is gone from discovery"
    );
    Ok(())
}

/// v1 test cgroups and their burner, removed (thawed, killed) on drop.
#[derive(Default)]
struct V1Cgroups {
    dirs: Vec<std::path::PathBuf>,
    burner: Option<std::process::Child>,
}

impl Drop for V1Cgroups {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
        }
        if let Some(burner) = self.burner.as_mut() {
            let _ = burner.kill();
            let _ = burner.wait();
        }
        for dir in self.dirs.iter().rev() {
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// Money from counters on the real collector (issue "Money from counters"):
/// a sandbox with a CPU burner is resized up, goes idle, is suspended and
/// resumed, becomes active again and is resized down, sampled every 200 ms
/// on real cgroups. Then a third of the collector's batches, at random
/// (never the first or the last), are dropped, as if lost between collector
/// and Kafka, twenty times over: each of the five shipped sheets must bill
/// the lossy run what it bills the whole run, line by line, to the cent.
/// (The run is a minute long, so its lines are cents; that base quantities
/// are exact under loss, up to the rounding of spans, is
/// `services/core/tests/lost_samples.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_of_the_batches_lost_changes_no_bill() -> anyhow::Result<()> {
    use idlemeter_core::{
        rate_report, BillingOptions, NumberedSample, PriceSheet, SessionOrConnection, UsageSample,
    };
    let env = TestEnv::new("collector_lossy").await?;
    env.kafka
        .ensure_topics(&[(env.topics.commands.as_str(), 1)])
        .await?;
    let mut cgroups = TestCgroups::new("lossy")?;
    let sandbox = cgroups.add_sandbox("acme.lossy")?;
    cgroups.spawn_burner(&sandbox)?;
    let work = tempfile::tempdir()?;
    std::fs::create_dir_all(work.path().join("labels"))?;
    std::fs::create_dir_all(work.path().join("activity"))?;
    let labels = |vcpu_milli: u32, mem_gib: u64| -> anyhow::Result<()> {
        let text = format!(
            "vcpu_milli = {vcpu_milli}\nmem_bytes = {}\ndisk_bytes = {}\n",
            mem_gib << 30,
            20u64 << 30
        );
        let path = work.path().join("labels/acme.lossy.toml");
        std::fs::write(path.with_extension("tmp"), text)?;
        std::fs::rename(path.with_extension("tmp"), path)?;
        Ok(())
    };
    let activity = |sessions: u32| -> anyhow::Result<()> {
        let path = work.path().join("activity/acme.lossy");
        std::fs::write(
            path.with_extension("tmp"),
            format!("exec_sessions {sessions}\n"),
        )?;
        std::fs::rename(path.with_extension("tmp"), path)?;
        Ok(())
    };
    labels(2000, 4)?;
    activity(1)?;
    let node = format!("node-lossy-{}", std::process::id());
    let collector = RunningCollector::start(
        collector_config(&cgroups.parent, work.path(), &node),
        &env.kafka,
        env.topics.clone(),
    )?;
    let mut tail = SampleTail::new(&env)?;
    // `count` more samples after those read so far: each phase lasts that
    // long whatever the waits before it read (the last one must, for the
    // bill's last span to end on samples of its own allocation).
    let more = async |tail: &mut SampleTail, what: &str, count: usize| {
        let want = samples_of(&tail.samples, "lossy").len() + count;
        tail.wait_for(what, |samples| samples_of(samples, "lossy").len() >= want)
            .await
    };
    more(&mut tail, "running at 2 vCPU", 10).await?;
    labels(4000, 8)?;
    tail.wait_for("the resize up", |samples| {
        samples_of(samples, "lossy")
            .last()
            .is_some_and(|s| s.vcpu.0 == 4000)
    })
    .await?;
    more(&mut tail, "running at 4 vCPU", 8).await?;
    activity(0)?;
    more(&mut tail, "idle", 8).await?;
    send_command(&env, &node, "acme", "lossy", CommandAction::Suspend).await?;
    tail.wait_for("suspended", |samples| {
        samples_of(samples, "lossy")
            .last()
            .is_some_and(|s| s.state == LifecycleState::Suspended)
    })
    .await?;
    more(&mut tail, "suspended a while", 8).await?;
    send_command(&env, &node, "acme", "lossy", CommandAction::Resume).await?;
    activity(1)?;
    tail.wait_for("resumed", |samples| {
        samples_of(samples, "lossy")
            .last()
            .is_some_and(|s| s.state == LifecycleState::Running)
    })
    .await?;
    more(&mut tail, "active again", 8).await?;
    labels(1000, 2)?;
    tail.wait_for("the resize down", |samples| {
        samples_of(samples, "lossy")
            .last()
            .is_some_and(|s| s.vcpu.0 == 1000)
    })
    .await?;
    more(&mut tail, "running at 1 vCPU", 8).await?;
    collector.stop().await?;

    let shipped: Vec<_> = tail
        .samples
        .iter()
        .filter(|s| s.sample.sandbox.as_str() == "lossy")
        .cloned()
        .collect();
    let epochs: std::collections::BTreeSet<u64> =
        shipped.iter().map(|s| s.sample.epoch.0).collect();
    assert_eq!(epochs.len(), 1, "one epoch throughout");
    let mut batches: Vec<u64> = shipped.iter().map(|s| s.batch_seq).collect();
    batches.sort_unstable();
    batches.dedup();
    let (first, last) = (batches[0], batches[batches.len() - 1]);
    let numbered = |samples: Vec<UsageSample>| -> Vec<NumberedSample> {
        samples
            .into_iter()
            .enumerate()
            .map(|(index, sample)| NumberedSample {
                line: index as u64 + 1,
                sample,
            })
            .collect()
    };
    let sheets = [
        ("e2b", include_str!("../../prices/e2b.toml")),
        ("northflank", include_str!("../../prices/northflank.toml")),
        ("modal", include_str!("../../prices/modal.toml")),
        ("sprites", include_str!("../../prices/sprites.toml")),
        ("codesandbox", include_str!("../../prices/codesandbox.toml")),
    ];
    let rate = |sheet: &PriceSheet, samples: Vec<UsageSample>| {
        let report = rate_report(
            sheet,
            &numbered(samples),
            &SessionOrConnection,
            &BillingOptions::default(),
            Vec::new(),
        )
        .expect("rates");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        report.customers.into_iter().next().expect("acme")
    };
    let full: Vec<UsageSample> = shipped.iter().map(|s| s.sample.clone()).collect();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..20 {
        let mut dropped = std::collections::BTreeSet::new();
        while dropped.len() < batches.len() / 3 {
            // xorshift: a fixed sequence of random thirds.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let batch = batches[(state % batches.len() as u64) as usize];
            if batch != first && batch != last {
                dropped.insert(batch);
            }
        }
        let lossy: Vec<UsageSample> = shipped
            .iter()
            .filter(|s| !dropped.contains(&s.batch_seq))
            .map(|s| s.sample.clone())
            .collect();
        for (name, text) in sheets {
            let sheet = PriceSheet::from_toml(text, name)?;
            let whole = rate(&sheet, full.clone());
            let lost = rate(&sheet, lossy.clone());

            assert_eq!(whole.total, lost.total, "{name}, round {round}");
            assert_eq!(whole.lines.len(), lost.lines.len(), "{name}, round {round}");
            for (whole_line, lost_line) in whole.lines.iter().zip(&lost.lines) {
                assert_eq!(
                    (&whole_line.resource, whole_line.amount),
                    (&lost_line.resource, lost_line.amount),
                    "{name}, round {round}: {:?} vs {:?}",
                    whole.lines,
                    lost.lines
                );
            }
        }
    }
    eprintln!(
        "{} samples in {} batches; 20 random thirds dropped, bills unchanged",
        full.len(),
        batches.len()
    );
    Ok(())
}
