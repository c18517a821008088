//! Rating one series: each interval between consecutive samples becomes
//! integer quantities per (customer, price version, resource).
//!
//! This is the hot path. Everything here is integer arithmetic on base units
//! (vCPU-microseconds, byte-milliseconds, GPU-milliseconds, bytes); money is
//! computed later, once per line. What an interval used comes from
//! [`IntervalUsage`]: counter differences where the samples carry counters,
//! the closing sample's gauges otherwise. An interval that crosses a price
//! version's effective date is split at it, its integrals in proportion to
//! time with the remainder kept, so no unit is lost or doubled.

use crate::counters::Counter;
use crate::error::LineError;
use crate::pricing::{Basis, IdleBilling, PriceSheet, ResourceKind, ResourcePrice, ResourceSlot};
use crate::rating::idle::IdlePolicy;
use crate::rating::usage::{Activity, Class, IntervalUsage};
use crate::rating::{Accumulator, NumberedSample};
use crate::sample::{LifecycleState, UsageSample};

/// A continuous billable span of one resource, kept open to round it up to
/// the resource's increment when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct OpenSpan {
    pub(super) millis: u64,
    /// Quantity and billable length of the span's last segment: the rate at
    /// which the rounding-up padding is billed.
    pub(super) last_quantity: u128,
    pub(super) last_millis: u64,
    pub(super) row: usize,
    pub(super) version: usize,
}

/// One piece of an interval within a single price version.
#[derive(Debug, Clone, Copy)]
struct Segment<'u> {
    version: usize,
    usage: &'u IntervalUsage,
}

/// Rates series of one sheet into an accumulator.
pub(super) struct SeriesRater<'a, P> {
    pub sheet: &'a PriceSheet,
    pub policy: &'a P,
    pub accumulator: &'a mut Accumulator,
    pub errors: &'a mut Vec<LineError>,
    spans: Vec<OpenSpan>,
    /// Per price version: whether a resource bills only active time, so
    /// that idle time is worth reporting on the bill.
    idle_reported: Vec<bool>,
}

impl<'a, P: IdlePolicy> SeriesRater<'a, P> {
    pub fn new(
        sheet: &'a PriceSheet,
        policy: &'a P,
        accumulator: &'a mut Accumulator,
        errors: &'a mut Vec<LineError>,
    ) -> Self {
        let spans = vec![OpenSpan::default(); sheet.slot_count()];
        let idle_reported = sheet
            .versions()
            .iter()
            .map(|version| {
                version
                    .resources
                    .iter()
                    .flatten()
                    .any(ResourcePrice::bills_only_active_time)
            })
            .collect();
        Self {
            sheet,
            policy,
            accumulator,
            errors,
            spans,
            idle_reported,
        }
    }

    /// Rates one series (indices in `seq` order) and closes its spans. The
    /// first sample is the baseline.
    pub fn rate_series(&mut self, samples: &[NumberedSample], series: &[usize]) {
        let Some((&first, rest)) = series.split_first() else {
            return;
        };
        let baseline = &samples[first];
        self.accumulator.row_of(&baseline.sample.customer);
        self.rate_run(baseline, rest.iter().map(|index| &samples[*index]));
        self.close_all_spans();
    }

    /// Rates the intervals from `baseline` through `closings` (in `seq`
    /// order) and returns the last good sample, the next baseline. A sample
    /// that fails the checks is reported and skipped, and the next one is
    /// measured from the last good baseline, so a bad sample costs
    /// resolution, never money. Spans stay open: the caller closes them
    /// ([`Self::close_all_spans`]) or carries them ([`Self::take_spans`]).
    pub fn rate_run<'s>(
        &mut self,
        baseline: &'s NumberedSample,
        closings: impl Iterator<Item = &'s NumberedSample>,
    ) -> &'s NumberedSample {
        let mut baseline = baseline;
        for closing in closings {
            if let Err(error) = check_interval(baseline, closing) {
                self.errors.push(error);
                continue;
            }
            self.rate_interval(baseline, closing);
            baseline = closing;
        }
        baseline
    }

    /// The accumulator row of a customer, created on first sight.
    pub fn row_of(&mut self, customer: &crate::ids::CustomerId) -> usize {
        self.accumulator.row_of(customer)
    }

    /// The open spans (one per slot), leaving none open here.
    pub fn take_spans(&mut self) -> Vec<OpenSpan> {
        let empty = vec![OpenSpan::default(); self.spans.len()];
        std::mem::replace(&mut self.spans, empty)
    }

    /// Continues the spans a previous pass left open.
    pub fn resume_spans(&mut self, spans: &[OpenSpan]) {
        for (mine, carried) in self.spans.iter_mut().zip(spans) {
            *mine = *carried;
        }
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
        let row = self.accumulator.row_of(&closing.sample.customer);
        let activity = Activity {
            idle: self.policy.is_idle(&previous.sample, &closing.sample),
            collector_rule: self.policy.is_collector_rule(),
        };
        let usage = IntervalUsage::between(&previous.sample, &closing.sample, activity);
        let gpu_slot = self.gpu_slot_of(previous, closing, &usage);
        let mut version = first_version;
        let mut segment_start = start_ms;
        loop {
            let next_start = self
                .sheet
                .versions()
                .get(version + 1)
                .map(|next| next.effective_from_ms);
            let segment_end = next_start.map_or(end_ms, |next| next.min(end_ms));
            // Most intervals lie within one price version: no copy to share.
            let shared;
            let part = if segment_start == start_ms && segment_end == end_ms {
                &usage
            } else {
                shared = usage.share(start_ms, end_ms, segment_start, segment_end);
                &shared
            };
            let segment = Segment {
                version,
                usage: part,
            };
            self.rate_segment(&segment, row, gpu_slot);
            if segment_end >= end_ms {
                break;
            }
            segment_start = segment_end;
            version += 1;
        }
    }

    /// The slot of the interval's GPU model, reporting a model the sheet
    /// has no price for (its GPU time would otherwise vanish). The closing
    /// sample's model classifies; where the GPU counter says GPU time was
    /// used but the closing sample has no GPU any more (it went within a
    /// merged interval), the previous sample's model does.
    fn gpu_slot_of(
        &mut self,
        previous: &NumberedSample,
        closing: &NumberedSample,
        usage: &IntervalUsage,
    ) -> Option<ResourceSlot> {
        let model = if closing.sample.gpu_count > 0 {
            closing.sample.gpu_model.as_deref()?
        } else if usage.gpu_alloc.iter().any(|value| *value > 0) {
            closing
                .sample
                .gpu_model
                .as_deref()
                .or(previous.sample.gpu_model.as_deref())?
        } else {
            return None;
        };
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

    fn rate_segment(&mut self, segment: &Segment<'_>, row: usize, gpu_slot: Option<ResourceSlot>) {
        if self.idle_reported[segment.version] {
            let usage = segment.usage;
            let idle =
                usage.ms[Class::Running as usize].saturating_sub(usage.ms[Class::Active as usize]);
            self.accumulator.add_idle(
                row,
                segment.version,
                u64::try_from(idle).unwrap_or(u64::MAX),
            );
        }
        let prices = &self.sheet.versions()[segment.version].resources;
        for (slot, price) in prices.iter().enumerate() {
            let Some(price) = price else {
                self.close_span(slot);
                continue;
            };
            if price.kind == ResourceKind::Meter {
                // Metered from usage events, not from samples.
                continue;
            }
            if price.kind == ResourceKind::Egress {
                self.accumulator.add(
                    row,
                    segment.version,
                    ResourceSlot(slot),
                    segment.usage.net_tx,
                );
                continue;
            }
            let billed = billed_classes(price);
            let quantity = billed
                .iter()
                .map(|class| {
                    class_quantity(price, ResourceSlot(slot), *class, segment.usage, gpu_slot)
                })
                .sum::<u128>();
            if segment.usage.millis == 0 && quantity == 0 {
                // A zero-length interval neither bills time nor breaks a span.
                continue;
            }
            if quantity == 0 {
                self.close_span(slot);
                continue;
            }
            let billable_ms = billed
                .iter()
                .map(|class| segment.usage.ms[*class as usize])
                .sum::<u128>();
            self.accumulator
                .add(row, segment.version, ResourceSlot(slot), quantity);
            self.extend_span(slot, segment.version, billable_ms, quantity, row);
        }
    }

    fn extend_span(
        &mut self,
        slot: usize,
        version: usize,
        billable_ms: u128,
        quantity: u128,
        row: usize,
    ) {
        let span = &mut self.spans[slot];
        if span.millis > 0 && span.row != row {
            self.close_span(slot);
        }
        let Ok(billable_ms) = u64::try_from(billable_ms) else {
            return;
        };
        if billable_ms == 0 {
            // Quantity without billable time (an egress-like counter): no span.
            return;
        }
        let span = &mut self.spans[slot];
        span.millis += billable_ms;
        span.last_quantity = quantity;
        span.last_millis = billable_ms;
        span.row = row;
        span.version = version;
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

    pub fn close_all_spans(&mut self) {
        for slot in 0..self.spans.len() {
            self.close_span(slot);
        }
    }
}

/// The classes of time a resource bills in: running (or only its active
/// part where idle seconds are free), suspended and stopped as the sheet's
/// `bills_while` says. A gauge-rated interval has time in the closing
/// sample's class only (and no active time when idle), so for it this is the
/// rule of old: a resource bills when the closing state is billed and the
/// interval is not idle-and-free.
fn billed_classes(price: &ResourcePrice) -> BilledClasses {
    let mut classes = BilledClasses::default();
    if price.bills_while.contains(LifecycleState::Running) {
        classes.push(match price.idle {
            IdleBilling::Free => Class::Active,
            IdleBilling::Billed => Class::Running,
        });
    }
    if price.bills_while.contains(LifecycleState::Suspended) {
        classes.push(Class::Suspended);
    }
    if price.bills_while.contains(LifecycleState::Stopped) {
        classes.push(Class::Stopped);
    }
    classes
}

/// Up to three classes, without allocating.
#[derive(Debug, Default)]
struct BilledClasses {
    classes: [Option<Class>; 3],
    len: usize,
}

impl BilledClasses {
    fn push(&mut self, class: Class) {
        self.classes[self.len] = Some(class);
        self.len += 1;
    }

    fn iter(&self) -> impl Iterator<Item = &Class> {
        self.classes[..self.len].iter().flatten()
    }
}

/// Base-unit quantity of one time-based resource in one class of a segment.
/// The resource's minimum raises the rate per millisecond of that class.
fn class_quantity(
    price: &ResourcePrice,
    slot: ResourceSlot,
    class: Class,
    usage: &IntervalUsage,
    gpu_slot: Option<ResourceSlot>,
) -> u128 {
    let class = class as usize;
    let floor = u128::from(price.minimum_per_ms) * usage.ms[class];
    let (allocated, max_requested_used, used) = match price.kind {
        ResourceKind::Vcpu => (
            usage.vcpu_alloc[class],
            usage.vcpu_max[class],
            usage.cpu_used[class],
        ),
        ResourceKind::Memory => (
            usage.mem_alloc[class],
            usage.mem_max[class],
            usage.mem_used[class],
        ),
        ResourceKind::Gpu if gpu_slot == Some(slot) => return usage.gpu_alloc[class],
        ResourceKind::Gpu | ResourceKind::Egress | ResourceKind::Meter => return 0,
        ResourceKind::Disk => return usage.disk[class],
    };
    let measured = match price.basis {
        Basis::Allocated => allocated,
        Basis::Used => used,
        Basis::MaxRequestedUsed => max_requested_used,
    };
    measured.max(floor)
}

/// Whether rating refuses the sample that closes this interval (see
/// [`check_interval`]); compaction keeps what surrounds such a sample.
pub(crate) fn interval_is_refused(previous: &NumberedSample, closing: &NumberedSample) -> bool {
    check_interval(previous, closing).is_err()
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
        return check_state_time(previous, closing);
    }
    let carried = previous
        .sample
        .counters_present
        .both(closing.sample.counters_present);
    let by_state = Counter::ALL
        .into_iter()
        .filter(|counter| carried.contains(*counter))
        .map(|counter| (counter.name(), counter));
    let backwards = counters(&previous.sample)
        .into_iter()
        .zip(counters(&closing.sample))
        .find(|((_, before), (_, after))| after < before)
        .or_else(|| {
            by_state
                .map(|(name, counter)| {
                    (
                        (name, previous.sample.counter(counter)),
                        (name, closing.sample.counter(counter)),
                    )
                })
                .find(|((_, before), (_, after))| after < before)
        });
    match backwards {
        Some(((field, before), (_, after))) => Err(LineError::new(
            closing.line,
            field,
            format!(
                "counter went backwards within the epoch, from {before} on line {} to {after}: sample not billed",
                previous.line
            ),
        )),
        None => check_state_time(previous, closing),
    }
}

/// Slack for the time counters against the timestamps: both come from the
/// collector's clock, but each is rounded to the millisecond on its own.
const STATE_TIME_SLACK_MS: u64 = 1_000;

/// Refuses an interval whose time in states is absurd: a sandbox cannot be
/// running and suspended for longer than the interval lasted, nor active for
/// longer than it ran. Such a sample (a corrupted counter, a collector bug)
/// would bill time that never passed.
fn check_state_time(previous: &NumberedSample, closing: &NumberedSample) -> Result<(), LineError> {
    let carried = previous
        .sample
        .counters_present
        .both(closing.sample.counters_present);
    let grew = |counter: Counter| {
        carried
            .contains(counter)
            .then(|| closing.sample.counter(counter) - previous.sample.counter(counter))
    };
    let interval_ms =
        u64::try_from(closing.sample.ts.timestamp_millis() - previous.sample.ts.timestamp_millis())
            .unwrap_or(0);
    let running = grew(Counter::RunningMs);
    let in_states = running
        .unwrap_or(0)
        .saturating_add(grew(Counter::SuspendedMs).unwrap_or(0));
    let refuse = |field: &str, what: String| {
        Err(LineError::new(
            closing.line,
            field,
            format!(
                "{what}, in an interval of {interval_ms} ms since line {}: sample not billed",
                previous.line
            ),
        ))
    };
    if in_states > interval_ms.saturating_add(STATE_TIME_SLACK_MS) {
        return refuse(
            "running_ms",
            format!("running and suspended time grew by {in_states} ms"),
        );
    }
    if let (Some(active), Some(running)) = (grew(Counter::ActiveMs), running) {
        if active > running.saturating_add(STATE_TIME_SLACK_MS) {
            return refuse(
                "active_ms",
                format!("active time grew by {active} ms, running time by {running} ms"),
            );
        }
    }
    Ok(())
}

/// The common case, checked without building the named lists. The counters
/// by state are checked where both samples carry them.
fn counters_rise(before: &UsageSample, after: &UsageSample) -> bool {
    let carried = before.counters_present.both(after.counters_present);
    let by_state_rise = carried.is_empty()
        || Counter::ALL
            .into_iter()
            .filter(|counter| carried.contains(*counter))
            .all(|counter| after.counter(counter) >= before.counter(counter));
    by_state_rise
        && after.cpu_used_usec >= before.cpu_used_usec
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
