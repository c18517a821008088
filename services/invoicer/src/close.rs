//! Closing a period: each chunk of customers' accounts and rated
//! quantities read, billed and written, headers last; and the draft of
//! the open period (preview), billed the same way.

use super::*;

impl Invoicer {
    /// The invoice closing the open period at `now` would issue for one
    /// customer, as a draft (never stored): the period's quantities through
    /// `now` and the account as at `now`, billed by the same function as
    /// the close.
    pub async fn preview(&self, customer: &str, now: DateTime<Utc>) -> Result<Option<Invoice>> {
        let (start, end) = self.period_of(now);
        let accounts = self
            .accounts(None)
            .read(customer, customer, start, now)
            .await?;
        let rated = self.rated_in(customer, customer, (start, now)).await?;
        let id = CustomerId::parse(customer.to_owned()).map_err(|error| Error::Quantities {
            customer: customer.to_owned(),
            reason: error.to_string(),
        })?;
        let (mut usage, _) = self.usage_at(&id, start, now, rated.get(customer)).await?;
        let metered = self.metered_in((customer, customer), start, now).await?;
        self.apply_metered(&mut usage, &metered)?;
        let mut draft = self.invoice(&id, &usage, &accounts.account(&id), start, end, 0)?;
        if let Some(invoice) = &mut draft {
            invoice.status = "draft".to_owned();
            invoice.buyer = accounts.buyers.get(customer).cloned().unwrap_or_default();
        }
        Ok(draft)
    }

    /// Who to bill for the period: everyone the rater rated in it, everyone
    /// invoiced before (plan fees, adjustments), everyone with metered usage
    /// in it, on a plan, or with a record; in this invoicer's currency lane
    /// and share. Names only, in order; the rest is read chunk by chunk.
    async fn customers_to_bill(
        &self,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<Vec<String>> {
        let issuer = &self.terms.issuer;
        let start_s = unix_seconds(start);
        let mut customers: BTreeSet<String> = self
            .store
            .rated_customers(start_s, &self.sheet_checksum)
            .await?
            .into_iter()
            .collect();
        customers.extend(self.store.invoiced_customers(issuer).await?);
        // And everyone with metered usage in the period (events only).
        customers.extend(
            self.metered_in(("", "\u{10ffff}"), start, end)
                .await?
                .names()
                .cloned(),
        );
        // And everyone on a plan of their subscription (fees), and everyone
        // with a record (a record the sheet cannot bill, in another
        // currency, is then reported, not skipped in silence).
        customers.extend(self.store.subscribed_customers(issuer).await?);
        let currencies = self.store.customer_currencies(issuer).await?;
        customers.extend(currencies.keys().cloned());
        let mut customers: Vec<String> = customers.into_iter().collect();
        if let Some(lane) = &self.lane {
            customers.retain(|customer| lane.admits(customer, &currencies));
        }
        customers.retain(|customer| self.share.admits(customer));
        Ok(customers)
    }

    /// Closes the period starting at `period_start` (see the module doc).
    /// `progress(done, total)` is called as customers are computed.
    pub async fn close_period(
        &self,
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
        dry_run: bool,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<CloseOutcome> {
        let (start, end) = self.period_of(period_start);
        let closable = end + chrono::Duration::seconds(self.config.grace_seconds as i64);
        if now < closable {
            return Err(Error::PeriodOpen {
                start,
                end,
                closable,
            });
        }
        let _lock = if dry_run {
            None
        } else {
            Some(FileLock::acquire(&self.config.lock_file).await?)
        };
        let issuer = &self.terms.issuer;
        if !dry_run {
            // Invoices a crashed run issued but did not copy: copied first,
            // so the accounts read below see them.
            let relayed = self.relay_outbox().await?;
            if relayed > 0 {
                tracing::info!(
                    relayed,
                    "copied invoices a previous run issued to ClickHouse"
                );
            }
        }
        let customers = self.customers_to_bill((start, end)).await?;
        let adjusted = self.accounts(None).all_issued_adjustments().await?;
        let mut outcome = CloseOutcome::default();
        let mut next = self.store.last_invoice_number(issuer).await? + 1;
        let mut computed = 0;
        let run = Run {
            period: (start, end),
            now,
            dry_run,
            // Above every line written before, whatever this host's clock
            // says, so this run's lines replace a crashed run's.
            written_ms: u64::try_from(Utc::now().timestamp_millis())
                .unwrap_or(0)
                .max(self.store.last_line_version(issuer).await? + 1),
        };
        // One chunk's write runs while the next chunk is read and billed;
        // a chunk's headers are written only after the previous chunk's,
        // so numbers stay in order and without gaps across a crash.
        let mut writing: Option<tokio::task::JoinHandle<Result<()>>> = None;
        for (chunk, first, last) in
            idlemeter_core::ids::id_ranges(&customers, self.config.chunk_customers)
        {
            let reading = std::time::Instant::now();
            let read = self
                .read_chunk((first, last), run.period, &adjusted)
                .await?;
            outcome.timings.read += reading.elapsed();
            let billing = std::time::Instant::now();
            let mut billed = || {
                computed += 1;
                progress(computed, customers.len());
            };
            let chunk_issued = self
                .bill_chunk(&run, chunk, &read, &mut next, &mut outcome, &mut billed)
                .await?;
            outcome.timings.bill += billing.elapsed();
            let issued = self
                .write_chunk(&run, chunk_issued, &read, &mut writing, &mut outcome)
                .await?;
            outcome.count_issued(issued, self.config.keep_issued);
        }
        if let Some(last) = writing.take() {
            let waiting = std::time::Instant::now();
            last.await
                .map_err(|error| Error::Write(error.to_string()))??;
            outcome.timings.write_wait += waiting.elapsed();
        }
        if !outcome.behind_a_later_invoice.is_empty() {
            tracing::warn!(
                count = outcome.behind_a_later_invoice.len(),
                period = %start,
                "customers already invoiced for a later period are skipped; their late usage will be an adjustment instead"
            );
        }
        if !dry_run {
            tracing::info!(
                issuer = %issuer,
                period = %start,
                issued = outcome.issued_count,
                already = outcome.already_issued.len(),
                caught_up = outcome.caught_up,
                "period closed"
            );
        }
        Ok(outcome)
    }

    /// What billing the customers `first..=last` reads: their accounts (with
    /// the adjustments already issued, `adjusted`), the rater's quantities
    /// and their metered usage, in parallel.
    async fn read_chunk(
        &self,
        (first, last): (&str, &str),
        (start, end): (DateTime<Utc>, DateTime<Utc>),
        adjusted: &Adjusted,
    ) -> Result<ChunkRead> {
        let reader = self.accounts(Some(adjusted));
        let (accounts, rated, metered) = tokio::try_join!(
            async { Ok::<_, Error>(reader.read(first, last, start, end).await?) },
            self.rated_in(first, last, (start, end)),
            self.metered_in((first, last), start, end),
        )?;
        Ok(ChunkRead {
            accounts,
            rated,
            metered,
        })
    }

    /// Bills each customer of a chunk, numbering the invoices from `next`;
    /// returns them. A customer whose invoice cannot be computed is
    /// reported and left out; the store failing fails the close.
    async fn bill_chunk(
        &self,
        run: &Run,
        chunk: &[String],
        read: &ChunkRead,
        next: &mut u64,
        outcome: &mut CloseOutcome,
        billed: &mut (dyn FnMut() + Send),
    ) -> Result<Vec<Invoice>> {
        let start_s = unix_seconds(run.period.0);
        let mut issued = Vec::new();
        outcome.not_adjustable += read.accounts.not_adjustable.len();
        for customer in chunk {
            billed();
            if let Some(header) = read.accounts.invoiced_now.get(customer) {
                outcome
                    .already_issued
                    .push(Invoice::from_rows(header, &[])?);
                continue;
            }
            if read.accounts.invoiced_later.contains(customer) {
                outcome.behind_a_later_invoice.push(customer.clone());
                continue;
            }
            let invoice = self
                .invoice_of(
                    customer,
                    run.period,
                    &read.accounts,
                    (read.rated.get(customer), &read.metered),
                    *next,
                )
                .await;
            match invoice {
                Ok((Some(invoice), caught_up)) => {
                    outcome.caught_up += usize::from(caught_up);
                    // Every amount must fit its column, checked here so
                    // that one customer's cannot fail the chunk's insert.
                    if let Err(unfit) = invoice.to_rows(0, 0) {
                        let error = Error::Amount {
                            customer: customer.clone(),
                            reason: unfit.to_string(),
                        };
                        self.failed(customer, start_s, run.now, run.dry_run, error, outcome)
                            .await;
                        continue;
                    }
                    issued.push(invoice);
                    *next += 1;
                }
                Ok((None, caught_up)) => {
                    outcome.caught_up += usize::from(caught_up);
                    outcome.nothing_to_bill += 1;
                }
                // The store failing is everyone's problem.
                Err(Error::Store(error)) => return Err(Error::Store(error)),
                Err(error) => {
                    self.failed(customer, start_s, run.now, run.dry_run, error, outcome)
                        .await
                }
            }
        }
        Ok(issued)
    }

    /// Issues a chunk's invoices: in the ledger when there is one (which
    /// may refuse some, reported here), else in ClickHouse, written in the
    /// background (`writing`) after the previous chunk's write; a dry run
    /// writes nothing and compares the chunk's issued invoices instead.
    /// Returns the invoices issued.
    async fn write_chunk(
        &self,
        run: &Run,
        invoices: Vec<Invoice>,
        read: &ChunkRead,
        writing: &mut Option<tokio::task::JoinHandle<Result<()>>>,
        outcome: &mut CloseOutcome,
    ) -> Result<Vec<Invoice>> {
        let now_s = unix_seconds(run.now);
        if run.dry_run {
            self.compare_issued(
                outcome,
                run.period,
                &read.accounts,
                (&read.rated, &read.metered),
            )
            .await?;
            return Ok(invoices);
        }
        if let Some(ledger) = &self.ledger {
            let waiting = std::time::Instant::now();
            let (issued, already, refused) = self
                .issue_in_ledger(ledger, run.period.0, invoices, now_s, run.written_ms)
                .await?;
            outcome.timings.write_wait += waiting.elapsed();
            outcome.already_issued.extend(already);
            for (customer, reason) in refused {
                let error = Error::Amount {
                    customer: customer.clone(),
                    reason,
                };
                let start_s = unix_seconds(run.period.0);
                self.failed(&customer, start_s, run.now, false, error, outcome)
                    .await;
            }
            return Ok(issued);
        }
        let rows = chunk_rows(&invoices, now_s, run.written_ms)?;
        let waiting = std::time::Instant::now();
        if let Some(previous) = writing.take() {
            previous
                .await
                .map_err(|error| Error::Write(error.to_string()))??;
        }
        outcome.timings.write_wait += waiting.elapsed();
        let store = self.store.clone();
        *writing = Some(tokio::spawn(async move { write_rows(&store, rows).await }));
        Ok(invoices)
    }

    /// The rater's quantities of the customers `first..=last` for the
    /// period starting `start` that can be billed as they are through
    /// `until` ([`Store::rated_through`]). A customer left out is rated
    /// from its samples by [`Self::usage_at`].
    async fn rated_in(
        &self,
        first: &str,
        last: &str,
        period: (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<HashMap<String, RatedQuantities>> {
        let rated = self
            .store
            .rated_through((first, last), period, &self.sheet_checksum)
            .await?;
        for row in &rated.incomplete {
            if row.as_of >= unix_seconds(period.1) && !row.usage.is_empty() {
                // The rater re-rates it on a later pass; the close cannot wait.
                tracing::info!(customer = %row.customer, rated = row.samples, "the rater's period-end state did not rate every stored sample; rating the period from its samples");
            }
        }
        Ok(rated.complete)
    }

    /// In a dry run: what each already issued invoice of the chunk would
    /// total if it were issued now.
    async fn compare_issued(
        &self,
        outcome: &mut CloseOutcome,
        period: (DateTime<Utc>, DateTime<Utc>),
        accounts: &Accounts,
        (rated, metered): (&HashMap<String, RatedQuantities>, &MeteredRange),
    ) -> Result<()> {
        for (customer, header) in &accounts.invoiced_now {
            if let (Some(recomputed), _) = self
                .invoice_of(
                    customer,
                    period,
                    accounts,
                    (rated.get(customer), metered),
                    header.number,
                )
                .await?
            {
                let issued = idlemeter_store::from_column(header.total)?;
                if recomputed.total != issued {
                    outcome.differences.push((
                        header.number,
                        customer.clone(),
                        issued,
                        recomputed.total,
                    ));
                }
            }
        }
        Ok(())
    }

    async fn failed(
        &self,
        customer: &str,
        period_start: u32,
        now: DateTime<Utc>,
        dry_run: bool,
        error: Error,
        outcome: &mut CloseOutcome,
    ) {
        tracing::error!(%customer, %error, "invoice not computed; invoicing the others");
        if !dry_run {
            self.report_failure(customer, period_start, now, &error)
                .await;
        }
        outcome
            .failed
            .push((customer.to_owned(), error.to_string()));
    }

    /// The invoice of one customer for [start, end) as at `end`, numbered
    /// `number`; `None` when there is nothing to bill. Also says whether the
    /// customer's quantities had to be caught up from samples.
    async fn invoice_of(
        &self,
        customer: &str,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
        accounts: &Accounts,
        (rated, metered): (Option<&RatedQuantities>, &MeteredRange),
        number: u64,
    ) -> Result<(Option<Invoice>, bool)> {
        let id = CustomerId::parse(customer.to_owned()).map_err(|error| Error::Quantities {
            customer: customer.to_owned(),
            reason: error.to_string(),
        })?;
        let (mut usage, caught_up) = self.usage_at(&id, start, end, rated).await?;
        self.apply_metered(&mut usage, metered)?;
        let account = accounts.account(&id);
        let mut invoice = self.invoice(&id, &usage, &account, start, end, number)?;
        if let Some(invoice) = &mut invoice {
            invoice.buyer = accounts.buyers.get(customer).cloned().unwrap_or_default();
        }
        Ok((invoice, caught_up))
    }

    /// The bill of `usage` with `account`, as an invoice; `None` when
    /// nothing was used and nothing is charged (no invoice, no number).
    fn invoice(
        &self,
        customer: &CustomerId,
        usage: &CustomerUsage,
        account: &Account,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        number: u64,
    ) -> Result<Option<Invoice>> {
        let bill = bill(&self.sheet, usage, account)?;
        if bill.bills_nothing() {
            return Ok(None);
        }
        debug_assert_eq!(&bill.customer, customer);
        let invoice = Invoice::from_bill(
            &self.terms.issuer,
            number,
            &bill,
            BillContext {
                start,
                end,
                currency: self.sheet.currency.code().to_owned(),
                sheet: self.sheet_label.clone(),
                sheet_checksum: self.sheet_checksum.clone(),
                idle_policy: idlemeter_core::IdlePolicy::version(&self.idle).to_owned(),
            },
        );
        if !invoice.lines_add_up() {
            return Err(Error::Amount {
                customer: customer.to_string(),
                reason: format!("lines do not add up to the total {}", invoice.total),
            });
        }
        Ok(Some(invoice))
    }

    /// Puts a customer's metered quantities of `metered` on `usage`, in
    /// place of what the rater's figure held for them.
    fn apply_metered(&self, usage: &mut CustomerUsage, metered: &MeteredRange) -> Result<()> {
        if self.meters.is_empty() {
            return Ok(());
        }
        let quantities =
            metered
                .of(usage.customer.as_str())
                .map_err(|reason| Error::Quantities {
                    customer: usage.customer.to_string(),
                    reason: reason.to_owned(),
                })?;
        self.meters.apply(&self.sheet, usage, quantities);
        Ok(())
    }

    /// A customer's rated quantities of the period starting at `start`,
    /// through `until`: the rater's, when [`Self::rated_in`] found them
    /// complete; else its newest state before `until` that rated every
    /// sample stored before its end (or nothing) carried forward by the
    /// stored samples since, as the rater would (`true`: caught up here).
    async fn usage_at(
        &self,
        customer: &CustomerId,
        start: DateTime<Utc>,
        until: DateTime<Utc>,
        rated: Option<&RatedQuantities>,
    ) -> Result<(CustomerUsage, bool)> {
        if let Some(rated) = rated {
            let usage = CustomerUsage::from_text(&rated.usage, customer.clone(), &self.sheet)
                .map_err(|error| Error::Quantities {
                    customer: customer.to_string(),
                    reason: error.to_string(),
                })?;
            return Ok((usage, false));
        }
        let saved = self
            .store
            .rating_state_before(customer, start, (&self.sheet, &self.sheet_checksum), until)
            .await?;
        let (mut state, from_ms) = match saved {
            Some(saved) if self.rated_all(customer, start, &saved).await? => {
                (saved.state, saved.as_of_ms)
            }
            saved => {
                if let Some(saved) = saved {
                    tracing::info!(%customer, rated = saved.samples, "stored rating state did not rate every stored sample before its end; rating the period from its samples");
                }
                (RatingState::new(&self.sheet), unix_ms(start))
            }
        };
        let samples = NumberedSample::numbered(
            self.store
                .samples_for_rating(customer, from_ms, unix_ms(until))
                .await?,
        );
        state.advance(&self.sheet, &samples, &self.idle);
        let usage = state
            .usage(&self.sheet, &self.idle)
            .customers
            .into_iter()
            .find(|usage| &usage.customer == customer)
            .unwrap_or_else(|| CustomerUsage::nothing(customer.clone(), &self.sheet));
        Ok((usage, true))
    }

    /// Whether `saved`, a state of the period starting at `start`, rated
    /// every distinct sample stored from `start` up to its end.
    async fn rated_all(
        &self,
        customer: &CustomerId,
        start: DateTime<Utc>,
        saved: &SavedState,
    ) -> Result<bool> {
        let id = customer.as_str();
        let stored = self
            .store
            .sample_counts(Counted::Distinct, (id, id), unix_ms(start), saved.as_of_ms)
            .await?;
        Ok(stored.get(id).copied().unwrap_or(0) == saved.samples)
    }

    /// Stores why a customer's invoice was not computed in `rating_errors`
    /// (field `invoice`), beside the rater's reports.
    async fn report_failure(
        &self,
        customer: &str,
        period_start: u32,
        now: DateTime<Utc>,
        error: &Error,
    ) {
        let row = idlemeter_store::RatingErrorRow {
            customer: customer.to_owned(),
            sandbox: String::new(),
            epoch: 0,
            seq: 0,
            field: "invoice".to_owned(),
            reason: error.to_string(),
            period_start,
            sheet_checksum: self.sheet_checksum.clone(),
            detected_at: unix_seconds(now),
        };
        if let Err(store_error) = self.store.insert_rating_errors(&[row]).await {
            tracing::warn!(%customer, %store_error, "could not store the invoicing error");
        }
    }
}

/// What a close did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct CloseOutcome {
    /// Newly issued invoices (would-be, in a dry run), in number order: the
    /// first `keep_issued` of them.
    pub issued: Vec<Invoice>,
    /// How many were issued, and their totals per currency.
    pub issued_count: usize,
    pub issued_totals: BTreeMap<String, Decimal>,
    /// Customers whose invoice for the period already existed (headers).
    pub already_issued: Vec<Invoice>,
    /// For already issued invoices in a dry run: what a re-issue would total
    /// now, where it differs (the difference will be an adjustment).
    pub differences: Vec<(u64, String, Decimal, Decimal)>,
    /// Customers with nothing to bill.
    pub nothing_to_bill: usize,
    /// Customers skipped because they have an invoice for a later period.
    pub behind_a_later_invoice: Vec<String>,
    /// Customers whose period-end rated quantities were missing or behind
    /// the period's end and were caught up from their samples here.
    pub caught_up: usize,
    /// Invoiced periods not compared for an adjustment: no rated quantities
    /// of them under this sheet.
    pub not_adjustable: usize,
    /// Customers whose invoice could not be computed (an amount too large
    /// to compute exactly, lines that do not add up), with why: reported in
    /// `rating_errors` and left unissued, while everyone else is invoiced.
    /// A later run retries them.
    pub failed: Vec<(String, String)>,
    /// Where the time went.
    pub timings: CloseTimings,
}

impl CloseOutcome {
    /// Counts a chunk's issued invoices into the totals per currency,
    /// keeping the first `keep` of them whole.
    fn count_issued(&mut self, invoices: Vec<Invoice>, keep: usize) {
        for invoice in invoices {
            self.issued_count += 1;
            *self
                .issued_totals
                .entry(invoice.currency.clone())
                .or_default() += invoice.total;
            if self.issued.len() < keep {
                self.issued.push(invoice);
            }
        }
    }
}

/// Where a close's time went: reading accounts and rated quantities,
/// billing, and waiting for the previous chunk's write (the rest of each
/// write overlaps the next chunk).
#[derive(Debug, Clone, Copy, Default)]
pub struct CloseTimings {
    pub read: Duration,
    pub bill: Duration,
    pub write_wait: Duration,
}

/// What one close is: its period, when it runs, whether it writes, and
/// the version its lines are written with.
struct Run {
    period: (DateTime<Utc>, DateTime<Utc>),
    now: DateTime<Utc>,
    dry_run: bool,
    written_ms: u64,
}

/// What a close reads for a chunk of customers.
struct ChunkRead {
    accounts: Accounts,
    rated: HashMap<String, RatedQuantities>,
    metered: MeteredRange,
}

/// A chunk's invoices as rows: (headers, lines).
type ChunkRows = (
    Vec<idlemeter_store::InvoiceRow>,
    Vec<idlemeter_store::InvoiceLineRow>,
);

fn chunk_rows(invoices: &[Invoice], issued_at: u32, written_ms: u64) -> Result<ChunkRows> {
    let mut headers = Vec::with_capacity(invoices.len());
    let mut lines = Vec::new();
    for invoice in invoices {
        let (header, rows) = invoice.to_rows(issued_at, written_ms)?;
        headers.push(header);
        lines.extend(rows);
    }
    Ok((headers, lines))
}

/// Lines first, then the headers in one insert: the headers are the
/// chunk's commit marker.
async fn write_rows(store: &Store, (headers, lines): ChunkRows) -> Result<()> {
    if headers.is_empty() {
        return Ok(());
    }
    store.insert_invoice_lines(&lines).await?;
    store.insert_invoices(&headers).await?;
    Ok(())
}

/// An exclusive lock on a file, held until dropped.
#[derive(Debug)]
struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    /// Waits (up to 10 minutes) for the lock: a second run waits for the
    /// first, then finds its invoices issued.
    async fn acquire(path: &str) -> Result<Self> {
        let failed = |reason: String| Error::Lock {
            path: path.to_owned(),
            reason,
        };
        let path_buf = PathBuf::from(path);
        if let Some(parent) = path_buf.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| failed(e.to_string()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path_buf)
            .map_err(|e| failed(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(failed(
                            "still held by another run after 10 minutes".to_owned(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(std::fs::TryLockError::Error(error)) => return Err(failed(error.to_string())),
            }
        }
    }
}
