//! PostgreSQL adapter of idlemeter: the billing entities that change and
//! must never be half-written. Usage stays in ClickHouse; here an invoice
//! number is claimed, its invoice written and its copy for ClickHouse
//! queued in one transaction ([`Ledger::issue`]), so two invoicers on two
//! hosts, sharing nothing but this database, never share or skip a number.
//!
//! The dashboards keep reading ClickHouse: every issued document is also an
//! [`outbox`](Ledger::pending) row, which the issuer copies into ClickHouse
//! (idempotently: ClickHouse collapses a repeated copy) and then marks
//! delivered. A crash between the two leaves the row pending, and the next
//! run copies it again.
//!
//! Migrations are SQL files in `migrations/`, applied in name order, each in
//! its own transaction under an advisory lock, with a checksum that refuses
//! an applied file that changed (as the ClickHouse migrations do).

mod customers;
mod keys;
mod relay;

pub use customers::{
    CustomerRecord, CustomerSaved, Subscribed, SubscriptionRecord, CUSTOMERS_TOPIC,
    SUBSCRIPTIONS_TOPIC,
};
pub use keys::{record_api_key, API_KEYS_TOPIC};

use std::str::FromStr;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_postgres::NoTls;

/// Where the ledger lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSettings {
    /// `postgres://user[:password]@host:port/database`; "" for none. A
    /// secret: it may hold a password (`idlemeter config` prints it
    /// redacted).
    pub url: idlemeter_core::Secret,
    /// The schema the tables live in (created if absent): one database can
    /// hold several ledgers (tests give each its own).
    pub schema: String,
    /// Connections kept open.
    pub pool_size: usize,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        Self {
            url: idlemeter_core::Secret::default(),
            schema: "public".to_owned(),
            pool_size: 8,
        }
    }
}

/// Errors of the ledger, with what they concern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ledger settings: {0}")]
    Settings(String),
    #[error("postgres {context}: {source}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("postgres connection pool: {0}")]
    Pool(String),
    #[error("ledger migration {name} was changed after it was applied (applied checksum {applied}, file checksum {current}); add a new migration instead")]
    ChangedMigration {
        name: String,
        applied: String,
        current: String,
    },
    /// The caller refused a document while numbering it: nothing of the
    /// transaction was written.
    #[error("{0}")]
    Refused(String),
    /// Copying the outbox to ClickHouse failed (the items stay pending).
    #[error("relaying the outbox to ClickHouse: {0}")]
    Relay(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, tokio_postgres::Error> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Postgres {
            context: context.into(),
            source,
        })
    }
}

/// The ledger's migrations, in order: (name, SQL).
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_invoices",
        include_str!("../migrations/0001_invoices.sql"),
    ),
    (
        "0002_outbox_delivery",
        include_str!("../migrations/0002_outbox_delivery.sql"),
    ),
    (
        "0003_wallets",
        include_str!("../migrations/0003_wallets.sql"),
    ),
    (
        "0004_credit_notes",
        include_str!("../migrations/0004_credit_notes.sql"),
    ),
    (
        "0005_customers",
        include_str!("../migrations/0005_customers.sql"),
    ),
    (
        "0006_api_keys",
        include_str!("../migrations/0006_api_keys.sql"),
    ),
];

/// A series of document numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    Invoice,
    CreditNote,
}

impl Series {
    pub fn as_str(self) -> &'static str {
        match self {
            Series::Invoice => "invoice",
            Series::CreditNote => "credit_note",
        }
    }
}

/// An invoice as the ledger keeps it, made by the caller once its number is
/// known.
#[derive(Debug, Clone, PartialEq)]
pub struct InvoiceRecord {
    pub customer: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub currency: String,
    pub total: Decimal,
    /// What it draws from the customer's prepaid wallet (zero or more).
    pub wallet_applied: Decimal,
    /// What it takes from the customer's credit balance, and the negative
    /// spend it carries to it (each zero or more).
    pub balance_applied: Decimal,
    pub balance_carried: Decimal,
    /// The whole document, as the caller reads it back: kept here and
    /// carried by the outbox to ClickHouse.
    pub document: serde_json::Value,
}

/// What [`Ledger::issue`] did with each draft, by index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Issued {
    /// Drafts numbered and written, with their numbers, in order.
    pub numbered: Vec<(usize, u64)>,
    /// Drafts whose customer already had an invoice of the period (another
    /// run issued it), with that invoice's document: not written.
    pub already: Vec<(usize, serde_json::Value)>,
    /// Drafts refused (a wallet draw larger than the wallet holds), and
    /// why: not written, no number used; the others are issued.
    pub refused: Vec<(usize, String)>,
}

/// What importing one invoice did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    Inserted,
    /// The same invoice (number, customer, period) is already there.
    Present,
    /// The number or the customer's period is taken by another invoice:
    /// nothing written, and why.
    Conflict(String),
}

/// One queued copy for ClickHouse.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    pub id: i64,
    pub key: String,
    pub payload: serde_json::Value,
}

/// The outbox topic of issued invoices (their copy for ClickHouse).
pub const INVOICES_TOPIC: &str = "invoices";

/// The outbox topic of wallet deposits (their copy for ClickHouse).
pub const WALLET_DEPOSITS_TOPIC: &str = "wallet_deposits";

/// The outbox topic of issued credit notes (their copy for ClickHouse).
pub const CREDIT_NOTES_TOPIC: &str = "credit_notes";

/// The outbox topic of billing events for the platform (webhooks, Kafka).
pub const BILLING_EVENTS_TOPIC: &str = "billing_events";

/// A billing event as the platform receives it: `id` is the delivery id
/// (the same on every retry), `type` what happened, `data` its facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BillingEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub created_at: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl BillingEvent {
    /// `invoice.issued` of one invoice.
    pub fn invoice_issued(
        issuer: &str,
        number: u64,
        record: &InvoiceRecord,
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            id: format!("invoice.issued:{issuer}:{number}"),
            event_type: "invoice.issued".to_owned(),
            created_at: at,
            data: serde_json::json!({
                "issuer": issuer,
                "number": number,
                "customer": record.customer,
                "period_start": record.period_start,
                "period_end": record.period_end,
                "currency": record.currency,
                "total": record.total.to_string(),
            }),
        }
    }
}

impl BillingEvent {
    /// `credit_note.issued` of one credit note.
    pub fn credit_note_issued(
        issuer: &str,
        number: u64,
        record: &CreditNoteRecord,
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            id: format!("credit_note.issued:{issuer}:{number}"),
            event_type: "credit_note.issued".to_owned(),
            created_at: at,
            data: serde_json::json!({
                "issuer": issuer,
                "number": number,
                "customer": record.customer,
                "invoice_number": record.invoice_number,
                "currency": record.currency,
                "net": record.net.to_string(),
                "tax": record.tax.to_string(),
                "total": record.total.to_string(),
                "settlement": record.settlement,
                "reason": record.reason,
            }),
        }
    }
}

impl BillingEvent {
    /// `customer.spend_limit_reached`: the customer's spend in the period
    /// starting at `period_start` reached their record's limit. Once per
    /// customer and period (the id names both).
    pub fn spend_limit_reached(
        issuer: &str,
        customer: &str,
        period_start: DateTime<Utc>,
        (spend, limit, currency): (Decimal, Decimal, &str),
        at: DateTime<Utc>,
    ) -> Self {
        Self {
            id: format!(
                "customer.spend_limit_reached:{issuer}:{customer}:{}",
                period_start.timestamp()
            ),
            event_type: "customer.spend_limit_reached".to_owned(),
            created_at: at,
            data: serde_json::json!({
                "issuer": issuer,
                "customer": customer,
                "period_start": period_start,
                "spend": spend.to_string(),
                "spend_limit": limit.to_string(),
                "currency": currency,
            }),
        }
    }
}

/// A credit note as the ledger keeps it, made by the caller once its
/// number is known.
#[derive(Debug, Clone, PartialEq)]
pub struct CreditNoteRecord {
    pub customer: String,
    pub invoice_number: u64,
    pub currency: String,
    pub net: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
    /// `next_invoice` or `wallet`.
    pub settlement: String,
    pub reason: String,
    /// The whole note as the caller reads it back, carried by the outbox to
    /// ClickHouse.
    pub document: serde_json::Value,
    /// For a note settled to the wallet: the deposit's copy for ClickHouse
    /// (the deposit `credit_note:N` itself is written here).
    pub deposit_copy: Option<serde_json::Value>,
}

/// An issued invoice and the credit notes already issued on it, as a
/// credit note's maker reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Credited {
    pub customer: String,
    pub invoice_document: serde_json::Value,
    pub earlier_notes: Vec<serde_json::Value>,
}

/// A connection pool to the ledger's database and schema.
#[derive(Clone)]
pub struct Ledger {
    pool: Pool,
    schema: String,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Connects to `settings` ([`Ledger::migrate`] creates the schema).
    pub async fn connect(settings: &LedgerSettings) -> Result<Self> {
        if settings.url.is_empty() {
            return Err(Error::Settings(
                "[ledger] url is empty: give postgres://user@host:port/database".to_owned(),
            ));
        }
        let schema = settings.schema.clone();
        let schema_ok = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_');
        if !schema_ok {
            return Err(Error::Settings(format!(
                "[ledger] schema {schema:?} must be 1-63 of a-z, 0-9 and '_'"
            )));
        }
        let mut config = tokio_postgres::Config::from_str(settings.url.expose())
            .map_err(|error| Error::Settings(format!("[ledger] url: {error}")))?;
        config.options(format!("-c search_path={schema}"));
        config.application_name("idlemeter");
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .build()
            .map_err(|error| Error::Pool(error.to_string()))?;
        let ledger = Self { pool, schema };
        // Reachable now, not at the first document.
        drop(ledger.client().await?);
        Ok(ledger)
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|error| Error::Pool(error.to_string()))
    }

    /// Applies the migrations not applied yet; returns their names.
    pub async fn migrate(&self) -> Result<Vec<String>> {
        let mut client = self.client().await?;
        // One migrator at a time per schema (services starting together):
        // PostgreSQL's `IF NOT EXISTS` is not safe against a concurrent
        // creator, the lock is. The others wait, then find it all applied.
        let lock_key = format!("idlemeter-ledger:{}", self.schema);
        let tx = client.transaction().await.context("begin")?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock_key])
            .await
            .context("migration lock")?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.ledger_migrations (
                 name TEXT PRIMARY KEY,
                 checksum TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            schema = self.schema
        ))
        .await
        .context("creating the schema and ledger_migrations")?;
        tx.commit().await.context("committing ledger_migrations")?;
        let mut applied = Vec::new();
        for (name, sql) in MIGRATIONS {
            let checksum = hex(&Sha256::digest(sql.as_bytes()));
            let tx = client.transaction().await.context("begin")?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock_key])
                .await
                .context("migration lock")?;
            let existing = tx
                .query_opt(
                    "SELECT checksum FROM ledger_migrations WHERE name = $1",
                    &[name],
                )
                .await
                .context(format!("reading migration {name}"))?;
            match existing {
                Some(row) => {
                    let stored: String = row.get(0);
                    if stored != checksum {
                        return Err(Error::ChangedMigration {
                            name: (*name).to_owned(),
                            applied: stored,
                            current: checksum,
                        });
                    }
                }
                None => {
                    tx.batch_execute(sql)
                        .await
                        .context(format!("applying migration {name}"))?;
                    tx.execute(
                        "INSERT INTO ledger_migrations (name, checksum) VALUES ($1, $2)",
                        &[name, &checksum],
                    )
                    .await
                    .context(format!("recording migration {name}"))?;
                    applied.push((*name).to_owned());
                }
            }
            tx.commit().await.context(format!("committing {name}"))?;
        }
        Ok(applied)
    }

    /// Numbers and writes invoices of `issuer` for the period starting at
    /// `period_start`, in one transaction: the series row is locked first
    /// (a concurrent issuer waits for this commit), drafts of customers the
    /// period already invoiced are skipped, the others get the next numbers
    /// in order; `record(draft, number)` makes each one's record (and may
    /// renumber the caller's document). Any error writes nothing.
    pub async fn issue<T>(
        &self,
        issuer: &str,
        period_start: DateTime<Utc>,
        drafts: &mut [T],
        customer_of: impl Fn(&T) -> &str,
        mut record: impl FnMut(&mut T, u64) -> std::result::Result<InvoiceRecord, String>,
    ) -> Result<Issued> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.context("begin")?;
        let mut next = claim_series(&tx, issuer, Series::Invoice).await?;
        let customers: Vec<String> = drafts
            .iter()
            .map(|draft| customer_of(draft).to_owned())
            .collect();
        let mut invoiced: std::collections::HashMap<String, serde_json::Value> = tx
            .query(
                "SELECT customer, document FROM invoices \
                 WHERE issuer = $1 AND period_start = $2 AND customer = ANY($3)",
                &[&issuer, &period_start, &customers],
            )
            .await
            .context("invoiced customers")?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let mut issued = Issued::default();
        let now = Utc::now();
        for (index, draft) in drafts.iter_mut().enumerate() {
            if let Some(document) = invoiced.remove(&customers[index]) {
                issued.already.push((index, document));
                continue;
            }
            let number = next;
            let made = record(draft, number).map_err(Error::Refused)?;
            let mut refused = None;
            for drawn in [Drawn::Wallet, Drawn::CreditBalance] {
                if let Err(reason) = drawn.check(&tx, issuer, &made).await? {
                    refused = Some(reason);
                    break;
                }
            }
            if let Some(reason) = refused {
                issued.refused.push((index, reason));
                continue;
            }
            let number_sql = i64::try_from(number)
                .map_err(|_| Error::Refused(format!("invoice number {number} overflows")))?;
            insert_invoice(&tx, issuer, number_sql, now, &made).await?;
            tx.execute(
                "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
                &[
                    &INVOICES_TOPIC,
                    &format!("{issuer}/{number}"),
                    &made.document,
                ],
            )
            .await
            .context("queueing the invoice for ClickHouse")?;
            let event = BillingEvent::invoice_issued(issuer, number, &made, now);
            queue_event(&tx, &event).await?;
            issued.numbered.push((index, number));
            next += 1;
        }
        store_series(&tx, issuer, Series::Invoice, next).await?;
        tx.commit().await.context("committing issued invoices")?;
        Ok(issued)
    }

    /// Brings one invoice issued before the ledger (in ClickHouse) into it
    /// under its own number, and raises the series past it; nothing is
    /// queued for ClickHouse, which has it. Running it twice is harmless.
    pub async fn import_invoice(
        &self,
        issuer: &str,
        number: u64,
        issued_at: DateTime<Utc>,
        record: &InvoiceRecord,
    ) -> Result<Imported> {
        let number_sql = i64::try_from(number)
            .map_err(|_| Error::Refused(format!("invoice number {number} overflows")))?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.context("begin")?;
        let next = claim_series(&tx, issuer, Series::Invoice).await?;
        let existing = tx
            .query(
                "SELECT number, customer, period_start FROM invoices WHERE issuer = $1 \
                 AND (number = $2 OR (customer = $3 AND period_start = $4))",
                &[&issuer, &number_sql, &record.customer, &record.period_start],
            )
            .await
            .context("existing invoices")?;
        if let Some(row) = existing.first() {
            let (found, customer, start): (i64, String, DateTime<Utc>) =
                (row.get(0), row.get(1), row.get(2));
            return Ok(
                if found == number_sql
                    && customer == record.customer
                    && start == record.period_start
                {
                    Imported::Present
                } else {
                    Imported::Conflict(format!(
                        "invoice {number} of {issuer} ({} from {}) meets the ledger's invoice {found} ({customer} from {start})",
                        record.customer, record.period_start
                    ))
                },
            );
        }
        insert_invoice(&tx, issuer, number_sql, issued_at, record).await?;
        store_series(&tx, issuer, Series::Invoice, next.max(number + 1)).await?;
        tx.commit().await.context("committing the import")?;
        Ok(Imported::Inserted)
    }

    /// Records a prepaid wallet deposit (once per `deposit_id` and
    /// customer: `false` when it was already recorded) and queues
    /// `outbox` (its copy for ClickHouse) in the same transaction.
    pub async fn deposit(
        &self,
        issuer: &str,
        customer: &str,
        deposit_id: &str,
        amount: Decimal,
        deposited_at: DateTime<Utc>,
        outbox: &serde_json::Value,
    ) -> Result<bool> {
        if amount <= Decimal::ZERO {
            return Err(Error::Refused(format!(
                "deposit {deposit_id}: amount {amount} must be above zero"
            )));
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.context("begin")?;
        let inserted = tx
            .execute(
                "INSERT INTO wallet_deposits (issuer, customer, deposit_id, amount, deposited_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&issuer, &customer, &deposit_id, &amount, &deposited_at],
            )
            .await
            .context(format!("recording deposit {deposit_id}"))?;
        if inserted == 1 {
            tx.execute(
                "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
                &[
                    &WALLET_DEPOSITS_TOPIC,
                    &format!("{issuer}/{customer}/{deposit_id}"),
                    outbox,
                ],
            )
            .await
            .context("queueing the deposit for ClickHouse")?;
        }
        tx.commit().await.context("committing the deposit")?;
        Ok(inserted == 1)
    }

    /// Issues a credit note on invoice `invoice_number` of `issuer`, in one
    /// transaction: the invoice's notes are locked (a concurrent note on it
    /// waits), `make` computes the note from the invoice and its earlier
    /// notes with the next credit-note number, and the note, its copy for
    /// ClickHouse, its wallet deposit (settled to the wallet) and its
    /// `credit_note.issued` event are written. `make`'s refusal writes
    /// nothing and uses no number.
    pub async fn credit(
        &self,
        issuer: &str,
        invoice_number: u64,
        make: impl FnOnce(&Credited, u64) -> std::result::Result<CreditNoteRecord, String>,
    ) -> Result<(u64, CreditNoteRecord)> {
        let invoice_sql = i64::try_from(invoice_number)
            .map_err(|_| Error::Refused(format!("invoice number {invoice_number} overflows")))?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.context("begin")?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('credit:' || $1 || ':' || ($2::bigint)::text))",
            &[&issuer, &invoice_sql],
        )
        .await
        .context("locking the invoice's credit notes")?;
        let invoice = tx
            .query_opt(
                "SELECT customer, document FROM invoices WHERE issuer = $1 AND number = $2",
                &[&issuer, &invoice_sql],
            )
            .await
            .context("reading the credited invoice")?
            .ok_or_else(|| {
                Error::Refused(format!(
                    "invoice {invoice_number} of {issuer} is not in the ledger"
                ))
            })?;
        let earlier_notes = tx
            .query(
                "SELECT document FROM credit_notes WHERE issuer = $1 AND invoice_number = $2 \
                 ORDER BY number",
                &[&issuer, &invoice_sql],
            )
            .await
            .context("reading earlier credit notes")?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let credited = Credited {
            customer: invoice.get(0),
            invoice_document: invoice.get(1),
            earlier_notes,
        };
        let number = claim_series(&tx, issuer, Series::CreditNote).await?;
        let made = make(&credited, number).map_err(Error::Refused)?;
        let number_sql = i64::try_from(number)
            .map_err(|_| Error::Refused(format!("credit note number {number} overflows")))?;
        let now = Utc::now();
        tx.execute(
            "INSERT INTO credit_notes (issuer, number, customer, invoice_number, currency, \
             net, tax, total, settlement, reason, issued_at, document) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            &[
                &issuer,
                &number_sql,
                &credited.customer,
                &invoice_sql,
                &made.currency,
                &made.net,
                &made.tax,
                &made.total,
                &made.settlement,
                &made.reason,
                &now,
                &made.document,
            ],
        )
        .await
        .context(format!("writing credit note {number} of {issuer}"))?;
        tx.execute(
            "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
            &[
                &CREDIT_NOTES_TOPIC,
                &format!("{issuer}/{number}"),
                &made.document,
            ],
        )
        .await
        .context("queueing the credit note for ClickHouse")?;
        if let Some(copy) = &made.deposit_copy {
            let deposit_id = format!("credit_note:{number}");
            tx.execute(
                "INSERT INTO wallet_deposits (issuer, customer, deposit_id, amount, deposited_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[&issuer, &credited.customer, &deposit_id, &made.total, &now],
            )
            .await
            .context(format!("recording deposit {deposit_id}"))?;
            tx.execute(
                "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
                &[
                    &WALLET_DEPOSITS_TOPIC,
                    &format!("{issuer}/{}/{deposit_id}", credited.customer),
                    copy,
                ],
            )
            .await
            .context("queueing the deposit for ClickHouse")?;
        }
        queue_event(
            &tx,
            &BillingEvent::credit_note_issued(issuer, number, &made, now),
        )
        .await?;
        store_series(&tx, issuer, Series::CreditNote, number + 1).await?;
        tx.commit().await.context("committing the credit note")?;
        Ok((number, made))
    }

    /// Queues `event` unless an event with its id was queued before (in
    /// any state): `false` then. For events detected by polling, such as
    /// `customer.spend_limit_reached`, whose id names what happened once.
    pub async fn queue_event_once(&self, event: &BillingEvent) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.context("begin")?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('event:' || $1))",
            &[&event.id],
        )
        .await
        .context("locking the event id")?;
        let queued = tx
            .query_opt(
                "SELECT 1 FROM outbox WHERE topic = $1 AND key = $2",
                &[&BILLING_EVENTS_TOPIC, &event.id],
            )
            .await
            .context("looking for the event")?
            .is_some();
        if !queued {
            queue_event(&tx, event).await?;
        }
        tx.commit().await.context("committing the event")?;
        Ok(!queued)
    }

    /// A customer's credit balance in the ledger: notes settled to the next
    /// invoice and negative totals carried, less what invoices applied.
    pub async fn credit_balance(&self, issuer: &str, customer: &str) -> Result<Decimal> {
        let client = self.client().await?;
        let row = client
            .query_one(CREDIT_BALANCE_SQL, &[&issuer, &customer])
            .await
            .context("reading a credit balance")?;
        Ok(row.get(0))
    }

    /// A customer's wallet balance in the ledger: deposits less what
    /// issued invoices drew.
    pub async fn wallet_balance(&self, issuer: &str, customer: &str) -> Result<Decimal> {
        let client = self.client().await?;
        let row = client
            .query_one(WALLET_BALANCE_SQL, &[&issuer, &customer])
            .await
            .context("reading a wallet")?;
        Ok(row.get(0))
    }

    /// The next number of a series (what the next document would get).
    pub async fn next_number(&self, issuer: &str, series: Series) -> Result<u64> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT next_number FROM invoice_series WHERE issuer = $1 AND series = $2",
                &[&issuer, &series.as_str()],
            )
            .await
            .context("next number")?;
        Ok(row.map_or(1, |row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(1)))
    }

    /// Issued invoice numbers of `issuer`, ascending.
    pub async fn invoice_numbers(&self, issuer: &str) -> Result<Vec<u64>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT number FROM invoices WHERE issuer = $1 ORDER BY number",
                &[&issuer],
            )
            .await
            .context("invoice numbers")?;
        Ok(rows
            .iter()
            .map(|row| u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
            .collect())
    }

    /// Up to `limit` undelivered outbox items of `topic`, oldest first.
    pub async fn pending(&self, topic: &str, limit: i64) -> Result<Vec<OutboxItem>> {
        self.outbox_items(topic, limit, false).await
    }

    /// Up to `limit` undelivered items of `topic` whose next attempt is
    /// due, oldest first.
    pub async fn due(&self, topic: &str, limit: i64) -> Result<Vec<OutboxItem>> {
        self.outbox_items(topic, limit, true).await
    }

    async fn outbox_items(
        &self,
        topic: &str,
        limit: i64,
        only_due: bool,
    ) -> Result<Vec<OutboxItem>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, key, payload FROM outbox WHERE topic = $1 AND delivered_at IS NULL \
                 AND (NOT $3 OR next_attempt_at <= now()) ORDER BY id LIMIT $2",
                &[&topic, &limit, &only_due],
            )
            .await
            .context(format!("outbox of {topic}"))?;
        Ok(rows
            .iter()
            .map(|row| OutboxItem {
                id: row.get(0),
                key: row.get(1),
                payload: row.get(2),
            })
            .collect())
    }

    /// Records a failed attempt of an item: the next one is due after
    /// `initial x 2^(failed attempts before)`, at most `max`. Returns the
    /// attempts so far.
    pub async fn attempt_failed(
        &self,
        id: i64,
        error: &str,
        (initial, max): (std::time::Duration, std::time::Duration),
    ) -> Result<i32> {
        let client = self.client().await?;
        let (initial, max) = (initial.as_secs_f64(), max.as_secs_f64());
        let row = client
            .query_one(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $2, \
                 next_attempt_at = now() + make_interval(secs => \
                     least($4::float8, $3::float8 * power(2, least(attempts, 30)))) \
                 WHERE id = $1 RETURNING attempts",
                &[&id, &error, &initial, &max],
            )
            .await
            .context("recording a failed delivery")?;
        Ok(row.get(0))
    }

    /// Marks outbox items delivered (after their copy was written).
    pub async fn delivered(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        client
            .execute(
                "UPDATE outbox SET delivered_at = now() WHERE id = ANY($1) AND delivered_at IS NULL",
                &[&ids],
            )
            .await
            .context("marking the outbox delivered")?;
        Ok(())
    }
}

/// Writes one invoice row.
async fn insert_invoice(
    tx: &deadpool_postgres::Transaction<'_>,
    issuer: &str,
    number: i64,
    issued_at: DateTime<Utc>,
    record: &InvoiceRecord,
) -> Result<()> {
    tx.execute(
        "INSERT INTO invoices (issuer, number, customer, period_start, period_end, \
         currency, total, wallet_applied, issued_at, document, balance_applied, balance_carried) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &[
            &issuer,
            &number,
            &record.customer,
            &record.period_start,
            &record.period_end,
            &record.currency,
            &record.total,
            &record.wallet_applied,
            &issued_at,
            &record.document,
            &record.balance_applied,
            &record.balance_carried,
        ],
    )
    .await
    .context(format!("writing invoice {number} of {issuer}"))?;
    Ok(())
}

/// A wallet's balance: deposits less what issued invoices drew.
const WALLET_BALANCE_SQL: &str = "SELECT \
     (SELECT COALESCE(sum(amount), 0) FROM wallet_deposits WHERE issuer = $1 AND customer = $2) \
     - (SELECT COALESCE(sum(wallet_applied), 0) FROM invoices WHERE issuer = $1 AND customer = $2)";

/// A credit balance: notes settled to the next invoice, plus negative
/// totals carried, less what invoices applied.
const CREDIT_BALANCE_SQL: &str = "SELECT \
     (SELECT COALESCE(sum(total), 0) FROM credit_notes \
      WHERE issuer = $1 AND customer = $2 AND settlement = 'next_invoice') \
     + (SELECT COALESCE(sum(balance_carried - balance_applied), 0) FROM invoices \
        WHERE issuer = $1 AND customer = $2)";

/// A balance an invoice draws from, checked before it is issued.
#[derive(Debug, Clone, Copy)]
enum Drawn {
    /// Prepaid deposits (`wallet_applied`).
    Wallet,
    /// Credit notes settled to the next invoice and negative totals carried
    /// (`balance_applied`).
    CreditBalance,
}

impl Drawn {
    /// What `record` draws from this balance.
    fn applied(self, record: &InvoiceRecord) -> Decimal {
        match self {
            Self::Wallet => record.wallet_applied,
            Self::CreditBalance => record.balance_applied,
        }
    }

    /// Refuses (the inner error, saying why) an invoice drawing more than
    /// the customer's balance holds now, under a lock on the balance so
    /// that two issuers cannot both spend it.
    async fn check(
        self,
        tx: &deadpool_postgres::Transaction<'_>,
        issuer: &str,
        record: &InvoiceRecord,
    ) -> Result<std::result::Result<(), String>> {
        let applied = self.applied(record);
        if applied <= Decimal::ZERO {
            return Ok(Ok(()));
        }
        let (name, lock, balance_sql) = match self {
            Self::Wallet => ("wallet", "wallet", WALLET_BALANCE_SQL),
            Self::CreditBalance => ("credit balance", "balance", CREDIT_BALANCE_SQL),
        };
        let lock_key = format!("{lock}:{issuer}:{}", record.customer);
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock_key])
            .await
            .context(format!("locking the {name}"))?;
        let row = tx
            .query_one(balance_sql, &[&issuer, &record.customer])
            .await
            .context(format!("reading the {name}"))?;
        let balance: Decimal = row.get(0);
        if applied > balance {
            return Ok(Err(format!(
                "the invoice of {} draws {applied} from a {name} holding {balance}: refused; the next run bills with the {name} as it is then",
                record.customer
            )));
        }
        Ok(Ok(()))
    }
}

/// Queues a billing event in the transaction that made it happen.
async fn queue_event(tx: &deadpool_postgres::Transaction<'_>, event: &BillingEvent) -> Result<()> {
    let payload = serde_json::to_value(event)
        .map_err(|error| Error::Refused(format!("billing event {}: {error}", event.id)))?;
    tx.execute(
        "INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3)",
        &[&BILLING_EVENTS_TOPIC, &event.id, &payload],
    )
    .await
    .context("queueing a billing event")?;
    Ok(())
}

/// Locks a series' row (creating it at 1) and returns its next number.
async fn claim_series(
    tx: &deadpool_postgres::Transaction<'_>,
    issuer: &str,
    series: Series,
) -> Result<u64> {
    tx.execute(
        "INSERT INTO invoice_series (issuer, series, next_number) VALUES ($1, $2, 1) \
         ON CONFLICT DO NOTHING",
        &[&issuer, &series.as_str()],
    )
    .await
    .context("creating the series")?;
    let row = tx
        .query_one(
            "SELECT next_number FROM invoice_series WHERE issuer = $1 AND series = $2 FOR UPDATE",
            &[&issuer, &series.as_str()],
        )
        .await
        .context("locking the series")?;
    u64::try_from(row.get::<_, i64>(0))
        .map_err(|_| Error::Settings("a series' next number is below 1".to_owned()))
}

async fn store_series(
    tx: &deadpool_postgres::Transaction<'_>,
    issuer: &str,
    series: Series,
    next: u64,
) -> Result<()> {
    let next = i64::try_from(next)
        .map_err(|_| Error::Refused(format!("{} number {next} overflows", series.as_str())))?;
    tx.execute(
        "UPDATE invoice_series SET next_number = $3 WHERE issuer = $1 AND series = $2",
        &[&issuer, &series.as_str(), &next],
    )
    .await
    .context("advancing the series")?;
    Ok(())
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}
