//! Invoices (migration 0005): headers, lines and the reads the invoicer needs.

use crate::sql::{statement, Fetch};
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
    pub monthly_credits: i128,
    pub tax_rate: i128,
    pub tax: i128,
    pub total: i128,
    /// -1 (as a mantissa) when the plan has no one-time credit.
    pub one_time_credit_left: i128,
    /// How many lines the invoice has (lines 1..=line_count are its own).
    pub line_count: u16,
    /// Paid from the prepaid wallet (positive mantissa).
    pub wallet_applied: i128,
    pub issued_at: u32,
    /// Paid by the customer's credit balance (positive mantissa; migration
    /// 0013: absent from documents issued before it).
    #[serde(default)]
    pub balance_applied: i128,
    /// A negative spend carried to the credit balance (positive mantissa).
    #[serde(default)]
    pub balance_carried: i128,
    /// The buyer's details at issue, one per line (migration 0016).
    #[serde(default)]
    pub buyer: String,
}

/// An issued invoice as its rows: what the ledger keeps and its outbox
/// carries to ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuedRows {
    pub header: InvoiceRow,
    pub lines: Vec<InvoiceLineRow>,
}

/// An issued credit note as its rows (the ledger's document and outbox
/// payload).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CreditNoteRows {
    pub header: CreditNoteRow,
    pub lines: Vec<CreditNoteLineRow>,
}

/// One row of `credit_notes` (migration 0013).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct CreditNoteRow {
    pub issuer: String,
    pub number: u64,
    pub customer: String,
    pub invoice_number: u64,
    /// Unix seconds: the credited invoice's period.
    pub period_start: u32,
    pub currency: String,
    /// `Decimal(38, 12)` mantissas.
    pub net: i128,
    pub tax: i128,
    pub total: i128,
    /// `next_invoice` or `wallet`.
    pub settlement: String,
    pub reason: String,
    pub line_count: u16,
    pub issued_at: u32,
}

/// One row of `credit_note_lines`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct CreditNoteLineRow {
    pub issuer: String,
    pub number: u64,
    pub line_no: u16,
    pub customer: String,
    pub invoice_number: u64,
    pub invoice_line_no: u16,
    pub resource: String,
    pub amount: i128,
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
    /// Unix ms of the write: a rerun's line replaces a crashed run's.
    pub written_ms: u64,
}

/// One row of `wallet_deposits`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct WalletDepositRow {
    pub issuer: String,
    pub customer: String,
    pub deposit_id: String,
    pub amount: i128,
    /// Unix seconds.
    pub deposited_at: u32,
}

/// What [`Store::carried`] sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carried {
    /// Wallet deposits (prepaid money the next invoices draw on).
    WalletDeposits,
    /// Credit notes settled to the next invoice (the credit balance).
    CreditNotes,
}

impl Store {
    pub async fn insert_wallet_deposit(&self, row: &WalletDepositRow) -> Result<()> {
        self.insert_rows("wallet_deposits", std::slice::from_ref(row))
            .await
    }

    /// Many deposits in one insert (imports, benchmarks).
    pub async fn insert_wallet_deposits(&self, rows: &[WalletDepositRow]) -> Result<()> {
        self.insert_rows("wallet_deposits", rows).await
    }

    /// Every deposit of an issuer, one row each (the move to the ledger).
    pub async fn wallet_deposit_rows(&self, issuer: &str) -> Result<Vec<WalletDepositRow>> {
        self.client
            .query(
                "SELECT ?fields FROM wallet_deposits FINAL WHERE issuer = ? \
                 ORDER BY customer, deposit_id",
            )
            .bind(issuer)
            .all("wallet deposit rows")
            .await
    }

    /// Credit notes: lines first, then the headers (a header is the note's
    /// commit marker, as an invoice's is).
    pub async fn insert_credit_notes(
        &self,
        headers: &[CreditNoteRow],
        lines: &[CreditNoteLineRow],
    ) -> Result<()> {
        if headers.is_empty() {
            return Ok(());
        }
        self.insert_rows("credit_note_lines", lines).await?;
        self.insert_rows("credit_notes", headers).await
    }

    /// Credit notes of an issuer's customer, by number.
    pub async fn credit_notes_of(
        &self,
        issuer: &str,
        customer: &str,
    ) -> Result<Vec<CreditNoteRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM credit_notes FINAL WHERE issuer = {issuer} \
             AND customer = {customer} \
             ORDER BY number",
            issuer,
            customer,
        )
        .all(format!("credit notes of {customer}"))
        .await
    }

    /// The lines of a credit note, in order.
    pub async fn credit_note_lines(
        &self,
        header: &CreditNoteRow,
    ) -> Result<Vec<CreditNoteLineRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM credit_note_lines FINAL WHERE issuer = {issuer} \
             AND number = {number} \
             AND line_no <= {line_count} ORDER BY line_no",
            issuer = &header.issuer,
            number = header.number,
            line_count = header.line_count,
        )
        .all(format!(
            "lines of credit note {}-{}",
            header.issuer, header.number
        ))
        .await
    }

    /// Adjustment lines of customers `first..=last`, as (customer, number,
    /// line_no, for_period, amount). The caller keeps the lines of issued
    /// invoices only, up to their header's `line_count`.
    pub async fn adjustment_lines(
        &self,
        issuer: &str,
        first: &str,
        last: &str,
    ) -> Result<Vec<(String, u64, u16, u32, i128)>> {
        statement!(
            self.client,
            "SELECT customer, number, line_no, toUInt32(for_period), amount \
             FROM invoice_lines FINAL \
             WHERE issuer = {issuer} AND customer >= {first} AND customer <= {last} \
             AND kind = 'adjustment' \
             ORDER BY customer, number, line_no",
            issuer,
            first,
            last,
        )
        .all("adjustment lines")
        .await
    }

    /// The highest `written_ms` of `issuer`'s lines, 0 before the first.
    /// Adjustment lines of the invoices numbered `numbers`, as (customer,
    /// number, line_no, for_period, amount): a read by the lines' key.
    pub async fn adjustment_lines_of(
        &self,
        issuer: &str,
        numbers: &[u64],
    ) -> Result<Vec<(String, u64, u16, u32, i128)>> {
        if numbers.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<String> = numbers.iter().map(u64::to_string).collect();
        self.client
            .query(&format!(
                "SELECT customer, number, line_no, toUInt32(for_period), amount \
                 FROM invoice_lines FINAL \
                 WHERE issuer = ? AND number IN ({}) AND kind = 'adjustment' \
                 ORDER BY customer, number, line_no",
                list.join(", ")
            ))
            .bind(issuer)
            .all("adjustment lines of invoices")
            .await
    }

    pub async fn last_line_version(&self, issuer: &str) -> Result<u64> {
        self.client
            .query("SELECT max(written_ms) FROM invoice_lines WHERE issuer = ?")
            .bind(issuer)
            .fetch_one::<u64>()
            .await
            .context(format!("last line version of {issuer}"))
    }

    /// Lines first, in one insert; the headers are the commit marker.
    pub async fn insert_invoice_lines(&self, rows: &[InvoiceLineRow]) -> Result<()> {
        self.insert_rows("invoice_lines", rows).await
    }

    /// Headers in one insert (one block: all or none of them become visible).
    pub async fn insert_invoices(&self, rows: &[InvoiceRow]) -> Result<()> {
        self.insert_rows("invoices", rows).await
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
            .all(format!("invoices of {issuer}"))
            .await
    }

    /// The lines of the issued invoice `header`, in line order: its customer's,
    /// its first `line_count` (see migration 0005 for why both).
    pub async fn invoice_lines(&self, header: &InvoiceRow) -> Result<Vec<InvoiceLineRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM invoice_lines FINAL WHERE issuer = {issuer} \
             AND number = {number} \
             AND customer = {customer} AND line_no <= {line_count} ORDER BY line_no",
            issuer = &header.issuer,
            number = header.number,
            customer = &header.customer,
            line_count = header.line_count,
        )
        .all(format!(
            "lines of invoice {}-{}",
            header.issuer, header.number
        ))
        .await
    }

    /// What customers carry into their next invoice from before `before`
    /// (Unix seconds): one sum (mantissas) per customer of `issuer` from
    /// `first` to `last` with any.
    pub(crate) async fn carried(
        &self,
        carried: Carried,
        (issuer, first, last): (&str, &str, &str),
        before: u32,
    ) -> Result<Vec<(String, i128)>> {
        let (sql, what) = match carried {
            Carried::WalletDeposits => (
                "SELECT customer, sum(amount) FROM wallet_deposits FINAL \
                 WHERE issuer = {issuer} AND customer >= {first} AND customer <= {last} \
                 AND deposited_at < toDateTime({before}) \
                 GROUP BY customer ORDER BY customer",
                "wallet deposits",
            ),
            Carried::CreditNotes => (
                "SELECT customer, sum(total) FROM credit_notes FINAL \
                 WHERE issuer = {issuer} AND customer >= {first} AND customer <= {last} \
                 AND settlement = 'next_invoice' AND issued_at < toDateTime({before}) \
                 GROUP BY customer ORDER BY customer",
                "credit notes settled to the next invoice",
            ),
        };
        statement!(self.client, sql, issuer, first, last, before)
            .all(format!("{what} of {first} .. {last}"))
            .await
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
        )
        .all(format!("invoices of {customer}"))
        .await
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
}
