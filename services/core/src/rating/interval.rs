//! Rating one series: each interval between consecutive samples becomes
//! integer quantities per (customer, price version, resource).
//!
//! This is the hot path. Everything here is integer arithmetic on base units
//! (vCPU-microseconds, byte-milliseconds, GPU-milliseconds, bytes); money is
//! computed later, once per line. An interval that crosses a price version's
//! effective date is split at it, and its counter differences are split in
//! proportion to time with the remainder kept, so no unit is lost or doubled.

use crate::error::LineError;
use crate::pricing::{Basis, IdleBilling, PriceSheet, ResourceKind, ResourcePrice, ResourceSlot};
use crate::rating::idle::IdlePolicy;
use crate::rating::{Accumulator, NumberedSample};
use crate::sample::{LifecycleState, UsageSample};

/// A continuous billable span of one resource, kept open to round it up to
/// the resource's increment when it ends.
#[derive(Debug, Clone, Copy, Default)]
struct OpenSpan {
    millis: u64,
    /// Quantity and length of the span's last segment: the rate at which the
    /// rounding-up padding is billed.
    last_quantity: u128,
    last_millis: u64,
    row: usize,
    version: usize,
}

/// Counter differences over one interval.
#[derive(Debug, Clone, Copy)]
struct CounterDeltas {
    cpu_used_usec: u64,
    net_tx_bytes: u64,
}

/// One piece of an interval within a single price version.
#[derive(Debug, Clone, Copy)]
struct Segment {
    version: usize,
    millis: u64,
    cpu_used_usec: u64,
    net_tx_bytes: u64,
}

/// Rates series of one sheet into an accumulator.
pub(super) struct SeriesRater<'a, P> {
    pub sheet: &'a PriceSheet,
    pub policy: &'a P,
    pub accumulator: &'a mut Accumulator,
    pub errors: &'a mut Vec<LineError>,
    spans: Vec<OpenSpan>,
}

impl<'a, P: IdlePolicy> SeriesRater<'a, P> {
    pub fn new(
        sheet: &'a PriceSheet,
        policy: &'a P,
        accumulator: &'a mut Accumulator,
        errors: &'a mut Vec<LineError>,
    ) -> Self {
        let spans = vec![OpenSpan::default(); sheet.slot_count()];
        Self {
            sheet,
            policy,
            accumulator,
            errors,
            spans,
        }
    }

    /// Rates one series (indices in `seq` order). The first sample is the
    /// baseline; a sample that fails the checks is reported and skipped, and
    /// the next one is measured from the last good baseline, so a bad sample
    /// costs resolution, never money.
    pub fn rate_series(&mut self, samples: &[NumberedSample], series: &[usize]) {
        let Some((&first, rest)) = series.split_first() else {
            return;
        };
        let mut baseline = &samples[first];
        self.accumulator.row_of(&baseline.sample.customer);
        for &index in rest {
            let closing = &samples[index];
            if let Err(error) = check_interval(baseline, closing) {
                self.errors.push(error);
                continue;
            }
            self.rate_interval(baseline, closing);
            baseline = closing;
        }
        self.close_all_spans();
    }

    fn rate_interval(&mut self, previous: &NumberedSample, closing: &NumberedSample) {
        let start_ms = previous.sample.ts.timestamp_millis();
        let end_ms = closing.sample.ts.timestamp_millis();
        let Some(first_version) = self.sheet.version_at(start_ms) else {
            self.errors.push(LineError::new(
                closing.line,
                "ts",
                format!(
                    "the interval from {} starts before the sheet's first price version",
                    previous.sample.ts
                ),
            ));
            return;
        };
        let gpu_slot = self.gpu_slot_of(closing);
        let row = self.accumulator.row_of(&closing.sample.customer);
        let idle = self.policy.is_idle(&previous.sample, &closing.sample);
        let deltas = CounterDeltas {
            cpu_used_usec: closing.sample.cpu_used_usec - previous.sample.cpu_used_usec,
            net_tx_bytes: closing.sample.net_tx_bytes - previous.sample.net_tx_bytes,
        };
        let mut version = first_version;
        let mut segment_start = start_ms;
        loop {
            let next_start = self
                .sheet
                .versions()
                .get(version + 1)
                .map(|next| next.effective_from_ms);
            let segment_end = next_start.map_or(end_ms, |next| next.min(end_ms));
            let segment = split_segment(
                version,
                start_ms,
                end_ms,
                segment_start,
                segment_end,
                deltas,
            );
            self.rate_segment(&segment, &closing.sample, row, idle, gpu_slot);
            if segment_end >= end_ms {
                break;
            }
            segment_start = segment_end;
            version += 1;
        }
    }

    /// The slot of the closing sample's GPU model, reporting a model the
    /// sheet has no price for (its GPU time would otherwise vanish).
    fn gpu_slot_of(&mut self, closing: &NumberedSample) -> Option<ResourceSlot> {
        if closing.sample.gpu_count == 0 {
            return None;
        }
        let model = closing.sample.gpu_model.as_deref()?;
        let slot = self.sheet.gpu_slot(model);
        if slot.is_none() {
            self.errors.push(LineError::new(
                closing.line,
                "gpu_model",
                format!("{model:?} has no price in this sheet: its GPU time is not billed"),
            ));
        }
        slot
    }

    fn rate_segment(
        &mut self,
        segment: &Segment,
        closing: &UsageSample,
        row: usize,
        idle: bool,
        gpu_slot: Option<ResourceSlot>,
    ) {
        let prices = &self.sheet.versions()[segment.version].resources;
        for (slot, price) in prices.iter().enumerate() {
            let Some(price) = price else {
                self.close_span(slot);
                continue;
            };
            if price.kind == ResourceKind::Egress {
                let bytes = u128::from(segment.net_tx_bytes);
                self.accumulator
                    .add(row, segment.version, ResourceSlot(slot), bytes);
                continue;
            }
            if segment.millis == 0 {
                // A zero-length interval neither bills time nor breaks a span.
                continue;
            }
            let quantity = if bills_now(price, closing.state, idle) {
                time_quantity(price, ResourceSlot(slot), segment, closing, gpu_slot)
            } else {
                0
            };
            if quantity == 0 {
                self.close_span(slot);
                continue;
            }
            self.accumulator
                .add(row, segment.version, ResourceSlot(slot), quantity);
            self.extend_span(slot, segment, quantity, row);
        }
    }

    fn extend_span(&mut self, slot: usize, segment: &Segment, quantity: u128, row: usize) {
        let span = &mut self.spans[slot];
        if span.millis > 0 && span.row != row {
            self.close_span(slot);
        }
        let span = &mut self.spans[slot];
        span.millis += segment.millis;
        span.last_quantity = quantity;
        span.last_millis = segment.millis;
        span.row = row;
        span.version = segment.version;
    }

    /// Ends a span, billing the padding up to the next increment at the rate
    /// of its last segment (exact for an allocation basis).
    fn close_span(&mut self, slot: usize) {
        let span = std::mem::take(&mut self.spans[slot]);
        if span.millis == 0 || span.last_millis == 0 {
            return;
        }
        let Some(price) = &self.sheet.versions()[span.version].resources[slot] else {
            return;
        };
        let remainder = span.millis % price.increment_ms;
        if remainder == 0 {
            return;
        }
        let padding_ms = price.increment_ms - remainder;
        let padding = span.last_quantity * u128::from(padding_ms) / u128::from(span.last_millis);
        self.accumulator
            .add(span.row, span.version, ResourceSlot(slot), padding);
    }

    fn close_all_spans(&mut self) {
        for slot in 0..self.spans.len() {
            self.close_span(slot);
        }
    }
}

/// Whether a time-based resource bills in this state, given idleness.
fn bills_now(price: &ResourcePrice, state: LifecycleState, idle: bool) -> bool {
    let idle_free = idle && state == LifecycleState::Running && price.idle == IdleBilling::Free;
    price.bills_while.contains(state) && !idle_free
}

/// Base-unit quantity of one time-based resource over a segment.
fn time_quantity(
    price: &ResourcePrice,
    slot: ResourceSlot,
    segment: &Segment,
    closing: &UsageSample,
    gpu_slot: Option<ResourceSlot>,
) -> u128 {
    let millis = u128::from(segment.millis);
    let minimum = price.minimum_per_ms;
    match price.kind {
        ResourceKind::Vcpu => basis_quantity(
            price.basis,
            u64::from(closing.vcpu.0).max(minimum),
            u128::from(segment.cpu_used_usec).max(u128::from(minimum) * millis),
            millis,
        ),
        ResourceKind::Memory => basis_quantity(
            price.basis,
            closing.mem_bytes.max(minimum),
            u128::from(closing.mem_used_bytes.max(minimum)) * millis,
            millis,
        ),
        ResourceKind::Gpu if gpu_slot == Some(slot) => u128::from(closing.gpu_count) * millis,
        ResourceKind::Gpu => 0,
        ResourceKind::Disk => u128::from(closing.disk_bytes) * millis,
        ResourceKind::Egress => 0,
    }
}

/// Applies the billing basis: `requested_rate` is per millisecond, `used` is
/// already integrated over the segment; both include the minimum.
fn basis_quantity(basis: Basis, requested_rate: u64, used: u128, millis: u128) -> u128 {
    let requested = u128::from(requested_rate) * millis;
    match basis {
        Basis::Allocated => requested,
        Basis::Used => used,
        Basis::MaxRequestedUsed => requested.max(used),
    }
}

/// The part of an interval `[start, end)` that falls in `[from, to)`, with
/// counter differences split in proportion to time. Cumulative floors make
/// the parts of a split interval sum exactly to the whole.
fn split_segment(
    version: usize,
    start: i64,
    end: i64,
    from: i64,
    to: i64,
    deltas: CounterDeltas,
) -> Segment {
    let share = |delta: u64| -> u64 {
        if end <= start {
            return delta;
        }
        let span = (end - start) as u128;
        let upto = |at: i64| u128::from(delta) * (at - start) as u128 / span;
        u64::try_from(upto(to) - upto(from)).expect("a share of a u64 delta fits in u64")
    };
    Segment {
        version,
        millis: (to - from) as u64,
        cpu_used_usec: share(deltas.cpu_used_usec),
        net_tx_bytes: share(deltas.net_tx_bytes),
    }
}

/// Refuses an interval whose time runs backwards or whose cumulative counters
/// decrease within the epoch: it would bill negative usage.
fn check_interval(previous: &NumberedSample, closing: &NumberedSample) -> Result<(), LineError> {
    if closing.sample.ts < previous.sample.ts {
        return Err(LineError::new(
            closing.line,
            "ts",
            format!(
                "{} is earlier than {} on line {}, which has a lower seq",
                closing.sample.ts, previous.sample.ts, previous.line
            ),
        ));
    }
    if counters_rise(&previous.sample, &closing.sample) {
        return Ok(());
    }
    let backwards = counters(&previous.sample)
        .into_iter()
        .zip(counters(&closing.sample))
        .find(|((_, before), (_, after))| after < before);
    match backwards {
        Some(((field, before), (_, after))) => Err(LineError::new(
            closing.line,
            field,
            format!(
                "counter went backwards within the epoch, from {before} on line {} to {after}: sample not billed",
                previous.line
            ),
        )),
        None => Ok(()),
    }
}

/// The common case, checked without building the named list.
fn counters_rise(before: &UsageSample, after: &UsageSample) -> bool {
    after.cpu_used_usec >= before.cpu_used_usec
        && after.net_rx_bytes >= before.net_rx_bytes
        && after.net_tx_bytes >= before.net_tx_bytes
        && after.vcpu_alloc_usec >= before.vcpu_alloc_usec
        && after.mem_alloc_kib_ms >= before.mem_alloc_kib_ms
        && after.mem_used_kib_ms >= before.mem_used_kib_ms
        && after.gpu_alloc_ms >= before.gpu_alloc_ms
        && after.disk_mib_ms >= before.disk_mib_ms
        && after.api_calls >= before.api_calls
}

/// The cumulative counters of a sample, by field name.
fn counters(sample: &UsageSample) -> [(&'static str, u64); 9] {
    [
        ("cpu_used_usec", sample.cpu_used_usec),
        ("net_rx_bytes", sample.net_rx_bytes),
        ("net_tx_bytes", sample.net_tx_bytes),
        ("vcpu_alloc_usec", sample.vcpu_alloc_usec),
        ("mem_alloc_kib_ms", sample.mem_alloc_kib_ms),
        ("mem_used_kib_ms", sample.mem_used_kib_ms),
        ("gpu_alloc_ms", sample.gpu_alloc_ms),
        ("disk_mib_ms", sample.disk_mib_ms),
        ("api_calls", sample.api_calls),
    ]
}
