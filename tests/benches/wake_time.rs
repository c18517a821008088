//! Wake time on a real cgroup (issue "Idle policy", actions on the node): a
//! sandbox with a CPU burner is suspended, then woken, `ROUNDS` (10) times
//! each way:
//!
//! - **command**: a signed `resume` command produced to the commands topic;
//! - **lease**: a lease produced to the leases topic, through the policy
//!   service, which decides `wake` and sends the `resume` command.
//!
//! Wake time is from the moment the command (or lease) is produced to the
//! `ts` of the first sample that shows the sandbox running with its CPU
//! moving (taken by the collector; the reader's hop is not part of it). The
//! collector samples every `TICK_MS` (1000, the production default); after
//! it applies a command it samples again 100 ms later instead of at the next
//! tick, so the figure is the command's way there plus that delay. Wakes
//! are issued at phases spread over the tick.
//!
//! `make bench-wake` (root, cgroup v2 at /sys/fs/cgroup/unified, the test
//! servers). Not a test. Last line:
//! `bench: wake time p50 <a> ms p99 <b> ms by command, p50 <c> ms p99 <d> ms by lease through the policy service (<n> wakes each, tick <t> ms)`.

use std::time::Duration;

use chrono::Utc;
use idlemeter_core::LifecycleState;
use idlemeter_policy::{PolicyConfig, PolicyService};
use idlemeter_proto::v1::CommandAction;
use idlemeter_tests::bench::{percentile, setting};
use idlemeter_tests::collector::{
    collector_config, send_command, RunningCollector, SampleTail, TestCgroups, TEST_COMMAND_KEY,
};
use idlemeter_tests::TestEnv;

/// Idle after half an hour, so only commands and leases move the sandbox.
const POLICY: &str = "[policy]\nname = \"wake\"\nversion = \"1\"\n[rules]\nidle_window_s = 1800\nreissue_after_s = 3600\n";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    Command,
    Lease,
}

/// Suspends the sandbox and waits for a suspended sample; then wakes it and
/// returns ms from the wake's production to the first running sample with
/// its CPU moving.
async fn round(
    env: &TestEnv,
    tail: &mut SampleTail,
    node: &str,
    how: Wake,
    phase: Duration,
) -> anyhow::Result<f64> {
    send_command(env, node, "acme", "sleeper", CommandAction::Suspend).await?;
    let from = tail.samples.len();
    tail.wait_for("a suspended sample", |samples| {
        samples[from..]
            .iter()
            .any(|shipped| shipped.sample.state == LifecycleState::Suspended)
    })
    .await?;
    let frozen_cpu = tail.samples[tail.samples.len() - 1].sample.cpu_used_usec;
    // Wakes at spread phases of the tick, not right after one.
    tokio::time::sleep(phase).await;
    let asleep = tail.samples.len();
    let issued = Utc::now();
    match how {
        Wake::Command => {
            send_command(env, node, "acme", "sleeper", CommandAction::Resume).await?;
        }
        Wake::Lease => {
            env.produce_lease(
                &env.producer()?,
                "acme",
                "sleeper",
                Utc::now() + chrono::Duration::seconds(600),
            )
            .await?;
        }
    }
    let moving = |sample: &idlemeter_core::UsageSample| {
        sample.state == LifecycleState::Running && sample.cpu_used_usec > frozen_cpu
    };
    tail.wait_for("running with CPU moving", |samples| {
        samples[asleep..]
            .iter()
            .any(|shipped| moving(&shipped.sample))
    })
    .await?;
    let woke = tail.samples[asleep..]
        .iter()
        .find(|shipped| moving(&shipped.sample))
        .map(|shipped| shipped.sample.ts)
        .expect("waited for it");
    Ok((woke - issued).num_milliseconds() as f64)
}

async fn run() -> anyhow::Result<()> {
    let rounds = setting("ROUNDS", 10) as usize;
    let tick_ms = setting("TICK_MS", 1000);
    let env = TestEnv::new("bench_wake").await?;
    env.kafka
        .ensure_topics(&[
            (env.topics.commands.as_str(), 1),
            (env.topics.leases.as_str(), 1),
        ])
        .await?;
    let mut cgroups = TestCgroups::new("wake")?;
    let sandbox = cgroups.add_sandbox("acme.sleeper")?;
    cgroups.spawn_burner(&sandbox)?;
    let work = tempfile::tempdir()?;
    std::fs::create_dir_all(work.path().join("labels"))?;
    let node = format!("node-wake-{}", std::process::id());
    let mut config = collector_config(&cgroups.parent, work.path(), &node);
    config.interval_ms = tick_ms;
    let collector = RunningCollector::start(config, &env.kafka, env.topics.clone())?;
    let policy = PolicyService::build(
        &env.kafka,
        env.store.clone(),
        env.topics.clone(),
        PolicyConfig {
            file: "wake.toml".to_owned(),
            group_id: format!("{}.policy", env.group_id),
            command_key: idlemeter_core::Secret::new(TEST_COMMAND_KEY),
            ..PolicyConfig::default()
        },
        POLICY,
        &prometheus::Registry::new(),
    )
    .await?;
    let (stop_policy, policy_stopped) = tokio::sync::oneshot::channel::<()>();
    let policy = tokio::spawn(policy.run_until_stopped(async {
        let _ = policy_stopped.await;
    }));
    let mut tail = SampleTail::new(&env)?;
    tail.wait_for("the sandbox running", |samples| samples.len() >= 2)
        .await?;
    let mut figures = Vec::new();
    for how in [Wake::Command, Wake::Lease] {
        let mut millis = Vec::new();
        for done in 0..rounds {
            let phase = Duration::from_millis((done as u64 * 397) % tick_ms);
            millis.push(round(&env, &mut tail, &node, how, phase).await?);
            eprintln!(
                "bench: {} wake {}/{rounds}: {:.0} ms",
                if how == Wake::Command {
                    "command"
                } else {
                    "lease"
                },
                done + 1,
                millis[done]
            );
        }
        millis.sort_by(f64::total_cmp);
        figures.push((percentile(&millis, 50.0), percentile(&millis, 99.0)));
    }
    let _ = stop_policy.send(());
    policy.await??;
    collector.stop().await?;
    drop(cgroups);
    tokio::time::sleep(Duration::from_millis(10)).await;
    println!(
        "bench: wake time p50 {:.0} ms p99 {:.0} ms by command, p50 {:.0} ms p99 {:.0} ms by lease through the policy service ({rounds} wakes each, tick {tick_ms} ms)",
        figures[0].0, figures[0].1, figures[1].0, figures[1].1
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}
