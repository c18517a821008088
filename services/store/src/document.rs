//! An invoice as a document: built from a bill or read back from its rows,
//! and rendered as JSON, CSV and HTML (PDF: [`crate::pdf`]). A credit note
//! as a document: [`CreditNote`].

use chrono::{DateTime, Utc};
use idlemeter_core::{CustomerBill, LineKind};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::{
    from_column, to_column, CreditNoteLineRow, CreditNoteRow, InvoiceLineRow, InvoiceRow, Result,
};

/// What an invoice adds to its bill: its period and the sheet that priced it.
#[derive(Debug, Clone)]
pub struct BillContext {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub currency: String,
    pub sheet: String,
    pub sheet_checksum: String,
    /// The idle rule's version, noted on idle lines.
    pub idle_policy: String,
}

fn column(value: Decimal) -> Result<i128> {
    to_column(value)
}

/// One invoice line. Money and quantities serialize as decimal strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Line {
    pub line_no: u16,
    /// `usage`, `included`, `fee`, `adjustment`, `credit` or `tax`.
    pub kind: String,
    pub resource: String,
    pub quantity: Decimal,
    pub unit: String,
    pub unit_price: Decimal,
    pub amount: Decimal,
    /// The period an adjustment bills; the invoice's own period otherwise.
    pub for_period: DateTime<Utc>,
    pub note: String,
}

/// An invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Invoice {
    pub issuer: String,
    pub number: u64,
    /// `issued`, or `draft` for a preview of the open period.
    pub status: String,
    pub customer: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub currency: String,
    pub plan: String,
    pub sheet: String,
    pub sheet_checksum: String,
    pub lines: Vec<Line>,
    pub subtotal: Decimal,
    pub fees: Decimal,
    pub adjustments: Decimal,
    pub credits: Decimal,
    pub tax_rate: Decimal,
    pub tax: Decimal,
    /// Paid from the customer's prepaid wallet (a positive amount; the wallet
    /// line carries it negated).
    pub wallet_applied: Decimal,
    /// Paid by the customer's credit balance, and a negative spend carried
    /// to it (both zero or positive; their lines carry them signed).
    pub balance_applied: Decimal,
    pub balance_carried: Decimal,
    /// The buyer as the invoice was issued: the customer record's name,
    /// tax id and billing email (empty without a record).
    pub buyer: Vec<String>,
    /// The sum of every line, tax included and wallet payment deducted: what
    /// is due.
    pub total: Decimal,
    /// One-time credit left after this invoice; -1 when the plan has none.
    pub one_time_credit_left: Decimal,
}

fn time(unix: u32) -> DateTime<Utc> {
    DateTime::from_timestamp(i64::from(unix), 0).unwrap_or_default()
}

impl Invoice {
    /// The invoice document of a bill: its lines as they are, numbered.
    pub fn from_bill(issuer: &str, number: u64, bill: &CustomerBill, context: BillContext) -> Self {
        let lines: Vec<Line> = bill
            .lines
            .iter()
            .enumerate()
            .map(|(index, line)| Line {
                line_no: index as u16 + 1,
                kind: line.kind.as_str().to_owned(),
                resource: line.resource.clone(),
                quantity: line.quantity,
                unit: line.unit.clone(),
                unit_price: line.unit_price,
                amount: line.amount,
                for_period: match line.kind {
                    LineKind::Adjustment => line.price_version.unwrap_or(context.start),
                    _ => context.start,
                },
                note: match (line.kind, line.credit_available) {
                    (LineKind::Idle, _) => format!("idle under {}", context.idle_policy),
                    (LineKind::Wallet, Some(balance)) => {
                        format!("prepaid balance before: {balance}")
                    }
                    (_, Some(available)) => format!("available {available}"),
                    (_, None) => String::new(),
                },
            })
            .collect();
        Self {
            issuer: issuer.to_owned(),
            number,
            status: "issued".to_owned(),
            customer: bill.customer.as_str().to_owned(),
            period_start: context.start,
            period_end: context.end,
            currency: context.currency,
            plan: bill.plan.clone().unwrap_or_default(),
            sheet: context.sheet,
            sheet_checksum: context.sheet_checksum,
            lines,
            subtotal: bill.subtotal,
            fees: bill.fees,
            adjustments: bill.adjustments,
            credits: bill.credits,
            tax_rate: bill.tax_rate,
            tax: bill.tax,
            wallet_applied: bill.wallet_applied,
            balance_applied: bill.balance_applied,
            balance_carried: bill.balance_carried,
            buyer: Vec::new(),
            total: bill.total,
            one_time_credit_left: bill.one_time_credit_left.unwrap_or(Decimal::NEGATIVE_ONE),
        }
    }

    /// The stored rows of the invoice: its header and its lines, `written_ms`
    /// being the lines' version (see migration 0005).
    pub fn to_rows(
        &self,
        issued_at: u32,
        written_ms: u64,
    ) -> Result<(InvoiceRow, Vec<InvoiceLineRow>)> {
        let header = InvoiceRow {
            issuer: self.issuer.clone(),
            number: self.number,
            customer: self.customer.clone(),
            period_start: self.period_start.timestamp() as u32,
            period_end: self.period_end.timestamp() as u32,
            currency: self.currency.clone(),
            plan: self.plan.clone(),
            sheet: self.sheet.clone(),
            sheet_checksum: self.sheet_checksum.clone(),
            subtotal: column(self.subtotal)?,
            fees: column(self.fees)?,
            adjustments: column(self.adjustments)?,
            credits: column(self.credits)?,
            monthly_credits: column(
                self.lines
                    .iter()
                    .filter(|line| line.resource == "credit.monthly")
                    .map(|line| line.amount)
                    .sum(),
            )?,
            tax_rate: column(self.tax_rate)?,
            tax: column(self.tax)?,
            total: column(self.total)?,
            one_time_credit_left: column(self.one_time_credit_left)?,
            line_count: u16::try_from(self.lines.len()).unwrap_or(u16::MAX),
            wallet_applied: column(self.wallet_applied)?,
            issued_at,
            balance_applied: column(self.balance_applied)?,
            balance_carried: column(self.balance_carried)?,
            buyer: self.buyer.join("\n"),
        };
        let lines = self
            .lines
            .iter()
            .map(|line| {
                Ok(InvoiceLineRow {
                    issuer: self.issuer.clone(),
                    number: self.number,
                    line_no: line.line_no,
                    customer: self.customer.clone(),
                    kind: line.kind.clone(),
                    resource: line.resource.clone(),
                    quantity: column(line.quantity)?,
                    unit: line.unit.clone(),
                    unit_price: column(line.unit_price)?,
                    amount: column(line.amount)?,
                    for_period: line.for_period.timestamp() as u32,
                    note: line.note.clone(),
                    written_ms,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((header, lines))
    }

    /// An issued invoice as stored. Amounts come back at the column's scale
    /// (12 places) and are normalised to the currency's.
    pub fn from_rows(header: &InvoiceRow, lines: &[InvoiceLineRow]) -> Result<Self> {
        let money = |mantissa: i128| -> Result<Decimal> { Ok(from_column(mantissa)?.normalize()) };
        Ok(Self {
            issuer: header.issuer.clone(),
            number: header.number,
            status: "issued".to_owned(),
            customer: header.customer.clone(),
            period_start: time(header.period_start),
            period_end: time(header.period_end),
            currency: header.currency.clone(),
            plan: header.plan.clone(),
            sheet: header.sheet.clone(),
            sheet_checksum: header.sheet_checksum.clone(),
            lines: lines
                .iter()
                .map(|line| {
                    Ok(Line {
                        line_no: line.line_no,
                        kind: line.kind.clone(),
                        resource: line.resource.clone(),
                        quantity: money(line.quantity)?,
                        unit: line.unit.clone(),
                        unit_price: money(line.unit_price)?,
                        amount: money(line.amount)?,
                        for_period: time(line.for_period),
                        note: line.note.clone(),
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            subtotal: money(header.subtotal)?,
            fees: money(header.fees)?,
            adjustments: money(header.adjustments)?,
            credits: money(header.credits)?,
            tax_rate: money(header.tax_rate)?,
            tax: money(header.tax)?,
            wallet_applied: money(header.wallet_applied)?,
            balance_applied: money(header.balance_applied)?,
            balance_carried: money(header.balance_carried)?,
            buyer: header
                .buyer
                .lines()
                .filter(|line| !line.is_empty())
                .map(str::to_owned)
                .collect(),
            total: money(header.total)?,
            one_time_credit_left: money(header.one_time_credit_left)?,
        })
    }

    /// Whether the lines add up to `total`: checked before an invoice is
    /// issued or shown.
    pub fn lines_add_up(&self) -> bool {
        self.lines.iter().map(|line| line.amount).sum::<Decimal>() == self.total
    }

    /// The same invoice with every decimal normalised (for comparisons).
    pub fn normalized(&self) -> Self {
        let mut copy = self.clone();
        for line in &mut copy.lines {
            line.quantity = line.quantity.normalize();
            line.unit_price = line.unit_price.normalize();
            line.amount = line.amount.normalize();
        }
        for value in [
            &mut copy.subtotal,
            &mut copy.fees,
            &mut copy.adjustments,
            &mut copy.credits,
            &mut copy.tax_rate,
            &mut copy.tax,
            &mut copy.wallet_applied,
            &mut copy.balance_applied,
            &mut copy.balance_carried,
            &mut copy.total,
            &mut copy.one_time_credit_left,
        ] {
            *value = value.normalize();
        }
        copy
    }
}

pub fn to_json(invoice: &Invoice) -> String {
    serde_json::to_string_pretty(invoice).expect("invoices serialise")
}

/// One row per line, with the invoice's identity on each.
pub fn to_csv(invoice: &Invoice) -> String {
    let mut out = String::from(
        "issuer,number,customer,period_start,currency,line_no,kind,resource,quantity,unit,unit_price,amount,for_period\n",
    );
    for line in &invoice.lines {
        let fields = [
            invoice.issuer.clone(),
            invoice.number.to_string(),
            invoice.customer.clone(),
            invoice.period_start.to_rfc3339(),
            invoice.currency.clone(),
            line.line_no.to_string(),
            line.kind.clone(),
            line.resource.clone(),
            line.quantity.to_string(),
            line.unit.clone(),
            line.unit_price.to_string(),
            line.amount.to_string(),
            line.for_period.to_rfc3339(),
        ];
        let escaped: Vec<String> = fields.iter().map(|field| csv_field(field)).collect();
        out.push_str(&escaped.join(","));
        out.push('\n');
    }
    out
}

fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

fn html_escape(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained, printable HTML page (no external assets).
pub fn to_html(invoice: &Invoice) -> String {
    let mut rows = String::new();
    for line in &invoice.lines {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td class=n>{}</td><td>{}</td><td class=n>{}</td><td class=n>{}</td></tr>\n",
            html_escape(&line.kind),
            html_escape(&line.resource),
            line.quantity,
            html_escape(&line.unit),
            line.unit_price,
            line.amount
        ));
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=utf-8><title>Invoice {issuer}-{number}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border-bottom:1px solid #ccc;padding:4px 8px}}.n{{text-align:right}}</style></head><body>\n\
         <h1>Invoice {issuer}-{number}</h1>\n<p>{status} &middot; customer <b>{customer}</b> &middot; plan {plan}<br>\
         period {start} to {end} &middot; {currency}</p>\n<table>\n<tr><th>kind</th><th>resource</th>\
         <th>quantity</th><th>unit</th><th>unit price</th><th>amount</th></tr>\n{rows}\
         <tr><th colspan=5 class=n>total</th><th class=n>{total}</th></tr>\n</table>\n\
         <p>price sheet {sheet} ({checksum})</p>\n</body></html>\n",
        issuer = html_escape(&invoice.issuer),
        number = invoice.number,
        status = html_escape(&invoice.status),
        customer = html_escape(&invoice.customer),
        plan = html_escape(&invoice.plan),
        start = invoice.period_start.format("%Y-%m-%d %H:%M UTC"),
        end = invoice.period_end.format("%Y-%m-%d %H:%M UTC"),
        currency = html_escape(&invoice.currency),
        total = invoice.total,
        sheet = html_escape(&invoice.sheet),
        checksum = &invoice.sheet_checksum[..invoice.sheet_checksum.len().min(12)],
    )
}

/// A credit note: what it credits of an issued invoice, and where its total
/// goes. Money serializes as decimal strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CreditNote {
    pub issuer: String,
    pub number: u64,
    pub customer: String,
    /// The credited invoice, and its period.
    pub invoice_number: u64,
    pub period_start: DateTime<Utc>,
    pub currency: String,
    /// `next_invoice` (the customer's credit balance) or `wallet`.
    pub settlement: String,
    pub reason: String,
    pub lines: Vec<CreditNoteLine>,
    /// Sum of the lines; `total = net + tax`.
    pub net: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
    pub issued_at: DateTime<Utc>,
}

/// One line of a credit note: a positive amount credited of an invoice line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CreditNoteLine {
    pub line_no: u16,
    pub invoice_line_no: u16,
    pub resource: String,
    pub amount: Decimal,
}

impl CreditNote {
    /// The note's stored rows: its header and its lines.
    pub fn to_rows(&self) -> Result<(CreditNoteRow, Vec<CreditNoteLineRow>)> {
        let header = CreditNoteRow {
            issuer: self.issuer.clone(),
            number: self.number,
            customer: self.customer.clone(),
            invoice_number: self.invoice_number,
            period_start: self.period_start.timestamp() as u32,
            currency: self.currency.clone(),
            net: column(self.net)?,
            tax: column(self.tax)?,
            total: column(self.total)?,
            settlement: self.settlement.clone(),
            reason: self.reason.clone(),
            line_count: u16::try_from(self.lines.len()).unwrap_or(u16::MAX),
            issued_at: self.issued_at.timestamp() as u32,
        };
        let lines = self
            .lines
            .iter()
            .map(|line| {
                Ok(CreditNoteLineRow {
                    issuer: self.issuer.clone(),
                    number: self.number,
                    line_no: line.line_no,
                    customer: self.customer.clone(),
                    invoice_number: self.invoice_number,
                    invoice_line_no: line.invoice_line_no,
                    resource: line.resource.clone(),
                    amount: column(line.amount)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((header, lines))
    }

    /// A note as stored, amounts normalised.
    pub fn from_rows(header: &CreditNoteRow, lines: &[CreditNoteLineRow]) -> Result<Self> {
        let money = |mantissa: i128| -> Result<Decimal> { Ok(from_column(mantissa)?.normalize()) };
        Ok(Self {
            issuer: header.issuer.clone(),
            number: header.number,
            customer: header.customer.clone(),
            invoice_number: header.invoice_number,
            period_start: time(header.period_start),
            currency: header.currency.clone(),
            settlement: header.settlement.clone(),
            reason: header.reason.clone(),
            lines: lines
                .iter()
                .map(|line| {
                    Ok(CreditNoteLine {
                        line_no: line.line_no,
                        invoice_line_no: line.invoice_line_no,
                        resource: line.resource.clone(),
                        amount: money(line.amount)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            net: money(header.net)?,
            tax: money(header.tax)?,
            total: money(header.total)?,
            issued_at: time(header.issued_at),
        })
    }
}
