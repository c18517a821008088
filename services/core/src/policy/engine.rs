//! The idle-suspend decision engine: a pure state machine over the sample
//! stream.
//!
//! Time is the samples' own (`ts`), never the clock, so replaying a day of
//! samples with the same policy gives the same decisions at the same instants,
//! with the same ids. The state per sandbox is small and serialisable: a
//! service snapshots it and restores it after a restart, and a replay of
//! samples it had already seen changes nothing (they are recognised by `seq`).
//!
//! The rules, per running span of a sandbox:
//! - an interval is *active* when any enabled signal says so: an exec session
//!   or inbound connection open at its end, an API call during it, network or
//!   CPU above the thresholds. A resume or start counts as activity.
//! - missing data is not idle: an interval with samples lost within it (a seq
//!   jump) or longer than `gap_after_s` (the collector went quiet) counts as
//!   active, so the idle streak starts again at the first sample after the
//!   gap, from what was observed.
//! - the idle streak starts at the end of the last active interval, or at the
//!   expiry of a keep-alive lease if that is later. When the streak reaches the
//!   idle window, the engine decides `idle_window` with the policy's action.
//! - a running span that reaches `max_session_s` is decided `max_session`,
//!   whatever its activity and leases (it is a platform limit).
//! - a customer whose reported spend reached their limit gets `budget_cap`
//!   (suspend) for each sandbox still running.
//! - a decision is not repeated while it is pending; if the sandbox still runs
//!   `reissue_after_s` later, it is issued again (attempt 2, ...).
//! - hysteresis: a span shorter than `short_run_s` that ended by an idle
//!   suspend is a flap; each consecutive flap multiplies the window.
//! - a keep-alive lease that arrives while the sandbox is suspended wakes it:
//!   `wake` with action `resume`, at the lease's time (`at`). A platform's
//!   wake request is such a lease. It is re-issued like the others while the
//!   sandbox stays suspended and the lease holds.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::ids::{CustomerId, Epoch, NodeId, SandboxId};
use crate::policy::file::{Action, Policy, Rules};
use crate::rating::{is_gap, is_gap_after, IdlePolicy};
use crate::sample::{LifecycleState, UsageSample};

/// Why a decision was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    IdleWindow,
    MaxSession,
    BudgetCap,
    /// A lease (or a platform's wake request) for a suspended sandbox.
    Wake,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::IdleWindow => "idle_window",
            Rule::MaxSession => "max_session",
            Rule::BudgetCap => "budget_cap",
            Rule::Wake => "wake",
        }
    }
}

/// A keep-alive lease: the sandbox is held awake until `until` (exclusive).
/// A lease whose `until` is in the past releases an earlier one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub customer: CustomerId,
    pub sandbox: SandboxId,
    pub until: DateTime<Utc>,
    /// Who holds it (`customer`, `platform`, a user id), for the trail.
    pub holder: String,
    /// When it was taken: the event time of a wake. The service fills it
    /// from the Kafka message's timestamp when the sender did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

/// A customer's spend so far in the period, as the rater reported it at `at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spend {
    pub customer: CustomerId,
    pub at: DateTime<Utc>,
    pub amount: Decimal,
}

/// What the engine consumes, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "almost every input is a sample; boxing it would allocate once per sample"
)]
pub enum Input {
    Sample(UsageSample),
    Lease(Lease),
    Spend(Spend),
}

/// The measurements that decided, recorded with the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signals {
    pub running_since: DateTime<Utc>,
    pub idle_since: DateTime<Utc>,
    pub window_s: u64,
    pub flaps: u32,
    pub exec_sessions: u32,
    pub open_conns: u32,
    pub net_bytes_per_s: u64,
    pub cpu_percent: Decimal,
    pub lease_until: Option<DateTime<Utc>>,
    pub spend: Option<Decimal>,
}

/// One decision about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Deterministic: the same stream and policy give the same id, so a
    /// replayed decision collapses downstream.
    pub id: String,
    pub customer: CustomerId,
    pub sandbox: SandboxId,
    pub node: NodeId,
    pub epoch: Epoch,
    /// The `ts` of the sample at which the rule fired.
    pub at: DateTime<Utc>,
    pub rule: Rule,
    pub action: Action,
    /// 1 for the first issue, 2 and up for re-issues.
    pub attempt: u32,
    pub policy_version: String,
    pub reason: String,
    pub signals: Signals,
}

/// What the engine remembers of one sandbox; serialisable for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    pub customer: CustomerId,
    pub sandbox: SandboxId,
    pub node: NodeId,
    pub epoch: Epoch,
    pub seq: u64,
    pub ts: DateTime<Utc>,
    pub state: LifecycleState,
    pub cpu_used_usec: u64,
    pub net_bytes: u64,
    pub api_calls: u64,
    /// Start of the current running span.
    pub running_since: Option<DateTime<Utc>>,
    /// End of the last active interval (or the span's start).
    pub active_at: Option<DateTime<Utc>>,
    pub lease: Option<Lease>,
    pub flaps: u32,
    /// The decision waiting for the sandbox to leave `running`.
    pub pending: Option<Pending>,
    /// Rules whose `notify` was sent for this running span (idle: for this
    /// idle streak), so they are not sent again and do not hide later rules.
    #[serde(default)]
    pub notified: Vec<Rule>,
}

impl SandboxState {
    /// A sandbox not seen yet: stopped at seq 0, so its next sample starts
    /// an epoch, with nothing counted.
    fn unseen(
        customer: CustomerId,
        sandbox: SandboxId,
        node: NodeId,
        epoch: Epoch,
        ts: DateTime<Utc>,
    ) -> Self {
        Self {
            customer,
            sandbox,
            node,
            epoch,
            seq: 0,
            ts,
            state: LifecycleState::Stopped,
            cpu_used_usec: 0,
            net_bytes: 0,
            api_calls: 0,
            running_since: None,
            active_at: None,
            lease: None,
            flaps: 0,
            pending: None,
            notified: Vec::new(),
        }
    }

    /// A sandbox known only from a lease that arrived before its first
    /// sample. It lives in the state (and snapshots) like any other, so a
    /// restart keeps the lease.
    fn placeholder(lease: &Lease) -> Self {
        Self {
            lease: Some(lease.clone()),
            ..Self::unseen(
                lease.customer.clone(),
                lease.sandbox.clone(),
                NodeId::parse("unknown").expect("a valid id"),
                Epoch(0),
                lease.until,
            )
        }
    }

    /// Changes whenever anything a snapshot must keep changes.
    pub fn version(&self) -> (u64, u64, i64) {
        (
            self.epoch.0,
            self.seq,
            self.lease
                .as_ref()
                .map_or(i64::MIN, |lease| lease.until.timestamp_millis()),
        )
    }
}

/// A decision issued and not yet acted on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub rule: Rule,
    pub action: Action,
    pub at: DateTime<Utc>,
    pub attempt: u32,
}

type Key = (CustomerId, SandboxId);

/// The engine: a policy and the state of every sandbox it has seen.
#[derive(Debug, Clone)]
pub struct Engine {
    policy: Policy,
    version: String,
    sandboxes: HashMap<Key, SandboxState>,
    spend: BTreeMap<CustomerId, Spend>,
}

impl Engine {
    pub fn new(policy: Policy) -> Self {
        Self {
            version: policy.version_label(),
            policy,
            sandboxes: HashMap::new(),
            spend: BTreeMap::new(),
        }
    }

    /// An engine that continues from `snapshot` (see [`Engine::snapshot`]).
    pub fn restore(policy: Policy, snapshot: Snapshot) -> Self {
        let mut engine = Self::new(policy);
        for state in snapshot.sandboxes {
            engine
                .sandboxes
                .insert((state.customer.clone(), state.sandbox.clone()), state);
        }
        for spend in snapshot.spend {
            engine.spend.insert(spend.customer.clone(), spend);
        }
        engine
    }

    /// Everything the engine knows, in a stable order.
    pub fn snapshot(&self) -> Snapshot {
        let mut sandboxes: Vec<SandboxState> = self.sandboxes.values().cloned().collect();
        sandboxes.sort_by(|a, b| (&a.customer, &a.sandbox).cmp(&(&b.customer, &b.sandbox)));
        Snapshot {
            policy_version: self.version.clone(),
            sandboxes,
            spend: self.spend.values().cloned().collect(),
        }
    }

    pub fn policy_version(&self) -> &str {
        &self.version
    }

    pub fn sandbox(&self, customer: &CustomerId, sandbox: &SandboxId) -> Option<&SandboxState> {
        self.sandboxes.get(&(customer.clone(), sandbox.clone()))
    }

    /// Takes over a sandbox's state, restored from the snapshot its last
    /// owner wrote (a replica that gains a partition continues from there).
    pub fn adopt(&mut self, state: SandboxState) {
        self.sandboxes
            .insert((state.customer.clone(), state.sandbox.clone()), state);
    }

    /// Forgets one sandbox (its partition went to another replica, which
    /// continues from the snapshot); true if it was known.
    pub fn forget(&mut self, customer: &CustomerId, sandbox: &SandboxId) -> bool {
        self.sandboxes
            .remove(&(customer.clone(), sandbox.clone()))
            .is_some()
    }

    /// Forgets sandboxes last seen before `before` that are not running (gone
    /// or long suspended), so state stays bounded by the live fleet.
    pub fn forget_quiet(&mut self, before: DateTime<Utc>) -> usize {
        let size = self.sandboxes.len();
        self.sandboxes
            .retain(|_, state| state.ts >= before || state.state == LifecycleState::Running);
        size - self.sandboxes.len()
    }

    /// Feeds one input; returns the decisions it triggered.
    pub fn observe(&mut self, input: &Input) -> Vec<Decision> {
        match input {
            Input::Sample(sample) => self.observe_sample(sample).into_iter().collect(),
            Input::Lease(lease) => {
                let key = (lease.customer.clone(), lease.sandbox.clone());
                let state = self
                    .sandboxes
                    .entry(key)
                    .or_insert_with(|| SandboxState::placeholder(lease));
                state.lease = Some(lease.clone());
                let at = lease.at.unwrap_or(state.ts).max(state.ts);
                let reissue_after_s = self.policy.rules_for(&lease.customer).reissue_after_s;
                wake(&self.version, state, at, reissue_after_s)
                    .into_iter()
                    .collect()
            }
            Input::Spend(spend) => {
                self.spend.insert(spend.customer.clone(), spend.clone());
                Vec::new()
            }
        }
    }

    fn observe_sample(&mut self, sample: &UsageSample) -> Option<Decision> {
        let key = (sample.customer.clone(), sample.sandbox.clone());
        let rules = self.policy.rules_for(&sample.customer).clone();
        let state = match self.sandboxes.get_mut(&key) {
            Some(state) => {
                if sample.epoch < state.epoch
                    || (sample.epoch == state.epoch && sample.seq <= state.seq)
                {
                    return None; // a duplicate or a straggler: already decided on
                }
                state
            }
            None => self.sandboxes.entry(key).or_insert_with(|| {
                SandboxState::unseen(
                    sample.customer.clone(),
                    sample.sandbox.clone(),
                    sample.node.clone(),
                    sample.epoch,
                    sample.ts,
                )
            }),
        };
        let first_of_epoch = sample.epoch != state.epoch || state.seq == 0;
        let measured = Measured::between(state, sample, first_of_epoch);
        let gap = !first_of_epoch && is_gap_after(state.seq, state.ts, sample, rules.gap_after_s);
        let was_running = state.state == LifecycleState::Running && !first_of_epoch;
        if first_of_epoch {
            state.flaps = 0;
        }
        state.epoch = sample.epoch;
        state.seq = sample.seq;
        state.ts = sample.ts;
        state.state = sample.state;
        state.node = sample.node.clone();
        state.cpu_used_usec = sample.cpu_used_usec;
        state.net_bytes = sample.net_rx_bytes.saturating_add(sample.net_tx_bytes);
        state.api_calls = sample.api_calls;

        if sample.state != LifecycleState::Running {
            if was_running {
                // The span ended. If our idle suspend ended it quickly, it flapped.
                let span_s = state
                    .running_since
                    .map(|since| seconds_between(since, sample.ts))
                    .unwrap_or(0);
                let ended_by_idle = state
                    .pending
                    .as_ref()
                    .is_some_and(|pending| pending.rule == Rule::IdleWindow);
                if span_s >= rules.hysteresis.short_run_s {
                    state.flaps = 0;
                } else if ended_by_idle {
                    state.flaps = state.flaps.saturating_add(1);
                }
            }
            state.running_since = None;
            state.active_at = None;
            state.notified.clear();
            // A wake waits for the sandbox to run; any other decision is done.
            state.pending.take_if(|pending| pending.rule == Rule::Wake);
            if state.pending.is_some() {
                return wake(&self.version, state, sample.ts, rules.reissue_after_s);
            }
            state.pending = None;
            return None;
        }
        if !was_running {
            state.running_since = Some(sample.ts);
            state.active_at = Some(sample.ts);
            state.pending = None;
            state.notified.clear();
        } else if gap || measured.active(&rules) {
            state.active_at = Some(sample.ts);
            if state
                .pending
                .as_ref()
                .is_some_and(|pending| pending.rule == Rule::IdleWindow)
            {
                // The idle streak that decided ended: a new one starts from
                // here, with a decision of its own.
                state.pending = None;
            }
            state.notified.retain(|rule| *rule != Rule::IdleWindow);
        }
        let spend = self.spend.get(&sample.customer).map(|spend| spend.amount);
        decide(&self.version, &rules, state, &measured, spend)
    }
}

/// The engine's state, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub policy_version: String,
    pub sandboxes: Vec<SandboxState>,
    pub spend: Vec<Spend>,
}

/// What the interval closed by a sample measured.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Measured {
    exec_sessions: u32,
    open_conns: u32,
    api_calls: u64,
    net_bytes_per_s: u64,
    cpu_percent: Decimal,
}

impl Measured {
    fn between(state: &SandboxState, sample: &UsageSample, first_of_epoch: bool) -> Self {
        if first_of_epoch {
            return Self::gauges_of(sample);
        }
        Self::over_interval(
            state.ts,
            state.cpu_used_usec,
            state.net_bytes,
            state.api_calls,
            sample,
        )
    }

    /// Only what the sample itself says (no previous sample to difference).
    fn gauges_of(sample: &UsageSample) -> Self {
        Self {
            exec_sessions: sample.exec_sessions,
            open_conns: sample.open_conns,
            api_calls: 0,
            net_bytes_per_s: 0,
            cpu_percent: Decimal::ZERO,
        }
    }

    /// The interval from a previous sample (its time and counters) to `sample`.
    fn over_interval(
        previous_ts: DateTime<Utc>,
        previous_cpu_usec: u64,
        previous_net_bytes: u64,
        previous_api_calls: u64,
        sample: &UsageSample,
    ) -> Self {
        let mut measured = Self::gauges_of(sample);
        let elapsed_ms = (sample.ts - previous_ts).num_milliseconds().max(1) as u64;
        measured.api_calls = sample.api_calls.saturating_sub(previous_api_calls);
        let net = sample
            .net_rx_bytes
            .saturating_add(sample.net_tx_bytes)
            .saturating_sub(previous_net_bytes);
        measured.net_bytes_per_s = net.saturating_mul(1000) / elapsed_ms;
        let cpu_usec = sample.cpu_used_usec.saturating_sub(previous_cpu_usec);
        // allocated vCPU-microseconds over the interval: vcpu_millis x ms.
        let allocated = u64::from(sample.vcpu.0).saturating_mul(elapsed_ms);
        if allocated > 0 {
            measured.cpu_percent = (Decimal::from(cpu_usec) * Decimal::ONE_HUNDRED
                / Decimal::from(allocated))
            .round_dp(2);
        }
        measured
    }

    fn active(&self, rules: &Rules) -> bool {
        let signals = &rules.activity;
        (signals.exec_sessions && self.exec_sessions > 0)
            || (signals.open_conns && self.open_conns > 0)
            || (signals.api_calls && self.api_calls > 0)
            || signals
                .net_bytes_per_s
                .is_some_and(|limit| self.net_bytes_per_s > limit)
            || signals
                .cpu_percent
                .is_some_and(|limit| self.cpu_percent > limit)
    }
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    u64::try_from((to - from).num_milliseconds().max(0) / 1000).unwrap_or(0)
}

/// The rule that fires for a running sandbox now, if any, and the decision.
fn decide(
    version: &str,
    rules: &Rules,
    state: &mut SandboxState,
    measured: &Measured,
    spend: Option<Decimal>,
) -> Option<Decision> {
    let now = state.ts;
    let running_since = state.running_since.unwrap_or(now);
    let lease_until = state
        .lease
        .as_ref()
        .map(|lease| lease.until)
        .filter(|until| *until > running_since);
    let active_at = state.active_at.unwrap_or(running_since);
    let idle_since = match lease_until {
        Some(until) if until > active_at => until,
        _ => active_at,
    };
    let window_s = rules.window_after_flaps(state.flaps);
    let session_s = seconds_between(running_since, now);

    // Every rule that holds now, most important first.
    let mut holding = Vec::new();
    if rules
        .spend_limit
        .zip(spend)
        .is_some_and(|(limit, spent)| spent >= limit)
    {
        holding.push((
            Rule::BudgetCap,
            Action::Suspend,
            format!(
                "spend {} reached the limit of {}",
                spend.unwrap_or_default(),
                rules.spend_limit.unwrap_or_default()
            ),
        ));
    }
    if rules.max_session_s.is_some_and(|cap| session_s >= cap) {
        holding.push((
            Rule::MaxSession,
            rules.max_session_action,
            format!(
                "running for {session_s} s, the cap is {} s",
                rules.max_session_s.unwrap_or_default()
            ),
        ));
    }
    if now >= idle_since && seconds_between(idle_since, now) >= window_s {
        holding.push((
            Rule::IdleWindow,
            rules.idle_action,
            format!(
                "idle {} s (window {window_s} s): no enabled activity signal since {}",
                seconds_between(idle_since, now),
                idle_since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
        ));
    }
    // The first that is not already notified decides; a pending command of
    // the same rule is re-issued only after reissue_after_s.
    let mut chosen = None;
    for (rule, action, reason) in holding {
        if action == Action::Notify {
            if state.notified.contains(&rule) {
                continue;
            }
            state.notified.push(rule);
            chosen = Some((rule, action, reason, 1));
            break;
        }
        let attempt = match &state.pending {
            Some(pending) if pending.rule == rule => {
                if seconds_between(pending.at, now) < rules.reissue_after_s {
                    return None;
                }
                pending.attempt + 1
            }
            _ => 1,
        };
        chosen = Some((rule, action, reason, attempt));
        break;
    }
    let (rule, action, reason, attempt) = chosen?;
    let signals = Signals {
        running_since,
        idle_since,
        window_s,
        flaps: state.flaps,
        exec_sessions: measured.exec_sessions,
        open_conns: measured.open_conns,
        net_bytes_per_s: measured.net_bytes_per_s,
        cpu_percent: measured.cpu_percent,
        lease_until,
        spend,
    };
    Some(issue(
        version,
        state,
        now,
        (rule, action, attempt),
        reason,
        signals,
    ))
}

/// Records `rule` as pending and builds its decision at `at`.
fn issue(
    version: &str,
    state: &mut SandboxState,
    at: DateTime<Utc>,
    (rule, action, attempt): (Rule, Action, u32),
    reason: String,
    signals: Signals,
) -> Decision {
    state.pending = Some(Pending {
        rule,
        action,
        at,
        attempt,
    });
    Decision {
        id: format!(
            "{}:{}:{}:{}:{}",
            state.customer,
            state.sandbox,
            state.epoch.0,
            rule.as_str(),
            at.timestamp_millis()
        ),
        customer: state.customer.clone(),
        sandbox: state.sandbox.clone(),
        node: state.node.clone(),
        epoch: state.epoch,
        at,
        rule,
        action,
        attempt,
        policy_version: version.to_owned(),
        reason,
        signals,
    }
}

/// A resume for a suspended sandbox whose lease holds at `at`: the first
/// one, or a re-issue once `reissue_after_s` passed since the last. None
/// while running, stopped, or without a lease that holds.
fn wake(
    version: &str,
    state: &mut SandboxState,
    at: DateTime<Utc>,
    reissue_after_s: u64,
) -> Option<Decision> {
    let until = state.lease.as_ref().map(|lease| lease.until)?;
    if state.state != LifecycleState::Suspended || state.seq == 0 || until <= at {
        return None;
    }
    let attempt = match &state.pending {
        Some(pending) if pending.rule == Rule::Wake => {
            if seconds_between(pending.at, at) < reissue_after_s {
                return None;
            }
            pending.attempt + 1
        }
        _ => 1,
    };
    let holder = state
        .lease
        .as_ref()
        .map(|lease| lease.holder.clone())
        .unwrap_or_default();
    let reason = format!(
        "lease held by {holder} until {} while suspended",
        until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    let signals = Signals {
        running_since: at,
        idle_since: at,
        window_s: 0,
        flaps: state.flaps,
        exec_sessions: 0,
        open_conns: 0,
        net_bytes_per_s: 0,
        cpu_percent: Decimal::ZERO,
        lease_until: Some(until),
        spend: None,
    };
    Some(issue(
        version,
        state,
        at,
        (Rule::Wake, Action::Resume, attempt),
        reason,
        signals,
    ))
}

/// The policy's definition of activity as the rater's [`IdlePolicy`]: a
/// running interval is idle exactly when no signal the policy enables says
/// otherwise, with the rules of the sample's customer. Rating with it bills
/// idle seconds (for sheets that treat them differently) by the same rules,
/// and under the same version, as the service that suspends.
#[derive(Debug, Clone)]
pub struct PolicyIdle {
    policy: Policy,
    version: String,
}

impl PolicyIdle {
    pub fn new(policy: Policy) -> Self {
        Self {
            version: policy.version_label(),
            policy,
        }
    }
}

impl IdlePolicy for PolicyIdle {
    fn version(&self) -> &str {
        &self.version
    }

    fn is_idle(&self, previous: &UsageSample, closing: &UsageSample) -> bool {
        let measured = Measured::over_interval(
            previous.ts,
            previous.cpu_used_usec,
            previous.net_rx_bytes.saturating_add(previous.net_tx_bytes),
            previous.api_calls,
            closing,
        );
        let rules = self.policy.rules_for(&closing.customer);
        !is_gap(previous, closing, rules.gap_after_s) && !measured.active(rules)
    }
}

/// Runs `inputs` through a fresh engine: the pure function the service
/// computes incrementally.
pub fn decide_all(policy: &Policy, inputs: &[Input]) -> Vec<Decision> {
    let mut engine = Engine::new(policy.clone());
    inputs
        .iter()
        .flat_map(|input| engine.observe(input))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::VcpuMillis;

    fn sample(seq: u64, cpu_used_usec: u64, api_calls: u64, exec_sessions: u32) -> UsageSample {
        UsageSample {
            vcpu: VcpuMillis(2000),
            cpu_used_usec,
            api_calls,
            exec_sessions,
            ..UsageSample::blank(
                CustomerId::parse("c").expect("id"),
                NodeId::parse("n").expect("id"),
                SandboxId::parse("s").expect("id"),
                Epoch(1),
                seq,
                DateTime::from_timestamp(1_800_000_000 + seq as i64 * 10, 0).expect("time"),
            )
        }
    }

    fn idle_under(policy: &str, previous: &UsageSample, closing: &UsageSample) -> bool {
        let policy = Policy::from_toml(policy, "p.toml").expect("valid");
        PolicyIdle::new(policy).is_idle(previous, closing)
    }

    const SESSIONS: &str = "[policy]\nname = \"s\"\nversion = \"1\"\n";
    const API_ONLY: &str = "[policy]\nname = \"a\"\nversion = \"1\"\n[rules.activity]\nexec_sessions = false\nopen_conns = false\n";
    const CPU_20: &str =
        "[policy]\nname = \"c\"\nversion = \"1\"\n[rules.activity]\ncpu_percent = \"20\"\n";

    #[test]
    fn the_rater_sees_activity_exactly_as_the_policy_defines_it() {
        let before = sample(1, 0, 5, 0);
        // An open session, no API call, 2 vCPU x 10 s = 20 s allocated, 5 s used (25 %).
        let with_session = sample(2, 5_000_000, 5, 1);
        assert!(!idle_under(SESSIONS, &before, &with_session));
        assert!(
            idle_under(API_ONLY, &before, &with_session),
            "sessions do not count"
        );
        // No session, one API call.
        let with_call = sample(2, 0, 6, 0);
        assert!(!idle_under(API_ONLY, &before, &with_call));
        // No session, no call, CPU at 25 % (above 20) then at 15 % (below).
        let busy = sample(2, 5_000_000, 5, 0);
        let quiet = sample(2, 3_000_000, 5, 0);
        assert!(
            idle_under(SESSIONS, &before, &busy),
            "CPU alone is not activity by default"
        );
        assert!(!idle_under(CPU_20, &before, &busy));
        assert!(idle_under(CPU_20, &before, &quiet));
        let version = PolicyIdle::new(Policy::from_toml(CPU_20, "p.toml").expect("valid"));
        assert_eq!(version.version(), "c/1");
    }

    #[test]
    fn the_rater_never_calls_missing_data_idle() {
        let before = sample(1, 0, 5, 0);
        let next = sample(2, 0, 5, 0);
        assert!(
            idle_under(SESSIONS, &before, &next),
            "10 s without activity"
        );
        assert!(crate::rating::SessionOrConnection.is_idle(&before, &next));
        // Sample 2 lost: seq jumps from 1 to 3.
        let after_loss = sample(3, 0, 5, 0);
        assert!(!idle_under(SESSIONS, &before, &after_loss));
        assert!(!crate::rating::SessionOrConnection.is_idle(&before, &after_loss));
        // The collector quiet for 11 s, longer than the default 10 s. The
        // collector's rule knows no cadence for samples without counters.
        let mut late = sample(2, 0, 5, 0);
        late.ts = before.ts + chrono::Duration::seconds(11);
        assert!(!idle_under(SESSIONS, &before, &late));
        assert!(crate::rating::SessionOrConnection.is_idle(&before, &late));
        // A policy that expects samples a minute apart says so.
        let minute = "[policy]\nname = \"m\"\nversion = \"1\"\n[rules]\ngap_after_s = 60\n";
        assert!(idle_under(minute, &before, &late));
    }
}

/// The idle rule a service rates with: the collector's own
/// session-or-connection rule, or an idle policy file's. The rater, the
/// invoicer and the API hold one, so that they classify alike.
#[derive(Debug, Clone)]
pub enum IdleRule {
    SessionOrConnection,
    Policy(Box<PolicyIdle>),
}

impl IdlePolicy for IdleRule {
    fn version(&self) -> &str {
        match self {
            IdleRule::SessionOrConnection => crate::rating::SessionOrConnection.version(),
            IdleRule::Policy(policy) => policy.version(),
        }
    }

    fn is_idle(&self, previous: &UsageSample, closing: &UsageSample) -> bool {
        match self {
            IdleRule::SessionOrConnection => {
                crate::rating::SessionOrConnection.is_idle(previous, closing)
            }
            IdleRule::Policy(policy) => policy.is_idle(previous, closing),
        }
    }

    fn is_collector_rule(&self) -> bool {
        matches!(self, IdleRule::SessionOrConnection)
    }
}
