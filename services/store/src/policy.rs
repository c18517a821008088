//! The idle policy's tables (migration 0004): decisions and service state.

use rust_decimal::Decimal;

use crate::sql::{statement, Fetch};
use crate::{Result, Store};

/// See `queries/period_spend.sql`.
pub const PERIOD_SPEND_SQL: &str = include_str!("queries/period_spend.sql");

/// One row of `policy_decisions`; field order is column order.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct DecisionRow {
    pub decision_id: String,
    pub customer: String,
    pub sandbox: String,
    pub node: String,
    pub epoch: u64,
    pub at_ms: i64,
    /// Days since 1970-01-01 (`Date`).
    pub day: u16,
    pub rule: String,
    pub action: String,
    pub attempt: u32,
    pub policy_version: String,
    pub reason: String,
    /// The deciding signals, JSON.
    pub signals: String,
    /// Unix seconds.
    pub recorded_at: u32,
}

/// One row of `policy_state`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct PolicyStateRow {
    pub group_id: String,
    pub customer: String,
    pub sandbox: String,
    pub snapshot_ms: i64,
    /// The engine's per-sandbox state, JSON.
    pub state: String,
}

impl Store {
    pub async fn insert_decisions(&self, rows: &[DecisionRow]) -> Result<()> {
        self.insert_rows("policy_decisions", rows).await
    }

    /// Decisions about one customer's sandboxes, oldest first.
    pub async fn decisions_of(&self, customer: &str) -> Result<Vec<DecisionRow>> {
        self.client
            .query(
                "SELECT ?fields FROM policy_decisions FINAL WHERE customer = ? \
                 ORDER BY at_ms, decision_id",
            )
            .bind(customer)
            .all(format!("decisions of {customer}"))
            .await
    }

    /// The customer's spend so far in their latest period (what the period
    /// costs, before a prepaid wallet pays: see [`crate::LatestSpend`]) and
    /// the end of the hour it is rated to (Unix seconds); `None` before
    /// their first rating.
    pub async fn period_spend(&self, customer: &str) -> Result<Option<(u32, Decimal)>> {
        Ok(self
            .latest_spend(customer)
            .await?
            .map(|spend| (spend.as_of, spend.spend)))
    }

    pub async fn insert_policy_state(&self, rows: &[PolicyStateRow]) -> Result<()> {
        self.insert_rows("policy_state", rows).await
    }

    /// The latest state row of every sandbox of `group_id` snapshotted at or
    /// after `since_ms`.
    pub async fn policy_state(&self, group_id: &str, since_ms: i64) -> Result<Vec<PolicyStateRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM policy_state FINAL WHERE group_id = {group_id} \
             AND snapshot_ms >= {since_ms} \
             ORDER BY customer, sandbox",
            group_id,
            since_ms,
        )
        .all(format!("policy state of {group_id}"))
        .await
    }

    /// [`Self::policy_state`] of the named sandboxes only (a replica taking
    /// them over); rows of other customers' sandboxes of the same name are
    /// for the caller to drop.
    pub async fn policy_state_of(
        &self,
        group_id: &str,
        since_ms: i64,
        sandboxes: &[&str],
    ) -> Result<Vec<PolicyStateRow>> {
        if sandboxes.is_empty() {
            return Ok(Vec::new());
        }
        statement!(
            self.client,
            "SELECT ?fields FROM policy_state FINAL WHERE group_id = {group_id} \
             AND snapshot_ms >= {since_ms} \
             AND has({sandboxes}, sandbox) ORDER BY customer, sandbox",
            group_id,
            since_ms,
            sandboxes,
        )
        .all(format!(
            "policy state of {} sandboxes of {group_id}",
            sandboxes.len()
        ))
        .await
    }

    /// The `limit` most recent policy decisions about one sandbox, newest first.
    pub async fn recent_decisions(
        &self,
        customer: &str,
        sandbox: &str,
        limit: u32,
    ) -> Result<Vec<DecisionRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM policy_decisions FINAL WHERE customer = {customer} \
             AND sandbox = {sandbox} \
             ORDER BY at_ms DESC, decision_id DESC LIMIT {limit}",
            customer,
            sandbox,
            limit,
        )
        .all(format!("recent decisions of {customer}/{sandbox}"))
        .await
    }
}
