//! Properties of rating that must hold for any trace, not just the examples:
//! linearity under splitting, invariance under duplicates and shuffling, and
//! lines that sum exactly to the total with one rounding each.

use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};
use idlemeter_core::pricing::ResourceSlot;
use idlemeter_core::rating::RatedUsage;
use idlemeter_core::{
    rate_report, rate_samples, BillingOptions, CustomerId, Epoch, LifecycleState, LineKind, NodeId,
    NumberedSample, PriceSheet, SandboxId, SessionOrConnection, UsageSample, VcpuMillis,
};
use proptest::prelude::*;
use rust_decimal::{Decimal, RoundingStrategy};

/// Every resource kind and basis, a minimum, idle-free vCPU, tiers, a plan
/// with an odd fee and credit, and a price change in the middle of the traces.
const SHEET: &str = r#"
[sheet]
platform = "property-test"
currency = "USD"
line_rounding = "half_up"
month_hours = 730
default_plan = "basic"

[plans.basic]
monthly_fee = "3.333"
[[plans.basic.credits]]
kind = "monthly"
amount = "1.005"

[[versions]]
effective_from = 2026-01-01T00:00:00Z
[versions.resources.vcpu]
unit = "vcpu-second"
unit_price = "0.0000131"
basis = "max_requested_used"
minimum = "0.25"
idle = "free"
[versions.resources.memory]
unit = "GiB-hour"
unit_price = "0.0162"
basis = "used"
minimum = "0.125"
[versions.resources.gpu.H100]
unit = "gpu-hour"
unit_price = "2.74"
[versions.resources.disk]
unit = "GB-month"
unit_price = "0.09"
[versions.resources.egress]
unit = "GB"
unit_price = "0.05"

[[versions]]
effective_from = 2026-03-02T12:00:00Z
[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "0.0504"
basis = "allocated"
[versions.resources.memory]
unit = "GiB-hour"
tier_mode = "graduated"
tiers = [{ up_to = "1", unit_price = "0.02" }, { unit_price = "0.0111" }]
[versions.resources.gpu.H100]
unit = "gpu-second"
unit_price = "0.001097"
[versions.resources.disk]
unit = "GiB-month"
unit_price = "0.5"
bills_while = ["running", "suspended", "stopped"]
[versions.resources.egress]
unit = "GiB"
unit_price = "0.09"
"#;

fn sheet() -> PriceSheet {
    PriceSheet::from_toml(SHEET, "properties.toml").expect("test sheet loads")
}

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-02T10:00:00Z")
        .expect("valid timestamp")
        .with_timezone(&Utc)
}

/// One step of a series: seconds since the previous sample and what held
/// over the interval.
type Step = (u32, u8, u32, u64, u64, u32, u64, bool);

fn step() -> impl Strategy<Value = Step> {
    (
        1u32..1200,          // seconds since the previous sample
        0u8..3,              // state
        0u32..4000,          // vCPU thousandths
        0u64..(16u64 << 30), // memory bytes (allocated and used)
        0u64..5_000_000_000, // CPU microseconds used in the interval
        0u32..3,             // exec sessions
        0u64..3_000_000_000, // egress bytes in the interval
        any::<bool>(),       // a GPU attached
    )
}

fn series_from(sandbox: usize, steps: &[Step]) -> Vec<UsageSample> {
    let mut ts = start();
    let mut cpu = 0u64;
    let mut tx = 0u64;
    steps
        .iter()
        .enumerate()
        .map(
            |(seq, &(seconds, state, vcpu, mem, cpu_step, sessions, tx_step, gpu))| {
                ts += Duration::seconds(i64::from(seconds));
                cpu += cpu_step;
                tx += tx_step;
                UsageSample {
                    state: [
                        LifecycleState::Running,
                        LifecycleState::Suspended,
                        LifecycleState::Stopped,
                    ][usize::from(state)],
                    vcpu: VcpuMillis(vcpu),
                    mem_bytes: mem,
                    gpu_model: gpu.then(|| "H100".to_owned()),
                    gpu_count: u32::from(gpu),
                    disk_bytes: mem / 3,
                    cpu_used_usec: cpu,
                    net_tx_bytes: tx,
                    mem_used_bytes: mem / 2,
                    exec_sessions: sessions,
                    ..UsageSample::blank(
                        CustomerId::parse(format!("cust-{}", sandbox % 2)).expect("valid id"),
                        NodeId::parse("node-1").expect("valid id"),
                        SandboxId::parse(format!("sbx-{sandbox}")).expect("valid id"),
                        Epoch(1),
                        seq as u64,
                        ts,
                    )
                }
            },
        )
        .collect()
}

fn traces() -> impl Strategy<Value = Vec<Vec<UsageSample>>> {
    prop::collection::vec(prop::collection::vec(step(), 1..16), 1..4).prop_map(|all| {
        all.iter()
            .enumerate()
            .map(|(sandbox, steps)| series_from(sandbox, steps))
            .collect()
    })
}

fn numbered(samples: impl IntoIterator<Item = UsageSample>) -> Vec<NumberedSample> {
    samples
        .into_iter()
        .enumerate()
        .map(|(index, sample)| NumberedSample {
            line: index as u64 + 1,
            sample,
        })
        .collect()
}

/// Every (customer, version, slot) quantity of a rating.
fn quantities(sheet: &PriceSheet, rated: &RatedUsage) -> Vec<(String, usize, usize, u128)> {
    let mut all = Vec::new();
    for customer in &rated.customers {
        for version in 0..sheet.versions().len() {
            for slot in 0..sheet.slot_count() {
                let quantity = customer.quantity(version, ResourceSlot(slot));
                all.push((customer.customer.to_string(), version, slot, quantity));
            }
        }
    }
    all
}

proptest! {
    /// Rating the two halves of a trace, the split sample present in both (as
    /// the last of the first and the baseline of the second), rates exactly the
    /// same base quantities as the whole. The money before line rounding is
    /// `quantity x unit price / unit divisor` per (customer, version,
    /// resource), linear in the quantity, so it is the same money too.
    #[test]
    fn splitting_a_trace_keeps_its_quantities(trace in traces(), split_permille in 0usize..1000) {
        let sheet = sheet();
        let mut first = Vec::new();
        let mut second = Vec::new();
        for series in &trace {
            let split = (series.len() - 1) * split_permille / 1000;
            first.extend_from_slice(&series[..=split]);
            second.extend_from_slice(&series[split..]);
        }
        let whole = rate_samples(&sheet, &numbered(trace.concat()), &SessionOrConnection);
        let left = rate_samples(&sheet, &numbered(first), &SessionOrConnection);
        let right = rate_samples(&sheet, &numbered(second), &SessionOrConnection);
        prop_assert!(whole.errors.is_empty(), "{:?}", whole.errors);
        let mut halves = std::collections::BTreeMap::new();
        for (customer, version, slot, quantity) in quantities(&sheet, &left).into_iter().chain(quantities(&sheet, &right)) {
            *halves.entry((customer, version, slot)).or_insert(0u128) += quantity;
        }
        for (customer, version, slot, quantity) in quantities(&sheet, &whole) {
            prop_assert_eq!(halves.get(&(customer, version, slot)).copied().unwrap_or(0), quantity);
        }
    }

    /// Duplicated and shuffled samples rate to the same quantities.
    #[test]
    fn duplicates_and_order_do_not_change_quantities(
        trace in traces(),
        duplicate_every in 1usize..5,
        seed in any::<u64>(),
    ) {
        let sheet = sheet();
        let ordered: Vec<UsageSample> = trace.concat();
        let mut messy: Vec<UsageSample> = ordered
            .iter()
            .enumerate()
            .flat_map(|(index, sample)| {
                let copies = if index % duplicate_every == 0 { 2 } else { 1 };
                std::iter::repeat_n(sample.clone(), copies)
            })
            .collect();
        shuffle(&mut messy, seed);
        let clean = rate_samples(&sheet, &numbered(ordered), &SessionOrConnection);
        let rated = rate_samples(&sheet, &numbered(messy), &SessionOrConnection);
        prop_assert!(rated.errors.is_empty(), "{:?}", rated.errors);
        prop_assert_eq!(quantities(&sheet, &clean), quantities(&sheet, &rated));
    }

    /// The lines of every bill sum exactly to its total, the usage lines to
    /// its subtotal, and each usage line is its exact amount rounded once.
    #[test]
    fn lines_sum_to_the_total_and_round_once(trace in traces()) {
        let sheet = sheet();
        let samples = numbered(trace.concat());
        let report = rate_report(&sheet, &samples, &SessionOrConnection, &BillingOptions::default(), Vec::new())
            .expect("rates");
        for bill in &report.customers {
            let all: Decimal = bill.lines.iter().map(|line| line.amount).sum();
            prop_assert_eq!(all, bill.total);
            let usage: Decimal = bill
                .lines
                .iter()
                .filter(|line| matches!(line.kind, LineKind::Usage | LineKind::Included))
                .map(|line| line.amount)
                .sum();
            prop_assert_eq!(usage, bill.subtotal);
            prop_assert!(bill.total >= Decimal::ZERO);
            for line in bill.lines.iter().filter(|line| line.kind == LineKind::Usage) {
                prop_assert_eq!(line.amount.scale(), 2);
                prop_assert_eq!(line.amount, rounded_once(&sheet, line));
            }
        }
    }
}

/// The line's exact amount computed independently in decimals, rounded half up.
fn rounded_once(sheet: &PriceSheet, line: &idlemeter_core::InvoiceLine) -> Decimal {
    let slot = sheet
        .slot_by_name(&line.resource)
        .expect("a priced resource");
    let version = sheet
        .versions()
        .iter()
        .position(|version| Some(version.effective_from) == line.price_version)
        .expect("a version");
    let unit = &sheet.versions()[version].resources[slot.0]
        .as_ref()
        .expect("priced")
        .unit;
    let quantity = Decimal::from_str(line.quantity_base.as_deref().expect("usage has a base"))
        .expect("decimal");
    let divisor = Decimal::from_str(&unit.divisor().to_string()).expect("decimal");
    let exact = quantity * line.unit_price / divisor;
    exact.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero)
}

/// A deterministic Fisher-Yates shuffle (xorshift), so failures replay.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed | 1;
    for index in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let other = (state % (index as u64 + 1)) as usize;
        items.swap(index, other);
    }
}
