//! Rating carried between passes: the state that lets a rater rate only what
//! arrived since its last pass and still get the bill a rating of the whole
//! period from scratch would.
//!
//! Rating a series is a fold over its intervals whose state is small: the
//! last good sample (the next interval's baseline) and, per resource, the
//! open span still to be rounded up to its increment. A [`RatingState`]
//! holds that per (customer, sandbox, epoch), plus the integer quantities
//! rated so far per customer, price version and resource. Advancing it with
//! the samples of the next hour (or the next few seconds) rates exactly the
//! new intervals; [`RatingState::usage`] closes the open spans on a copy, as
//! the end of the data would, so the period-to-date figures equal
//! [`crate::rate_samples`] over every sample so far while the spans stay
//! open for the next pass.
//!
//! What a pass cannot see: a sample that arrives after a later one of its
//! series was rated (its `seq` is at or below the carried baseline) is left
//! out. Where the samples carry counters that costs resolution only: the
//! next interval's counter differences include its usage. Gauge-only
//! samples (collectors that predate the counters) lose its interval's
//! gauge reading, as a lost sample would.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::LineError;
use crate::ids::{CustomerId, Epoch, SandboxId};
use crate::pricing::PriceSheet;
use crate::rating::idle::IdlePolicy;
use crate::rating::interval::{OpenSpan, SeriesRater};
use crate::rating::{series, Accumulator, NumberedSample, RatedUsage};
use crate::sample::UsageSample;

/// Why a stored state cannot continue under a sheet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("rating state is not valid JSON of format {FORMAT}: {0}")]
    Format(String),
    #[error(
        "rating state was made for a sheet with {state_versions} price versions and \
         {state_slots} resources, not this one ({sheet_versions} and {sheet_slots})"
    )]
    OtherSheet {
        state_versions: usize,
        state_slots: usize,
        sheet_versions: usize,
        sheet_slots: usize,
    },
}

const FORMAT: u32 = 1;

/// What one series carries into the next pass. The baseline is kept as a
/// numbered sample (line 0: from an earlier pass) so a pass rates from it
/// without a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CarriedSeries {
    baseline: NumberedSample,
    spans: Vec<OpenSpan>,
}

/// Carried series by sandbox, looked up without allocating a key (a live
/// pass looks up one series per sample), then by customer and epoch.
#[derive(Debug, Clone, Default)]
struct SeriesMap {
    by_sandbox: HashMap<SandboxId, Vec<CarriedSeries>>,
    len: usize,
}

impl SeriesMap {
    fn position(list: &[CarriedSeries], customer: &CustomerId, epoch: Epoch) -> Option<usize> {
        list.iter().position(|carried| {
            carried.baseline.sample.epoch == epoch && &carried.baseline.sample.customer == customer
        })
    }

    fn get(
        &self,
        customer: &CustomerId,
        sandbox: &SandboxId,
        epoch: Epoch,
    ) -> Option<&CarriedSeries> {
        let list = self.by_sandbox.get(sandbox)?;
        Self::position(list, customer, epoch).map(|index| &list[index])
    }

    fn get_mut(
        &mut self,
        customer: &CustomerId,
        sandbox: &SandboxId,
        epoch: Epoch,
    ) -> Option<&mut CarriedSeries> {
        let list = self.by_sandbox.get_mut(sandbox)?;
        Self::position(list, customer, epoch).map(|index| &mut list[index])
    }

    /// Adds a series not carried yet (its key is its baseline's).
    fn insert(&mut self, carried: CarriedSeries) {
        let sandbox = &carried.baseline.sample.sandbox;
        match self.by_sandbox.get_mut(sandbox) {
            Some(list) => list.push(carried),
            None => {
                self.by_sandbox.insert(sandbox.clone(), vec![carried]);
            }
        }
        self.len += 1;
    }

    fn values(&self) -> impl Iterator<Item = &CarriedSeries> {
        self.by_sandbox.values().flatten()
    }
}

/// The rating of a set of samples so far, ready to take more.
#[derive(Debug, Clone)]
pub struct RatingState {
    versions: usize,
    accumulator: Accumulator,
    series: SeriesMap,
}

impl PartialEq for RatingState {
    fn eq(&self, other: &Self) -> bool {
        self.stored() == other.stored()
    }
}

impl RatingState {
    /// Nothing rated yet, under `sheet`.
    pub fn new(sheet: &PriceSheet) -> Self {
        Self {
            versions: sheet.versions().len(),
            accumulator: Accumulator::new(sheet.versions().len(), sheet.slot_count()),
            series: SeriesMap::default(),
        }
    }

    /// Rates `samples` on top of what was rated before and returns the lines
    /// refused (duplicates that conflict, counters that go back, time before
    /// the sheet's first version). Samples may be in any order; a sample at
    /// or below its series' carried baseline is one rated before (or a late
    /// one, see the module doc) and is left out.
    ///
    /// `sheet` must be the sheet the state was made under: [`Self::new`] and
    /// [`Self::from_json`] check its shape; its content is the caller's key
    /// (the rater stores states under the sheet's checksum).
    pub fn advance<P: IdlePolicy>(
        &mut self,
        sheet: &PriceSheet,
        samples: &[NumberedSample],
        policy: &P,
    ) -> Vec<LineError> {
        let mut errors = Vec::new();
        let all_series = series::build_series(samples, &mut errors);
        let mut rater = SeriesRater::new(sheet, policy, &mut self.accumulator, &mut errors);
        for members in &all_series {
            let Some(&first) = members.first() else {
                continue;
            };
            let head = &samples[first].sample;
            let last = match self.series.get(&head.customer, &head.sandbox, head.epoch) {
                Some(carried) => {
                    rater.resume_spans(&carried.spans);
                    let seq = carried.baseline.sample.seq;
                    let newer = members
                        .iter()
                        .map(|index| &samples[*index])
                        .filter(|numbered| numbered.sample.seq > seq);
                    let last = rater.rate_run(&carried.baseline, newer);
                    // Nothing newer rated: the carried baseline stays.
                    (!std::ptr::eq(last, &carried.baseline)).then(|| last.clone())
                }
                None => {
                    rater.row_of(&head.customer);
                    let closings = members[1..].iter().map(|index| &samples[*index]);
                    Some(rater.rate_run(&samples[first], closings).clone())
                }
            };
            let spans = rater.take_spans();
            match (
                last,
                self.series
                    .get_mut(&head.customer, &head.sandbox, head.epoch),
            ) {
                (Some(baseline), Some(carried)) => {
                    carried.baseline = NumberedSample {
                        line: 0,
                        ..baseline
                    };
                    carried.spans = spans;
                }
                (None, Some(carried)) => carried.spans = spans,
                (Some(baseline), None) => {
                    self.series.insert(CarriedSeries {
                        baseline: NumberedSample {
                            line: 0,
                            ..baseline
                        },
                        spans,
                    });
                }
                (None, None) => {}
            }
        }
        errors.sort_by(|left, right| (left.line, &left.field).cmp(&(right.line, &right.field)));
        errors
    }

    /// The quantities of everything rated so far, with every open span
    /// closed as if the data ended here (the state itself keeps them open).
    pub fn usage<P: IdlePolicy>(&self, sheet: &PriceSheet, policy: &P) -> RatedUsage {
        let mut accumulator = self.accumulator.clone();
        let mut errors = Vec::new();
        let mut rater = SeriesRater::new(sheet, policy, &mut accumulator, &mut errors);
        for carried in self.series.values() {
            rater.resume_spans(&carried.spans);
            rater.close_all_spans();
        }
        RatedUsage {
            customers: accumulator.into_customers(),
            errors,
            idle_policy: policy.version().to_owned(),
        }
    }

    /// The state a new billing period starts from: every series' last
    /// sample stays the baseline of its next interval (which belongs to the
    /// new period, as in rating the period from scratch, whose samples
    /// include each series' last one before it), with nothing rated and no
    /// span open.
    pub fn next_period(&self) -> Self {
        let mut next = Self {
            versions: self.versions,
            accumulator: Accumulator::new(self.versions, self.accumulator.slot_count),
            series: SeriesMap::default(),
        };
        for carried in self.series.values() {
            next.series.insert(CarriedSeries {
                baseline: carried.baseline.clone(),
                spans: vec![OpenSpan::default(); carried.spans.len()],
            });
        }
        next
    }

    /// Series carried (one per customer, sandbox and epoch seen).
    pub fn series_count(&self) -> usize {
        self.series.len
    }

    /// The state as JSON, deterministic for equal states (series in key
    /// order), to be stored and resumed by another process.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.stored()).expect("a rating state always serializes")
    }

    /// A stored state, checked against the sheet it is to continue under.
    pub fn from_json(text: &str, sheet: &PriceSheet) -> Result<Self, StateError> {
        let stored: StoredState =
            serde_json::from_str(text).map_err(|error| StateError::Format(error.to_string()))?;
        if stored.format != FORMAT {
            return Err(StateError::Format(format!("format {}", stored.format)));
        }
        let slots = sheet.slot_count();
        if stored.versions != sheet.versions().len() || stored.slots != slots {
            return Err(StateError::OtherSheet {
                state_versions: stored.versions,
                state_slots: stored.slots,
                sheet_versions: sheet.versions().len(),
                sheet_slots: slots,
            });
        }
        let row_len = stored.versions * slots;
        if stored.customers.len() != stored.quantities.len()
            || stored.quantities.iter().any(|row| row.len() != row_len)
        {
            return Err(StateError::Format(
                "one row of quantities per customer, versions x resources long".to_owned(),
            ));
        }
        let mut accumulator = Accumulator::new(stored.versions, slots);
        if !stored.idle_ms.is_empty()
            && (stored.idle_ms.len() != stored.customers.len()
                || stored
                    .idle_ms
                    .iter()
                    .any(|row| row.len() != stored.versions))
        {
            return Err(StateError::Format(
                "one row of idle ms per customer, one per price version".to_owned(),
            ));
        }
        let mut idle_rows = stored.idle_ms.into_iter();
        for (customer, row) in stored.customers.into_iter().zip(stored.quantities) {
            let index = accumulator.row_of(&customer);
            accumulator.rows[index] = row;
            if let Some(idle) = idle_rows.next() {
                accumulator.idle[index] = idle;
            }
        }
        let mut series = SeriesMap::default();
        for carried in stored.series {
            let mut spans = vec![OpenSpan::default(); slots];
            for (slot, span) in carried.open {
                let in_range = spans.get_mut(usize::from(slot)).filter(|_| {
                    span.row < accumulator.rows.len() && span.version < stored.versions
                });
                let Some(target) = in_range else {
                    return Err(StateError::Format(format!(
                        "an open span of slot {slot} names row {} or version {} out of range",
                        span.row, span.version
                    )));
                };
                *target = span;
            }
            let (customer, sandbox, epoch) = (
                &carried.baseline.customer,
                &carried.baseline.sandbox,
                carried.baseline.epoch,
            );
            if series.get(customer, sandbox, epoch).is_some() {
                return Err(StateError::Format(format!(
                    "series {customer}/{sandbox}/{} stored twice",
                    epoch.0
                )));
            }
            series.insert(CarriedSeries {
                baseline: NumberedSample {
                    line: 0,
                    sample: carried.baseline,
                },
                spans,
            });
        }
        Ok(Self {
            versions: stored.versions,
            accumulator,
            series,
        })
    }

    fn stored(&self) -> StoredState {
        let mut rows: Vec<(&CustomerId, &Vec<u128>, &Vec<u64>)> = self
            .accumulator
            .customers
            .iter()
            .zip(&self.accumulator.rows)
            .zip(&self.accumulator.idle)
            .map(|((customer, row), idle)| (customer, row, idle))
            .collect();
        rows.sort_by(|left, right| left.0.cmp(right.0));
        // Spans name accumulator rows; stored rows are in customer order.
        let mut renumber = vec![0usize; rows.len()];
        for (stored_index, (customer, _, _)) in rows.iter().enumerate() {
            renumber[self.accumulator.row_index[*customer]] = stored_index;
        }
        let mut series: Vec<StoredSeries> = self
            .series
            .values()
            .map(|carried| StoredSeries {
                baseline: carried.baseline.sample.clone(),
                open: carried
                    .spans
                    .iter()
                    .enumerate()
                    .filter(|(_, span)| span.millis > 0)
                    .map(|(slot, span)| {
                        let mut span = *span;
                        span.row = renumber[span.row];
                        (u16::try_from(slot).unwrap_or(u16::MAX), span)
                    })
                    .collect(),
            })
            .collect();
        series.sort_by(|left, right| {
            let key = |stored: &StoredSeries| {
                (
                    stored.baseline.customer.clone(),
                    stored.baseline.sandbox.clone(),
                    stored.baseline.epoch,
                )
            };
            key(left).cmp(&key(right))
        });
        StoredState {
            format: FORMAT,
            versions: self.versions,
            slots: self.accumulator.slot_count,
            customers: rows
                .iter()
                .map(|(customer, _, _)| (*customer).clone())
                .collect(),
            quantities: rows.iter().map(|(_, row, _)| (*row).clone()).collect(),
            idle_ms: rows.iter().map(|(_, _, idle)| (*idle).clone()).collect(),
            series,
        }
    }
}

/// The stored form: rows and series in key order so equal states store
/// equal text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredState {
    format: u32,
    versions: usize,
    slots: usize,
    customers: Vec<CustomerId>,
    quantities: Vec<Vec<u128>>,
    /// Per customer, per price version: idle running ms (absent in states
    /// written before idle lines: zero).
    #[serde(default)]
    idle_ms: Vec<Vec<u64>>,
    series: Vec<StoredSeries>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredSeries {
    baseline: UsageSample,
    /// Open spans only, by slot.
    open: Vec<(u16, OpenSpan)>,
}
