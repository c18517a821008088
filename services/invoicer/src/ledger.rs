//! The invoicer and the PostgreSQL ledger: numbers claimed and invoices
//! issued there, credit notes, wallet deposits, the import of invoices
//! issued before the ledger, and the outbox relayed to ClickHouse.

use super::*;

impl Invoicer {
    /// Copies every issued invoice the outbox still holds into ClickHouse,
    /// then marks it delivered; returns how many. A copy repeated after a
    /// crash collapses in ClickHouse (same rows, same version).
    pub async fn relay_outbox(&self) -> Result<usize> {
        match &self.ledger {
            Some(ledger) => Ok(ledger.relay(&self.store).await?),
            None => Ok(0),
        }
    }

    /// Records a prepaid wallet deposit: in the ledger (copied to
    /// ClickHouse) when there is one, else in ClickHouse. `false` when the
    /// same deposit id was recorded before.
    pub async fn deposit(&self, row: &idlemeter_store::WalletDepositRow) -> Result<bool> {
        record_deposit(self.ledger.as_ref(), &self.store, row).await
    }

    /// Issues a credit note on invoice `number` (see
    /// [`idlemeter_core::credit_note`] for what may be credited), numbered
    /// in the credit-note series, settled to the customer's credit balance
    /// or wallet, then copied to ClickHouse. Needs the ledger.
    pub async fn credit_note(
        &self,
        number: u64,
        request: &CreditRequest,
        settlement: Settlement,
        reason: &str,
    ) -> Result<CreditNote> {
        let Some(ledger) = &self.ledger else {
            return Err(Error::Ledger(idlemeter_ledger::Error::Settings(
                "credit notes are issued in the ledger: set [ledger] url".to_owned(),
            )));
        };
        if reason.trim().is_empty() {
            return Err(Error::Credit(
                "a credit note needs a reason (it is printed on the note)".to_owned(),
            ));
        }
        let issuer = self.terms.issuer.clone();
        let (_, record) = ledger
            .credit(&issuer, number, |credited, note_number| {
                let note = self
                    .draft_credit_note(credited, request, settlement, reason)
                    .map_err(|error| format!("credit note on invoice {number}: {error}"))?;
                let note = CreditNote {
                    number: note_number,
                    ..note
                };
                let (header, lines) = note.to_rows().map_err(|error| error.to_string())?;
                let deposit_copy = (settlement == Settlement::Wallet)
                    .then(|| {
                        serde_json::to_value(idlemeter_store::WalletDepositRow {
                            issuer: issuer.clone(),
                            customer: note.customer.clone(),
                            deposit_id: format!("credit_note:{note_number}"),
                            amount: header.total,
                            deposited_at: header.issued_at,
                        })
                    })
                    .transpose()
                    .map_err(|error| error.to_string())?;
                Ok(idlemeter_ledger::CreditNoteRecord {
                    customer: note.customer.clone(),
                    invoice_number: number,
                    currency: note.currency.clone(),
                    net: note.net,
                    tax: note.tax,
                    total: note.total,
                    settlement: settlement.as_str().to_owned(),
                    reason: reason.to_owned(),
                    document: serde_json::to_value(CreditNoteRows { header, lines })
                        .map_err(|error| error.to_string())?,
                    deposit_copy,
                })
            })
            .await?;
        self.relay_outbox().await?;
        let rows: CreditNoteRows = serde_json::from_value(record.document)
            .map_err(|error| Error::Write(format!("the credit note's document: {error}")))?;
        Ok(CreditNote::from_rows(&rows.header, &rows.lines)?)
    }

    /// A credit note's figures from the invoice and its earlier notes, not
    /// yet numbered.
    fn draft_credit_note(
        &self,
        credited: &idlemeter_ledger::Credited,
        request: &CreditRequest,
        settlement: Settlement,
        reason: &str,
    ) -> Result<CreditNote> {
        let rows: IssuedRows = serde_json::from_value(credited.invoice_document.clone())
            .map_err(|error| Error::Write(format!("the invoice's document: {error}")))?;
        let invoice = Invoice::from_rows(&rows.header, &rows.lines)?;
        let mut credited_lines: BTreeMap<u16, Decimal> = BTreeMap::new();
        let (mut credited_net, mut credited_tax) = (Decimal::ZERO, Decimal::ZERO);
        for document in &credited.earlier_notes {
            let earlier: CreditNoteRows = serde_json::from_value(document.clone())
                .map_err(|error| Error::Write(format!("an earlier credit note: {error}")))?;
            let earlier = CreditNote::from_rows(&earlier.header, &earlier.lines)?;
            for line in &earlier.lines {
                *credited_lines.entry(line.invoice_line_no).or_default() += line.amount;
            }
            credited_net += earlier.net;
            credited_tax += earlier.tax;
        }
        let currency = if invoice.currency == self.sheet.currency.code() {
            self.sheet.currency
        } else {
            idlemeter_core::Currency::parse(&invoice.currency, None).map_err(Error::Credit)?
        };
        let lines: Vec<CreditableLine> = invoice
            .lines
            .iter()
            .map(|line| CreditableLine {
                line_no: line.line_no,
                kind: line.kind.clone(),
                resource: line.resource.clone(),
                amount: line.amount,
            })
            .collect();
        let draft = idlemeter_core::credit_note::credit_note(
            &CreditedInvoice {
                lines: &lines,
                payable: invoice.subtotal + invoice.fees + invoice.adjustments + invoice.credits,
                tax_rate: invoice.tax_rate,
                tax: invoice.tax,
                credited_lines: &credited_lines,
                credited_net,
                credited_tax,
                minor_digits: currency.minor_digits(),
                rounding: self.sheet.line_rounding,
            },
            request,
        )
        .map_err(|error| Error::Credit(error.to_string()))?;
        let note = CreditNote {
            issuer: invoice.issuer.clone(),
            number: 0,
            customer: invoice.customer.clone(),
            invoice_number: invoice.number,
            period_start: invoice.period_start,
            currency: invoice.currency.clone(),
            settlement: settlement.as_str().to_owned(),
            reason: reason.to_owned(),
            lines: draft
                .lines
                .iter()
                .enumerate()
                .map(|(index, line)| CreditNoteLine {
                    line_no: index as u16 + 1,
                    invoice_line_no: line.invoice_line_no,
                    resource: line.resource.clone(),
                    amount: line.amount,
                })
                .collect(),
            net: draft.net,
            tax: draft.tax,
            total: draft.total,
            issued_at: Utc::now(),
        };
        let summed: Decimal = note.lines.iter().map(|line| line.amount).sum();
        if summed != note.net || note.net + note.tax != note.total {
            return Err(Error::Credit(format!(
                "credit note lines sum to {summed}, net {} + tax {} stated as {}: refused",
                note.net, note.tax, note.total
            )));
        }
        Ok(note)
    }

    /// Copies the invoices of this issuer that ClickHouse holds into the
    /// ledger, under their own numbers (the move to PostgreSQL); the
    /// series then continues after the highest. `progress(done, total)`
    /// as invoices are read. Safe to run again: present ones are counted,
    /// conflicting ones reported and skipped.
    pub async fn import_to_ledger(
        &self,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<LedgerImport> {
        let Some(ledger) = &self.ledger else {
            return Err(Error::Ledger(idlemeter_ledger::Error::Settings(
                "no ledger configured: set [ledger] url".to_owned(),
            )));
        };
        let mut report = LedgerImport::default();
        // Deposits first, so the ledger's wallets hold what the imported
        // invoices drew.
        for row in self.store.wallet_deposit_rows(&self.terms.issuer).await? {
            if deposit_in_ledger(ledger, &row).await? {
                report.deposits += 1;
            }
        }
        // Their copies for ClickHouse repeat rows it has (they collapse).
        ledger.relay(&self.store).await?;
        let headers = self.store.invoices(&self.terms.issuer).await?;
        for (done, header) in headers.iter().enumerate() {
            let lines = self.store.invoice_lines(header).await?;
            let invoice = Invoice::from_rows(header, &lines)?;
            let issued_at = DateTime::from_timestamp(i64::from(header.issued_at), 0)
                .unwrap_or(invoice.period_end);
            let record = ledger_record(
                &invoice,
                IssuedRows {
                    header: header.clone(),
                    lines,
                },
            )
            .map_err(Error::Write)?;
            match ledger
                .import_invoice(&self.terms.issuer, invoice.number, issued_at, &record)
                .await?
            {
                idlemeter_ledger::Imported::Inserted => report.imported += 1,
                idlemeter_ledger::Imported::Present => report.present += 1,
                idlemeter_ledger::Imported::Conflict(reason) => report.conflicts.push(reason),
            }
            progress(done + 1, headers.len());
        }
        Ok(report)
    }

    /// Issues a chunk's invoices through the ledger (see
    /// [`Self::with_ledger`]) and relays them; returns (issued, already
    /// issued by another run, refused with why).
    pub(crate) async fn issue_in_ledger(
        &self,
        ledger: &idlemeter_ledger::Ledger,
        start: DateTime<Utc>,
        mut drafts: Vec<Invoice>,
        issued_at: u32,
        written_ms: u64,
    ) -> Result<(Vec<Invoice>, Vec<Invoice>, Vec<(String, String)>)> {
        let done = ledger
            .issue(
                &self.terms.issuer,
                start,
                &mut drafts,
                |invoice| invoice.customer.as_str(),
                |invoice, number| {
                    invoice.number = number;
                    let (header, lines) = invoice
                        .to_rows(issued_at, written_ms)
                        .map_err(|error| error.to_string())?;
                    ledger_record(invoice, IssuedRows { header, lines })
                },
            )
            .await?;
        self.relay_outbox().await?;
        let mut already = Vec::with_capacity(done.already.len());
        for (_, document) in done.already {
            let rows: IssuedRows = serde_json::from_value(document)
                .map_err(|error| Error::Write(format!("an issued invoice's document: {error}")))?;
            already.push(Invoice::from_rows(&rows.header, &rows.lines)?);
        }
        let refused = done
            .refused
            .iter()
            .map(|(index, reason)| (drafts[*index].customer.clone(), reason.clone()))
            .collect();
        let numbered: std::collections::HashSet<usize> =
            done.numbered.iter().map(|(index, _)| *index).collect();
        let issued = drafts
            .into_iter()
            .enumerate()
            .filter(|(index, _)| numbered.contains(index))
            .map(|(_, invoice)| invoice)
            .collect();
        Ok((issued, already, refused))
    }
}

/// What [`Invoicer::import_to_ledger`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LedgerImport {
    /// Wallet deposits copied.
    pub deposits: usize,
    pub imported: usize,
    /// Already in the ledger, identical.
    pub present: usize,
    /// Invoices whose number or period the ledger holds differently.
    pub conflicts: Vec<String>,
}

/// Records a deposit in the ledger (then relays it) or, without one, in
/// ClickHouse; `false` when the ledger had it already.
pub async fn record_deposit(
    ledger: Option<&idlemeter_ledger::Ledger>,
    store: &Store,
    row: &idlemeter_store::WalletDepositRow,
) -> Result<bool> {
    let Some(ledger) = ledger else {
        store.insert_wallet_deposit(row).await?;
        return Ok(true);
    };
    let new = deposit_in_ledger(ledger, row).await?;
    ledger.relay(store).await?;
    Ok(new)
}

/// An issued invoice as the ledger keeps it: its figures, and its stored
/// rows as the document.
fn ledger_record(
    invoice: &Invoice,
    rows: IssuedRows,
) -> std::result::Result<idlemeter_ledger::InvoiceRecord, String> {
    Ok(idlemeter_ledger::InvoiceRecord {
        customer: invoice.customer.clone(),
        period_start: invoice.period_start,
        period_end: invoice.period_end,
        currency: invoice.currency.clone(),
        total: invoice.total,
        wallet_applied: invoice.wallet_applied,
        balance_applied: invoice.balance_applied,
        balance_carried: invoice.balance_carried,
        document: serde_json::to_value(rows).map_err(|error| error.to_string())?,
    })
}

/// Records a deposit row in the ledger with the row as its ClickHouse copy.
async fn deposit_in_ledger(
    ledger: &idlemeter_ledger::Ledger,
    row: &idlemeter_store::WalletDepositRow,
) -> Result<bool> {
    let amount = idlemeter_store::from_column(row.amount)?;
    let at = DateTime::from_timestamp(i64::from(row.deposited_at), 0).unwrap_or_default();
    let payload = serde_json::to_value(row).map_err(|error| Error::Write(error.to_string()))?;
    Ok(ledger
        .deposit(
            &row.issuer,
            &row.customer,
            &row.deposit_id,
            amount,
            at,
            &payload,
        )
        .await?)
}
