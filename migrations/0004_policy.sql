-- Idle-suspend policy: every decision, and the policy service's state.
--
-- policy_decisions: one row per decision (and per re-issue), with the rule,
-- the policy version and the signals that decided it (JSON). The decision id
-- is deterministic (customer:sandbox:epoch:rule:at_ms), so a decision replayed
-- after a restart collapses into the same row.
CREATE TABLE IF NOT EXISTS policy_decisions
(
    decision_id String,
    customer String,
    sandbox String,
    node String,
    epoch UInt64,
    at_ms Int64,
    day Date,
    rule String,
    action String,
    attempt UInt32,
    policy_version String,
    reason String,
    signals String,
    recorded_at DateTime
)
ENGINE = ReplacingMergeTree(recorded_at)
PARTITION BY toYYYYMM(day)
ORDER BY (customer, sandbox, at_ms, decision_id);

-- The policy service's per-sandbox state as of its last snapshot (JSON), one
-- row per (group, sandbox), replaced at each snapshot. A restarted service
-- restores it and replays the uncommitted tail of usage.samples, which the
-- engine recognises by seq: a restart neither forgets an idle streak nor
-- suspends early.
CREATE TABLE IF NOT EXISTS policy_state
(
    group_id String,
    customer String,
    sandbox String,
    snapshot_ms Int64,
    state String
)
ENGINE = ReplacingMergeTree(snapshot_ms)
ORDER BY (group_id, customer, sandbox);
