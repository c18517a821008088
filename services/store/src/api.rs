//! Reads and writes of the customer usage API (migration 0006 and the
//! per-window views over the usage and rating tables).

use chrono::{DateTime, Utc};
use idlemeter_core::rollup::{usage_by_hour, Counters, HourCounters, HourUsage};
use idlemeter_core::{Epoch, SandboxId};
use rust_decimal::Decimal;

use crate::rated::from_column;
use crate::sql::statement;
use crate::{Context, DecisionRow, Error, InvoiceRow, Result, Store};

/// Usage per (sandbox, epoch, hour or day) from the hourly rollup; see the file.
pub const USAGE_WINDOW_ROLLUP_SQL: &str = include_str!("queries/usage_window_rollup.sql");
/// Usage per (sandbox, epoch, minute) from raw samples; see the file.
pub const USAGE_WINDOW_MINUTE_SQL: &str = include_str!("queries/usage_window_minute.sql");
/// The latest sample of each sandbox of a customer; see the file.
pub const SANDBOX_STATE_SQL: &str = include_str!("queries/sandbox_state.sql");
/// Rated snapshot totals per line for a time range; see the file.
pub const SNAPSHOT_LINES_SQL: &str = include_str!("queries/snapshot_lines.sql");

/// One row of `api_keys`; field order is column order.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct ApiKeyRow {
    pub key_id: String,
    /// Empty for an admin key.
    pub customer: String,
    /// `customer` or `admin`.
    pub role: String,
    /// Hex SHA-256 of the secret part of the key.
    pub secret_sha256: String,
    pub name: String,
    /// Unix seconds.
    pub created_at: u32,
    /// Unix seconds; 0 while valid.
    pub revoked_at: u32,
    pub version: u64,
}

/// One row of `spend_alerts`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct SpendAlertRow {
    pub customer: String,
    pub alert_id: String,
    /// `Decimal(38, 12)` mantissa.
    pub threshold: i128,
    /// Empty: the customer's billing currency.
    pub currency: String,
    pub webhook_url: String,
    /// HMAC key of this alert's webhooks.
    pub webhook_secret: String,
    pub created_at: u32,
    pub deleted: u8,
    pub version: u64,
}

/// One row of `spend_alert_firings`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct AlertFiringRow {
    pub customer: String,
    pub alert_id: String,
    pub period_start: u32,
    pub spend: i128,
    pub fired_at: u32,
}

/// A window width of the usage API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Hour,
    Day,
}

impl Window {
    pub fn seconds(self) -> u32 {
        match self {
            Window::Minute => 60,
            Window::Hour => 3_600,
            Window::Day => 86_400,
        }
    }
}

/// Which sandboxes one usage page covers: `first..=last` in id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRange {
    pub first: String,
    pub last: String,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct WindowRow {
    sandbox: String,
    epoch: u64,
    bucket: u32,
    sample_count: u64,
    lo: [u64; 8],
    hi: [u64; 8],
}

pub(crate) fn counters(values: [u64; 8]) -> Counters {
    let [cpu_used_usec, net_rx_bytes, net_tx_bytes, vcpu_alloc_usec, mem_alloc_kib_ms, mem_used_kib_ms, gpu_alloc_ms, disk_mib_ms] =
        values;
    Counters {
        cpu_used_usec,
        net_rx_bytes,
        net_tx_bytes,
        vcpu_alloc_usec,
        mem_alloc_kib_ms,
        mem_used_kib_ms,
        gpu_alloc_ms,
        disk_mib_ms,
    }
}

/// Window rows (bucket 0 = everything before the range) as per-window usage.
fn windows(rows: Vec<WindowRow>) -> Result<Vec<HourUsage>> {
    let rollup = rows
        .into_iter()
        .map(|row| {
            Ok(HourCounters {
                sandbox: SandboxId::parse(row.sandbox).map_err(|e| Error::BadRow(e.to_string()))?,
                epoch: Epoch(row.epoch),
                hour: DateTime::from_timestamp(i64::from(row.bucket), 0)
                    .expect("a u32 unix time is a valid time"),
                is_baseline: row.bucket == 0,
                samples: row.sample_count,
                min: counters(row.lo),
                max: counters(row.hi),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(usage_by_hour(&rollup))
}

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
    /// Sandboxes of `customer` with samples in `[from, to)`, after `after` (in
    /// id order), at most `limit`, or only `only` when given.
    pub async fn sandboxes_with_usage(
        &self,
        customer: &str,
        from: u32,
        to: u32,
        after: &str,
        only: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>> {
        // The hourly rollup knows the same sandboxes at a fraction of the rows;
        // hours are widened to cover a minute range that starts mid-hour.
        let from_hour = from - from % 3_600;
        statement!(
            self.client,
            "SELECT DISTINCT sandbox FROM usage_hours \
             WHERE customer = {customer} AND hour >= toDateTime({from_hour}) \
             AND hour < toDateTime({to}) \
             AND sandbox > {after} \
             AND ({only_flag} = 0 OR sandbox = {only}) ORDER BY sandbox LIMIT {limit}",
            customer,
            from_hour,
            to,
            after,
            only_flag = u8::from(only.is_some()),
            only = only.unwrap_or(""),
            limit,
        )?
        .fetch_all()
        .await
        .context(format!("sandboxes with usage of {customer}"))
    }

    /// Usage of `customer`'s sandboxes in `range` per window of `[from, to)`
    /// (both on window boundaries), as the rollup arithmetic of
    /// [`idlemeter_core::rollup`] computes it.
    pub async fn usage_by_window(
        &self,
        customer: &str,
        range: &SandboxRange,
        from: u32,
        to: u32,
        window: Window,
    ) -> Result<Vec<HourUsage>> {
        let context = format!("usage by {window:?} of {customer}");
        let rows: Vec<WindowRow> = match window {
            Window::Hour | Window::Day => statement!(
                self.client,
                USAGE_WINDOW_ROLLUP_SQL,
                from,
                width = window.seconds(),
                customer,
                to,
                first = &range.first,
                last = &range.last
            )?
            .fetch_all()
            .await
            .context(context)?,
            Window::Minute => {
                let from_hour = from - from % 3_600;
                statement!(
                    self.client,
                    USAGE_WINDOW_MINUTE_SQL,
                    customer,
                    from_hour,
                    first = &range.first,
                    last = &range.last,
                    from,
                    to
                )?
                .fetch_all()
                .await
                .context(context)?
            }
        };
        windows(rows)
    }

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
        )?
        .fetch_all()
        .await
        .context(format!("recent decisions of {customer}/{sandbox}"))
    }

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
            statement!(self.client, SNAPSHOT_LINES_SQL, customer, to, from)?
                .fetch_all()
                .await
                .context(format!("snapshot lines of {customer}"))?;
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

    /// `issuer`'s invoices of `customer` numbered below `before`, newest
    /// first, at most `limit`.
    pub async fn invoices_of(
        &self,
        issuer: &str,
        customer: &str,
        before: u64,
        limit: u32,
    ) -> Result<Vec<InvoiceRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM invoices FINAL WHERE issuer = {issuer} \
             AND customer = {customer} AND number < {before} \
             ORDER BY number DESC LIMIT {limit}",
            issuer,
            customer,
            before,
            limit,
        )?
        .fetch_all()
        .await
        .context(format!("invoices of {customer}"))
    }

    /// One invoice of `customer`, if it is theirs.
    pub async fn invoice_of(
        &self,
        issuer: &str,
        customer: &str,
        number: u64,
    ) -> Result<Option<InvoiceRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM invoices FINAL WHERE issuer = {issuer} \
             AND customer = {customer} AND number = {number}",
            issuer,
            customer,
            number,
        )?
        .fetch_optional()
        .await
        .context(format!("invoice {number} of {customer}"))
    }

    pub async fn insert_api_key(&self, row: &ApiKeyRow) -> Result<()> {
        self.insert_rows("api_keys", std::slice::from_ref(row))
            .await
    }

    /// Every key's latest version, revoked ones included.
    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRow>> {
        self.client
            .query("SELECT ?fields FROM api_keys FINAL ORDER BY key_id")
            .fetch_all()
            .await
            .context("api keys")
    }

    pub async fn insert_spend_alert(&self, row: &SpendAlertRow) -> Result<()> {
        self.insert_rows("spend_alerts", std::slice::from_ref(row))
            .await
    }

    /// The latest version of every alert of `customer` (of every customer when
    /// `None`), deleted ones included: filtering after FINAL here, not in SQL,
    /// keeps an old undeleted version from showing through on servers that
    /// apply a WHERE before collapsing versions.
    pub async fn spend_alerts(&self, customer: Option<&str>) -> Result<Vec<SpendAlertRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM spend_alerts FINAL WHERE ({customer} = '' OR customer = {customer}) \
             ORDER BY customer, alert_id",
            customer = customer.unwrap_or(""),
        )?
            .fetch_all()
            .await
            .context("spend alerts")
    }

    pub async fn insert_alert_firing(&self, row: &AlertFiringRow) -> Result<()> {
        self.insert_rows("spend_alert_firings", std::slice::from_ref(row))
            .await
    }

    pub async fn alert_firings(&self) -> Result<Vec<AlertFiringRow>> {
        self.client
            .query("SELECT ?fields FROM spend_alert_firings FINAL ORDER BY customer, alert_id, period_start")
            .fetch_all()
            .await
            .context("spend alert firings")
    }
}

/// Unix seconds of `time`, clamped to what a ClickHouse `DateTime` holds.
pub fn unix_seconds(time: DateTime<Utc>) -> u32 {
    u32::try_from(time.timestamp().max(0)).unwrap_or(u32::MAX)
}
