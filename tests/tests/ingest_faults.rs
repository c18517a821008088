//! Ingest under faults, against the real broker and ClickHouse: a known stream
//! goes through a rebalance between two ingest workers, and is reconciled
//! afterwards: 0 lost, 0 doubled.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_core::{NodeId, UsageSample};
use idlemeter_proto::encode_node_batch;
use idlemeter_tests::{counted, sample, TestEnv};

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
            let mut sample = counted(sample(
                &format!("sbx-{node}-{index}"),
                1,
                tick + 1,
                start() + chrono::Duration::seconds(tick as i64),
                1_000 * tick,
                0,
            ));
            sample.node = node_id.clone();
            sample
        })
        .collect();
    (node_id, samples)
}

/// Produces every node's batch of `tick`, each `copies` times.
async fn produce_tick(
    env: &TestEnv,
    producer: &rdkafka::producer::FutureProducer,
    tick: u64,
    copies: usize,
) -> anyhow::Result<()> {
    for node in 0..NODES {
        let (node_id, samples) = batch(node, tick);
        let payload = encode_node_batch(&node_id, Utc::now(), tick, &samples);
        for _ in 0..copies {
            env.produce(producer, node_id.as_str(), &payload).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_between_two_workers_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new("faults_rebalance").await?;
    let producer = env.producer()?;
    let first = env.start_ingest(&env.clickhouse)?;
    let mut second = None;
    for tick in 0..TICKS {
        produce_tick(&env, &producer, tick, 1).await?;
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
    env.eventually("every sample stored", || async {
        Ok(env.samples_covered().await? >= expected)
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

/// ClickHouse dies mid-stream and stays down, then comes back: the same ingest
/// process keeps retrying with backoff, consumes nothing new meanwhile, and
/// catches up without losing or doubling a sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_then_back_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let mut env = TestEnv::new("faults_clickhouse_down").await?;
    let mut clickhouse = idlemeter_tests::PrivateClickHouse::start("faults").await?;
    env.clickhouse.url = clickhouse.url();
    env.store = idlemeter_store::Store::new(&env.clickhouse);
    env.store.migrate(0).await?;
    let producer = env.producer()?;
    let ingest = env.start_ingest(&env.clickhouse)?;
    for tick in 0..TICKS / 2 {
        produce_tick(&env, &producer, tick, 1).await?;
    }
    env.eventually("the first half stored", || async {
        Ok(env.samples_covered().await? >= NODES * SANDBOXES_PER_NODE * TICKS / 2)
    })
    .await?;

    clickhouse.kill();
    for tick in TICKS / 2..TICKS {
        produce_tick(&env, &producer, tick, 1).await?;
    }
    env.eventually("insert failures while clickhouse is down", || async {
        Ok(ingest.counter("idlemeter_ingest_insert_failures_total") >= 3)
    })
    .await?;
    // Down for 30 s in all, as an operator's restart of ClickHouse would be.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let failures_while_down = ingest.counter("idlemeter_ingest_insert_failures_total");
    clickhouse.resume().await?;

    env.eventually("the second half stored", || async {
        Ok(env.samples_covered().await? >= NODES * SANDBOXES_PER_NODE * TICKS)
    })
    .await?;
    // Backoff, not a busy loop: with 50 ms doubling to 500 ms, 30 s is at most ~65 tries.
    assert!(
        failures_while_down < 100,
        "{failures_while_down} insert attempts in 30 s"
    );
    ingest.stop().await?;
    env.assert_stream_reconciles(
        start(),
        NODES * SANDBOXES_PER_NODE,
        TICKS,
        1_000 * (TICKS - 1),
    )
    .await
}

/// The stream arrives backwards, every batch twice, with a burst of garbage
/// between: every garbage message is dead-lettered and the usage is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_duplicated_stream_with_a_garbage_burst_reconciles() -> anyhow::Result<()> {
    const GARBAGE: u64 = 200;
    let env = TestEnv::new("faults_disorder").await?;
    let producer = env.producer()?;
    let ingest = env.start_ingest(&env.clickhouse)?;
    for tick in (0..TICKS).rev() {
        produce_tick(&env, &producer, tick, 2).await?;
        if tick == TICKS / 2 {
            for index in 0..GARBAGE {
                env.produce(&producer, "node-0", format!("garbage {index}").as_bytes())
                    .await?;
            }
        }
    }
    env.eventually("every sample stored", || async {
        Ok(env.samples_covered().await? >= NODES * SANDBOXES_PER_NODE * TICKS)
    })
    .await?;
    env.eventually("every garbage message dead-lettered", || async {
        Ok(ingest.counter("idlemeter_ingest_dead_letters_total") >= GARBAGE)
    })
    .await?;
    assert_eq!(
        ingest.counter("idlemeter_ingest_dead_letters_total"),
        GARBAGE
    );
    ingest.stop().await?;
    env.assert_stream_reconciles(
        start(),
        NODES * SANDBOXES_PER_NODE,
        TICKS,
        1_000 * (TICKS - 1),
    )
    .await
}

/// The broker is killed (SIGKILL) while ingest is consuming and the producer
/// goes on producing, then started again on its own data: ingest reconnects,
/// resumes from its committed offsets (or replays, which collapses), and the
/// stream reconciles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_mid_stream_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let mut env = TestEnv::new("faults_broker_restart").await?;
    let mut broker = idlemeter_tests::PrivateBroker::start("restart").await?;
    env.use_broker(broker.address()).await?;
    let producer = env.producer()?;
    let ingest = env.start_ingest(&env.clickhouse)?;
    for tick in 0..TICKS / 4 {
        produce_tick(&env, &producer, tick, 1).await?;
    }
    env.eventually("the first quarter stored", || async {
        Ok(env.samples_covered().await? >= NODES * SANDBOXES_PER_NODE * TICKS / 4)
    })
    .await?;
    // More acknowledged messages, and the broker dies while ingest is still
    // reading them: some consumed, some inserted, offsets partly committed.
    for tick in TICKS / 4..TICKS / 2 {
        produce_tick(&env, &producer, tick, 1).await?;
    }
    broker.kill();
    let stored_at_kill = env.samples_covered().await?;

    // The producer goes on while the broker is down: its sends wait and are
    // delivered (idempotently) once it is back.
    let late = {
        let env = env.clone();
        let producer = producer.clone();
        tokio::spawn(async move {
            for tick in TICKS / 2..TICKS {
                produce_tick(&env, &producer, tick, 1).await?;
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stored_while_down = env.samples_covered().await?;
    assert!(
        stored_while_down <= NODES * SANDBOXES_PER_NODE * TICKS / 2,
        "{stored_while_down} samples stored, but only the first half was ever acknowledged"
    );
    broker.resume().await?;
    late.await??;
    eprintln!("stored at the kill: {stored_at_kill}; after 5 s down: {stored_while_down}");

    env.eventually("every sample stored after the restart", || async {
        Ok(env.samples_covered().await? >= NODES * SANDBOXES_PER_NODE * TICKS)
    })
    .await?;
    ingest.stop().await?;
    env.assert_stream_reconciles(
        start(),
        NODES * SANDBOXES_PER_NODE,
        TICKS,
        1_000 * (TICKS - 1),
    )
    .await
}
