//! Margin: a CPU sandbox and a GPU sandbox of one customer on nodes of
//! known cost, billed by the rater and costed by the node cost sheet, read
//! from the admin route and the margin panel with exact numbers.

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_api::auth::generate;
use idlemeter_core::margin::NodeCosts;
use idlemeter_core::{NodeId, UsageSample, VcpuMillis};
use idlemeter_tests::TestEnv;
use serde_json::Value;

/// vCPU $0.20 per vCPU-hour, H100 $4.00 per GPU-hour.
const SHEET: &str = r#"
[sheet]
platform = "test"
currency = "USD"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "0.20"
basis = "allocated"
increment_seconds = 1
idle = "billed"

[versions.resources.gpu.H100]
unit = "gpu-hour"
unit_price = "4.00"
increment_seconds = 1
idle = "billed"
"#;

/// A 96-vCPU node at $9.60 an hour ($0.10 per vCPU-hour) and an 8-GPU node
/// at $98.32 an hour, allocated by GPU.
const COSTS: &str = r#"
[sheet]
currency = "USD"

[[types]]
name = "p5.48xlarge"
nodes = "gpu-*"
cost_per_hour = "98.32"
vcpus = 192
memory_gib = 2048
gpus = 8

[[types]]
name = "c7i.metal"
nodes = "*"
cost_per_hour = "9.60"
vcpus = 96
memory_gib = 192
"#;

fn at(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, day, hour, 0, 0)
        .single()
        .expect("valid date")
}

/// `sandbox` on `node` with `vcpus` and `gpus` H100 for ten hours from
/// 2026-10-05, its allocation counters growing with time.
fn ten_hours(sandbox: &str, node: &str, vcpus: u32, gpus: u32) -> Vec<UsageSample> {
    let seconds: u64 = 36_000;
    idlemeter_tests::running_span("m-1", 1, at(5, 0), 10, vcpus * 1000, 0)
        .into_iter()
        .enumerate()
        .map(|(index, sample)| {
            let elapsed = if index == 0 { 0 } else { seconds };
            UsageSample {
                sandbox: idlemeter_core::SandboxId::parse(sandbox).expect("id"),
                node: NodeId::parse(node).expect("id"),
                vcpu: VcpuMillis(vcpus * 1000),
                gpu_model: (gpus > 0).then(|| "H100".to_owned()),
                gpu_count: gpus,
                vcpu_alloc_usec: u64::from(vcpus) * elapsed * 1_000_000,
                gpu_alloc_ms: u64::from(gpus) * elapsed * 1_000,
                ..sample
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_margin_of_sandboxes_on_nodes_of_known_cost() -> anyhow::Result<()> {
    let env = TestEnv::new("margin").await?;
    let mut samples = ten_hours("cpu-box", "cpu-1", 4, 0);
    samples.extend(ten_hours("gpu-box", "gpu-1", 8, 1));
    env.store.insert_samples(&samples).await?;
    // The minute rows ingest writes beside the samples.
    env.store
        .client()
        .query(idlemeter_store::minutes_from_samples_sql())
        .execute()
        .await?;
    idlemeter_tests::rater_pass(
        &env,
        SHEET,
        "margin.toml",
        idlemeter_core::BillingTerms::default(),
        at(6, 1),
    )
    .await?;
    let costs = NodeCosts::from_toml(COSTS, "costs.toml").map_err(anyhow::Error::msg)?;
    env.store.load_node_costs(&costs).await?;

    let admin = generate(None, "finance", 0);
    env.store.insert_api_key(&admin.row).await?;
    let tenant = idlemeter_core::CustomerId::parse("m-1")?;
    let customer = generate(Some(&tenant), "m", 0);
    env.store.insert_api_key(&customer.row).await?;
    let api = idlemeter_tests::api(&env, SHEET, idlemeter_core::BillingTerms::default()).await?;
    let base = idlemeter_tests::serve(api).await?;
    let rows: Vec<Value> = reqwest::Client::new()
        .get(format!(
            "{base}/v1/admin/margin?from=2026-10-01T00:00:00Z&to=2026-10-08T00:00:00Z"
        ))
        .bearer_auth(&admin.key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let row = |sandbox: &str| -> (String, String, String, String) {
        let found = rows
            .iter()
            .find(|row| row["sandbox"] == sandbox)
            .unwrap_or_else(|| panic!("a row for {sandbox:?} in {rows:?}"));
        let text = |field: &str| found[field].as_str().unwrap_or_default().to_owned();
        (
            text("node_type"),
            text("revenue"),
            text("cost"),
            text("margin"),
        )
    };
    // cpu-box: 40 vCPU-hours billed $8.00 (its 40 of the customer's 120
    // vCPU-hours of $24.00); 40/96 of ten $9.60 node-hours = $4.00.
    assert_eq!(
        row("cpu-box"),
        ("c7i.metal".into(), "8".into(), "4".into(), "4".into())
    );
    // gpu-box: $16.00 of vCPU and the whole $40.00 of H100; 1/8 of ten
    // $98.32 node-hours = $122.90: a loss of $66.90.
    assert_eq!(
        row("gpu-box"),
        (
            "p5.48xlarge".into(),
            "56".into(),
            "122.9".into(),
            "-66.9".into()
        )
    );
    // The customer: $64.00 billed, $126.90 allocated.
    assert_eq!(
        row(""),
        (String::new(), "64".into(), "126.9".into(), "-62.9".into())
    );
    assert!(rows.iter().all(|row| row["currency"] == "USD"));
    // A customer key does not see the route.
    let status = reqwest::Client::new()
        .get(format!("{base}/v1/admin/margin"))
        .bearer_auth(&customer.key)
        .send()
        .await?
        .status();
    assert_eq!(status, 404);
    Ok(())
}
