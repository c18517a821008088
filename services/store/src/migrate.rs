//! Schema migrations: the SQL files of `migrations/`, applied in order and
//! recorded in `schema_migrations` with a checksum.
//!
//! Applying is idempotent (applied files are skipped, and every statement is
//! `IF NOT EXISTS`, so a crash between a statement and its record is harmless on
//! rerun) and refuses a file whose content changed after it was applied.
//! Migrations are compiled into the binary so a deployed `idlemeter migrate`
//! cannot drift from the code that reads the tables.

use sha2::{Digest, Sha256};

use crate::cluster::ClusterDdl;
use crate::sql::Fetch;
use crate::{Context, Error, Result, Store};

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migration {
    ($name:literal) => {
        Migration {
            name: $name,
            sql: include_str!(concat!("../../../migrations/", $name)),
        }
    };
}

/// Migration 0010's backfill: the minute rows of every stored sample, as
/// ingest would have written them (for fixtures that insert samples).
pub fn minutes_from_samples_sql() -> &'static str {
    const SQL: &str = include_str!("../../../migrations/0010_compacted.sql");
    let start = SQL
        .find("INSERT INTO usage_minutes")
        .expect("migration 0010 has its backfill");
    SQL[start..].trim().trim_end_matches(';')
}

/// Every migration, in order. A test checks this list against the directory.
pub const MIGRATIONS: &[Migration] = &[
    migration!("0001_usage_samples.sql"),
    migration!("0002_usage_hourly.sql"),
    migration!("0003_rated_usage.sql"),
    migration!("0004_policy.sql"),
    migration!("0005_invoices.sql"),
    migration!("0006_api.sql"),
    migration!("0007_sample_detail.sql"),
    migration!("0008_state_counters.sql"),
    migration!("0009_rating_state.sql"),
    migration!("0010_compacted.sql"),
    migration!("0011_rated_quantities.sql"),
    migration!("0012_usage_events.sql"),
    migration!("0013_credit_notes.sql"),
    migration!("0014_customers.sql"),
    migration!("0015_node_costs.sql"),
    migration!("0016_invoice_buyer.sql"),
    migration!("0017_rating_state_counts.sql"),
];

impl Migration {
    /// Hex SHA-256 of the file's bytes.
    pub fn checksum(&self) -> String {
        Sha256::digest(self.sql.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// The statements of the file: comments dropped, split at `;` ending a line.
    pub fn statements(&self) -> Vec<String> {
        let without_comments: String = self
            .sql
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        without_comments
            .split(";\n")
            .map(|statement| statement.trim().trim_end_matches(';').trim().to_owned())
            .filter(|statement| !statement.is_empty())
            .collect()
    }
}

/// What a migration run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<&'static str>,
    pub already_applied: Vec<&'static str>,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct AppliedRow {
    name: String,
    checksum: String,
}

#[derive(Debug, clickhouse::Row, serde::Serialize)]
struct AppliedInsert<'a> {
    name: &'a str,
    checksum: &'a str,
    applied_at: u32,
}

impl Store {
    /// Creates the database if needed and applies every pending migration.
    pub async fn migrate(&self, now_unix: u32) -> Result<MigrationReport> {
        let database = self.database_ident()?;
        let cluster = match self.cluster() {
            Some(cluster) => Some(ClusterDdl::new(cluster, database)?),
            None => None,
        };
        let create_database = match &cluster {
            Some(cluster) => cluster.create_database(),
            None => format!("CREATE DATABASE IF NOT EXISTS {database}"),
        };
        self.server
            .query(&create_database)
            .execute()
            .await
            .context(create_database.clone())?;
        let create_record = "CREATE TABLE IF NOT EXISTS schema_migrations \
             (name String, checksum String, applied_at DateTime) \
             ENGINE = MergeTree ORDER BY name";
        for statement in translated(cluster.as_ref(), create_record)? {
            self.client
                .query(&statement)
                .execute()
                .await
                .context("create schema_migrations")?;
        }
        let applied: Vec<AppliedRow> = self
            .client
            .query("SELECT name, checksum FROM schema_migrations ORDER BY name")
            .all("read schema_migrations")
            .await?;

        let mut report = MigrationReport::default();
        for migration in MIGRATIONS {
            let checksum = migration.checksum();
            if let Some(row) = applied.iter().find(|row| row.name == migration.name) {
                if row.checksum != checksum {
                    return Err(Error::ChangedMigration {
                        name: migration.name.to_owned(),
                        applied: row.checksum.clone(),
                        current: checksum,
                    });
                }
                report.already_applied.push(migration.name);
                continue;
            }
            self.apply(migration, cluster.as_ref(), &checksum, now_unix)
                .await?;
            report.applied.push(migration.name);
        }
        Ok(report)
    }

    async fn apply(
        &self,
        migration: &Migration,
        cluster: Option<&ClusterDdl>,
        checksum: &str,
        now_unix: u32,
    ) -> Result<()> {
        for (index, written) in migration.statements().iter().enumerate() {
            for statement in translated(cluster, written)? {
                let query = match cluster {
                    // A distributed DDL waits for every server; see below for
                    // when that wait is cut short.
                    Some(_) => self
                        .client
                        .query(&statement)
                        .with_setting("distributed_ddl_task_timeout", DDL_WAIT_S.to_string()),
                    None => self.client.query(&statement),
                };
                match query.execute().await {
                    Ok(()) => {}
                    // A rerun after a crash between an ADD COLUMN and its record
                    // (18.16 has no IF NOT EXISTS there): the columns are in place.
                    Err(error) if adds_columns(&statement) && column_exists(&error) => {
                        tracing::info!(
                            migration = migration.name,
                            statement = index + 1,
                            "columns already added by an earlier, unrecorded run"
                        );
                    }
                    // ClickHouse 18.16's DDL worker can leave a replicated
                    // ALTER ON CLUSTER unacknowledged by the second replica of
                    // a shard ("Node exists: .../executed") although the
                    // other replica applied it, which replication carries:
                    // done once every server has the columns.
                    Err(error)
                        if cluster.is_some()
                            && adds_columns(&statement)
                            && ddl_timed_out(&error) =>
                    {
                        self.await_columns_everywhere(&statement)
                            .await
                            .context(format!("{} statement {}", migration.name, index + 1))?;
                    }
                    Err(error) => {
                        return Err(error).context(format!(
                            "{} statement {}",
                            migration.name,
                            index + 1
                        ))
                    }
                }
            }
        }
        let mut insert = self
            .client
            .insert::<AppliedInsert<'_>>("schema_migrations")
            .await
            .context("record migration")?;
        insert
            .write(&AppliedInsert {
                name: migration.name,
                checksum,
                applied_at: now_unix,
            })
            .await
            .context("record migration")?;
        insert.end().await.context("record migration")?;
        tracing::info!(migration = migration.name, "applied migration");
        Ok(())
    }

    /// The database name, checked to be a plain identifier because `CREATE
    /// DATABASE` cannot take a bound parameter.
    fn database_ident(&self) -> Result<&str> {
        let valid = !self.database.is_empty()
            && self
                .database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid {
            Ok(&self.database)
        } else {
            Err(Error::BadRow(format!(
                "database name {:?} must be letters, digits and underscores",
                self.database
            )))
        }
    }
}

/// The statements to run for one written statement: itself on one server,
/// its cluster translation on a cluster.
fn translated(cluster: Option<&ClusterDdl>, statement: &str) -> Result<Vec<String>> {
    match cluster {
        Some(cluster) => cluster.translate(statement),
        None => Ok(vec![statement.to_owned()]),
    }
}

/// How long a distributed DDL statement waits for every server.
const DDL_WAIT_S: u64 = 60;

/// "Watching task ... is executing longer than distributed_ddl_task_timeout".
fn ddl_timed_out(error: &clickhouse::error::Error) -> bool {
    error.to_string().contains("distributed_ddl_task_timeout")
}

impl Store {
    /// Waits (up to [`DDL_WAIT_S`]) until every server of the cluster has
    /// the columns an `ALTER TABLE db.t ON CLUSTER c ADD COLUMN ...` adds.
    async fn await_columns_everywhere(
        &self,
        statement: &str,
    ) -> Result<(), clickhouse::error::Error> {
        let words: Vec<&str> = statement.split_whitespace().collect();
        let (Some(table), Some(cluster)) = (words.get(2), words.get(5)) else {
            return Err(clickhouse::error::Error::Custom(format!(
                "not an ALTER ... ON CLUSTER: {statement}"
            )));
        };
        let table = table.rsplit('.').next().unwrap_or(table);
        let columns: Vec<&str> = words
            .windows(3)
            .filter(|w| w[0].eq_ignore_ascii_case("ADD") && w[1].eq_ignore_ascii_case("COLUMN"))
            .map(|w| w[2])
            .collect();
        let hosts: Vec<(String, u16)> = self
            .client
            .query("SELECT host_address, port FROM system.clusters WHERE cluster = ?")
            .bind(*cluster)
            .fetch_all()
            .await?;
        let addresses = hosts
            .iter()
            .map(|(host, port)| format!("{host}:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let expected = (hosts.len() * columns.len()) as u64;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(DDL_WAIT_S);
        loop {
            // Addresses joined by commas: each server is asked.
            let found: u64 = self
                .client
                .query(&format!(
                    "SELECT count() FROM remote('{addresses}', system, columns) \
                     WHERE database = ? AND table = ? AND has(?, name)"
                ))
                .bind(&self.database)
                .bind(table)
                .bind(&columns)
                .fetch_one()
                .await?;
            if found == expected {
                tracing::warn!(%table, ?columns, "distributed ALTER unacknowledged by a server that has its columns; continuing");
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(clickhouse::error::Error::Custom(format!(
                    "{found} of {expected} columns of {table} on the cluster's servers after {DDL_WAIT_S} s"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}

/// Whether a statement is an `ALTER TABLE ... ADD COLUMN`.
fn adds_columns(statement: &str) -> bool {
    let normalised = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    let upper = normalised.to_ascii_uppercase();
    upper.starts_with("ALTER TABLE ") && upper.contains(" ADD COLUMN ")
}

/// "Cannot add column x: column with this name already exists": code 44 on
/// 18.16, 15 (DUPLICATE_COLUMN) on current versions.
fn column_exists(error: &clickhouse::error::Error) -> bool {
    error
        .to_string()
        .contains("column with this name already exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_list_matches_the_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .expect("migrations dir")
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        on_disk.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(on_disk, listed, "MIGRATIONS must list every file, in order");
    }

    #[test]
    fn statements_split_at_line_ending_semicolons_and_drop_comments() {
        let migration = Migration {
            name: "x.sql",
            sql: "-- a comment; with a semicolon\nCREATE TABLE a (s String DEFAULT ';')\nENGINE = Log;\n\nCREATE VIEW b AS SELECT 1;\n",
        };
        assert_eq!(
            migration.statements(),
            vec![
                "CREATE TABLE a (s String DEFAULT ';')\nENGINE = Log".to_owned(),
                "CREATE VIEW b AS SELECT 1".to_owned()
            ]
        );
    }
}
