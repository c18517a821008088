//! Statements with named placeholders on a server without query parameters.
//!
//! ClickHouse 18.16 has no server-side query parameters, and the clickhouse
//! crate binds values client-side, in the order of the text's `?`s. A
//! statement that reads one customer's rows in three subqueries then binds
//! `customer` three times, and a chain of twenty `.bind()` calls must match
//! the text's order by hand. Here a statement names its values instead,
//! `{customer}` (the spelling of current ClickHouse's parameters, without
//! the type), and [`statement!`] binds each placeholder to
//! the variable (or expression) of that name, in the text's order, still
//! through the crate's escaping: nothing is formatted into SQL by hand.
//! [`Fetch::all`] then reads every row, naming what was read when it fails.

use clickhouse::query::Query;

use crate::{Context, Error, Result};

/// A statement's text with its `{name}` placeholders turned into `?`, and
/// the names in the order of the `?`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Named<'a> {
    positional: String,
    order: Vec<&'a str>,
    text: &'a str,
}

impl<'a> Named<'a> {
    /// Parses `text`. A `?` other than the crate's `?fields` is refused: it
    /// would take a value meant for a named placeholder.
    pub fn parse(text: &'a str) -> Result<Self> {
        let mut positional = String::with_capacity(text.len());
        let mut order = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find(['{', '?']) {
            positional.push_str(&rest[..at]);
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("?fields") {
                positional.push_str("?fields");
                rest = after;
                continue;
            }
            if tail.starts_with('?') {
                return Err(bad(text, "has a positional `?`; name the value `{name}`"));
            }
            let name_len = tail[1..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len() - 1);
            let name = &tail[1..1 + name_len];
            if name.is_empty() || !tail[1 + name_len..].starts_with('}') {
                return Err(bad(text, "has a `{` that opens no `{name}` placeholder"));
            }
            positional.push('?');
            order.push(name);
            rest = &tail[name_len + 2..];
        }
        positional.push_str(rest);
        Ok(Self {
            positional,
            order,
            text,
        })
    }

    /// The text as the clickhouse crate binds it.
    pub fn positional(&self) -> &str {
        &self.positional
    }

    /// The placeholders' names, one per `?`, in order.
    pub fn order(&self) -> &[&'a str] {
        &self.order
    }

    /// The error for a placeholder no value was given for.
    pub fn missing(&self, name: &str) -> Error {
        bad(
            self.text,
            &format!("names {{{name}}}, which is given no value"),
        )
    }
}

fn bad(text: &str, reason: &str) -> Error {
    let start: String = text
        .split_whitespace()
        .take(8)
        .collect::<Vec<_>>()
        .join(" ");
    Error::BadStatement(format!("the statement \"{start} ...\" {reason}"))
}

/// A query on `client` of a statement with `{name}` placeholders, each bound
/// to the variable of that name or to the expression given for it:
/// `statement!(self.client, SQL, customer, first = &range.first)`.
/// Evaluates to `Result<clickhouse::query::Query>`; a placeholder with no
/// value is an error that names it.
/// With no values: `statement!(client, SQL)`.
macro_rules! statement {
    ($client:expr, $sql:expr $(,)?) => {
        $crate::sql::Named::parse($sql).and_then(|named| match named.order().first() {
            Some(name) => Err(named.missing(name)),
            None => Ok($client.query(named.positional())),
        })
    };
    ($client:expr, $sql:expr $(, $name:ident $(= $value:expr)?)+ $(,)?) => {
        $crate::sql::Named::parse($sql).and_then(|named| {
            let mut query = $client.query(named.positional());
            for name in named.order() {
                query = match *name {
                    $(stringify!($name) => query.bind(&$crate::sql::statement!(@value $name $(, $value)?)),)*
                    other => return Err(named.missing(other)),
                };
            }
            Ok(query)
        })
    };
    (@value $name:ident) => { $name };
    (@value $name:ident, $value:expr) => { $value };
}
pub(crate) use statement;

/// Reading every row of a statement: `statement!(..).all("what").await`
/// instead of `?`, `fetch_all`, `await` and `context` at every read.
pub(crate) trait Fetch {
    /// Every row, or an error that says what was being read.
    async fn all<T>(self, what: impl Into<String>) -> Result<Vec<T>>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead;
}

impl Fetch for Query {
    async fn all<T>(self, what: impl Into<String>) -> Result<Vec<T>>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.fetch_all().await.context(what)
    }
}

impl Fetch for Result<Query> {
    async fn all<T>(self, what: impl Into<String>) -> Result<Vec<T>>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self?.all(what).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_positional_in_order_and_repeat() {
        let named = Named::parse(
            "SELECT ?fields FROM t WHERE customer = {customer} AND at < toDateTime({to}) \
             UNION ALL SELECT ?fields FROM u WHERE customer = {customer}",
        )
        .expect("parses");
        assert_eq!(
            named.positional(),
            "SELECT ?fields FROM t WHERE customer = ? AND at < toDateTime(?) \
             UNION ALL SELECT ?fields FROM u WHERE customer = ?"
        );
        assert_eq!(named.order(), ["customer", "to", "customer"]);
    }

    #[test]
    fn a_positional_mark_or_a_stray_brace_is_refused() {
        let error = Named::parse("SELECT 1 WHERE a = ?").expect_err("positional");
        assert!(error.to_string().contains("positional `?`"), "{error}");
        let error = Named::parse("SELECT '{' AS brace").expect_err("stray brace");
        assert!(error.to_string().contains("opens no"), "{error}");
        let error = Named::parse("SELECT {a b}").expect_err("not a name");
        assert!(error.to_string().contains("opens no"), "{error}");
    }

    #[test]
    fn the_macro_binds_by_name_and_names_a_missing_value() {
        let client = clickhouse::Client::default();
        let customer = "o'brien";
        let from = 7u32;
        let sql = "SELECT 1 WHERE c = {customer} AND f = {from} AND c2 = {customer} AND l = {last}";
        let query = statement!(client, sql, customer, from, last = "zz").expect("every name given");
        assert_eq!(
            query.sql_display().to_string(),
            "SELECT 1 WHERE c = 'o\\'brien' AND f = 7 AND c2 = 'o\\'brien' AND l = 'zz'"
        );
        let Err(error) = statement!(client, sql, customer, from) else {
            panic!("no value for last, yet bound");
        };
        assert!(error.to_string().contains("{last}"), "{error}");
    }
}
