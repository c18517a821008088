//! Idle-aware billing end to end, with a real cgroup: a sandbox whose only
//! activity is CPU (a burner, no session, no connection) is idle under the
//! policy; the policy service decides to suspend it, the collector freezes its
//! cgroup on the command, and from then on its compute bill stops while its
//! storage bill goes on. Then the platform asks for it (a lease): the policy
//! decides a wake, the collector thaws it and its CPU moves again. Real
//! broker, real ClickHouse, real cgroup v2 freeze.

use std::time::Duration;

use idlemeter_core::rating::NumberedSample;
use idlemeter_core::{
    rate_report, BillingOptions, LifecycleState, PriceSheet, SessionOrConnection,
};
use idlemeter_policy::{PolicyConfig, PolicyService};
use idlemeter_tests::collector::{collector_config, RunningCollector, SampleTail, TestCgroups};
use idlemeter_tests::TestEnv;
use rust_decimal::Decimal;

const POLICY: &str = r#"
[policy]
name = "e2e"
version = "1"

[rules]
idle_window_s = 2
idle_action = "suspend"
reissue_after_s = 5
"#;

/// $1 per allocated vCPU-second while running; $1 per GB-second of disk in
/// every state but stopped.
const SHEET: &str = r#"
[sheet]
platform = "e2e"
currency = "USD"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-second"
unit_price = "1"
basis = "allocated"
increment_seconds = 1
idle = "billed"

[versions.resources.disk]
unit = "GB-second"
unit_price = "1"
bills_while = ["running", "suspended"]
increment_seconds = 1
idle = "billed"
"#;

fn amount_of(report: &idlemeter_core::RateReport, resource: &str) -> Decimal {
    report
        .customers
        .iter()
        .flat_map(|bill| bill.lines.iter())
        .filter(|line| line.resource == resource)
        .map(|line| line.amount)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sandbox_is_frozen_and_only_its_storage_bills_on() -> anyhow::Result<()> {
    let env = TestEnv::new("idle_e2e").await?;
    env.kafka
        .ensure_topics(&[
            (env.topics.commands.as_str(), 1),
            (env.topics.leases.as_str(), 1),
        ])
        .await?;
    let mut cgroups = TestCgroups::new("idle-e2e")?;
    let sandbox = cgroups.add_sandbox("acme.worker")?;
    cgroups.spawn_burner(&sandbox)?;
    let work = tempfile::tempdir()?;
    std::fs::create_dir_all(work.path().join("labels"))?;
    std::fs::write(
        work.path().join("labels/acme.worker.toml"),
        "vcpu_milli = 1000\ndisk_bytes = 1000000000\n",
    )?;
    let node = format!("node-idle-{}", std::process::id());
    let collector = RunningCollector::start(
        collector_config(&cgroups.parent, work.path(), &node),
        &env.kafka,
        env.topics.clone(),
    )?;
    let registry = prometheus::Registry::new();
    let policy = PolicyService::build(
        &env.kafka,
        env.store.clone(),
        env.topics.clone(),
        PolicyConfig {
            file: "e2e-policy.toml".to_owned(),
            group_id: format!("{}.policy", env.group_id),
            snapshot_interval_ms: 500,
            command_key: idlemeter_core::Secret::new(idlemeter_tests::collector::TEST_COMMAND_KEY),
            ..PolicyConfig::default()
        },
        POLICY,
        &registry,
    )
    .await?;
    let (stop_policy, policy_stopped) = tokio::sync::oneshot::channel::<()>();
    let policy_task = tokio::spawn(policy.run_until_stopped(async {
        let _ = policy_stopped.await;
    }));

    // The collector samples every 200 ms; give the sandbox ten suspended samples.
    let mut tail = SampleTail::new(&env)?;
    tail.wait_for("ten suspended samples", |samples| {
        samples
            .iter()
            .filter(|shipped| shipped.sample.state == LifecycleState::Suspended)
            .count()
            >= 10
    })
    .await?;
    let before_wake = tail.samples.len();

    // The platform's wake request: a lease while suspended.
    env.produce_lease(
        &env.producer()?,
        "acme",
        "worker",
        chrono::Utc::now() + chrono::Duration::seconds(120),
    )
    .await?;
    let suspended_cpu = tail.samples[before_wake - 1].sample.cpu_used_usec;
    tail.wait_for("running again with CPU moving", |samples| {
        samples[before_wake..].iter().any(|shipped| {
            shipped.sample.state == LifecycleState::Running
                && shipped.sample.cpu_used_usec > suspended_cpu + 100_000
        })
    })
    .await?;
    let _ = stop_policy.send(());
    policy_task.await??;
    collector.stop().await?;
    let wakes: Vec<_> = env
        .store
        .decisions_of("acme")
        .await?
        .into_iter()
        .filter(|row| row.rule == "wake")
        .collect();
    assert_eq!(wakes.len(), 1, "{wakes:?}");
    assert_eq!(wakes[0].action, "resume");
    assert!(wakes[0].reason.contains("platform"), "{}", wakes[0].reason);
    tail.samples.truncate(before_wake);

    // The trail: one idle_window decision, before the first frozen sample.
    let decisions = env.store.decisions_of("acme").await?;
    let suspends: Vec<_> = decisions
        .iter()
        .filter(|row| row.sandbox == "worker" && row.rule == "idle_window")
        .collect();
    assert!(!suspends.is_empty(), "no idle decision: {decisions:?}");
    let samples: Vec<_> = tail
        .samples
        .iter()
        .map(|shipped| shipped.sample.clone())
        .collect();
    let first_suspended = samples
        .iter()
        .position(|sample| sample.state == LifecycleState::Suspended)
        .expect("waited for suspended samples");
    let frozen_at = samples[first_suspended].ts.timestamp_millis();
    assert!(suspends[0].at_ms <= frozen_at);
    // The decision came at least the window after the sandbox started: the
    // burner's CPU alone did not keep it awake, but nothing fired early either.
    assert!(suspends[0].at_ms - samples[0].ts.timestamp_millis() >= 2_000);

    // Billing: compute stops at the freeze, storage goes on.
    let sheet = PriceSheet::from_toml(SHEET, "e2e.toml")?;
    let numbered = |upto: usize| -> Vec<NumberedSample> {
        samples[..upto]
            .iter()
            .enumerate()
            .map(|(index, sample)| NumberedSample {
                line: index as u64 + 1,
                sample: sample.clone(),
            })
            .collect()
    };
    let rate = |upto: usize| {
        rate_report(
            &sheet,
            &numbered(upto),
            &SessionOrConnection,
            &BillingOptions::default(),
            Vec::new(),
        )
    };
    let until_frozen = rate(first_suspended + 1)?;
    let everything = rate(samples.len())?;
    assert!(amount_of(&until_frozen, "vcpu") > Decimal::ZERO);
    assert_eq!(
        amount_of(&everything, "vcpu"),
        amount_of(&until_frozen, "vcpu"),
        "compute billed after the freeze"
    );
    let suspended_seconds =
        (samples[samples.len() - 1].ts - samples[first_suspended].ts).num_milliseconds() / 1000;
    assert!(suspended_seconds >= 1);
    assert!(
        amount_of(&everything, "disk")
            >= amount_of(&until_frozen, "disk") + Decimal::from(suspended_seconds),
        "storage must bill on while suspended: {} then {}",
        amount_of(&until_frozen, "disk"),
        amount_of(&everything, "disk")
    );
    drop(cgroups);
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
