//! Invoicing benchmark (not a test): loads `CUSTOMERS` customers (one sandbox,
//! a baseline and a closing sample each) for October 2026 into a fresh
//! database, then closes the month and prints the time and customers/s.
//!
//!   scripts/bench-invoices.sh     (starts the test ClickHouse, then this)
//!   CUSTOMERS=100000 cargo bench -p idlemeter-invoicer --bench close_month

use std::time::Instant;

use chrono::{TimeZone, Utc};
use idlemeter_core::{
    CustomerId, Epoch, LifecycleState, NodeId, SandboxId, UsageSample, VcpuMillis,
};
use idlemeter_invoicer::{Invoicer, InvoicerConfig};
use idlemeter_store::{ClickHouseSettings, Store};

const SHEET: &str = include_str!("../../../prices/e2b.toml");

fn main() -> anyhow::Result<()> {
    let customers: u64 = std::env::var("CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(customers))
}

async fn run(customers: u64) -> anyhow::Result<()> {
    let database = format!("bench_invoices_{}", std::process::id());
    let store = Store::new(&ClickHouseSettings {
        url: std::env::var("IDLEMETER_CLICKHOUSE__URL")
            .unwrap_or_else(|_| "http://127.0.0.1:28123".to_owned()),
        database: database.clone(),
        user: "default".to_owned(),
        password: String::new(),
    });
    store.migrate(0).await?;
    let start = Utc
        .with_ymd_and_hms(2026, 10, 1, 0, 0, 0)
        .single()
        .expect("time");
    let loaded = Instant::now();
    let mut batch = Vec::new();
    for index in 0..customers {
        for seq in 1..=2u64 {
            batch.push(UsageSample {
                customer: CustomerId::parse(format!("cust-{index:07}"))?,
                node: NodeId::parse("node-1")?,
                sandbox: SandboxId::parse("sbx")?,
                epoch: Epoch(1),
                seq,
                ts: start + chrono::Duration::hours((seq as i64 - 1) * (1 + (index % 500) as i64)),
                state: LifecycleState::Running,
                vcpu: VcpuMillis(2000),
                mem_bytes: 1 << 30,
                gpu_model: None,
                gpu_count: 0,
                disk_bytes: 0,
                cpu_used_usec: seq,
                net_rx_bytes: 0,
                net_tx_bytes: 0,
                vcpu_alloc_usec: seq,
                mem_alloc_kib_ms: seq,
                mem_used_kib_ms: 0,
                gpu_alloc_ms: 0,
                disk_mib_ms: 0,
                api_calls: 0,
                mem_used_bytes: 0,
                exec_sessions: 1,
                open_conns: 0,
                detail: Default::default(),
                state_counters: Default::default(),
                counters_present: Default::default(),
            });
        }
        if batch.len() >= 100_000 {
            store.insert_samples(&batch).await?;
            batch.clear();
        }
    }
    store.insert_samples(&batch).await?;
    eprintln!(
        "bench: {} samples of {customers} customers loaded in {:.1} s",
        customers * 2,
        loaded.elapsed().as_secs_f64()
    );
    let lock = std::env::temp_dir().join(format!("{database}.lock"));
    let invoicer = Invoicer::new(
        store,
        idlemeter_store::SheetSource {
            sheet_text: SHEET,
            sheet_label: "prices/e2b.toml",
            policy: None,
        },
        InvoicerConfig {
            lock_file: lock.display().to_string(),
            ..InvoicerConfig::default()
        },
        idlemeter_core::BillingTerms {
            issuer: "bench".to_owned(),
            ..idlemeter_core::BillingTerms::default()
        },
    )?;
    let began = Instant::now();
    let outcome = invoicer
        .close_period(start, Utc::now(), false, &|done, total| {
            if done % (total / 10).max(1) == 0 {
                eprintln!(
                    "bench: {done}/{total} customers computed after {:.1} s",
                    began.elapsed().as_secs_f64()
                );
            }
        })
        .await?;
    let elapsed = began.elapsed().as_secs_f64();
    println!(
        "invoices: closed October for {customers} customers ({} invoices) in {elapsed:.1} s: {:.0} customers/s (target: 100,000 in 60 s)",
        outcome.issued.len(),
        customers as f64 / elapsed
    );
    Ok(())
}
