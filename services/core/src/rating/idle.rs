//! Whether a running interval was idle, as a swappable policy.
//!
//! Sheets that do not bill idle seconds (Sprites) ask the policy about every
//! running interval. The offline rater uses [`SessionOrConnection`]; the online
//! rater can plug in the versioned decisions of the idle policy engine behind
//! the same trait. The policy's version is recorded in every rating output, so
//! a bill can be explained and replayed.

use chrono::{DateTime, Utc};

use crate::sample::UsageSample;

/// The longest interval between two samples that still counts as observed,
/// for rules that do not state their own (`[rules] gap_after_s` in a policy
/// file): ten ticks of the collector's one-second cadence.
pub const DEFAULT_GAP_AFTER_S: u64 = 10;

/// True when the interval from `previous` to `closing` (one epoch) is
/// missing data: samples lost in between (a seq jump) or no sample for
/// longer than `gap_after_s` (the collector went quiet). Missing data is
/// never idle: idle time starts from what was observed.
pub fn is_gap(previous: &UsageSample, closing: &UsageSample, gap_after_s: u64) -> bool {
    is_gap_after(previous.seq, previous.ts, closing, gap_after_s)
}

/// [`is_gap`] from the `seq` and `ts` of the previous sample alone.
pub fn is_gap_after(
    previous_seq: u64,
    previous_ts: DateTime<Utc>,
    closing: &UsageSample,
    gap_after_s: u64,
) -> bool {
    let lost = closing.seq > previous_seq.saturating_add(1);
    let quiet_ms = (closing.ts - previous_ts).num_milliseconds();
    lost || quiet_ms > i64::try_from(gap_after_s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// Classifies the interval that `closing` closes (it began at `previous`).
pub trait IdlePolicy {
    /// A stable name and version, recorded with the rating.
    fn version(&self) -> &str;

    /// True when the interval was idle: running, but nobody using it.
    fn is_idle(&self, previous: &UsageSample, closing: &UsageSample) -> bool;

    /// True when this is the collector's own activity rule (an exec session
    /// or an open inbound connection at the tick), so that the active
    /// counters the collector sends measure exactly what this policy would
    /// call active, second by second. Other policies classify each interval
    /// by its closing sample and take its running counters whole.
    fn is_collector_rule(&self) -> bool {
        false
    }
}

/// Idle means no exec session and no open inbound connection on the sample
/// that closes the interval: the platforms' documented activity signals.
/// Low CPU alone is never idle, and neither is an interval with samples lost
/// within it (a seq jump). Samples without counters carry no cadence this
/// rule could know, so their interval length alone is not a gap here; the
/// collector's samples carry its active counters, which replace the verdict
/// (they measured every second, across lost samples too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionOrConnection;

impl IdlePolicy for SessionOrConnection {
    fn version(&self) -> &str {
        "session-or-connection/v2"
    }

    fn is_idle(&self, previous: &UsageSample, closing: &UsageSample) -> bool {
        closing.exec_sessions == 0
            && closing.open_conns == 0
            && closing.seq <= previous.seq.saturating_add(1)
    }

    fn is_collector_rule(&self) -> bool {
        true
    }
}

/// Never idle: every running second is active. For what-if ratings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NeverIdle;

impl IdlePolicy for NeverIdle {
    fn version(&self) -> &str {
        "never-idle/v1"
    }

    fn is_idle(&self, _previous: &UsageSample, _closing: &UsageSample) -> bool {
        false
    }
}
