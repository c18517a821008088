//! Cluster mode (`[clickhouse] cluster = "<name>"`): the same migrations,
//! turned into replicated and distributed tables on every server of a
//! ClickHouse cluster.
//!
//! A migration file is written once, for one server. On a cluster each of its
//! statements becomes, with `ON CLUSTER` and database-qualified names:
//!
//! - `CREATE TABLE t (...) ENGINE = XMergeTree(args) ...` of a table with a
//!   `customer` column (or `customers`, keyed by `id`): a local table `t_local`,
//!   `ReplicatedXMergeTree('/clickhouse/tables/{shard}/<db>/t_local',
//!   '{replica}', args)`, and `t` itself as `Distributed` over it, sharded by
//!   `cityHash64(customer)`. Every row of a customer lives on one shard, so
//!   `FINAL`, per-customer reads and joins on the customer stay on that shard
//!   (the store sets `distributed_product_mode = 'local'`).
//! - the same statement for a table without a customer ([`GLOBAL_TABLES`]: the
//!   node cost sheet, the migration record): one replicated table under its own
//!   name, with one ZooKeeper path for the whole cluster, so every server holds
//!   all of it and a join reads it locally.
//! - `CREATE MATERIALIZED VIEW v TO t AS SELECT ... FROM s`: the view on every
//!   server, from `s_local` to `t_local` (an insert reaches the view on the
//!   replica that receives it; replication copies the view's rows).
//! - `ALTER TABLE t ...`: the local table; the distributed one is made again
//!   over it.
//! - `DROP TABLE`: on every server. `INSERT ... SELECT`: unchanged (it reads
//!   and writes through the distributed tables).
//!
//! Anything else is refused, so a new migration cannot slip past the cluster
//! untranslated: `every_migration_translates` checks them all.

use std::collections::BTreeMap;

use crate::migrate::{Migration, MIGRATIONS};
use crate::{Error, Result};

/// Tables without a customer: replicated whole on every server.
pub const GLOBAL_TABLES: &[&str] = &["node_costs", "schema_migrations"];

/// Tables whose customer column has another name.
const SHARD_COLUMNS: &[(&str, &str)] = &[("customers", "id")];

/// Where a table's rows live on a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// `Distributed` over `<name>_local`, sharded by this expression.
    Sharded(String),
    /// Replicated to every server under its own name.
    Global,
}

/// The cluster and database a migration is translated for.
#[derive(Debug, Clone)]
pub struct ClusterDdl {
    cluster: String,
    database: String,
    placements: BTreeMap<String, Placement>,
}

impl ClusterDdl {
    /// Reads every migration's `CREATE TABLE` to place its table.
    pub fn new(cluster: &str, database: &str) -> Result<Self> {
        check_ident("cluster", cluster)?;
        check_ident("database", database)?;
        let mut placements = BTreeMap::new();
        placements.insert("schema_migrations".to_owned(), Placement::Global);
        for migration in MIGRATIONS {
            for statement in migration.statements() {
                if let Some(create) = CreateTable::parse(&statement) {
                    let placement = placement_of(&create, migration)?;
                    placements.insert(create.name.to_owned(), placement);
                }
            }
        }
        Ok(Self {
            cluster: cluster.to_owned(),
            database: database.to_owned(),
            placements,
        })
    }

    /// `CREATE DATABASE` on every server.
    pub fn create_database(&self) -> String {
        format!(
            "CREATE DATABASE IF NOT EXISTS {} ON CLUSTER {}",
            self.database, self.cluster
        )
    }

    /// The cluster statements of one migration statement.
    pub fn translate(&self, statement: &str) -> Result<Vec<String>> {
        let words: Vec<&str> = statement.split_whitespace().collect();
        let upper = |i: usize| words.get(i).map(|w| w.to_ascii_uppercase());
        match (upper(0).as_deref(), upper(1).as_deref()) {
            (Some("CREATE"), Some("TABLE")) => self.create_table(statement),
            (Some("CREATE"), Some("MATERIALIZED")) => self.create_view(statement, &words),
            (Some("ALTER"), Some("TABLE")) => self.alter(statement, &words),
            (Some("DROP"), Some("TABLE")) => {
                let name = *words.last().unwrap_or(&"");
                Ok(vec![format!(
                    "DROP TABLE IF EXISTS {}.{} ON CLUSTER {}",
                    self.database, name, self.cluster
                )])
            }
            (Some("INSERT"), Some("INTO")) => Ok(vec![statement.to_owned()]),
            _ => Err(unsupported(statement, "not a statement cluster mode knows")),
        }
    }

    fn create_table(&self, statement: &str) -> Result<Vec<String>> {
        let create = CreateTable::parse(statement).ok_or_else(|| {
            unsupported(
                statement,
                "expected CREATE TABLE IF NOT EXISTS name (...) ENGINE = ...",
            )
        })?;
        let placement = self
            .placements
            .get(create.name)
            .cloned()
            .unwrap_or(Placement::Global);
        let (local, path) = match &placement {
            Placement::Sharded(_) => {
                let local = format!("{}_local", create.name);
                let path = format!("/clickhouse/tables/{{shard}}/{}/{local}", self.database);
                (local, path)
            }
            Placement::Global => {
                let path = format!("/clickhouse/tables/all/{}/{}", self.database, create.name);
                (create.name.to_owned(), path)
            }
        };
        let mut args = vec![format!("'{path}'"), "'{replica}'".to_owned()];
        if !create.engine_args.trim().is_empty() {
            args.push(create.engine_args.trim().to_owned());
        }
        let mut statements = vec![format!(
            "CREATE TABLE IF NOT EXISTS {db}.{local} ON CLUSTER {cluster} {columns} ENGINE = Replicated{engine}({args}) {rest}",
            db = self.database,
            cluster = self.cluster,
            columns = create.columns,
            engine = create.engine,
            args = args.join(", "),
            rest = create.rest,
        )];
        if let Placement::Sharded(key) = placement {
            statements.push(self.distributed(create.name, &key));
        }
        Ok(statements)
    }

    /// The distributed table `name` over `name_local`, on every server.
    fn distributed(&self, name: &str, key: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{name} ON CLUSTER {cluster} AS {db}.{name}_local \
             ENGINE = Distributed({cluster}, {db}, {name}_local, {key})",
            db = self.database,
            cluster = self.cluster,
        )
    }

    fn create_view(&self, statement: &str, words: &[&str]) -> Result<Vec<String>> {
        // CREATE MATERIALIZED VIEW IF NOT EXISTS v TO t AS SELECT ...
        let shape_ok = words.len() > 10
            && words[2].eq_ignore_ascii_case("VIEW")
            && words[3].eq_ignore_ascii_case("IF")
            && words[7].eq_ignore_ascii_case("TO")
            && words[9].eq_ignore_ascii_case("AS");
        if !shape_ok {
            return Err(unsupported(
                statement,
                "expected CREATE MATERIALIZED VIEW IF NOT EXISTS v TO t AS SELECT ...",
            ));
        }
        let (view, target) = (words[6], words[8]);
        let select = statement
            .find(words[10])
            .map(|at| &statement[at..])
            .unwrap_or_default();
        let mut rewritten = String::new();
        let mut tokens = select.split_inclusive(char::is_whitespace).peekable();
        while let Some(token) = tokens.next() {
            rewritten.push_str(token);
            if token.trim().eq_ignore_ascii_case("FROM") {
                if let Some(source) = tokens.next() {
                    let name = source.trim();
                    rewritten.push_str(&format!("{}.{}", self.database, self.local_name(name)));
                    rewritten.push_str(&source[name.len()..]);
                }
            }
        }
        Ok(vec![format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{view} ON CLUSTER {cluster} TO {db}.{target} AS {rewritten}",
            db = self.database,
            cluster = self.cluster,
            target = self.local_name(target),
        )])
    }

    fn alter(&self, statement: &str, words: &[&str]) -> Result<Vec<String>> {
        let name = words
            .get(2)
            .ok_or_else(|| unsupported(statement, "ALTER TABLE without a table"))?;
        let at = statement.find(name).unwrap_or_default() + name.len();
        let rest = &statement[at..];
        let on = |table: &str| {
            format!(
                "ALTER TABLE {}.{table} ON CLUSTER {}{rest}",
                self.database, self.cluster
            )
        };
        match self.placements.get(*name) {
            // ClickHouse 18.16 refuses `ALTER ... ON CLUSTER` of a distributed
            // table over replicated shards ("isn't replicated, but shard #1 is
            // replicated"): the distributed table, which holds no rows (inserts
            // are synchronous), is made again over the altered local one.
            Some(Placement::Sharded(key)) => Ok(vec![
                on(&format!("{name}_local")),
                format!(
                    "DROP TABLE IF EXISTS {}.{name} ON CLUSTER {}",
                    self.database, self.cluster
                ),
                self.distributed(name, key),
            ]),
            Some(Placement::Global) => Err(unsupported(
                statement,
                "ALTER of a table replicated to every server runs once per shard; add a new table instead",
            )),
            None => Err(unsupported(statement, "ALTER of a table no migration creates")),
        }
    }

    /// The name rows are stored under on each server.
    fn local_name(&self, table: &str) -> String {
        match self.placements.get(table) {
            Some(Placement::Sharded(_)) => format!("{table}_local"),
            _ => table.to_owned(),
        }
    }

    /// Where `table` lives, for tests and `idlemeter migrate`'s report.
    pub fn placement(&self, table: &str) -> Option<&Placement> {
        self.placements.get(table)
    }
}

fn placement_of(create: &CreateTable<'_>, migration: &Migration) -> Result<Placement> {
    if GLOBAL_TABLES.contains(&create.name) {
        return Ok(Placement::Global);
    }
    let column = SHARD_COLUMNS
        .iter()
        .find(|(table, _)| *table == create.name)
        .map_or("customer", |(_, column)| *column);
    if create.column_names().any(|name| name == column) {
        Ok(Placement::Sharded(format!("cityHash64({column})")))
    } else {
        Err(Error::BadRow(format!(
            "migration {}: table {} has no `{column}` column to shard by; \
             give it one or list it in cluster::GLOBAL_TABLES",
            migration.name, create.name
        )))
    }
}

fn check_ident(what: &str, value: &str) -> Result<()> {
    let valid = !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(Error::BadRow(format!(
            "{what} name {value:?} must be letters, digits and underscores"
        )))
    }
}

fn unsupported(statement: &str, why: &str) -> Error {
    let head: String = statement.chars().take(80).collect();
    Error::BadRow(format!("cluster mode cannot translate `{head}...`: {why}"))
}

/// `CREATE TABLE IF NOT EXISTS name (columns) ENGINE = Engine[(args)] rest`.
#[derive(Debug)]
struct CreateTable<'a> {
    name: &'a str,
    /// With its parentheses.
    columns: &'a str,
    engine: &'a str,
    engine_args: &'a str,
    rest: &'a str,
}

impl<'a> CreateTable<'a> {
    fn parse(statement: &'a str) -> Option<Self> {
        let prefix = "CREATE TABLE IF NOT EXISTS ";
        let normalised: String = statement.split_whitespace().collect::<Vec<_>>().join(" ");
        if !normalised.to_ascii_uppercase().starts_with(prefix) {
            return None;
        }
        let after_exists = statement.to_ascii_uppercase().find("EXISTS")? + "EXISTS".len();
        let tail = &statement[after_exists..];
        let open = tail.find('(')?;
        let name = tail[..open].trim();
        let close = open + matching_paren(&tail[open..])?;
        let columns = &tail[open..=close];
        let after = tail[close + 1..].trim_start();
        let after = after
            .strip_prefix("ENGINE")?
            .trim_start()
            .strip_prefix('=')?
            .trim_start();
        let engine_end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let engine = &after[..engine_end];
        let mut rest = &after[engine_end..];
        let mut engine_args = "";
        if rest.starts_with('(') {
            let end = matching_paren(rest)?;
            engine_args = &rest[1..end];
            rest = &rest[end + 1..];
        }
        if !engine.ends_with("MergeTree") || engine.starts_with("Replicated") {
            return None;
        }
        Some(Self {
            name,
            columns,
            engine,
            engine_args,
            rest: rest.trim(),
        })
    }

    /// The first word of each top-level entry of the column list.
    fn column_names(&self) -> impl Iterator<Item = &'a str> {
        let inner = &self.columns[1..self.columns.len() - 1];
        split_top_level(inner)
            .into_iter()
            .filter_map(|entry| entry.split_whitespace().next())
    }
}

/// The index of the parenthesis closing the one `text` starts with,
/// ignoring parentheses inside quoted strings.
fn matching_paren(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quoted = false;
    for (at, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(at);
                }
            }
            _ => {}
        }
    }
    None
}

/// `text` split at commas outside parentheses and quotes.
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut quoted, mut start) = (Vec::new(), 0i32, false, 0);
    for (at, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ddl() -> ClusterDdl {
        ClusterDdl::new("idlemeter", "db").expect("every migration places its tables")
    }

    #[test]
    fn every_migration_translates() {
        let ddl = ddl();
        for migration in MIGRATIONS {
            for statement in migration.statements() {
                let translated = ddl
                    .translate(&statement)
                    .unwrap_or_else(|error| panic!("{}: {error}", migration.name));
                assert!(!translated.is_empty(), "{}", migration.name);
                for sql in &translated {
                    let is_insert = sql.starts_with("INSERT");
                    assert!(is_insert || sql.contains(" ON CLUSTER idlemeter"), "{sql}");
                }
            }
        }
    }

    #[test]
    fn customer_tables_are_sharded_by_customer_and_the_rest_replicated_everywhere() {
        let ddl = ddl();
        let sharded = Placement::Sharded("cityHash64(customer)".to_owned());
        for table in [
            "usage_samples",
            "usage_minutes",
            "usage_hours",
            "rated_usage",
            "invoices",
            "policy_state",
        ] {
            assert_eq!(ddl.placement(table), Some(&sharded), "{table}");
        }
        assert_eq!(
            ddl.placement("customers"),
            Some(&Placement::Sharded("cityHash64(id)".to_owned()))
        );
        assert_eq!(ddl.placement("node_costs"), Some(&Placement::Global));
    }

    #[test]
    fn a_sharded_table_becomes_a_replicated_local_table_and_a_distributed_one() {
        let statements = ddl()
            .translate(
                "CREATE TABLE IF NOT EXISTS rated_usage\n(\n    customer String,\n    note String DEFAULT 'a, (b'\n)\nENGINE = ReplacingMergeTree(rated_at)\nPARTITION BY toYYYYMM(period_start)\nORDER BY (customer)",
            )
            .expect("translates");
        assert_eq!(statements.len(), 2);
        assert!(statements[0]
            .starts_with("CREATE TABLE IF NOT EXISTS db.rated_usage_local ON CLUSTER idlemeter ("));
        assert!(statements[0].contains("note String DEFAULT 'a, (b'"));
        assert!(statements[0].contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db/rated_usage_local', '{replica}', rated_at) PARTITION BY toYYYYMM(period_start)"
        ));
        assert_eq!(
            statements[1],
            "CREATE TABLE IF NOT EXISTS db.rated_usage ON CLUSTER idlemeter AS db.rated_usage_local ENGINE = Distributed(idlemeter, db, rated_usage_local, cityHash64(customer))"
        );
    }

    #[test]
    fn views_read_and_write_local_tables_and_alters_reach_both_tables() {
        let ddl = ddl();
        let view = ddl
            .translate("CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hours_mv TO usage_hours AS\nSELECT customer\nFROM usage_minutes\nGROUP BY customer")
            .expect("translates");
        assert_eq!(
            view,
            vec!["CREATE MATERIALIZED VIEW IF NOT EXISTS db.usage_hours_mv ON CLUSTER idlemeter TO db.usage_hours_local AS SELECT customer\nFROM db.usage_minutes_local\nGROUP BY customer"]
        );
        let alter = ddl
            .translate("ALTER TABLE invoices\n    ADD COLUMN x UInt8 DEFAULT 0")
            .expect("translates");
        assert_eq!(
            alter,
            vec![
                "ALTER TABLE db.invoices_local ON CLUSTER idlemeter\n    ADD COLUMN x UInt8 DEFAULT 0",
                "DROP TABLE IF EXISTS db.invoices ON CLUSTER idlemeter",
                "CREATE TABLE IF NOT EXISTS db.invoices ON CLUSTER idlemeter AS db.invoices_local ENGINE = Distributed(idlemeter, db, invoices_local, cityHash64(customer))",
            ]
        );
        assert!(ddl
            .translate("ALTER TABLE node_costs ADD COLUMN x UInt8")
            .is_err());
        assert!(ddl.translate("RENAME TABLE a TO b").is_err());
    }

    #[test]
    fn a_table_with_no_customer_must_be_declared_global() {
        let migration = Migration {
            name: "9999_x.sql",
            sql: "",
        };
        let create = CreateTable::parse(
            "CREATE TABLE IF NOT EXISTS prices (sku String) ENGINE = MergeTree ORDER BY sku",
        )
        .expect("parses");
        let error = placement_of(&create, &migration).expect_err("no customer column");
        assert!(error.to_string().contains("GLOBAL_TABLES"), "{error}");
    }
}
