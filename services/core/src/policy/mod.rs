//! The idle-suspend policy: which sandboxes to suspend, when, and why.
//!
//! [`file`] loads a versioned policy file; [`engine`] turns the sample stream
//! (plus keep-alive leases and spend reports) into decisions, as a pure
//! function of its inputs and the policy version.

pub mod engine;
pub mod file;
pub mod replay;

pub use engine::{
    decide_all, Decision, Engine, IdleRule, Input, Lease, PolicyIdle, Rule, SandboxState, Signals,
    Snapshot, Spend,
};
pub use file::{Action, ActivitySignals, Hysteresis, Policy, Rules};
pub use replay::{parse_leases, replay, replay_order};
