//! Sandboxes as the usage API shows them: the latest sample of each
//! (`usage_samples`, migration 0001).

use crate::sql::statement;
use crate::{Context, Result, Store};

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
        )?
        .fetch_all()
        .await
        .context(format!("sandbox states of {customer}"))
    }
}
