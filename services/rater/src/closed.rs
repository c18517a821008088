//! Closed hours: each customer's hourly final snapshot carried from the
//! hour before, and finished periods re-rated when their stored samples
//! differ from what their period-end state rated.

use super::*;

/// What one pass rated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RatingPass {
    pub snapshots_written: usize,
    /// Snapshots found already written (a customer rated through the newest
    /// closed hour counts once, whatever its hours).
    pub snapshots_present: usize,
    pub changes_recorded: usize,
    pub samples_refused: usize,
    /// Customers whose rating failed (reported in `rating_errors`).
    pub customers_failed: usize,
    /// Finished periods re-rated because samples arrived after their last
    /// hour was rated.
    pub periods_rerated: usize,
    /// Samples read from the store by this pass.
    pub samples_read: usize,
}

/// A customer's newest final state, kept so the next hour need not read it
/// back.
#[derive(Debug, Clone)]
pub(crate) struct FinalState {
    period_start: DateTime<Utc>,
    /// The end of the hour it rates through.
    as_of: DateTime<Utc>,
    state: RatingState,
    /// How many of the period's samples it has rated (see [`Rated`]).
    samples: u64,
}

/// A state to go on rating from: what it covers and how much of it.
#[derive(Debug)]
struct Rated {
    state: RatingState,
    /// The time (Unix ms) its samples run to.
    until_ms: u64,
    /// How many distinct samples of the period (taken from its start up to
    /// `until_ms`) it has rated: each read's samples in its own range,
    /// added up hour after hour. Stored with every state; the period-end
    /// state's figure is compared with the period's stored samples, and a
    /// difference (samples that arrived after their hour was rated, or a
    /// read that came from a replica still catching up) re-rates the
    /// period (`Rater::rerate_late`).
    samples: u64,
}

impl FinalState {
    fn of(period_start: DateTime<Utc>, as_of: DateTime<Utc>, rated: Rated) -> Self {
        Self {
            period_start,
            as_of,
            state: rated.state,
            samples: rated.samples,
        }
    }
}

/// How many of `samples` (a read of `[from_ms, ..)` with its baselines)
/// were taken in the read's own range: what the read adds to a state's
/// count.
fn in_range(samples: &[NumberedSample], from_ms: u64) -> u64 {
    samples
        .iter()
        .filter(|numbered| {
            u64::try_from(numbered.sample.ts.timestamp_millis()).is_ok_and(|ts| ts >= from_ms)
        })
        .count() as u64
}

impl Rater {
    /// Rates every closed hour of the current period (and the previous one, so
    /// a period's last hours are rated after a restart across its end) in
    /// which a customer has samples, and the newest closed hour, that has no
    /// snapshot under this sheet yet; then re-rates finished periods that
    /// received samples since their last hour was rated. Idempotent: a second
    /// call with the same `now` writes nothing.
    pub async fn rate_closed_hours(&self, now: DateTime<Utc>) -> Result<RatingPass> {
        self.follow_shares();
        let closed_until =
            floor_hour(now - chrono::Duration::seconds(self.config.grace_seconds as i64));
        let last_hour_start = closed_until - chrono::Duration::hours(1);
        let current = self.period().start_of(last_hour_start);
        let previous = self.period().previous(current);
        let mut pass = RatingPass::default();
        for period_start in [previous, current] {
            let full_end = self.period().next(period_start);
            let period_end = full_end.min(closed_until);
            let customers = self
                .my_customers_with_usage(period_start, period_end, true)
                .await?;
            for (customer, _, _) in &customers {
                // One query for what this sheet already rated, not one per hour.
                let rated = self
                    .store
                    .rated_hours(customer, unix_seconds(period_start), &self.sheet_checksum)
                    .await?;
                if rated.contains(&unix_seconds(period_end)) {
                    // Rated through the newest closed hour: nothing is due
                    // (late samples of a finished period: `rerate_late`).
                    pass.snapshots_present += 1;
                    continue;
                }
                // Only hours in which samples close intervals can differ from
                // the hour before (a quiet hour's snapshot would repeat it;
                // readers take the newest snapshot at or before a time), and
                // the newest closed hour, so that the state reaches it.
                let mut due: BTreeSet<DateTime<Utc>> = self
                    .store
                    .sample_hours(customer, unix_ms(period_start), unix_ms(period_end))
                    .await?
                    .into_iter()
                    .filter_map(|hour| DateTime::from_timestamp(i64::from(hour) + 3600, 0))
                    .filter(|as_of| *as_of <= period_end)
                    .collect();
                due.insert(period_end);
                for as_of in due {
                    if rated.contains(&unix_seconds(as_of)) {
                        pass.snapshots_present += 1;
                    } else if let Err(error) = self
                        .rate_snapshot(customer, (period_start, as_of), now, &mut pass)
                        .await
                    {
                        // The store failing is everyone's problem: retry the
                        // pass. Anything else is this customer's.
                        if matches!(error, Error::Store(_)) {
                            return Err(error);
                        }
                        self.customer_failed(customer, period_start, now, &error)
                            .await;
                        pass.customers_failed += 1;
                        break;
                    }
                }
            }
            if period_end == full_end {
                self.rerate_late(period_start, &customers, now, &mut pass)
                    .await?;
            }
        }
        // Periods before the previous one that an invoice may still adjust:
        // looked at once per closed hour.
        let look_back = {
            let mut last = self.lookback_checked.lock().expect("not poisoned");
            let due = *last != Some(closed_until);
            *last = Some(closed_until);
            due
        };
        if look_back {
            let mut period_start = previous;
            for _ in 1..self.terms.adjust_lookback_periods {
                period_start = self.period().previous(period_start);
                let customers = self
                    .my_customers_with_usage(period_start, self.period().next(period_start), false)
                    .await?;
                self.rerate_late(period_start, &customers, now, &mut pass)
                    .await?;
            }
        }
        Ok(pass)
    }

    /// Re-rates, from its samples, the finished period of every customer
    /// whose period-end state did not rate every sample stored for the
    /// period: samples that arrived after their hour was rated, or a read
    /// served by a replica still catching up. The new period-end state is
    /// what the close bills, or, after the close, what the next invoice
    /// adjusts for. `customers` carries each one's stored row count
    /// (duplicates not yet merged included): when it equals the state's
    /// count nothing is due; otherwise the distinct samples decide, so
    /// duplicates awaiting a merge never re-rate a period.
    async fn rerate_late(
        &self,
        period_start: DateTime<Utc>,
        customers: &[(CustomerId, u64, u64)],
        now: DateTime<Utc>,
        pass: &mut RatingPass,
    ) -> Result<()> {
        if customers.is_empty() {
            return Ok(());
        }
        let end = self.period().next(period_start);
        let mine: HashMap<&str, &CustomerId> = customers
            .iter()
            .map(|(customer, _, _)| (customer.as_str(), customer))
            .collect();
        let stored_rows: HashMap<String, u64> = customers
            .iter()
            .map(|(customer, _, rows)| (customer.to_string(), *rows))
            .collect();
        let rated: Vec<_> = self
            .store
            .rated_quantities(
                "",
                "\u{10ffff}",
                unix_seconds(period_start),
                &self.sheet_checksum,
            )
            .await?
            .into_iter()
            .filter(|row| mine.contains_key(row.customer.as_str()))
            .collect();
        // The states not complete through the period's end: those that
        // reach it but did not rate every stored sample. States older than
        // migration 0011 (no closed quantities) are never complete, and are
        // left alone: their periods were invoiced from samples, and
        // re-rating them now would start adjusting invoices an older
        // release issued.
        let split = self
            .store
            .split_complete(rated, &stored_rows, (period_start, end))
            .await?;
        let short = split
            .incomplete
            .iter()
            .filter(|row| row.as_of >= unix_seconds(end) && !row.usage.is_empty());
        for row in short {
            let Some(&customer) = mine.get(row.customer.as_str()) else {
                continue;
            };
            tracing::info!(%customer, period = %period_start, rated = row.samples, "samples the period-end state did not rate: re-rating the period");
            match self.rerate_period(customer, period_start, now, pass).await {
                Ok(()) => pass.periods_rerated += 1,
                Err(Error::Store(error)) => return Err(Error::Store(error)),
                Err(error) => {
                    self.customer_failed(customer, period_start, now, &error)
                        .await;
                    pass.customers_failed += 1;
                }
            }
        }
        Ok(())
    }

    /// The period-end state of a finished period, rated again from its
    /// first sample (see [`Self::rerate_late`]).
    async fn rerate_period(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
        pass: &mut RatingPass,
    ) -> Result<()> {
        let end = self.period().next(period_start);
        let mut state = RatingState::new(&self.sheet);
        let samples = self
            .read_samples(
                customer,
                unix_ms(period_start),
                unix_ms(end),
                &mut pass.samples_read,
            )
            .await?;
        let errors = state.advance(&self.sheet, &samples, &self.idle);
        self.report_refused(customer, period_start, &samples, &errors, now)
            .await?;
        let rated = Rated {
            state,
            until_ms: unix_ms(end),
            samples: in_range(&samples, unix_ms(period_start)),
        };
        let report = self
            .store_state(customer, (period_start, end), &rated, now)
            .await?;
        self.rewrite_lines(customer, &report, (period_start, end), now)
            .await?;
        let mut finals = self.finals.lock().expect("not poisoned");
        if finals
            .get(customer)
            .is_some_and(|last| last.period_start == period_start)
        {
            finals.insert(customer.clone(), FinalState::of(period_start, end, rated));
        }
        Ok(())
    }

    /// Writes the snapshot at `as_of` again from a re-rated `report`, so
    /// that what the API, spend alerts and dashboards read for the period
    /// is the figure its close bills. A line the new bill no longer has is
    /// written again at zero: the table keeps the newest row per line
    /// number, and the old one must not count.
    async fn rewrite_lines(
        &self,
        customer: &CustomerId,
        report: &RateReport,
        (period_start, as_of): (DateTime<Utc>, DateTime<Utc>),
        now: DateTime<Utc>,
    ) -> Result<()> {
        let Some(bill) = bill_of(report, customer) else {
            return Ok(());
        };
        let (period_secs, as_of_secs, rated_at) = (
            unix_seconds(period_start),
            unix_seconds(as_of),
            unix_seconds(now),
        );
        let mut rows = self.bill_rows(report, bill, period_secs, as_of_secs, rated_at)?;
        let old = self
            .store
            .rated_lines(customer, period_secs, &self.sheet_checksum, as_of_secs)
            .await?;
        let kept = rows.len();
        for mut gone in old
            .into_iter()
            .filter(|row| usize::from(row.line_no) >= kept)
        {
            gone.quantity = 0;
            gone.amount = 0;
            gone.rated_at = rated_at;
            rows.push(gone);
        }
        self.store.insert_rated_lines(&rows).await?;
        Ok(())
    }

    /// Rates one customer's hour ending `as_of` of the period starting
    /// `period_start`.
    async fn rate_snapshot(
        &self,
        customer: &CustomerId,
        (period_start, as_of): (DateTime<Utc>, DateTime<Utc>),
        now: DateTime<Utc>,
        pass: &mut RatingPass,
    ) -> Result<()> {
        let (period_secs, as_of_secs) = (unix_seconds(period_start), unix_seconds(as_of));
        // Snapshots of other sheet versions: the new one is explained against them.
        let existing = self
            .store
            .snapshot_totals(customer, period_secs, as_of_secs)
            .await?;
        if existing
            .iter()
            .any(|(checksum, _)| checksum == &self.sheet_checksum)
        {
            pass.snapshots_present += 1;
            return Ok(());
        }
        // The newest state at or before this hour: usually the hour before;
        // this hour's own when a pass stored it and died before the lines
        // (it then rates nothing more); an older one after a gap.
        let mut rated = self.resume(customer, period_start, as_of).await?;
        let samples = self
            .read_samples(
                customer,
                rated.until_ms,
                unix_ms(as_of),
                &mut pass.samples_read,
            )
            .await?;
        let errors = rated.state.advance(&self.sheet, &samples, &self.idle);
        self.report_refused(customer, period_start, &samples, &errors, now)
            .await?;
        pass.samples_refused += errors.len();
        rated.samples += in_range(&samples, rated.until_ms);
        rated.until_ms = unix_ms(as_of);
        // The state first: a state without lines is found by the next pass,
        // which writes the lines from it.
        let report = self
            .store_state(customer, (period_start, as_of), &rated, now)
            .await?;
        self.finals
            .lock()
            .expect("not poisoned")
            .insert(customer.clone(), FinalState::of(period_start, as_of, rated));
        let Some(bill) = bill_of(&report, customer) else {
            return Ok(());
        };
        let rated_at = unix_seconds(now);
        let rows = self.bill_rows(&report, bill, period_secs, as_of_secs, rated_at)?;
        self.store.insert_rated_lines(&rows).await?;
        self.metrics.snapshots_written.inc();
        pass.snapshots_written += 1;
        for (old_checksum, old_total) in existing {
            let change = self
                .explain_change(
                    customer,
                    &old_checksum,
                    old_total,
                    bill,
                    period_secs,
                    as_of_secs,
                    rated_at,
                )
                .await?;
            self.store.insert_rating_change(&change).await?;
            pass.changes_recorded += 1;
        }
        Ok(())
    }

    /// Bills a rated state with the customer's account as at `as_of` and
    /// stores it (with its closed quantities and the count of samples it
    /// rated); returns the bill.
    async fn store_state(
        &self,
        customer: &CustomerId,
        (period_start, as_of): (DateTime<Utc>, DateTime<Utc>),
        rated: &Rated,
        now: DateTime<Utc>,
    ) -> Result<RateReport> {
        let state = &rated.state;
        let (account, metered) = self
            .account_and_metered(customer, period_start, as_of)
            .await?;
        let metered = metered
            .of(customer.as_str())
            .map_err(|reason| Error::Metered {
                customer: customer.to_string(),
                reason: reason.to_owned(),
            })?;
        let (report, usage) = self.report(customer, state, &account, metered)?;
        self.store
            .insert_rating_state(&RatingStateRow {
                customer: customer.to_string(),
                period_start: unix_seconds(period_start),
                sheet_checksum: self.sheet_checksum.clone(),
                as_of: unix_seconds(as_of),
                series: u32::try_from(state.series_count()).unwrap_or(u32::MAX),
                state: state.to_json(),
                rated_at: unix_seconds(now),
                usage,
                samples: rated.samples,
                revision: wall_clock_ms(),
                counts_rated: 1,
            })
            .await?;
        Ok(report)
    }

    /// The state to continue from to rate up to `before`: the cached final
    /// state if it is not newer, else the newest stored one at or before it,
    /// else nothing (the period's start).
    async fn resume(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        before: DateTime<Utc>,
    ) -> Result<Rated> {
        let scratch = || Rated {
            state: RatingState::new(&self.sheet),
            until_ms: unix_ms(period_start),
            samples: 0,
        };
        if before <= period_start {
            return Ok(scratch());
        }
        if let Some(last) = self.finals.lock().expect("not poisoned").get(customer) {
            if last.period_start == period_start && last.as_of <= before {
                return Ok(Rated {
                    state: last.state.clone(),
                    until_ms: unix_ms(last.as_of),
                    samples: last.samples,
                });
            }
        }
        // A stored state that does not load is none: states are a cache of
        // the samples, and rating from the period's start gives the same
        // figures, only slower.
        let saved = self
            .store
            .rating_state_before(customer, period_start, self.sheet_key(), before)
            .await?;
        Ok(saved.map_or_else(scratch, |saved| Rated {
            state: saved.state,
            until_ms: saved.as_of_ms,
            samples: saved.samples,
        }))
    }

    /// The sheet and its checksum, as stored states are keyed.
    pub(crate) fn sheet_key(&self) -> (&PriceSheet, &str) {
        (&self.sheet, &self.sheet_checksum)
    }

    /// The customers of this replica with samples in `[start, end)` (and,
    /// with `metered`, those with metered events there), as
    /// (customer, first sample ms, sample count).
    async fn my_customers_with_usage(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        metered: bool,
    ) -> Result<Vec<(CustomerId, u64, u64)>> {
        let mut customers = self
            .store
            .customers_with_samples(unix_ms(start), unix_ms(end))
            .await?;
        if metered {
            self.add_metered_customers(&mut customers, start, end)
                .await?;
        }
        self.keep_mine(
            &mut customers,
            |(customer, _, _)| customer.as_str(),
            std::time::Duration::ZERO,
        )
        .await?;
        Ok(customers)
    }

    /// Adds to `customers` (sorted, from the samples) those with only
    /// metered usage in `[period_start, until)`, without samples counted.
    async fn add_metered_customers(
        &self,
        customers: &mut Vec<(CustomerId, u64, u64)>,
        period_start: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<()> {
        if self.meters.is_empty() {
            return Ok(());
        }
        let metered = self
            .metered_range(("", "\u{10ffff}"), period_start, until)
            .await?;
        let known: BTreeSet<CustomerId> = customers.iter().map(|(id, _, _)| id.clone()).collect();
        for name in metered.names() {
            match CustomerId::parse(name.clone()) {
                Ok(id) if !known.contains(&id) => customers.push((id, 0, 0)),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(customer = %name, %error, "metered usage of an invalid customer id is not rated")
                }
            }
        }
        customers.sort_by(|left, right| left.0.cmp(&right.0));
        Ok(())
    }

    /// Compares the new bill with the stored snapshot of another sheet version,
    /// line by line, into one readable sentence.
    #[allow(clippy::too_many_arguments)]
    async fn explain_change(
        &self,
        customer: &CustomerId,
        old_checksum: &str,
        old_total: Decimal,
        bill: &CustomerBill,
        period_start: u32,
        as_of: u32,
        detected_at: u32,
    ) -> Result<RatingChangeRow> {
        let old_lines = self
            .store
            .rated_lines(customer, period_start, old_checksum, as_of)
            .await?;
        let mut differences = Vec::new();
        for line in &bill.lines {
            let old = old_lines
                .iter()
                .find(|old| old.resource == line.resource && old.kind == line.kind.as_str());
            let mut old_amount = match old {
                Some(old) => idlemeter_store::from_column(old.amount)?,
                None => Decimal::ZERO,
            };
            // Stored amounts carry the column's 12 places; both are whole
            // minor units, so showing the old one at the new one's scale is exact.
            old_amount.rescale(line.amount.scale());
            if old_amount != line.amount {
                differences.push(format!(
                    "{} {}: {} -> {} (unit price {})",
                    line.kind.as_str(),
                    line.resource,
                    old_amount,
                    line.amount,
                    line.unit_price
                ));
            }
        }
        for old in &old_lines {
            if !bill
                .lines
                .iter()
                .any(|line| line.resource == old.resource && line.kind.as_str() == old.kind)
            {
                let old_amount = idlemeter_store::from_column(old.amount)?.normalize();
                differences.push(format!(
                    "{} {}: {} -> gone",
                    old.kind, old.resource, old_amount
                ));
            }
        }
        let explanation = if differences.is_empty() {
            format!(
                "sheet {} changed ({} -> {}) without changing this bill",
                self.sheet_label,
                short(old_checksum),
                short(&self.sheet_checksum)
            )
        } else {
            format!(
                "sheet {} changed ({} -> {}): {}",
                self.sheet_label,
                short(old_checksum),
                short(&self.sheet_checksum),
                differences.join("; ")
            )
        };
        Ok(RatingChangeRow {
            customer: customer.to_string(),
            period_start,
            as_of,
            sheet: self.sheet_label.clone(),
            old_checksum: old_checksum.to_owned(),
            new_checksum: self.sheet_checksum.clone(),
            old_total: column(old_total)?,
            new_total: column(bill.total)?,
            explanation,
            detected_at,
        })
    }
}
