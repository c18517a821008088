//! Throughput of the offline rating path, in samples rated per second on one
//! core, for allocation bases (the E2B sheet) and for max(requested, used)
//! with minimums and GPUs (the Modal sheet).
//!
//! `cargo bench -p idlemeter-core --bench rating` prints the median of several
//! runs. Samples are pre-parsed: this measures rating, not JSON parsing. They
//! arrive interleaved by time across sandboxes, as a node's batches do.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use idlemeter_core::{
    rate_samples, CustomerId, Epoch, LifecycleState, NodeId, NumberedSample, PriceSheet, SandboxId,
    SessionOrConnection, UsageSample, VcpuMillis,
};

const SANDBOXES: usize = 10_000;
const SAMPLES_PER_SANDBOX: usize = 200;
const RUNS: usize = 7;

fn trace() -> Vec<NumberedSample> {
    let start = DateTime::parse_from_rfc3339("2026-03-02T10:00:00Z")
        .expect("valid timestamp")
        .with_timezone(&Utc);
    let customers: Vec<CustomerId> = (0..100)
        .map(|index| CustomerId::parse(format!("customer-{index}")).expect("valid id"))
        .collect();
    let sandboxes: Vec<SandboxId> = (0..SANDBOXES)
        .map(|index| SandboxId::parse(format!("sbx-{index:06}")).expect("valid id"))
        .collect();
    let node = NodeId::parse("node-1").expect("valid id");
    let mut samples = Vec::with_capacity(SANDBOXES * SAMPLES_PER_SANDBOX);
    for tick in 0..SAMPLES_PER_SANDBOX {
        for (index, sandbox) in sandboxes.iter().enumerate() {
            let seconds = tick as u64;
            samples.push(NumberedSample {
                line: samples.len() as u64 + 1,
                sample: UsageSample {
                    state: if tick % 50 < 45 {
                        LifecycleState::Running
                    } else {
                        LifecycleState::Suspended
                    },
                    vcpu: VcpuMillis(2000),
                    mem_bytes: 4 << 30,
                    gpu_model: (index % 10 == 0).then(|| "H100".to_owned()),
                    gpu_count: u32::from(index % 10 == 0),
                    disk_bytes: 10 << 30,
                    cpu_used_usec: seconds * 700_000,
                    net_rx_bytes: seconds * 1000,
                    net_tx_bytes: seconds * 2000,
                    mem_used_bytes: 1 << 30,
                    exec_sessions: u32::from(tick % 3 == 0),
                    ..UsageSample::blank(
                        customers[index % customers.len()].clone(),
                        node.clone(),
                        sandbox.clone(),
                        Epoch(1),
                        seconds,
                        start + Duration::from_secs(seconds),
                    )
                },
            });
        }
    }
    samples
}

fn median_rate(sheet: &PriceSheet, samples: &[NumberedSample]) -> f64 {
    let mut rates: Vec<f64> = (0..RUNS)
        .map(|_| {
            let began = Instant::now();
            black_box(rate_samples(
                sheet,
                black_box(samples),
                &SessionOrConnection,
            ));
            samples.len() as f64 / began.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[RUNS / 2]
}

fn main() {
    let interleaved = trace();
    let mut grouped = interleaved.clone();
    grouped.sort_by(|left, right| {
        (&left.sample.sandbox, left.sample.seq).cmp(&(&right.sample.sandbox, right.sample.seq))
    });
    for (order, samples) in [
        ("interleaved by time", &interleaved),
        ("grouped by sandbox", &grouped),
    ] {
        println!("input {order}:");
        rate_each_sheet(samples);
    }
}

fn rate_each_sheet(samples: &[NumberedSample]) {
    for (name, text) in [
        ("e2b (allocated)", include_str!("../../../prices/e2b.toml")),
        (
            "sprites (allocated, idle free)",
            include_str!("../../../prices/sprites.toml"),
        ),
        (
            "modal (max(requested, used), gpu)",
            include_str!("../../../prices/modal.toml"),
        ),
    ] {
        let sheet = PriceSheet::from_toml(text, name).expect("shipped sheet loads");
        let rate = median_rate(&sheet, samples);
        println!(
            "  {name}: {} samples, median {:.2} M samples/s on one core",
            samples.len(),
            rate / 1e6
        );
    }
}
