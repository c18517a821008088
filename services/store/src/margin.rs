//! Node costs for margin (migration 0015): a node cost sheet loaded as rows
//! under a new version, which the margin query reads (the newest only).

use idlemeter_core::margin::NodeCosts;

use crate::{to_column, Context, Result, Store};

/// One row of `node_costs`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct NodeCostRow {
    pub version: u64,
    pub priority: u32,
    pub node_type: String,
    pub prefix: String,
    pub exact: u8,
    pub currency: String,
    /// `Decimal(38, 12)` mantissa.
    pub cost_per_hour: i128,
    pub allocate_by: String,
    pub capacity_per_hour: u64,
}

impl Store {
    /// Loads a node cost sheet under a new version (above every loaded
    /// one); returns it. Loading the same sheet again is harmless.
    pub async fn load_node_costs(&self, costs: &NodeCosts) -> Result<u64> {
        let newest: u64 = self
            .client
            .query("SELECT max(version) FROM node_costs")
            .fetch_one()
            .await
            .context("newest node cost version")?;
        let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        let version = now.max(newest + 1);
        let rows = costs
            .types
            .iter()
            .enumerate()
            .map(|(priority, node_type)| {
                let (prefix, exact) = node_type.prefix();
                Ok(NodeCostRow {
                    version,
                    priority: u32::try_from(priority).unwrap_or(u32::MAX),
                    node_type: node_type.name.clone(),
                    prefix: prefix.to_owned(),
                    exact: u8::from(exact),
                    currency: costs.currency.clone(),
                    cost_per_hour: to_column(node_type.cost_per_hour)?,
                    allocate_by: node_type.allocate_by.as_str().to_owned(),
                    capacity_per_hour: u64::try_from(node_type.capacity_per_hour())
                        .unwrap_or(u64::MAX),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.insert_rows("node_costs", &rows).await?;
        Ok(version)
    }
}
