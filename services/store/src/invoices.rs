//! Invoices (migration 0005): headers, lines and the reads the invoicer needs.

use crate::{Context, Result, Store};

/// One row of `invoices`: an issued invoice's header. Field order is column order.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct InvoiceRow {
    pub issuer: String,
    pub number: u64,
    pub customer: String,
    /// Unix seconds.
    pub period_start: u32,
    pub period_end: u32,
    pub currency: String,
    pub plan: String,
    pub sheet: String,
    pub sheet_checksum: String,
    /// `Decimal(38, 12)` mantissas; see [`crate::to_column`].
    pub subtotal: i128,
    pub fees: i128,
    pub adjustments: i128,
    pub credits: i128,
    pub tax_rate: i128,
    pub tax: i128,
    pub total: i128,
    /// -1 (as a mantissa) when the plan has no one-time credit.
    pub one_time_credit_left: i128,
    pub issued_at: u32,
}

/// One row of `invoice_lines`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct InvoiceLineRow {
    pub issuer: String,
    pub number: u64,
    pub line_no: u16,
    pub customer: String,
    pub kind: String,
    pub resource: String,
    pub quantity: i128,
    pub unit: String,
    pub unit_price: i128,
    pub amount: i128,
    /// Unix seconds: the period an adjustment bills (else the invoice's own).
    pub for_period: u32,
    pub note: String,
}

impl Store {
    /// Lines first, in one insert; the headers are the commit marker.
    pub async fn insert_invoice_lines(&self, rows: &[InvoiceLineRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self
            .client
            .insert::<InvoiceLineRow>("invoice_lines")
            .await
            .context("insert invoice_lines")?;
        for row in rows {
            insert.write(row).await.context("insert invoice_lines")?;
        }
        insert.end().await.context("insert invoice_lines")
    }

    /// Headers in one insert (one block: all or none of them become visible).
    pub async fn insert_invoices(&self, rows: &[InvoiceRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self
            .client
            .insert::<InvoiceRow>("invoices")
            .await
            .context("insert invoices")?;
        for row in rows {
            insert.write(row).await.context("insert invoices")?;
        }
        insert.end().await.context("insert invoices")
    }

    /// The highest number `issuer` has issued, 0 before the first.
    pub async fn last_invoice_number(&self, issuer: &str) -> Result<u64> {
        self.client
            .query("SELECT max(number) FROM invoices WHERE issuer = ?")
            .bind(issuer)
            .fetch_one::<u64>()
            .await
            .context(format!("last invoice number of {issuer}"))
    }

    /// Every invoice of `issuer`, oldest period first, then by number.
    pub async fn invoices(&self, issuer: &str) -> Result<Vec<InvoiceRow>> {
        self.client
            .query(
                "SELECT ?fields FROM invoices FINAL WHERE issuer = ? \
                 ORDER BY period_start, number",
            )
            .bind(issuer)
            .fetch_all()
            .await
            .context(format!("invoices of {issuer}"))
    }

    /// One invoice's lines, in line order.
    pub async fn invoice_lines(&self, issuer: &str, number: u64) -> Result<Vec<InvoiceLineRow>> {
        self.client
            .query(
                "SELECT ?fields FROM invoice_lines FINAL WHERE issuer = ? AND number = ? \
                 ORDER BY line_no",
            )
            .bind(issuer)
            .bind(number)
            .fetch_all()
            .await
            .context(format!("lines of invoice {issuer}-{number}"))
    }

    /// The adjustment lines of issued invoices of one customer, as
    /// (for_period, amount mantissa); lines of a crashed run without a header
    /// are not issued and do not count.
    pub async fn issued_adjustments(
        &self,
        issuer: &str,
        customer: &str,
    ) -> Result<Vec<(u32, i128)>> {
        self.client
            .query(
                "SELECT toUInt32(for_period), amount FROM invoice_lines FINAL \
                 WHERE issuer = ? AND customer = ? AND kind = 'adjustment' \
                 AND number IN (SELECT number FROM invoices WHERE issuer = ? AND customer = ?) \
                 ORDER BY number, line_no",
            )
            .bind(issuer)
            .bind(customer)
            .bind(issuer)
            .bind(customer)
            .fetch_all()
            .await
            .context(format!("adjustments of {customer}"))
    }
}
