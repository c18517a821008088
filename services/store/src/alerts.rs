//! Spend alerts and their firings (`spend_alerts`, `spend_alert_firings`,
//! migration 0006).

use crate::sql::{statement, Fetch};
use crate::{Result, Store};

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

impl Store {
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
        )
            .all("spend alerts")
            .await
    }

    pub async fn insert_alert_firing(&self, row: &AlertFiringRow) -> Result<()> {
        self.insert_rows("spend_alert_firings", std::slice::from_ref(row))
            .await
    }

    pub async fn alert_firings(&self) -> Result<Vec<AlertFiringRow>> {
        self.client
            .query("SELECT ?fields FROM spend_alert_firings FINAL ORDER BY customer, alert_id, period_start")
            .all("spend alert firings")
            .await
    }
}
