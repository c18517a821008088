//! Customers and subscriptions: written here under transactions, copied to
//! ClickHouse (`customers`, `subscriptions`) through the outbox, where the
//! rater, the API and the invoicer read them alike.
//!
//! Rules the ledger enforces, whoever writes:
//! - a customer's currency cannot change once they have an invoice;
//! - a plan change cannot take effect inside a period already invoiced
//!   (it would rewrite an issued invoice: issue a credit note instead);
//! - a subscription needs its customer's record.

use chrono::{DateTime, Utc};
use idlemeter_store::{to_column, CustomerRow, SubscriptionRow};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::{Context, Error, Ledger, Result};

/// The outbox topic of customer records (their copy for ClickHouse).
pub const CUSTOMERS_TOPIC: &str = "customers";

/// The outbox topic of plan changes (their copy for ClickHouse).
pub const SUBSCRIPTIONS_TOPIC: &str = "subscriptions";

/// A customer as finance manages them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerRecord {
    /// The customer id usage carries (the cgroup prefix).
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// ISO 4217 code; the customer is billed by the sheet of this currency.
    pub currency: String,
    /// In [0, 1): 0.2 is 20 %. Absent: `[billing] tax_rates` decides, as
    /// for customers without a record.
    #[serde(default)]
    pub tax_rate: Option<Decimal>,
    #[serde(default)]
    pub tax_id: String,
    #[serde(default)]
    pub billing_email: String,
    /// Spend in a period beyond which `customer.spend_limit_reached` is
    /// sent; none when absent.
    #[serde(default)]
    pub spend_limit: Option<Decimal>,
    /// Free-form facts (a CRM id, a segment), as a JSON object.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl CustomerRecord {
    /// Refuses a record that could not bill: what, and why.
    pub fn validate(&self) -> Result<()> {
        let refuse =
            |reason: String| Err(Error::Refused(format!("customer {:?}: {reason}", self.id)));
        // PostgreSQL stores no NUL in text or JSONB.
        let texts = [
            &self.name,
            &self.tax_id,
            &self.billing_email,
            &self.currency,
        ];
        if texts.iter().any(|text| text.contains('\0'))
            || serde_json::Value::Object(self.metadata.clone())
                .to_string()
                .contains("\\u0000")
        {
            return refuse("a text field or metadata holds a NUL character".to_owned());
        }
        if self.name.len() > 1024 || self.tax_id.len() > 256 || self.billing_email.len() > 320 {
            return refuse(
                "name (1024), tax_id (256) or billing_email (320 bytes) is too long".to_owned(),
            );
        }
        if let Err(error) = idlemeter_core::CustomerId::parse(self.id.clone()) {
            return refuse(format!("id: {error}"));
        }
        if let Err(reason) = idlemeter_core::Currency::parse(&self.currency, Some(2)) {
            return refuse(format!("currency: {reason}"));
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return refuse(format!(
                "currency {:?} is not an ISO 4217 code (three capitals)",
                self.currency
            ));
        }
        if let Some(rate) = self
            .tax_rate
            .filter(|rate| rate.is_sign_negative() || *rate >= Decimal::ONE)
        {
            return refuse(format!("tax_rate {rate} is not in [0, 1) (0.2 is 20 %)"));
        }
        if self.spend_limit.is_some_and(|limit| limit <= Decimal::ZERO) {
            return refuse("spend_limit must be above zero (leave it out for none)".to_owned());
        }
        if !self.billing_email.is_empty() && !self.billing_email.contains('@') {
            return refuse(format!(
                "billing_email {:?} is not an address",
                self.billing_email
            ));
        }
        Ok(())
    }
}

/// What saving a customer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CustomerSaved {
    pub version: u64,
    pub created: bool,
}

/// A plan from an instant on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    pub plan: String,
    pub effective_from: DateTime<Utc>,
}

/// What recording a plan change did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscribed {
    /// The plan a change at the same instant had, now replaced.
    pub replaced: Option<String>,
}

fn money(value: Decimal) -> Result<i128> {
    to_column(value).map_err(|error| Error::Refused(error.to_string()))
}

impl Ledger {
    /// Creates or replaces a customer's record (a new version), copied to
    /// ClickHouse by the outbox.
    pub async fn save_customer(
        &self,
        issuer: &str,
        record: &CustomerRecord,
    ) -> Result<CustomerSaved> {
        record.validate()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.context("begin")?;
        // Two first saves of one customer wait for each other (no row to
        // lock yet), so versions never repeat.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('customer:' || $1 || ':' || $2))",
            &[&issuer, &record.id],
        )
        .await
        .context("locking the customer")?;
        let existing = tx
            .query_opt(
                "SELECT currency, version FROM customers WHERE issuer = $1 AND id = $2 FOR UPDATE",
                &[&issuer, &record.id],
            )
            .await
            .context("reading the customer")?;
        // Invoiced in another currency (with a record or before having
        // one): the currency is fixed, or their wallet and credit balance
        // would be spent in another money.
        let invoiced_in: Vec<String> = tx
            .query(
                "SELECT DISTINCT currency FROM invoices WHERE issuer = $1 AND customer = $2 \
                 AND currency <> $3",
                &[&issuer, &record.id, &record.currency],
            )
            .await
            .context("reading the customer's invoiced currencies")?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if !invoiced_in.is_empty() {
            return Err(Error::Refused(format!(
                "customer {:?} is invoiced in {}: their currency cannot change to {}",
                record.id,
                invoiced_in.join(", "),
                record.currency
            )));
        }
        let version: i64 = existing.as_ref().map_or(1, |row| row.get::<_, i64>(1) + 1);
        let now = Utc::now();
        let metadata = serde_json::Value::Object(record.metadata.clone());
        tx.execute(
            "INSERT INTO customers (issuer, id, name, currency, tax_rate, tax_id, billing_email, \
             spend_limit, metadata, version, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (issuer, id) DO UPDATE SET name = $3, currency = $4, tax_rate = $5, \
             tax_id = $6, billing_email = $7, spend_limit = $8, metadata = $9, version = $10, \
             updated_at = $11",
            &[
                &issuer,
                &record.id,
                &record.name,
                &record.currency,
                &record.tax_rate,
                &record.tax_id,
                &record.billing_email,
                &record.spend_limit,
                &metadata,
                &version,
                &now,
            ],
        )
        .await
        .context(format!("saving customer {}", record.id))?;
        let copy = CustomerRow {
            issuer: issuer.to_owned(),
            id: record.id.clone(),
            name: record.name.clone(),
            currency: record.currency.clone(),
            tax_rate: money(record.tax_rate.unwrap_or(Decimal::NEGATIVE_ONE))?,
            tax_id: record.tax_id.clone(),
            billing_email: record.billing_email.clone(),
            spend_limit: money(record.spend_limit.unwrap_or(Decimal::NEGATIVE_ONE))?,
            metadata: metadata.to_string(),
            version: u64::try_from(version).unwrap_or(1),
            updated_at: u32::try_from(now.timestamp()).unwrap_or(0),
        };
        self.queue_copy(
            &tx,
            CUSTOMERS_TOPIC,
            &format!("{issuer}/{}/{version}", record.id),
            &copy,
        )
        .await?;
        tx.commit().await.context("committing the customer")?;
        Ok(CustomerSaved {
            version: u64::try_from(version).unwrap_or(1),
            created: existing.is_none(),
        })
    }

    /// Puts a customer on `plan` from `effective_from` (replacing a change
    /// recorded for the same instant). The caller checks that the plan
    /// exists in the sheet.
    pub async fn subscribe(
        &self,
        issuer: &str,
        customer: &str,
        change: &SubscriptionRecord,
    ) -> Result<Subscribed> {
        if change.plan.is_empty() {
            return Err(Error::Refused("a plan change needs a plan".to_owned()));
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.context("begin")?;
        let known = tx
            .query_opt(
                "SELECT 1 FROM customers WHERE issuer = $1 AND id = $2 FOR UPDATE",
                &[&issuer, &customer],
            )
            .await
            .context("reading the customer")?;
        if known.is_none() {
            return Err(Error::Refused(format!(
                "no customer {customer:?}: save their record first"
            )));
        }
        let invoiced_until: Option<DateTime<Utc>> = tx
            .query_one(
                "SELECT max(period_end) FROM invoices WHERE issuer = $1 AND customer = $2",
                &[&issuer, &customer],
            )
            .await
            .context("reading the customer's invoiced periods")?
            .get(0);
        if let Some(until) = invoiced_until.filter(|until| change.effective_from < *until) {
            return Err(Error::Refused(format!(
                "customer {customer:?} is invoiced until {until}: a plan change from {} would rewrite an issued invoice (issue a credit note, or change from {until} on)",
                change.effective_from
            )));
        }
        let replaced: Option<String> = tx
            .query_opt(
                "SELECT plan FROM subscriptions WHERE issuer = $1 AND customer = $2 \
                 AND effective_from = $3",
                &[&issuer, &customer, &change.effective_from],
            )
            .await
            .context("reading the subscription")?
            .map(|row| row.get(0));
        let now = Utc::now();
        tx.execute(
            "INSERT INTO subscriptions (issuer, customer, effective_from, plan, recorded_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (issuer, customer, effective_from) \
             DO UPDATE SET plan = $4, recorded_at = $5",
            &[
                &issuer,
                &customer,
                &change.effective_from,
                &change.plan,
                &now,
            ],
        )
        .await
        .context(format!("recording the plan change of {customer}"))?;
        let copy = SubscriptionRow {
            issuer: issuer.to_owned(),
            customer: customer.to_owned(),
            effective_from: u32::try_from(change.effective_from.timestamp()).map_err(|_| {
                Error::Refused(format!(
                    "effective_from {} is outside 1970..2106",
                    change.effective_from
                ))
            })?,
            plan: change.plan.clone(),
            recorded_ms: u64::try_from(now.timestamp_millis()).unwrap_or(0),
        };
        self.queue_copy(
            &tx,
            SUBSCRIPTIONS_TOPIC,
            &format!("{issuer}/{customer}/{}", change.effective_from.timestamp()),
            &copy,
        )
        .await?;
        tx.commit().await.context("committing the plan change")?;
        Ok(Subscribed { replaced })
    }

    /// A customer's record, version and plan changes (oldest first).
    pub async fn customer(
        &self,
        issuer: &str,
        id: &str,
    ) -> Result<Option<(CustomerRecord, u64, Vec<SubscriptionRecord>)>> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT id, name, currency, tax_rate, tax_id, billing_email, spend_limit, \
                 metadata, version FROM customers WHERE issuer = $1 AND id = $2",
                &[&issuer, &id],
            )
            .await
            .context("reading a customer")?
        else {
            return Ok(None);
        };
        let metadata: serde_json::Value = row.get(7);
        let record = CustomerRecord {
            id: row.get(0),
            name: row.get(1),
            currency: row.get(2),
            tax_rate: row.get(3),
            tax_id: row.get(4),
            billing_email: row.get(5),
            spend_limit: row.get(6),
            metadata: match metadata {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            },
        };
        let version = u64::try_from(row.get::<_, i64>(8)).unwrap_or(1);
        let plans = client
            .query(
                "SELECT plan, effective_from FROM subscriptions WHERE issuer = $1 \
                 AND customer = $2 ORDER BY effective_from",
                &[&issuer, &id],
            )
            .await
            .context("reading a customer's plan changes")?
            .iter()
            .map(|row| SubscriptionRecord {
                plan: row.get(0),
                effective_from: row.get(1),
            })
            .collect();
        Ok(Some((record, version, plans)))
    }

    /// The end of the customer's last invoiced period, if any: the earliest
    /// instant a plan change may take effect.
    pub async fn invoiced_until(
        &self,
        issuer: &str,
        customer: &str,
    ) -> Result<Option<DateTime<Utc>>> {
        let client = self.client().await?;
        Ok(client
            .query_one(
                "SELECT max(period_end) FROM invoices WHERE issuer = $1 AND customer = $2",
                &[&issuer, &customer],
            )
            .await
            .context("reading the customer's invoiced periods")?
            .get(0))
    }

    /// Every customer id of the issuer, in order.
    pub async fn customer_ids(&self, issuer: &str) -> Result<Vec<String>> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT id FROM customers WHERE issuer = $1 ORDER BY id",
                &[&issuer],
            )
            .await
            .context("listing customers")?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    /// Queues a row's copy for ClickHouse in the caller's transaction.
    pub(crate) async fn queue_copy<T: Serialize>(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        topic: &str,
        key: &str,
        row: &T,
    ) -> Result<()> {
        let payload = serde_json::to_value(row)
            .map_err(|error| Error::Refused(format!("{topic} copy {key}: {error}")))?;
        tx.execute(
            "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
            &[&topic, &key, &payload],
        )
        .await
        .context(format!("queueing {key} for ClickHouse"))?;
        Ok(())
    }
}
