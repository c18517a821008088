//! The open hour: live figures rated from the samples that arrived since
//! the last look, ahead of the last final snapshot.

use super::*;

/// What one live pass rated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LivePass {
    pub customers_rated: usize,
    pub customers_failed: usize,
    pub samples_read: usize,
}

/// A customer's state ahead of the last final hour: the live figure's.
#[derive(Debug, Clone)]
pub(crate) struct LiveState {
    period_start: DateTime<Utc>,
    state: RatingState,
    /// Newest sample time rated, Unix ms.
    newest_ms: u64,
    /// The account the live figure bills with, and when it was read (`None`:
    /// to be read before the next figure).
    account: Account,
    account_read: Option<std::time::Instant>,
    /// Metered quantities of the period, read with the account.
    metered: Vec<Metered>,
}

/// A customer's metered quantities for a live figure: a refusal is logged
/// and leaves them out (the hourly pass records it against the customer).
fn live_metered(range: &MeteredRange, customer: &CustomerId) -> Vec<Metered> {
    match range.of(customer.as_str()) {
        Ok(metered) => metered.to_vec(),
        Err(reason) => {
            tracing::warn!(%customer, %reason, "metered usage left out of the live figure");
            Vec::new()
        }
    }
}

impl Rater {
    /// Rates the open hour from the store (the `clickhouse` live source):
    /// every customer's samples of the last `live_interval_seconds +
    /// live_lateness_seconds`, with each series' baseline before them, read
    /// in one query, then [`Self::rate_live_samples`]. The query filters
    /// `usage_samples` by time, which its order key does not lead with: fine
    /// for tests and small fleets; fleets use the `kafka` live source.
    pub async fn rate_live(&self, now: DateTime<Utc>) -> Result<LivePass> {
        let lateness = chrono::Duration::seconds(self.config.live_lateness_seconds as i64);
        let window = chrono::Duration::seconds(self.config.live_interval_seconds.max(1) as i64);
        let period_start = self.period().start_of(now);
        let from = (now - window - lateness).max(period_start);
        let recent = self
            .store
            .samples_for_rating_range("", "\u{10ffff}", unix_ms(from), unix_ms(now) + 1)
            .await?;
        self.rate_live_samples(now, recent).await
    }

    /// Rates `recent` samples (from the store or the stream, in any order)
    /// into the live figures of their customers: each customer's live state
    /// carried forward by them, billed, and every figure written to
    /// `live_usage` in one insert. A customer seen for the first time (or in
    /// a new period) is resumed from its newest final state and its stored
    /// samples since; after that only new samples are rated. A series'
    /// baseline bridges samples a pass did not see: with counters that costs
    /// no money (see the module doc).
    pub async fn rate_live_samples(
        &self,
        now: DateTime<Utc>,
        recent: Vec<UsageSample>,
    ) -> Result<LivePass> {
        self.follow_shares();
        let period_start = self.period().start_of(now);
        let mut pass = LivePass {
            samples_read: recent.len(),
            ..LivePass::default()
        };
        self.metrics.samples_read.inc_by(recent.len() as u64);
        // Grouped by moving each sample once (a pass at 100k samples/s holds
        // a second of them; sorting them would move each many times).
        let mut by_customer: HashMap<CustomerId, Vec<NumberedSample>> = HashMap::new();
        for numbered in NumberedSample::numbered(recent) {
            match by_customer.get_mut(&numbered.sample.customer) {
                Some(group) => group.push(numbered),
                None => {
                    by_customer.insert(numbered.sample.customer.clone(), vec![numbered]);
                }
            }
        }
        let mut customers: Vec<&CustomerId> = by_customer.keys().collect();
        self.keep_mine(&mut customers, |customer| customer.as_str(), LANE_REFRESH)
            .await?;
        customers.sort();
        self.resume_live(&customers, period_start, now, &mut pass)
            .await?;
        self.refresh_accounts(&customers, period_start, now).await?;
        // Every customer's figure in one insert: one per customer would
        // cost a round trip each.
        let mut pending = Vec::new();
        for customer in customers {
            let group = &by_customer[customer];
            match self
                .rate_live_customer(customer, period_start, now, group, &mut pass, &mut pending)
                .await
            {
                Ok(()) => pass.customers_rated += 1,
                Err(Error::Store(error)) => return Err(Error::Store(error)),
                Err(error) => {
                    tracing::warn!(%customer, %error, "live rating of this customer failed; the hour's final rating will report it");
                    pass.customers_failed += 1;
                }
            }
        }
        if !pending.is_empty() {
            self.store.insert_live_lines(&pending).await?;
        }
        Ok(pass)
    }

    /// Gives every one of `customers` (sorted) without a live state one: its
    /// newest final state carried forward by its stored samples since, read
    /// for up to `RESUME_CHUNK` customers per query (a restarted rater
    /// resumes a thousand customers in a few queries, not two thousand).
    async fn resume_live(
        &self,
        customers: &[&CustomerId],
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
        pass: &mut LivePass,
    ) -> Result<()> {
        const RESUME_CHUNK: usize = 200;
        let missing: Vec<CustomerId> = {
            let live = self.live.lock().expect("not poisoned");
            customers
                .iter()
                .filter(|customer| !live.contains_key(**customer))
                .map(|customer| (*customer).clone())
                .collect()
        };
        for (chunk, first, last) in idlemeter_core::ids::id_ranges(&missing, RESUME_CHUNK) {
            let stored = self
                .store
                .rating_states_before(
                    (first.as_str(), last.as_str()),
                    period_start,
                    self.sheet_key(),
                    now,
                )
                .await?;
            let mut states: HashMap<String, (RatingState, u64)> = stored
                .into_iter()
                .map(|saved| (saved.customer, (saved.state, saved.as_of_ms)))
                .collect();
            let (accounts, metered) = self
                .accounts_and_metered((first.as_str(), last.as_str()), period_start, now)
                .await?;
            let from_ms = chunk
                .iter()
                .map(|customer| {
                    states
                        .get(customer.as_str())
                        .map_or(unix_ms(period_start), |(_, from)| *from)
                })
                .min()
                .unwrap_or(unix_ms(period_start));
            let samples = self
                .store
                .samples_for_rating_range(first.as_str(), last.as_str(), from_ms, unix_ms(now) + 1)
                .await?;
            pass.samples_read += samples.len();
            self.metrics.samples_read.inc_by(samples.len() as u64);
            for customer in chunk {
                let (mut state, resumed_ms) = states
                    .remove(customer.as_str())
                    .unwrap_or_else(|| (RatingState::new(&self.sheet), unix_ms(period_start)));
                let own = NumberedSample::numbered(
                    samples
                        .iter()
                        .filter(|sample| &sample.customer == customer)
                        .cloned(),
                );
                // What the final state already rated is at or below its
                // baselines: advancing skips it.
                state.advance(&self.sheet, &own, &self.idle);
                let newest_ms = own
                    .iter()
                    .map(|numbered| unix_ms(numbered.sample.ts))
                    .max()
                    .unwrap_or(resumed_ms);
                self.live.lock().expect("not poisoned").insert(
                    customer.clone(),
                    LiveState {
                        period_start,
                        state,
                        newest_ms,
                        account: accounts.account(customer),
                        account_read: Some(std::time::Instant::now()),
                        metered: live_metered(&metered, customer),
                    },
                );
            }
        }
        Ok(())
    }

    /// Reads again, a range of up to `ACCOUNT_CHUNK` customers per query,
    /// the accounts of those of `customers` (sorted) whose live account is
    /// older than `account_refresh_seconds`.
    async fn refresh_accounts(
        &self,
        customers: &[&CustomerId],
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        const ACCOUNT_CHUNK: usize = 200;
        let refresh = Duration::from_secs(self.config.account_refresh_seconds);
        let stale: Vec<CustomerId> = {
            let live = self.live.lock().expect("not poisoned");
            customers
                .iter()
                .filter(|customer| {
                    live.get(**customer).is_some_and(|state| {
                        state.period_start == period_start
                            && state
                                .account_read
                                .is_none_or(|read| read.elapsed() >= refresh)
                    })
                })
                .map(|customer| (*customer).clone())
                .collect()
        };
        for (chunk, first, last) in idlemeter_core::ids::id_ranges(&stale, ACCOUNT_CHUNK) {
            let (accounts, metered) = self
                .accounts_and_metered((first.as_str(), last.as_str()), period_start, now)
                .await?;
            let mut live = self.live.lock().expect("not poisoned");
            for customer in chunk {
                if let Some(state) = live.get_mut(customer) {
                    state.account = accounts.account(customer);
                    state.metered = live_metered(&metered, customer);
                    state.account_read = Some(std::time::Instant::now());
                }
            }
        }
        Ok(())
    }

    async fn rate_live_customer(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
        recent: &[NumberedSample],
        pass: &mut LivePass,
        pending: &mut Vec<RatedLineRow>,
    ) -> Result<()> {
        let cached = self.live.lock().expect("not poisoned").remove(customer);
        let (mut live, samples): (LiveState, Cow<'_, [NumberedSample]>) = match cached {
            Some(live) if live.period_start == period_start => (live, Cow::Borrowed(recent)),
            // The period turned: the old period's last samples move the
            // baselines, which carry into the new one.
            Some(mut live) if live.period_start < period_start => {
                let (old, new): (Vec<NumberedSample>, Vec<NumberedSample>) = recent
                    .iter()
                    .cloned()
                    .partition(|numbered| numbered.sample.ts < period_start);
                live.state.advance(&self.sheet, &old, &self.idle);
                let next = LiveState {
                    period_start,
                    state: live.state.next_period(),
                    newest_ms: unix_ms(period_start),
                    account: Account::default(),
                    account_read: None,
                    metered: Vec::new(),
                };
                (next, Cow::Owned(new))
            }
            // `resume_live` gave every customer of the pass a live state;
            // only a clock that went back across a period start gets here.
            _ => {
                self.resume_live(&[customer], period_start, now, pass)
                    .await?;
                let live = self
                    .live
                    .lock()
                    .expect("not poisoned")
                    .remove(customer)
                    .expect("resume_live inserts a state for every customer it is given");
                (live, Cow::Borrowed(recent))
            }
        };
        let newest = samples
            .iter()
            .map(|numbered| unix_ms(numbered.sample.ts))
            .max()
            .unwrap_or(live.newest_ms);
        live.state.advance(&self.sheet, &samples, &self.idle);
        live.newest_ms = live.newest_ms.max(newest);
        if live.account_read.is_none() {
            let (account, metered) = self
                .account_and_metered(customer, period_start, now)
                .await?;
            live.account = account;
            live.metered = live_metered(&metered, customer);
            live.account_read = Some(std::time::Instant::now());
        }
        let (report, _) = self.report(customer, &live.state, &live.account, &live.metered)?;
        let as_of_secs = u32::try_from(live.newest_ms / 1000).unwrap_or(u32::MAX);
        let rows = match bill_of(&report, customer) {
            Some(bill) => self.bill_rows(
                &report,
                bill,
                unix_seconds(period_start),
                as_of_secs,
                unix_seconds(now),
            )?,
            None => Vec::new(),
        };
        if !rows.is_empty() {
            pending.extend(rows);
            self.metrics.live_figures_written.inc();
        }
        self.live
            .lock()
            .expect("not poisoned")
            .insert(customer.clone(), live);
        Ok(())
    }
}
