//! Offline replay: a file of samples (and leases) through the engine the
//! service runs, in the order the service would have read them.
//!
//! Files may be shuffled and hold duplicates (an export of a topic, several
//! exports concatenated). Samples are ordered by `ts`, then customer,
//! sandbox, epoch and seq; a lease goes before the samples at or after its
//! `at`. The engine recognises duplicates by seq, so they change nothing.

use chrono::{DateTime, Utc};

use crate::error::LineError;
use crate::policy::engine::{decide_all, Decision, Input, Lease};
use crate::policy::file::Policy;
use crate::sample::UsageSample;

/// The engine's inputs in replay order (see the module doc).
pub fn replay_order(mut samples: Vec<UsageSample>, mut leases: Vec<Lease>) -> Vec<Input> {
    samples.sort_by(|a, b| {
        (a.ts, &a.customer, &a.sandbox, a.epoch, a.seq).cmp(&(
            b.ts,
            &b.customer,
            &b.sandbox,
            b.epoch,
            b.seq,
        ))
    });
    let lease_time = |lease: &Lease| lease.at.unwrap_or(DateTime::<Utc>::MIN_UTC);
    leases.sort_by(|a, b| {
        (lease_time(a), &a.customer, &a.sandbox, a.until).cmp(&(
            lease_time(b),
            &b.customer,
            &b.sandbox,
            b.until,
        ))
    });
    let mut inputs = Vec::with_capacity(samples.len() + leases.len());
    let mut leases = leases.into_iter().peekable();
    for sample in samples {
        while let Some(lease) = leases.next_if(|lease| lease_time(lease) <= sample.ts) {
            inputs.push(Input::Lease(lease));
        }
        inputs.push(Input::Sample(sample));
    }
    inputs.extend(leases.map(Input::Lease));
    inputs
}

/// Every decision `policy` takes on these samples and leases.
pub fn replay(policy: &Policy, samples: Vec<UsageSample>, leases: Vec<Lease>) -> Vec<Decision> {
    decide_all(policy, &replay_order(samples, leases))
}

/// Leases from JSONL, one object per line as on `sandbox.leases`, with `at`
/// required (a file has no message timestamps). Refused lines are reported
/// and the others kept.
pub fn parse_leases(text: &str) -> (Vec<Lease>, Vec<LineError>) {
    let (mut leases, mut errors) = (Vec::new(), Vec::new());
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let number = index as u64 + 1;
        match serde_json::from_str::<Lease>(line) {
            Ok(lease) if lease.at.is_none() => errors.push(LineError::new(
                number,
                "at",
                "is required in a lease file: when the lease was taken (RFC 3339)",
            )),
            Ok(lease) => leases.push(lease),
            Err(error) => errors.push(LineError::new(
                number,
                "json",
                format!("not a lease ({{customer, sandbox, until, holder, at}}): {error}"),
            )),
        }
    }
    (leases, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonl::parse_samples;

    const POLICY: &str = "[policy]\nname = \"r\"\nversion = \"1\"\n[rules]\nidle_window_s = 5\nreissue_after_s = 600\n";

    fn samples(count: u64) -> Vec<UsageSample> {
        let lines: Vec<String> = (1..=count)
            .map(|seq| {
                format!(
                    r#"{{"ts":"2026-11-02T10:00:{:02}Z","customer":"acme","node":"n","sandbox":"s","epoch":1,"seq":{seq},"state":"running","vcpu":1,"mem_bytes":0,"disk_bytes":0,"cpu_used_usec":0,"mem_used_bytes":0,"net_rx_bytes":0,"net_tx_bytes":0,"exec_sessions":0,"open_conns":0}}"#,
                    seq - 1
                )
            })
            .collect();
        let parsed = parse_samples(&lines.join("\n"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        parsed.samples.into_iter().map(|n| n.sample).collect()
    }

    #[test]
    fn shuffled_and_duplicated_input_decides_as_the_ordered_stream() {
        let policy = Policy::from_toml(POLICY, "p.toml").expect("valid");
        let ordered = replay(&policy, samples(20), Vec::new());
        assert_eq!(ordered.len(), 1);
        assert_eq!(
            ordered[0].at.timestamp() % 60,
            5,
            "window 5 s from the start"
        );
        let mut messy = samples(20);
        messy.extend(samples(20));
        messy.reverse();
        messy.swap(3, 31);
        assert_eq!(replay(&policy, messy, Vec::new()), ordered);
    }

    #[test]
    fn a_lease_applies_from_its_time_and_a_lease_without_time_is_refused() {
        let policy = Policy::from_toml(POLICY, "p.toml").expect("valid");
        let text = "{\"customer\":\"acme\",\"sandbox\":\"s\",\"until\":\"2026-11-02T10:00:15Z\",\"holder\":\"u\",\"at\":\"2026-11-02T10:00:02Z\"}\n\n{\"customer\":\"acme\",\"sandbox\":\"s\",\"until\":\"2026-11-02T10:00:15Z\",\"holder\":\"u\"}\nnot json\n";
        let (leases, errors) = parse_leases(text);
        assert_eq!(leases.len(), 1);
        assert_eq!(
            errors
                .iter()
                .map(|e| (e.line, e.field.as_str()))
                .collect::<Vec<_>>(),
            [(3, "at"), (4, "json")]
        );
        let decided = replay(&policy, samples(25), leases);
        assert_eq!(decided.len(), 1);
        assert_eq!(
            decided[0].at.timestamp() % 60,
            20,
            "held until 15, then 5 s"
        );
    }
}
