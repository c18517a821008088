//! Compaction: which per-second samples storage must keep so that rating the
//! kept ones bills exactly what rating all of them would, and one row per
//! sandbox-minute for the usage windows.
//!
//! Rating prices counter differences (principle 1), so the samples between
//! two kept ones matter only where merging their intervals would change
//! what rating does with them. [`Compactor`] keeps a sample when it is:
//!
//! - the first sample of a series it sees (a conservative start: it cannot
//!   know what came before);
//! - the last of its UTC minute (the minute row's end, and every hour's end);
//! - next to a *break*: a change of the interval's signature (state,
//!   allocation, GPU, which counters are carried, which of them moved, a
//!   zero-length interval), or a UTC hour boundary. Around a break at sample
//!   `b` it keeps the sample before `b`, `b` and the sample after it, so the
//!   interval that ends a span of billable time, the last interval before an
//!   hour's lines are written and the interval that crosses the hour (and a
//!   price version's effective date on it) are rated exactly as they were;
//! - refused by rating (time or a counter going backwards, absurd time in a
//!   state), with the two samples before it and the one after it;
//! - of a series without the full set of counters (gauge rating needs every
//!   sample: it multiplies the closing sample's allocation by time);
//! - late (a seq at or below one already seen, not a duplicate of a held
//!   sample), or the last two of a series that ends (a new epoch, or silence).
//!
//! Between breaks the interval signature is constant, so a merged interval's
//! counter differences are the sum of its parts', its class of time and zero
//! pattern are theirs, and the interval that closes each span is kept whole.
//! Keeping more than this rule (after a restart, for late samples) never
//! changes a bill: every interval of the kept samples still lies within one
//! signature run. The rule is exact for the collector's activity rule (the
//! active counters measure it second by second) and for sheets whose
//! resource minimums do not exceed what a sandbox's basis measures (every
//! shipped sheet: Modal's minimums are at or below its minimum request). An
//! idle policy that classifies intervals by their rates needs the raw
//! seconds; see services/ingest/README.md.
//!
//! Minute rows carry the smallest and largest value of the rollup counters
//! over the minute's samples, its first and last seq and timestamp: what the
//! per-second rows gave the usage windows, one row instead of sixty.

use crate::counters::{Counter, CounterSet};
use crate::ids::{CustomerId, Epoch, SandboxId};
use crate::pricing::{Basis, PriceSheet, ResourceKind};
use crate::rating::{interval_is_refused, NumberedSample};
use crate::sample::{LifecycleState, UsageSample};

/// The counters a minute row keeps the range of, in column order.
pub const MINUTE_COUNTERS: [&str; 11] = [
    "cpu_used_usec",
    "net_rx_bytes",
    "net_tx_bytes",
    "vcpu_alloc_usec",
    "mem_alloc_kib_ms",
    "mem_used_kib_ms",
    "gpu_alloc_ms",
    "disk_mib_ms",
    "running_ms",
    "suspended_ms",
    "active_ms",
];

fn minute_counters(sample: &UsageSample) -> [u64; 11] {
    [
        sample.cpu_used_usec,
        sample.net_rx_bytes,
        sample.net_tx_bytes,
        sample.vcpu_alloc_usec,
        sample.mem_alloc_kib_ms,
        sample.mem_used_kib_ms,
        sample.gpu_alloc_ms,
        sample.disk_mib_ms,
        sample.state_counters.running_ms,
        sample.state_counters.suspended_ms,
        sample.state_counters.active_ms,
    ]
}

/// One sandbox-minute of one epoch: the range of its samples. Serialises
/// to JSON for the dead-letter topic (a row ClickHouse refused).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MinuteRow {
    pub customer: CustomerId,
    pub sandbox: SandboxId,
    pub epoch: Epoch,
    /// Start of the UTC minute, seconds since the Unix epoch.
    pub minute_s: i64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ts_ms: i64,
    pub last_ts_ms: i64,
    /// Smallest and largest value of each of [`MINUTE_COUNTERS`].
    pub lo: [u64; 11],
    pub hi: [u64; 11],
    /// Largest vCPU allocation seen in the minute, thousandths.
    pub vcpu_milli: u32,
    /// State of the minute's last sample.
    pub state: LifecycleState,
}

/// What a compactor hands to storage.
#[derive(Debug, Default, Clone)]
pub struct Compacted {
    pub samples: Vec<UsageSample>,
    pub minutes: Vec<MinuteRow>,
}

impl Compacted {
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty() && self.minutes.is_empty()
    }
}

/// What the compactor has seen, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactStats {
    pub samples_in: u64,
    pub samples_kept: u64,
    pub duplicates: u64,
    pub late: u64,
    /// Samples a seq jump skipped when the next one arrived (lost on the
    /// node or in transit); one that arrives later still counts here, and
    /// in `late`.
    pub missing: u64,
    pub refused: u64,
    pub series_ended: u64,
}

impl std::ops::AddAssign for CompactStats {
    fn add_assign(&mut self, other: Self) {
        self.samples_in += other.samples_in;
        self.samples_kept += other.samples_kept;
        self.duplicates += other.duplicates;
        self.late += other.late;
        self.missing += other.missing;
        self.refused += other.refused;
        self.series_ended += other.series_ended;
    }
}

/// Which samples a compactor must keep: what the sheets that will rate them
/// read. Sheets that bill no resource by use alone (every shipped sheet) do
/// not care whether CPU or memory use was zero in an interval, only how
/// much was used; a sheet that does (`basis = "used"`) ends a span of
/// billable time where use is zero, so intervals with and without use must
/// not merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactRule {
    keep_all: bool,
    /// Bits of [`Signature::unmoved`] that take part in the comparison.
    unmoved_mask: u32,
}

/// Bits of the counters that measure use alone.
fn use_bits() -> u32 {
    let mut bits = 1u32 << Counter::ALL.len(); // cpu_used_usec, see Signature::of
    for (bit, counter) in Counter::ALL.into_iter().enumerate() {
        if matches!(
            counter,
            Counter::MemUsedKibMs | Counter::MemUsedActiveKibMs | Counter::CpuUsedActiveUsec
        ) {
            bits |= 1 << bit;
        }
    }
    bits
}

impl CompactRule {
    /// Exact for any sheet whose minimums bind on no resource billed by use
    /// alone and whose price versions start on a UTC hour (the default;
    /// [`CompactRule::for_sheets`] checks both).
    pub const EVERY_SHEET: CompactRule = CompactRule {
        keep_all: false,
        unmoved_mask: u32::MAX,
    };

    /// Keep every sample: for an idle policy that classifies intervals by
    /// their rates, which merged intervals change.
    pub const KEEP_ALL: CompactRule = CompactRule {
        keep_all: true,
        unmoved_mask: u32::MAX,
    };

    /// Exact for these sheets (every price version of each). Keeps every
    /// sample where a sheet needs it: a price version that starts off a UTC
    /// hour (merged intervals would be split across it in proportion), or a
    /// minimum on a resource billed by use alone (rating takes the larger of
    /// use and minimum per interval, which merging changes).
    pub fn for_sheets<'a>(sheets: impl IntoIterator<Item = &'a PriceSheet>) -> Self {
        let mut bills_use = false;
        for sheet in sheets {
            for version in sheet.versions() {
                if version.effective_from_ms.rem_euclid(HOUR_MS) != 0 {
                    return Self::KEEP_ALL;
                }
                for price in version.resources.iter().flatten() {
                    let by_use = matches!(price.kind, ResourceKind::Vcpu | ResourceKind::Memory)
                        && price.basis == Basis::Used;
                    if by_use && price.minimum_per_ms > 0 {
                        return Self::KEEP_ALL;
                    }
                    bills_use |= by_use;
                }
            }
        }
        if bills_use {
            Self::EVERY_SHEET
        } else {
            Self {
                keep_all: false,
                unmoved_mask: !use_bits(),
            }
        }
    }

    pub fn keeps_all(&self) -> bool {
        self.keep_all
    }

    /// Whether the rule keeps the zero-or-not of use apart.
    pub fn separates_use(&self) -> bool {
        self.unmoved_mask & use_bits() == use_bits()
    }
}

impl Default for CompactRule {
    fn default() -> Self {
        Self::EVERY_SHEET
    }
}

const MINUTE_MS: i64 = 60_000;
/// Refused samples in a row after which a series starts again.
const RESTART_AFTER_REFUSED: u32 = 3;
const HOUR_MS: i64 = 3_600_000;

/// Everything about an interval, other than its counter differences, that
/// rating reads: intervals with equal signatures can be merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signature {
    state: LifecycleState,
    vcpu: u32,
    mem_bytes: u64,
    /// The closing sample's used memory, where the interval has time outside
    /// running (the gauge then measures it); zero otherwise.
    mem_used_bytes: u64,
    gpu_count: u32,
    /// Hashes of the closing and the previous sample's GPU model.
    gpu_models: (u64, u64),
    disk_bytes: u64,
    carried: u32,
    /// Bit per rated counter (and two derived measures) that did not move.
    unmoved: u32,
}

fn model_hash(model: Option<&str>) -> u64 {
    // FNV-1a: stable and cheap; a collision could only merge intervals that
    // change GPU model and keep every other measure, which no sheet prices
    // differently without another change.
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in model.unwrap_or("\u{0}").bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

impl Signature {
    fn of(previous: &UsageSample, closing: &UsageSample, unmoved_mask: u32) -> Self {
        let carried = previous.counters_present.both(closing.counters_present);
        let mut unmoved = 0u32;
        for (bit, counter) in Counter::ALL.into_iter().enumerate() {
            if closing.counter(counter) == previous.counter(counter) {
                unmoved |= 1 << bit;
            }
        }
        let millis = (closing.ts.timestamp_millis() - previous.ts.timestamp_millis()).max(0) as u64;
        // Saturating: a sample without these counters has them at zero.
        let running = closing
            .state_counters
            .running_ms
            .saturating_sub(previous.state_counters.running_ms);
        let suspended = closing
            .state_counters
            .suspended_ms
            .saturating_sub(previous.state_counters.suspended_ms);
        let outside_running = millis.saturating_sub(running);
        let stopped = outside_running.saturating_sub(suspended);
        let base = Counter::ALL.len();
        for (offset, zero) in [
            closing.cpu_used_usec == previous.cpu_used_usec,
            millis == 0,
            stopped == 0,
        ]
        .into_iter()
        .enumerate()
        {
            if zero {
                unmoved |= 1 << (base + offset);
            }
        }
        Self {
            state: closing.state,
            vcpu: closing.vcpu.0,
            mem_bytes: closing.mem_bytes,
            mem_used_bytes: if outside_running > 0 {
                closing.mem_used_bytes
            } else {
                0
            },
            gpu_count: closing.gpu_count,
            gpu_models: (
                model_hash(closing.gpu_model.as_deref()),
                model_hash(previous.gpu_model.as_deref()),
            ),
            disk_bytes: closing.disk_bytes,
            carried: carried.0,
            unmoved: unmoved & unmoved_mask,
        }
    }
}

/// A sample whose fate is not decided yet, with its source position.
#[derive(Debug)]
struct Held<P> {
    sample: NumberedSample,
    position: P,
    keep: bool,
}

#[derive(Debug)]
struct OpenMinute<P> {
    row: MinuteRow,
    first_position: P,
}

impl MinuteRow {
    /// The row of the minute `sample` falls in, holding only it.
    pub fn open(sample: &UsageSample) -> Self {
        let counters = minute_counters(sample);
        let ts_ms = sample.ts.timestamp_millis();
        MinuteRow {
            customer: sample.customer.clone(),
            sandbox: sample.sandbox.clone(),
            epoch: sample.epoch,
            minute_s: ts_ms.div_euclid(MINUTE_MS) * 60,
            first_seq: sample.seq,
            last_seq: sample.seq,
            first_ts_ms: ts_ms,
            last_ts_ms: ts_ms,
            lo: counters,
            hi: counters,
            vcpu_milli: sample.vcpu.0,
            state: sample.state,
        }
    }

    /// Whether `sample` falls in this row's minute (of the same series).
    pub fn contains(&self, sample: &UsageSample) -> bool {
        sample.ts.timestamp_millis().div_euclid(MINUTE_MS) * 60 == self.minute_s
    }

    /// Takes another sample of the same series and minute in.
    pub fn add(&mut self, sample: &UsageSample) {
        let row = self;
        let ts_ms = sample.ts.timestamp_millis();
        if sample.seq < row.first_seq {
            row.first_seq = sample.seq;
            row.first_ts_ms = ts_ms;
        }
        if sample.seq > row.last_seq {
            row.last_seq = sample.seq;
            row.last_ts_ms = ts_ms;
            row.state = sample.state;
        }
        for (index, value) in minute_counters(sample).into_iter().enumerate() {
            row.lo[index] = row.lo[index].min(value);
            row.hi[index] = row.hi[index].max(value);
        }
        row.vcpu_milli = row.vcpu_milli.max(sample.vcpu.0);
    }
}

impl<P: Copy> OpenMinute<P> {
    fn open(sample: &UsageSample, position: P) -> Self {
        Self {
            row: MinuteRow::open(sample),
            first_position: position,
        }
    }

    fn add(&mut self, sample: &UsageSample) {
        self.row.add(sample);
    }

    fn contains(&self, sample: &UsageSample) -> bool {
        self.row.contains(sample)
    }
}

/// One series (customer, sandbox, epoch): the last two samples, whose fate
/// waits on the next one, and the open minute.
#[derive(Debug)]
struct Window<P> {
    older: Option<Held<P>>,
    newer: Held<P>,
    /// Signature of the interval from `older` to `newer`, where known.
    newer_signature: Option<Signature>,
    /// Keep the next sample (it follows one rating refuses).
    keep_next: bool,
    /// Samples refused since the last good one.
    refused_in_a_row: u32,
    minute: OpenMinute<P>,
    last_arrival_ms: i64,
}

/// Compacts a stream of samples series by series. `P` is the source
/// position of a sample (a Kafka offset): [`Compactor::oldest_position`] is
/// the earliest one whose rows are not final yet, the point a replay must
/// start from to rebuild this state.
#[derive(Debug)]
pub struct Compactor<P> {
    /// Series by sandbox; a sandbox has one epoch open (per customer).
    /// A fast hash: ids come from our own collectors, and a million are
    /// looked up a second.
    series: foldhash::HashMap<SandboxId, Vec<Window<P>>>,
    stats: CompactStats,
    rule: CompactRule,
}

impl<P> Default for Compactor<P> {
    fn default() -> Self {
        Self {
            series: foldhash::HashMap::default(),
            stats: CompactStats::default(),
            rule: CompactRule::default(),
        }
    }
}

fn full_counters(sample: &UsageSample) -> bool {
    sample.counters_present == CounterSet::ALL
}

impl<P: Copy + Ord> Compactor<P> {
    /// A compactor that keeps what `rule` says rating needs (every sample
    /// for [`CompactRule::KEEP_ALL`]; minute rows always).
    pub fn with_rule(rule: CompactRule) -> Self {
        Self {
            rule,
            ..Self::default()
        }
    }

    pub fn stats(&self) -> CompactStats {
        self.stats
    }

    /// The counts since the last call, for metrics.
    pub fn take_stats(&mut self) -> CompactStats {
        std::mem::take(&mut self.stats)
    }

    /// Series held.
    pub fn series_count(&self) -> usize {
        self.series.values().map(Vec::len).sum()
    }

    /// Takes one sample in, received at `arrived_ms` (any clock the caller
    /// also gives [`Compactor::end_quiet`]); rows whose fate is decided go
    /// to `out`.
    pub fn push(&mut self, sample: UsageSample, position: P, arrived_ms: i64, out: &mut Compacted) {
        self.stats.samples_in += 1;
        let Some(windows) = self.series.get_mut(&sample.sandbox) else {
            let sandbox = sample.sandbox.clone();
            let window = Window::start(sample, position, arrived_ms);
            self.series.insert(sandbox, vec![window]);
            return;
        };
        let Some(index) = windows
            .iter()
            .position(|window| window.newer.sample.sample.customer == sample.customer)
        else {
            windows.push(Window::start(sample, position, arrived_ms));
            return;
        };
        let window = &mut windows[index];
        let epoch = window.newer.sample.sample.epoch;
        if sample.epoch > epoch {
            let ended = std::mem::replace(window, Window::start(sample, position, arrived_ms));
            self.stats.series_ended += 1;
            ended.end(out, &mut self.stats);
            return;
        }
        if sample.epoch < epoch {
            self.keep_late(sample, out);
            return;
        }
        window.last_arrival_ms = arrived_ms;
        if let Some(restart) = window.push(sample, position, self.rule, out, &mut self.stats) {
            let ended = std::mem::replace(window, Window::start(restart, position, arrived_ms));
            self.stats.series_ended += 1;
            ended.end(out, &mut self.stats);
        }
    }

    fn keep_late(&mut self, sample: UsageSample, out: &mut Compacted) {
        self.stats.late += 1;
        self.stats.samples_kept += 1;
        out.samples.push(sample);
    }

    /// Ends every series that received nothing since `before_ms` (its
    /// sandbox went quiet: stopped, or its node is gone): its last two
    /// samples and its open minute are written.
    pub fn end_quiet(&mut self, before_ms: i64, out: &mut Compacted) {
        let stats = &mut self.stats;
        self.series.retain(|_, windows| {
            let mut index = 0;
            while index < windows.len() {
                if windows[index].last_arrival_ms < before_ms {
                    stats.series_ended += 1;
                    windows.swap_remove(index).end(out, stats);
                } else {
                    index += 1;
                }
            }
            !windows.is_empty()
        });
    }

    /// Ends every series (the end of an offline input).
    pub fn finish(&mut self, out: &mut Compacted) {
        self.end_quiet(i64::MAX, out);
    }

    /// The earliest source position still needed to rebuild the state: the
    /// samples whose fate is open and the first sample of each open minute.
    pub fn oldest_position(&self) -> Option<P> {
        self.series
            .values()
            .flatten()
            .map(|window| {
                let mut oldest = window.minute.first_position.min(window.newer.position);
                if let Some(older) = &window.older {
                    oldest = oldest.min(older.position);
                }
                oldest
            })
            .min()
    }
}

impl<P: Copy + Ord> Window<P> {
    fn start(sample: UsageSample, position: P, arrived_ms: i64) -> Self {
        let minute = OpenMinute::open(&sample, position);
        Self {
            last_arrival_ms: arrived_ms,
            older: None,
            newer: Held {
                sample: NumberedSample { line: 0, sample },
                position,
                keep: true,
            },
            newer_signature: None,
            keep_next: false,
            refused_in_a_row: 0,
            minute,
        }
    }

    fn push(
        &mut self,
        sample: UsageSample,
        position: P,
        rule: CompactRule,
        out: &mut Compacted,
        stats: &mut CompactStats,
    ) -> Option<UsageSample> {
        let newest_seq = self.newer.sample.sample.seq;
        if sample.seq <= newest_seq {
            let held_twice = sample.seq == newest_seq
                || self
                    .older
                    .as_ref()
                    .is_some_and(|older| older.sample.sample.seq == sample.seq);
            if held_twice {
                stats.duplicates += 1;
                return None;
            }
            // Late: kept (more samples never change a bill); counted in its
            // minute only while that minute is open.
            if self.minute.contains(&sample) {
                self.minute.add(&sample);
            }
            stats.late += 1;
            stats.samples_kept += 1;
            out.samples.push(sample);
            return None;
        }
        stats.missing += sample.seq - newest_seq - 1;
        let closing = NumberedSample { line: 0, sample };
        let newer = &self.newer.sample;
        let in_same_minute = self.minute.contains(&closing.sample);
        if interval_is_refused(newer, &closing) {
            stats.refused += 1;
            self.refused_in_a_row += 1;
            if self.refused_in_a_row >= RESTART_AFTER_REFUSED {
                // A run of refusals (a collector clock that jumped): end the
                // series here and start again from this sample, so that the
                // partition's offsets and the minute rows move on.
                return Some(closing.sample);
            }
            // Rating skips it and rates the next interval from `newer`:
            // keep the two before it, it, and the one after it.
            self.newer.keep = true;
            if let Some(older) = &mut self.older {
                older.keep = true;
            }
            self.keep_next = true;
            if in_same_minute {
                self.minute.add(&closing.sample);
            }
            stats.samples_kept += 1;
            out.samples.push(closing.sample);
            return None;
        }
        let signature = Signature::of(&newer.sample, &closing.sample, rule.unmoved_mask);
        let newer_ms = newer.sample.ts.timestamp_millis();
        let closing_ms = closing.sample.ts.timestamp_millis();
        let hour_boundary = newer_ms.div_euclid(HOUR_MS) != closing_ms.div_euclid(HOUR_MS);
        let gauges_only = !full_counters(&newer.sample) || !full_counters(&closing.sample);
        let is_break = self.newer_signature != Some(signature) || hour_boundary || gauges_only;
        let mut keep = std::mem::take(&mut self.keep_next) || gauges_only || rule.keep_all;
        if is_break {
            keep = true;
            self.newer.keep = true;
            if let Some(older) = &mut self.older {
                older.keep = true;
            }
        }
        if in_same_minute {
            self.minute.add(&closing.sample);
        } else {
            self.newer.keep = true;
            let closed = std::mem::replace(
                &mut self.minute,
                OpenMinute::open(&closing.sample, position),
            );
            out.minutes.push(closed.row);
        }
        let held = Held {
            sample: closing,
            position,
            keep,
        };
        let previous = std::mem::replace(&mut self.newer, held);
        if let Some(decided) = self.older.replace(previous) {
            if decided.keep {
                stats.samples_kept += 1;
                out.samples.push(decided.sample.sample);
            }
        }
        self.newer_signature = Some(signature);
        self.refused_in_a_row = 0;
        None
    }

    /// The series ends: its last two samples are kept (the interval that
    /// closes its spans), and its minute is written.
    fn end(self, out: &mut Compacted, stats: &mut CompactStats) {
        if let Some(older) = self.older {
            stats.samples_kept += 1;
            out.samples.push(older.sample.sample);
        }
        stats.samples_kept += 1;
        out.samples.push(self.newer.sample.sample);
        out.minutes.push(self.minute.row);
    }
}

/// Compacts a whole input at once (tests, offline tools) under `rule`: the
/// samples to keep and the minute rows, in no particular order.
pub fn compact_all(samples: impl IntoIterator<Item = UsageSample>, rule: CompactRule) -> Compacted {
    let mut compactor = Compactor::<u64>::with_rule(rule);
    let mut out = Compacted::default();
    for (position, sample) in samples.into_iter().enumerate() {
        let arrived_ms = sample.ts.timestamp_millis();
        compactor.push(sample, position as u64, arrived_ms, &mut out);
    }
    compactor.finish(&mut out);
    out
}
