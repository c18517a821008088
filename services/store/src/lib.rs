//! ClickHouse adapter of idlemeter: schema migrations, sample inserts and the
//! rollup queries, on ClickHouse 18.16 through current releases.
//!
//! SQL is kept to what both ends accept (see "Supported servers" in the README): no
//! `DateTime64`, no server-side query parameters, no window functions. Values are
//! bound with the clickhouse crate's client-side `?` binding, never formatted into
//! SQL. Schema validation is off because it needs the
//! `RowBinaryWithNamesAndTypes` format that 18.16 lacks; the row structs here are
//! checked against the migrations by the integration tests instead.

mod accounts;
mod alerts;
pub mod cluster;
mod customers;
pub mod document;
mod events;
mod invoices;
mod keys;
mod margin;
mod migrate;
mod minutes;
pub mod pdf;
mod policy;
mod rated;
mod samples;
mod sandboxes;
mod spend;
mod sql;
mod state;
mod usage;

use serde::Deserialize;

pub use accounts::{ratings_checksum, with_policy, AccountReader, Accounts, Adjusted, SheetSource};
pub use alerts::{AlertFiringRow, SpendAlertRow};
pub use customers::{Currencies, CurrencyLane, CustomerRow, SubscriptionRow};
pub use document::{BillContext, CreditNote, CreditNoteLine, Invoice, Line};
pub use events::{
    EventRow, MeterQuery, MeterValueRow, MeterWindowRow, MeteredRange, METER_TOTALS_SQL,
    METER_WINDOWS_SQL,
};
pub use invoices::{
    CreditNoteLineRow, CreditNoteRow, CreditNoteRows, InvoiceLineRow, InvoiceRow, IssuedRows,
    WalletDepositRow,
};
pub use keys::ApiKeyRow;
pub use margin::NodeCostRow;
pub use migrate::{minutes_from_samples_sql, Migration, MigrationReport, MIGRATIONS};
pub use minutes::CompactedRows;
pub use policy::{DecisionRow, PolicyStateRow};
pub use rated::{
    from_column, to_column, Counted, RatedLineRow, RatingChangeRow, MONEY_SCALE,
    SAMPLES_FOR_RATING_SQL,
};
pub use samples::SampleRow;
pub use sandboxes::{SandboxStateRow, SANDBOX_STATE_SQL};
pub use spend::{LatestSpend, SnapshotLine, SNAPSHOT_LINES_SQL};
pub use state::{RatedQuantities, RatedThrough, RatingErrorRow, RatingStateRow, SavedState};
pub use usage::{
    unix_ms, unix_seconds, SandboxRange, Window, USAGE_WINDOW_MINUTE_SQL, USAGE_WINDOW_ROLLUP_SQL,
};

/// Where and as whom to reach ClickHouse.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseSettings {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub database: String,
    #[serde(default = "default_user")]
    pub user: String,
    /// Printed redacted (`idlemeter config`, logs).
    #[serde(default)]
    pub password: idlemeter_core::Secret,
    /// The ClickHouse cluster (a `remote_servers` name) to run on: migrations
    /// then create replicated tables sharded by customer and distributed
    /// tables over them (see [`cluster`]). Unset: one server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Cluster mode: a replica further behind its shard than this many
    /// seconds (one just restarted, catching up) serves no read; the
    /// shard's other replicas do, and with none fresh the read fails and is
    /// retried, rather than bill from rows a replica has not received yet.
    #[serde(default = "default_max_replica_delay_s")]
    pub max_replica_delay_s: u64,
}

/// The default of [`ClickHouseSettings::max_replica_delay_s`].
pub const DEFAULT_MAX_REPLICA_DELAY_S: u64 = 5;

fn default_max_replica_delay_s() -> u64 {
    DEFAULT_MAX_REPLICA_DELAY_S
}

fn default_user() -> String {
    "default".to_owned()
}

/// Errors of the store, with the statement or table they concern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("clickhouse {context}: {source}")]
    ClickHouse {
        context: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("migration {name} was changed after it was applied (applied checksum {applied}, file checksum {current}); add a new migration instead")]
    ChangedMigration {
        name: String,
        applied: String,
        current: String,
    },
    #[error("stored row is invalid: {0}")]
    BadRow(String),
    /// A statement of this crate that cannot be bound (a bug, found by the
    /// first test that runs it).
    #[error("{0}")]
    BadStatement(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// ClickHouse error codes that mean the data itself cannot be inserted:
/// parse and type errors, values out of range, too many partitions in one
/// block. Retrying the same rows fails the same way.
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO (an operator's check in a column)
    407, // DECIMAL_OVERFLOW
    469, // VIOLATED_CONSTRAINT
];

impl Error {
    /// Whether retrying the same statement with the same rows can succeed:
    /// false for errors about the data (see [`PERMANENT_CODES`], and
    /// "Too many partitions for single INSERT block", whose code 252 is
    /// shared with the transient "too many parts"); true for everything
    /// else (network, timeouts, memory, a server starting or read-only).
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::BadRow(_) => true,
            Error::ChangedMigration { .. } => true,
            Error::BadStatement(_) => true,
            Error::ClickHouse { source, .. } => match source {
                clickhouse::error::Error::BadResponse(text) => {
                    text.contains("Too many partitions for single INSERT block")
                        || exception_code(text).is_some_and(|code| PERMANENT_CODES.contains(&code))
                }
                _ => false,
            },
        }
    }
}

/// The code of a ClickHouse exception text (`Code: 252. DB::Exception: ...`).
fn exception_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

pub(crate) trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
}

impl<T> Context<T> for Result<T, clickhouse::error::Error> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::ClickHouse {
            context: context.into(),
            source,
        })
    }
}

/// A handle on idlemeter's ClickHouse database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: clickhouse::Client,
    /// Same server, no database selected: for `CREATE DATABASE`.
    server: clickhouse::Client,
    database: String,
    cluster: Option<String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("database", &self.database)
            .finish()
    }
}

impl Store {
    /// The same store with every query limited to `seconds` of server time
    /// (ClickHouse `max_execution_time`): a caller that gives up on a
    /// request (the API's request timeout) does not leave its query running.
    pub fn with_max_execution_time(mut self, seconds: u64) -> Self {
        self.client = self
            .client
            .with_setting("max_execution_time", seconds.max(1).to_string());
        self
    }

    pub fn new(settings: &ClickHouseSettings) -> Self {
        let server = clickhouse::Client::default()
            .with_url(&settings.url)
            .with_user(&settings.user)
            .with_password(settings.password.expose())
            .with_validation(false);
        let mut client = server.clone().with_database(&settings.database);
        if settings.cluster.is_some() {
            // An insert returns once every shard has its rows (the ingest
            // commits its offsets after that); a subquery over a distributed
            // table inside a distributed query reads each shard's own rows,
            // which is whole because tables are sharded by customer; reads and
            // writes prefer the first live replica of each shard, so a reader
            // sees what was just written while that replica is up; a replica
            // that fell behind (restarted, catching up) is read from only
            // once it is within `max_replica_delay_s` of its shard.
            client = client
                .with_setting("insert_distributed_sync", "1")
                .with_setting("distributed_product_mode", "local")
                .with_setting("load_balancing", "in_order")
                .with_setting(
                    "max_replica_delay_for_distributed_queries",
                    settings.max_replica_delay_s.max(1).to_string(),
                )
                .with_setting("fallback_to_stale_replicas_for_distributed_queries", "0");
        }
        Self {
            client,
            server,
            database: settings.database.clone(),
            cluster: settings.cluster.clone(),
        }
    }

    /// The cluster this store runs on (`[clickhouse] cluster`), if any.
    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// The underlying client, for queries this crate does not wrap yet (tests,
    /// admin commands).
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Inserts `rows` into `table` in one INSERT (one block: ClickHouse makes
    /// all of them visible at once, or none). Nothing is sent for no rows.
    pub(crate) async fn insert_rows<T>(&self, table: &str, rows: &[T]) -> Result<()>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let context = || format!("insert {table}");
        let mut insert = self.client.insert::<T>(table).await.context(context())?;
        for row in rows {
            insert.write(row).await.context(context())?;
        }
        insert.end().await.context(context())
    }

    /// Runs a read-only query built by the caller from trusted parts (the
    /// dashboards' panel SQL with integer placeholders filled in) and returns
    /// its rows as text: a header row of column names, then one row per
    /// result row (TabSeparatedWithNames, unescaped).
    pub async fn query_rows(&self, sql: &str) -> Result<Vec<Vec<String>>> {
        let bytes = self
            .client
            .query(sql)
            .fetch_bytes("TabSeparatedWithNames")
            .context("panel query")?
            .collect()
            .await
            .context("panel query")?;
        let text = String::from_utf8_lossy(&bytes);
        Ok(text
            .lines()
            .map(|line| {
                line.split('\t')
                    .map(|field| {
                        field
                            .replace("\\t", "\t")
                            .replace("\\n", "\n")
                            .replace("\\\\", "\\")
                    })
                    .collect()
            })
            .collect())
    }

    /// Checks that the server answers.
    pub async fn ping(&self) -> Result<()> {
        self.server
            .query("SELECT 1")
            .fetch_one::<u8>()
            .await
            .context("ping")
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(text: &str) -> Error {
        Error::ClickHouse {
            context: "insert".to_owned(),
            source: clickhouse::error::Error::BadResponse(text.to_owned()),
        }
    }

    /// Finding "poison messages stall ingest": errors about the rows are
    /// told from errors about the server.
    #[test]
    fn permanent_errors_are_told_from_transient_ones() {
        for permanent in [
            "Code: 252, e.displayText() = DB::Exception: Too many partitions for single INSERT block (more than 100).",
            "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). (TOO_MANY_PARTS)",
            "Code: 53. DB::Exception: Type mismatch",
            "Code: 407. DB::Exception: Decimal math overflow",
        ] {
            assert!(response(permanent).is_permanent(), "{permanent}");
        }
        for transient in [
            "Code: 252. DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts",
            "Code: 241. DB::Exception: Memory limit (total) exceeded",
            "Code: 242. DB::Exception: Table is in readonly mode",
            "upstream connect error",
        ] {
            assert!(!response(transient).is_permanent(), "{transient}");
        }
        let network = Error::ClickHouse {
            context: "insert".to_owned(),
            source: clickhouse::error::Error::TimedOut,
        };
        assert!(!network.is_permanent());
    }
}
