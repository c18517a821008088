//! Ingest under faults, against the real broker and ClickHouse: a known stream
//! goes through a rebalance between two ingest workers, and is reconciled
//! afterwards: 0 lost, 0 doubled.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_core::{NodeId, UsageSample};
use idlemeter_proto::encode_node_batch;
use idlemeter_tests::{sample, TestEnv};

const NODES: u64 = 6;
const SANDBOXES_PER_NODE: u64 = 5;
const TICKS: u64 = 40;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0)
        .single()
        .expect("valid time")
}

/// Tick `tick` of node `node`: every sandbox's seq is `tick + 1` and its CPU
/// counter `1,000 x tick`, so each sandbox's usage over the stream is known in
/// advance: 1,000 x (TICKS - 1) µs.
fn batch(node: u64, tick: u64) -> (NodeId, Vec<UsageSample>) {
    let node_id = NodeId::parse(format!("node-{node}")).expect("valid id");
    let samples = (0..SANDBOXES_PER_NODE)
        .map(|index| {
            let mut sample = sample(
                &format!("sbx-{node}-{index}"),
                1,
                tick + 1,
                start() + chrono::Duration::seconds(tick as i64),
                1_000 * tick,
                0,
            );
            sample.node = node_id.clone();
            sample
        })
        .collect();
    (node_id, samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_between_two_workers_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new("faults_rebalance").await?;
    let producer = env.producer()?;
    let first = env.start_ingest(&env.clickhouse)?;
    let mut second = None;
    for tick in 0..TICKS {
        for node in 0..NODES {
            let (node_id, samples) = batch(node, tick);
            let payload = encode_node_batch(&node_id, Utc::now(), tick, &samples);
            env.produce(&producer, node_id.as_str(), &payload).await?;
        }
        if tick == 10 {
            // A second worker joins the group mid-stream: partitions move.
            second = Some(env.start_ingest(&env.clickhouse)?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first worker leaves; its partitions move to the second.
    let consumed_by_first = first.counter("idlemeter_ingest_messages_consumed_total");
    first.stop().await?;
    let expected = NODES * SANDBOXES_PER_NODE * TICKS;
    let distinct = || async {
        Ok::<u64, anyhow::Error>(
            env.store
                .client()
                .query("SELECT uniqExact(sandbox, epoch, seq) FROM usage_samples")
                .fetch_one::<u64>()
                .await?,
        )
    };
    env.eventually("every sample stored", || async {
        Ok(distinct().await? >= expected)
    })
    .await?;
    let second = second.expect("started at tick 10");
    let consumed_by_second = second.counter("idlemeter_ingest_messages_consumed_total");
    second.stop().await?;
    assert!(
        consumed_by_first > 0 && consumed_by_second > 0,
        "both workers must have owned partitions: {consumed_by_first} and {consumed_by_second} messages"
    );

    // Reconcile: each sample identity exactly once after collapsing, and every
    // sandbox's usage exactly what was sent.
    env.assert_stream_reconciles(
        start(),
        NODES * SANDBOXES_PER_NODE,
        TICKS,
        1_000 * (TICKS - 1),
    )
    .await
}
