//! Traces shared by the rating tests: epochs generated tick by tick the way
//! the collector integrates them (`services/collector/src/counters.rs`).

#![allow(dead_code)]

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use idlemeter_core::{
    rate_report, BillingOptions, CounterSet, CustomerId, Epoch, LifecycleState, NodeId,
    NumberedSample, PriceSheet, RateReport, SandboxId, SessionOrConnection, UsageSample,
    VcpuMillis,
};
use proptest::prelude::*;
use rust_decimal::Decimal;

pub const SHEETS: [(&str, &str, u64); 5] = [
    ("e2b", include_str!("../../../../prices/e2b.toml"), 1),
    (
        "northflank",
        include_str!("../../../../prices/northflank.toml"),
        1,
    ),
    ("modal", include_str!("../../../../prices/modal.toml"), 1),
    (
        "sprites",
        include_str!("../../../../prices/sprites.toml"),
        1,
    ),
    (
        "codesandbox",
        include_str!("../../../../prices/codesandbox.toml"),
        60,
    ),
];

/// What holds over a run of ticks.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    pub ticks: u32,
    pub running: bool,
    /// vCPU thousandths, at least Modal's minimum of 0.25 vCPU.
    pub vcpu: u32,
    /// Memory in MiB, at least Modal's minimum of 128 MiB.
    pub mem_mib: u64,
    /// Permille of the allocation used as CPU (over 1000: bursting above it).
    pub cpu_permille: u64,
    pub session: bool,
}

pub fn phase() -> impl Strategy<Value = Phase> {
    (
        1u32..90,
        prop::bool::weighted(0.75),
        prop::sample::select(vec![250u32, 500, 1000, 2000, 4000, 8000]),
        prop::sample::select(vec![128u64, 512, 1024, 2048, 8192]),
        0u64..1500,
        any::<bool>(),
    )
        .prop_map(
            |(ticks, running, vcpu, mem_mib, cpu_permille, session)| Phase {
                ticks,
                running,
                vcpu,
                mem_mib,
                cpu_permille,
                session,
            },
        )
}

/// One sandbox's epoch: its phases and whether it has GPUs.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    pub phases: Vec<Phase>,
    pub gpus: u32,
    pub disk_gib: u64,
}

pub fn epoch_plan() -> impl Strategy<Value = EpochPlan> {
    (
        prop::collection::vec(phase(), 1..12),
        prop::sample::select(vec![0u32, 0, 1, 2]),
        1u64..200,
    )
        .prop_map(|(phases, gpus, disk_gib)| EpochPlan {
            phases,
            gpus,
            disk_gib,
        })
}

pub fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-03T10:00:00Z")
        .expect("valid timestamp")
        .with_timezone(&Utc)
}

/// The samples a collector would send for a plan: one per tick, the first a
/// baseline. `jitter` adds up to that many milliseconds to each tick.
pub fn collect(sandbox: usize, plan: &EpochPlan, jitter: &[u16]) -> Vec<UsageSample> {
    let mut samples = Vec::new();
    let mut sample = UsageSample {
        vcpu: VcpuMillis(plan.phases[0].vcpu),
        mem_bytes: plan.phases[0].mem_mib << 20,
        gpu_model: (plan.gpus > 0).then(|| "H100".to_owned()),
        gpu_count: plan.gpus,
        disk_bytes: plan.disk_gib << 30,
        counters_present: CounterSet::ALL,
        ..UsageSample::blank(
            CustomerId::parse(format!("cust-{}", sandbox % 3)).expect("valid id"),
            NodeId::parse("node-1").expect("valid id"),
            SandboxId::parse(format!("sbx-{sandbox}")).expect("valid id"),
            Epoch(1),
            1,
            start(),
        )
    };
    samples.push(sample.clone());
    let mut tick = 0usize;
    for phase in &plan.phases {
        for _ in 0..phase.ticks {
            tick += 1;
            let ts = start()
                + Duration::seconds(tick as i64)
                + Duration::milliseconds(i64::from(jitter[tick % jitter.len()]));
            let elapsed = (ts - sample.ts).num_milliseconds() as u64;
            advance(&mut sample, phase, elapsed);
            sample.seq += 1;
            sample.ts = ts;
            samples.push(sample.clone());
        }
    }
    samples
}

/// One interval of the collector's integration, closing at a tick of `phase`.
pub fn advance(sample: &mut UsageSample, phase: &Phase, elapsed: u64) {
    sample.state = if phase.running {
        LifecycleState::Running
    } else {
        LifecycleState::Suspended
    };
    sample.vcpu = VcpuMillis(phase.vcpu);
    sample.mem_bytes = phase.mem_mib << 20;
    sample.exec_sessions = u32::from(phase.session && phase.running);
    sample.open_conns = 0;
    let disk = (sample.disk_bytes >> 20) * elapsed;
    sample.disk_mib_ms += disk;
    let counters = &mut sample.state_counters;
    if !phase.running {
        counters.suspended_ms += elapsed;
        sample.mem_used_bytes = 0;
        return;
    }
    let alloc = u64::from(phase.vcpu) * elapsed;
    let used = alloc * phase.cpu_permille / 1000;
    let mem_kib = (phase.mem_mib << 10) * elapsed;
    let used_kib = mem_kib * phase.cpu_permille.min(1000) / 1000;
    let gpu = u64::from(sample.gpu_count) * elapsed;
    sample.mem_used_bytes = (phase.mem_mib << 20) * phase.cpu_permille.min(1000) / 1000;
    sample.vcpu_alloc_usec += alloc;
    sample.cpu_used_usec += used;
    sample.mem_alloc_kib_ms += mem_kib;
    sample.mem_used_kib_ms += used_kib;
    sample.gpu_alloc_ms += gpu;
    sample.net_tx_bytes += used;
    counters.running_ms += elapsed;
    counters.vcpu_max_usec += alloc.max(used);
    counters.mem_max_kib_ms += mem_kib.max(used_kib);
    counters.disk_running_mib_ms += disk;
    if sample.exec_sessions > 0 {
        counters.active_ms += elapsed;
        counters.vcpu_alloc_active_usec += alloc;
        counters.vcpu_max_active_usec += alloc.max(used);
        counters.cpu_used_active_usec += used;
        counters.mem_alloc_active_kib_ms += mem_kib;
        counters.mem_max_active_kib_ms += mem_kib.max(used_kib);
        counters.mem_used_active_kib_ms += used_kib;
        counters.gpu_alloc_active_ms += gpu;
        counters.disk_active_mib_ms += disk;
    }
}

/// Rates samples (numbered from 1 in their order) with the collector's
/// activity rule and no billing options.
pub fn rate(sheet: &PriceSheet, samples: &[UsageSample]) -> RateReport {
    let numbered: Vec<NumberedSample> = samples
        .iter()
        .enumerate()
        .map(|(index, sample)| NumberedSample {
            line: index as u64 + 1,
            sample: sample.clone(),
        })
        .collect();
    rate_report(
        sheet,
        &numbered,
        &SessionOrConnection,
        &BillingOptions::default(),
        Vec::new(),
    )
    .expect("rates")
}

/// (customer, resource, price version) -> (base quantity, amount), and a
/// "total" line per customer.
pub type Lines = BTreeMap<(String, String, String), (String, Decimal)>;

pub fn lines(report: &RateReport) -> Lines {
    let mut all = BTreeMap::new();
    for bill in &report.customers {
        for line in &bill.lines {
            let key = (
                bill.customer.to_string(),
                format!("{}:{}", line.kind.as_str(), line.resource),
                format!("{:?}", line.price_version),
            );
            let quantity = line.quantity_base.clone().unwrap_or_default();
            all.insert(key, (quantity, line.amount));
        }
        all.insert(
            (bill.customer.to_string(), "total".to_owned(), String::new()),
            (String::new(), bill.total),
        );
    }
    all
}
