//! What the service reads and writes: leases (JSON) in, sandbox commands
//! (protobuf) and `policy_decisions` rows out.

use super::*;

/// A keep-alive lease as sent on `sandbox.leases` (JSON):
/// `{"customer": "c", "sandbox": "s", "until": "2026-11-02T12:00:00Z", "holder": "customer"}`.
/// An `until` in the past releases the lease.
pub fn decode_lease(payload: &[u8]) -> Result<Lease, String> {
    serde_json::from_slice(payload).map_err(|error| format!("not a lease: {error}"))
}

/// The command the collector acts on.
pub fn command_of(decision: &Decision) -> v1::SandboxCommand {
    let action = match decision.action {
        Action::Suspend => v1::CommandAction::Suspend,
        Action::Stop => v1::CommandAction::Stop,
        Action::Resume => v1::CommandAction::Resume,
        Action::Notify => v1::CommandAction::Unspecified,
    };
    v1::SandboxCommand {
        schema_version: SCHEMA_VERSION,
        command_id: decision.id.clone(),
        node: decision.node.as_str().to_owned(),
        customer: decision.customer.as_str().to_owned(),
        sandbox: decision.sandbox.as_str().to_owned(),
        epoch: decision.epoch.0,
        action: action as i32,
        reason: decision.reason.clone(),
        policy_version: decision.policy_version.clone(),
        // The decision's own time: the collector ignores stale commands, and
        // a replayed decision must look exactly as old as it is.
        issued_unix_ms: decision.at.timestamp_millis(),
    }
}

/// The `policy_decisions` row of a decision recorded at `now`.
pub fn decision_row(decision: &Decision, now: DateTime<Utc>) -> DecisionRow {
    DecisionRow {
        decision_id: decision.id.clone(),
        customer: decision.customer.as_str().to_owned(),
        sandbox: decision.sandbox.as_str().to_owned(),
        node: decision.node.as_str().to_owned(),
        epoch: decision.epoch.0,
        at_ms: decision.at.timestamp_millis(),
        day: u16::try_from(decision.at.timestamp().div_euclid(86_400)).unwrap_or(0),
        rule: decision.rule.as_str().to_owned(),
        action: decision.action.as_str().to_owned(),
        attempt: decision.attempt,
        policy_version: decision.policy_version.clone(),
        reason: decision.reason.clone(),
        signals: serde_json::to_string(&decision.signals).expect("signals serialise"),
        recorded_at: u32::try_from(now.timestamp()).unwrap_or(0),
    }
}
