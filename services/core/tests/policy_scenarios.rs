//! The idle policy's scenario suite: traces as data files in
//! `policies/scenarios/`, each with the exact decisions it must produce, plus
//! the replay properties (same stream, same decisions; duplicates, replays
//! and a restart from a snapshot change nothing).
//!
//! A scenario file names a policy from `policies/`, may override its tables
//! (`[rules...]`, `[plans...]`, `[customers...]`), and describes one sandbox as
//! consecutive segments of samples taken every `interval_s` seconds:
//! `state`, `exec_sessions`, `open_conns`, `cpu_percent` (of the allocation),
//! `net_bytes_per_s`, `api_calls_per_sample`. A segment with `missing =
//! "collector"` is time the collector did not sample (time passes, seq does
//! not); `missing = "transit"` was sampled but lost on the way (time and seq
//! pass, nothing arrives). Counters move through both. `[[lease]]` entries take a
//! keep-alive lease at `at_s` until `until_s`; `[[spend]]` entries report the
//! customer's spend so far (`amount`) at `at_s`. `[[expect]]` lists every
//! decision, with its exact time in seconds from the start.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, TimeZone, Utc};
use idlemeter_core::policy::{decide_all, Decision, Engine, Input, Lease, Policy, Snapshot, Spend};
use idlemeter_core::{
    CustomerId, Epoch, LifecycleState, NodeId, SandboxId, UsageSample, VcpuMillis,
};
use serde::Deserialize;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    description: String,
    policy: String,
    #[serde(default = "default_customer")]
    customer: String,
    #[serde(default = "default_interval")]
    interval_s: i64,
    #[serde(default)]
    rules: Option<toml::Value>,
    #[serde(default)]
    plans: Option<toml::Value>,
    #[serde(default)]
    customers: Option<toml::Value>,
    segment: Vec<Segment>,
    #[serde(default)]
    lease: Vec<LeaseAt>,
    #[serde(default)]
    spend: Vec<SpendAt>,
    #[serde(default)]
    expect: Vec<Expected>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpendAt {
    at_s: i64,
    amount: String,
}

fn default_customer() -> String {
    "cust-1".to_owned()
}
fn default_interval() -> i64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Segment {
    seconds: i64,
    #[serde(default = "running")]
    state: LifecycleState,
    #[serde(default)]
    exec_sessions: u32,
    #[serde(default)]
    open_conns: u32,
    #[serde(default)]
    cpu_percent: u64,
    #[serde(default)]
    net_bytes_per_s: u64,
    #[serde(default)]
    api_calls_per_sample: u64,
    #[serde(default)]
    missing: Option<Missing>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Missing {
    /// The collector took no sample (it was down or stalled).
    Collector,
    /// Samples were taken and lost in transit.
    Transit,
}

fn running() -> LifecycleState {
    LifecycleState::Running
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseAt {
    at_s: i64,
    until_s: i64,
    holder: String,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Expected {
    at_s: i64,
    rule: String,
    action: String,
    #[serde(default = "first_attempt")]
    attempt: u32,
}

fn first_attempt() -> u32 {
    1
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 10, 0, 0)
        .single()
        .expect("valid time")
}

/// Deep-merges `overrides` into `base` (tables merge, values replace).
fn merge(base: &mut toml::Value, overrides: &toml::Value) {
    match (base, overrides) {
        (toml::Value::Table(base), toml::Value::Table(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overrides) => *base = overrides.clone(),
    }
}

fn load(path: &Path) -> (Scenario, Policy, Vec<Input>) {
    let text = std::fs::read_to_string(path).expect("scenario readable");
    let scenario: Scenario =
        toml::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let policy_path = repo_root().join("policies").join(&scenario.policy);
    let mut policy_toml: toml::Value =
        toml::from_str(&std::fs::read_to_string(&policy_path).expect("policy readable"))
            .expect("policy is TOML");
    for (table, overrides) in [
        ("rules", &scenario.rules),
        ("plans", &scenario.plans),
        ("customers", &scenario.customers),
    ] {
        if let Some(overrides) = overrides {
            let mut wrapped = toml::value::Table::new();
            wrapped.insert(table.to_owned(), overrides.clone());
            merge(&mut policy_toml, &toml::Value::Table(wrapped));
        }
    }
    let policy = Policy::from_toml(
        &toml::to_string(&policy_toml).expect("serialisable"),
        &policy_path.display().to_string(),
    )
    .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let inputs = trace(&scenario);
    (scenario, policy, inputs)
}

/// The scenario's segments as samples, with its leases at their times.
fn trace(scenario: &Scenario) -> Vec<Input> {
    let customer = CustomerId::parse(scenario.customer.clone()).expect("id");
    let sandbox = SandboxId::parse("sbx-1").expect("id");
    let vcpu_millis: u64 = 2000;
    let mut inputs = Vec::new();
    let mut leases: Vec<&LeaseAt> = scenario.lease.iter().collect();
    leases.sort_by_key(|lease| lease.at_s);
    let mut spends: Vec<&SpendAt> = scenario.spend.iter().collect();
    spends.sort_by_key(|spend| spend.at_s);
    let (mut t, mut seq) = (0i64, 0u64);
    let (mut cpu, mut net, mut api) = (0u64, 0u64, 0u64);
    let interval = scenario.interval_s;
    for segment in &scenario.segment {
        assert_eq!(
            segment.seconds % interval,
            0,
            "segments are whole intervals"
        );
        for _ in 0..segment.seconds / interval {
            while leases.first().is_some_and(|lease| lease.at_s <= t) {
                let lease = leases.remove(0);
                inputs.push(Input::Lease(Lease {
                    customer: customer.clone(),
                    sandbox: sandbox.clone(),
                    until: start() + Duration::seconds(lease.until_s),
                    holder: lease.holder.clone(),
                    at: Some(start() + Duration::seconds(lease.at_s)),
                }));
            }
            while spends.first().is_some_and(|spend| spend.at_s <= t) {
                let spend = spends.remove(0);
                inputs.push(Input::Spend(Spend {
                    customer: customer.clone(),
                    at: start() + Duration::seconds(spend.at_s),
                    amount: spend.amount.parse().expect("decimal amount"),
                }));
            }
            if seq > 0 && segment.state == LifecycleState::Running {
                let interval_us = u64::try_from(interval).expect("positive") * 1_000_000;
                cpu += vcpu_millis * interval_us / 1000 * segment.cpu_percent / 100;
                net += segment.net_bytes_per_s * u64::try_from(interval).expect("positive");
                api += segment.api_calls_per_sample;
            }
            if segment.missing == Some(Missing::Collector) {
                t += interval;
                continue;
            }
            seq += 1;
            if segment.missing == Some(Missing::Transit) {
                t += interval;
                continue;
            }
            inputs.push(Input::Sample(UsageSample {
                customer: customer.clone(),
                node: NodeId::parse("node-1").expect("id"),
                sandbox: sandbox.clone(),
                epoch: Epoch(1),
                seq,
                ts: start() + Duration::seconds(t),
                state: segment.state,
                vcpu: VcpuMillis(u32::try_from(vcpu_millis).expect("small")),
                mem_bytes: 1 << 30,
                gpu_model: None,
                gpu_count: 0,
                disk_bytes: 0,
                cpu_used_usec: cpu,
                net_rx_bytes: net / 2,
                net_tx_bytes: net - net / 2,
                vcpu_alloc_usec: 0,
                mem_alloc_kib_ms: 0,
                mem_used_kib_ms: 0,
                gpu_alloc_ms: 0,
                disk_mib_ms: 0,
                api_calls: api,
                mem_used_bytes: 0,
                exec_sessions: segment.exec_sessions,
                open_conns: segment.open_conns,
                detail: Default::default(),
                state_counters: Default::default(),
                counters_present: Default::default(),
            }));
            t += interval;
        }
    }
    inputs
}

fn as_expected(decisions: &[Decision]) -> Vec<Expected> {
    decisions
        .iter()
        .map(|decision| Expected {
            at_s: (decision.at - start()).num_seconds(),
            rule: decision.rule.as_str().to_owned(),
            action: decision.action.as_str().to_owned(),
            attempt: decision.attempt,
        })
        .collect()
}

fn scenarios() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo_root().join("policies/scenarios"))
        .expect("scenario directory")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 6, "the scenario suite is missing files");
    paths
}

#[test]
fn every_scenario_decides_exactly_what_it_expects() {
    let mut failures = Vec::new();
    for path in scenarios() {
        let (scenario, policy, inputs) = load(&path);
        assert!(!scenario.description.trim().is_empty());
        let decided = as_expected(&decide_all(&policy, &inputs));
        if decided != scenario.expect {
            failures.push(format!(
                "{}:\n  expected {:?}\n  decided  {:?}",
                path.display(),
                scenario.expect,
                decided
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_shipped_policy_loads() {
    let mut count = 0;
    for entry in std::fs::read_dir(repo_root().join("policies")).expect("policies") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            let text = std::fs::read_to_string(&path).expect("readable");
            Policy::from_toml(&text, &path.display().to_string())
                .unwrap_or_else(|error| panic!("{error}"));
            count += 1;
        }
    }
    assert_eq!(count, 5, "one policy per platform");
}

/// Replaying the same day gives the same decisions, ids included; a stream
/// with every sample duplicated (a Kafka replay) gives the same decisions; and
/// an engine restored from a JSON snapshot taken at any point, fed the rest of
/// the stream from a little before that point (the uncommitted tail replayed),
/// decides exactly what an engine that never stopped decided.
#[test]
fn decisions_are_a_pure_function_of_stream_and_policy() {
    for path in scenarios() {
        let (_, policy, inputs) = load(&path);
        let once = decide_all(&policy, &inputs);
        assert_eq!(once, decide_all(&policy, &inputs), "{}", path.display());

        let doubled: Vec<Input> = inputs
            .iter()
            .flat_map(|input| [input.clone(), input.clone()])
            .collect();
        assert_eq!(once, decide_all(&policy, &doubled), "{}", path.display());

        let step = (inputs.len() / 7).max(1);
        for cut in (1..inputs.len()).step_by(step) {
            let mut engine = Engine::new(policy.clone());
            let mut decided: Vec<Decision> = inputs[..cut]
                .iter()
                .flat_map(|input| engine.observe(input))
                .collect();
            let json = serde_json::to_string(&engine.snapshot()).expect("serialisable");
            let snapshot: Snapshot = serde_json::from_str(&json).expect("deserialisable");
            let mut restored = Engine::restore(policy.clone(), snapshot);
            let replay_from = cut.saturating_sub(5);
            let replayed: Vec<Decision> = inputs[replay_from..]
                .iter()
                .flat_map(|input| restored.observe(input))
                .collect();
            // Decisions at or before the cut were already emitted; a replay
            // must not emit them again.
            decided.extend(replayed);
            assert_eq!(once, decided, "{} cut at input {cut}", path.display());
        }
    }
}
