//! Whether a running interval was idle, as a swappable policy.
//!
//! Sheets that do not bill idle seconds (Sprites) ask the policy about every
//! running interval. The offline rater uses [`SessionOrConnection`]; the online
//! rater can plug in the versioned decisions of the idle policy engine behind
//! the same trait. The policy's version is recorded in every rating output, so
//! a bill can be explained and replayed.

use crate::sample::UsageSample;

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
/// Low CPU alone is never idle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionOrConnection;

impl IdlePolicy for SessionOrConnection {
    fn version(&self) -> &str {
        "session-or-connection/v1"
    }

    fn is_idle(&self, _previous: &UsageSample, closing: &UsageSample) -> bool {
        closing.exec_sessions == 0 && closing.open_conns == 0
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
