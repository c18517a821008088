//! Customers and subscriptions (migration 0014): the ledger's records as
//! ClickHouse keeps them, and the reads accounts need.

use crate::sql::{statement, Fetch};
use crate::{Context, Result, Store};

/// One row of `customers`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct CustomerRow {
    pub issuer: String,
    pub id: String,
    pub name: String,
    pub currency: String,
    /// `Decimal(38, 12)` mantissas; -1 (as a decimal) when the record has
    /// no tax rate.
    pub tax_rate: i128,
    pub tax_id: String,
    pub billing_email: String,
    /// -1 (as a decimal) when there is no limit.
    pub spend_limit: i128,
    /// A JSON object, as text.
    pub metadata: String,
    pub version: u64,
    /// Unix seconds.
    pub updated_at: u32,
}

/// One row of `subscriptions`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionRow {
    pub issuer: String,
    pub customer: String,
    /// Unix seconds.
    pub effective_from: u32,
    pub plan: String,
    pub recorded_ms: u64,
}

/// Which customers one sheet bills: those whose record names its currency
/// and, for the primary sheet (`[rater] sheet`), those without a record.
/// A service running several sheets (one per currency) gives each its
/// lane, so that no customer is billed twice or in another currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrencyLane {
    pub currency: String,
    pub primary: bool,
}

/// Each customer's currency from their record, by id.
pub type Currencies = std::collections::HashMap<String, String>;

impl CurrencyLane {
    /// Whether the lane bills `customer`.
    pub fn admits(&self, customer: &str, currencies: &Currencies) -> bool {
        match currencies.get(customer) {
            Some(currency) => *currency == self.currency,
            None => self.primary,
        }
    }
}

impl Store {
    /// Every customer record's currency (the newest record of each).
    pub async fn customer_currencies(&self, issuer: &str) -> Result<Currencies> {
        Ok(self
            .client
            .query("SELECT id, currency FROM customers FINAL WHERE issuer = ?")
            .bind(issuer)
            .fetch_all::<(String, String)>()
            .await
            .context("customer currencies")?
            .into_iter()
            .collect())
    }

    /// Records with a spend limit (above zero).
    pub async fn customers_with_spend_limits(&self, issuer: &str) -> Result<Vec<CustomerRow>> {
        self.client
            .query(
                "SELECT ?fields FROM customers FINAL WHERE issuer = ? AND spend_limit > 0 \
                 ORDER BY id",
            )
            .bind(issuer)
            .all("customers with spend limits")
            .await
    }

    /// Customers with a plan change recorded (their fees are due even
    /// without usage).
    pub async fn subscribed_customers(&self, issuer: &str) -> Result<Vec<String>> {
        self.client
            .query("SELECT DISTINCT customer FROM subscriptions WHERE issuer = ? ORDER BY customer")
            .bind(issuer)
            .all("subscribed customers")
            .await
    }

    pub async fn insert_customers(&self, rows: &[CustomerRow]) -> Result<()> {
        self.insert_rows("customers", rows).await
    }

    pub async fn insert_subscriptions(&self, rows: &[SubscriptionRow]) -> Result<()> {
        self.insert_rows("subscriptions", rows).await
    }

    /// The newest record of each customer from `first` to `last`.
    pub async fn customers_between(
        &self,
        issuer: &str,
        first: &str,
        last: &str,
    ) -> Result<Vec<CustomerRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM customers FINAL WHERE issuer = {issuer} \
             AND id >= {first} AND id <= {last} ORDER BY id",
            issuer,
            first,
            last
        )
        .all(format!("customers {first} .. {last}"))
        .await
    }

    /// The plan changes of customers from `first` to `last` effective
    /// before `before` (Unix seconds), by customer then date.
    pub async fn subscriptions_between(
        &self,
        issuer: &str,
        first: &str,
        last: &str,
        before: u32,
    ) -> Result<Vec<SubscriptionRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM subscriptions FINAL WHERE issuer = {issuer} \
             AND customer >= {first} AND customer <= {last} \
             AND effective_from < toDateTime({before}) \
             ORDER BY customer, effective_from",
            issuer,
            first,
            last,
            before,
        )
        .all(format!("subscriptions of {first} .. {last}"))
        .await
    }
}
