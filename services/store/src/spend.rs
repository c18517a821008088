//! Spend read back from what the rater wrote (`rated_usage`, migration
//! 0003; `live_usage`, migration 0009): snapshot lines per window, the
//! latest spend of a period, and its lines.

use rust_decimal::Decimal;

use crate::rated::from_column;
use crate::sql::{statement, Fetch};
use crate::{Context, Result, Store};

/// Rated snapshot totals per line for a time range; see the file.
pub const SNAPSHOT_LINES_SQL: &str = include_str!("queries/snapshot_lines.sql");

/// The summed amounts of one (kind, resource) line of every rated snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLine {
    pub period_start: u32,
    pub sheet_checksum: String,
    pub as_of: u32,
    pub currency: String,
    pub kind: String,
    pub resource: String,
    pub amount: Decimal,
    /// When the snapshot was rated (the latest of its lines), Unix seconds.
    pub rated_at: u32,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct SnapshotLineRow {
    period_start: u32,
    sheet_checksum: String,
    as_of: u32,
    currency: String,
    kind: String,
    resource: String,
    amount: i128,
    rated_at: u32,
}

/// The customer's spend in their latest rated period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestSpend {
    pub period_start: u32,
    pub sheet_checksum: String,
    /// End of the last hour rated (a final snapshot), or the second of the
    /// newest sample rated (a live figure), Unix seconds.
    pub as_of: u32,
    /// What is due: the sum of every line.
    pub total: Decimal,
    /// What the period costs so far: every line but a prepaid wallet's
    /// payment. Spend alerts and budget caps compare this.
    pub spend: Decimal,
    /// A live figure of the open hour (`live_usage`), not yet final.
    pub provisional: bool,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct LatestSpendRow {
    period_start_unix: u32,
    sheet_checksum: String,
    as_of_unix: u32,
    total: i128,
    spend: i128,
}

impl Store {
    /// Per-line totals of `customer`'s rated snapshots with `as_of` in
    /// `(from, to]` in periods that started before `to`, and of the latest
    /// snapshot at or before `from` of each (period, checksum) (the window's
    /// starting point).
    pub async fn snapshot_lines(
        &self,
        customer: &str,
        from: u32,
        to: u32,
    ) -> Result<Vec<SnapshotLine>> {
        let rows: Vec<SnapshotLineRow> =
            statement!(self.client, SNAPSHOT_LINES_SQL, customer, to, from)
                .all(format!("snapshot lines of {customer}"))
                .await?;
        rows.into_iter()
            .map(|row| {
                Ok(SnapshotLine {
                    period_start: row.period_start,
                    sheet_checksum: row.sheet_checksum,
                    as_of: row.as_of,
                    currency: row.currency,
                    kind: row.kind,
                    resource: row.resource,
                    amount: from_column(row.amount)?,
                    rated_at: row.rated_at,
                })
            })
            .collect()
    }

    /// The customer's spend so far in their latest rated period (see
    /// `queries/period_spend.sql`): the newer of the latest final snapshot
    /// and the live figure of the open hour; `None` before their first
    /// rating.
    pub async fn latest_spend(&self, customer: &str) -> Result<Option<LatestSpend>> {
        let final_spend = self.spend_in(customer, "rated_usage").await?;
        let live_spend = self.spend_in(customer, "live_usage").await?;
        Ok(match (final_spend, live_spend) {
            (Some(done), Some(live))
                if (live.period_start, live.as_of) > (done.period_start, done.as_of) =>
            {
                Some(live)
            }
            (None, live) => live,
            (done, _) => done,
        })
    }

    async fn spend_in(&self, customer: &str, table: &str) -> Result<Option<LatestSpend>> {
        let sql = crate::policy::PERIOD_SPEND_SQL.replace("rated_usage", table);
        let row: Option<LatestSpendRow> = statement!(self.client, &sql, customer)?
            .fetch_optional()
            .await
            .context(format!("period spend of {customer} in {table}"))?;
        row.map(|row| {
            Ok(LatestSpend {
                period_start: row.period_start_unix,
                sheet_checksum: row.sheet_checksum,
                as_of: row.as_of_unix,
                total: from_column(row.total)?,
                spend: from_column(row.spend)?,
                provisional: table == "live_usage",
            })
        })
        .transpose()
    }

    /// The lines behind a [`LatestSpend`], final or live, in line order.
    pub async fn spend_lines(
        &self,
        customer: &idlemeter_core::CustomerId,
        spend: &LatestSpend,
    ) -> Result<Vec<crate::RatedLineRow>> {
        if spend.provisional {
            self.live_lines(customer.as_str(), spend.period_start, &spend.sheet_checksum)
                .await
        } else {
            self.rated_lines(
                customer,
                spend.period_start,
                &spend.sheet_checksum,
                spend.as_of,
            )
            .await
        }
    }
}
