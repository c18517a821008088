//! What ingest lets in, beyond what decoding checks: samples whose time is
//! within a window around now, from a node allowed to report their customer.
//! A sample refused here is dead-lettered with its reason (its message is
//! kept byte for byte), and the message's other samples go on.
//!
//! - **Time window.** `ts` is checked to be a valid time when decoded; a
//!   node with a broken clock (or a forged batch) can still spread one
//!   message over decades, and ClickHouse refuses an insert that touches
//!   more than `max_partitions_per_insert_block` monthly partitions, for
//!   every tenant in the batch. Samples older than `max_sample_age_s` or
//!   more than `max_sample_ahead_s` in the future are refused.
//! - **Who may report whom.** A node could claim any customer. With
//!   `allowed_customers` set, samples naming a node report only that
//!   node's listed customers. The node id is in the message: this stops a
//!   misconfigured node or a confused tenant; against a producer that lies
//!   about its node, give each node its own Kafka principal (SASL) and
//!   restrict who may write the samples topic with the broker's ACLs.

use std::collections::{BTreeMap, HashMap};

use idlemeter_core::{CustomerId, NodeId, UsageSample};
use serde::{Deserialize, Serialize};

/// Which customers each node may report (`[ingest.allowed_customers]`):
/// node id → customer ids, where `"*"` is any customer and `"acme-*"` any
/// customer id starting `acme-`; the node `"*"` applies to nodes not
/// listed. Empty (the default): any node may report any customer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AllowedCustomers(pub BTreeMap<String, Vec<String>>);

impl AllowedCustomers {
    fn allows(&self, node: &NodeId, customer: &CustomerId) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let Some(patterns) = self.0.get(node.as_str()).or_else(|| self.0.get("*")) else {
            return false;
        };
        patterns
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => customer.as_str().starts_with(prefix),
                None => pattern == customer.as_str(),
            })
    }
}

/// Most (node, customer) answers kept.
const MAX_CACHED: usize = 100_000;

/// The rules a decoded sample must pass, with the clock of this batch.
#[derive(Debug, Clone)]
pub struct Admission {
    pub max_sample_age_ms: i64,
    pub max_sample_ahead_ms: i64,
    pub allowed: AllowedCustomers,
    /// Answers of `allowed` per (node, customer): a batch repeats them.
    cache: HashMap<(NodeId, CustomerId), bool>,
}

impl Admission {
    pub fn new(max_sample_age_s: u64, max_sample_ahead_s: u64, allowed: AllowedCustomers) -> Self {
        let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
        Self {
            max_sample_age_ms: ms(max_sample_age_s),
            max_sample_ahead_ms: ms(max_sample_ahead_s),
            allowed,
            cache: HashMap::new(),
        }
    }

    /// Why `sample` is refused at `now_ms` (wall clock), if it is.
    pub fn refusal(&mut self, sample: &UsageSample, now_ms: i64) -> Option<String> {
        let ts_ms = sample.ts.timestamp_millis();
        if ts_ms < now_ms.saturating_sub(self.max_sample_age_ms) {
            return Some(format!(
                "field `ts`: {} is more than {} s before ingest's clock ({}): outside the accepted window",
                sample.ts.to_rfc3339(),
                self.max_sample_age_ms / 1000,
                rfc3339(now_ms)
            ));
        }
        if ts_ms > now_ms.saturating_add(self.max_sample_ahead_ms) {
            return Some(format!(
                "field `ts`: {} is more than {} s after ingest's clock ({}): the node's clock is ahead?",
                sample.ts.to_rfc3339(),
                self.max_sample_ahead_ms / 1000,
                rfc3339(now_ms)
            ));
        }
        if self.allowed.0.is_empty() {
            return None;
        }
        // Bounded: ids come from outside, and a stream of made-up ones must
        // not grow ingest's memory.
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        let allowed = &self.allowed;
        let allows = *self
            .cache
            .entry((sample.node.clone(), sample.customer.clone()))
            .or_insert_with(|| allowed.allows(&sample.node, &sample.customer));
        (!allows).then(|| {
            format!(
                "node {} is not allowed to report customer {} (ingest.allowed_customers)",
                sample.node, sample.customer
            )
        })
    }

    /// Splits `samples` into those admitted and the reasons of the others,
    /// each naming its sample (`customer.sandbox` epoch and seq).
    pub fn admit(
        &mut self,
        samples: Vec<UsageSample>,
        now_ms: i64,
    ) -> (Vec<UsageSample>, Vec<String>) {
        let mut admitted = Vec::with_capacity(samples.len());
        let mut refused = Vec::new();
        for sample in samples {
            match self.refusal(&sample, now_ms) {
                None => admitted.push(sample),
                Some(reason) => refused.push(format!(
                    "sample {}.{} epoch {} seq {}: {reason}",
                    sample.customer, sample.sandbox, sample.epoch.0, sample.seq
                )),
            }
        }
        (admitted, refused)
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map_or_else(|| ms.to_string(), |time| time.to_rfc3339())
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;

    fn sample(node: &str, customer: &str, ts_ms: i64) -> UsageSample {
        let ts = DateTime::<Utc>::from_timestamp_millis(ts_ms).expect("time");
        let line = format!(
            r#"{{"ts": "{}", "customer": "{customer}", "node": "{node}", "sandbox": "sbx", "epoch": 1, "seq": 1, "state": "running", "vcpu": 1, "mem_bytes": 0, "gpu_model": null, "gpu_count": 0, "disk_bytes": 0, "cpu_used_usec": 0, "mem_used_bytes": 0, "net_rx_bytes": 0, "net_tx_bytes": 0, "exec_sessions": 0, "open_conns": 0}}"#,
            ts.to_rfc3339()
        );
        idlemeter_core::jsonl::parse_sample(&line).expect("a valid sample")
    }

    const NOW: i64 = 1_796_000_000_000;
    const DAY: i64 = 86_400_000;

    /// Finding "poison messages stall ingest": samples spread over decades
    /// are refused one by one; those inside the window pass.
    #[test]
    fn samples_outside_the_time_window_are_refused_with_the_reason() {
        let mut admission = Admission::new(400 * 86_400, 600, AllowedCustomers::default());
        let samples = vec![
            sample("n", "acme", NOW - 399 * DAY),
            sample("n", "acme", NOW - 401 * DAY),
            sample("n", "acme", NOW + 599_000),
            sample("n", "acme", NOW + 601_000),
            sample("n", "acme", 1_000),
            sample("n", "acme", 4_102_444_800_000),
        ];
        let kept: Vec<i64> = samples.iter().map(|s| s.ts.timestamp_millis()).collect();
        let (admitted, refused) = admission.admit(samples, NOW);
        let admitted: Vec<i64> = admitted.iter().map(|s| s.ts.timestamp_millis()).collect();
        assert_eq!(admitted, vec![kept[0], kept[2]]);
        assert_eq!(refused.len(), 4);
        assert!(refused[0].contains("field `ts`") && refused[0].contains("before"));
        assert!(refused[0].starts_with("sample acme.sbx epoch 1 seq 1"));
        assert!(refused[1].contains("after"));
    }

    /// Finding "Kafka is a trust boundary": with an allow-list, a node
    /// reports only its own customers.
    #[test]
    fn a_node_reports_only_the_customers_it_is_allowed() {
        let allowed = AllowedCustomers(BTreeMap::from([
            (
                "node-a".to_owned(),
                vec!["acme".to_owned(), "team-*".to_owned()],
            ),
            ("*".to_owned(), vec!["shared".to_owned()]),
        ]));
        let mut admission = Admission::new(u64::MAX / 2000, 600, allowed);
        for (node, customer, ok) in [
            ("node-a", "acme", true),
            ("node-a", "team-blue", true),
            ("node-a", "globex", false),
            ("node-a", "shared", false),
            ("node-b", "shared", true),
            ("node-b", "acme", false),
        ] {
            let refusal = admission.refusal(&sample(node, customer, NOW), NOW);
            assert_eq!(refusal.is_none(), ok, "{node} → {customer}: {refusal:?}");
            if let Some(reason) = refusal {
                assert!(
                    reason.contains(node) && reason.contains(customer),
                    "{reason}"
                );
            }
        }
        let mut open = Admission::new(1_000, 600, AllowedCustomers::default());
        assert!(open.refusal(&sample("any", "any", NOW), NOW).is_none());
    }
}
