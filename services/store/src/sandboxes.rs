//! Sandboxes as the usage API shows them: the latest sample of each
//! (`usage_samples`, migration 0001).

use crate::sql::{statement, Fetch};
use crate::{Result, Store};

/// The latest sample of each sandbox of a customer; see the file.
pub const SANDBOX_STATE_SQL: &str = include_str!("queries/sandbox_state.sql");

/// The latest sample of one sandbox, as the API shows its state.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct SandboxStateRow {
    pub sandbox: String,
    pub node: String,
    pub epoch: u64,
    pub state: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub vcpu_milli: u32,
    pub mem_bytes: u64,
    pub gpu_model: String,
    pub gpu_count: u32,
    pub disk_bytes: u64,
    pub exec_sessions: u32,
    pub open_conns: u32,
}

impl SandboxStateRow {
    /// The row [`SANDBOX_STATE_SQL`] would read for a sandbox whose latest
    /// sample is `sample` and whose epoch began at `first_seen_ms`: the
    /// state of a sample not stored yet (the API's live view).
    pub fn of_sample(sample: &idlemeter_core::UsageSample, first_seen_ms: u64) -> Self {
        Self {
            sandbox: sample.sandbox.to_string(),
            node: sample.node.to_string(),
            epoch: sample.epoch.0,
            state: sample.state.as_str().to_owned(),
            first_seen_ms,
            last_seen_ms: u64::try_from(sample.ts.timestamp_millis()).unwrap_or(0),
            vcpu_milli: sample.vcpu.0,
            mem_bytes: sample.mem_bytes,
            gpu_model: sample.gpu_model.clone().unwrap_or_default(),
            gpu_count: sample.gpu_count,
            disk_bytes: sample.disk_bytes,
            exec_sessions: sample.exec_sessions,
            open_conns: sample.open_conns,
        }
    }
}

impl Store {
    /// The latest sample of `customer`'s sandboxes after `after` (id order),
    /// at most `limit`, or of `only`.
    pub async fn sandbox_states(
        &self,
        customer: &str,
        after: &str,
        only: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SandboxStateRow>> {
        statement!(
            self.client,
            SANDBOX_STATE_SQL,
            customer,
            after,
            only_flag = u8::from(only.is_some()),
            only = only.unwrap_or(""),
            limit
        )
        .all(format!("sandbox states of {customer}"))
        .await
    }
}
