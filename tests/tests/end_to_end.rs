//! One sample end to end: node batch → Kafka → ingest → ClickHouse → rollup query,
//! against the real broker and ClickHouse server.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_core::rollup::HourUsage;
use idlemeter_core::{CustomerId, NodeId, UsageSample};
use idlemeter_proto::{encode_node_batch, sample_to_wire, v1};
use idlemeter_tests::{sample, TestEnv};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

fn at(hour: u32, minute: u32, second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, hour, minute, second)
        .single()
        .expect("valid time")
}

/// Two sandboxes over two hours; sbx-b restarts (epoch 2) mid-hour.
///
/// Expected CPU usage, by hand:
/// - sbx-a hour 10: 3,000 - 1,000 = 2,000 µs (first sample is the baseline)
/// - sbx-a hour 11: 10,000 - 3,000 = 7,000 µs (baseline: hour 10's max)
/// - sbx-b hour 10: epoch 1: 900 - 500 = 400; epoch 2: 400 - 100 = 300; total 700
fn trace() -> (Vec<UsageSample>, Vec<UsageSample>) {
    let node_one = vec![
        sample("sbx-a", 1, 1, at(10, 59, 58), 1_000, 100),
        sample("sbx-a", 1, 2, at(10, 59, 59), 3_000, 150),
        sample("sbx-a", 1, 3, at(11, 0, 0), 6_000, 400),
        sample("sbx-a", 1, 4, at(11, 0, 1), 10_000, 1_000),
    ];
    let node_two = vec![
        sample("sbx-b", 1, 1, at(10, 30, 0), 500, 0),
        sample("sbx-b", 1, 2, at(10, 31, 0), 900, 0),
        sample("sbx-b", 2, 1, at(10, 32, 0), 100, 0),
        sample("sbx-b", 2, 2, at(10, 33, 0), 400, 0),
    ];
    (node_one, node_two)
}

fn cpu_by_sandbox_hour(usage: &[HourUsage]) -> Vec<(String, u32, u64)> {
    usage
        .iter()
        .map(|u| {
            (
                u.sandbox.to_string(),
                chrono::Timelike::hour(&u.hour),
                u.usage.cpu_used_usec,
            )
        })
        .collect()
}

async fn produce_trace(env: &TestEnv) -> anyhow::Result<()> {
    let (node_one, node_two) = trace();
    let producer = env.producer()?;
    let node = NodeId::parse("node-1")?;
    env.produce(
        &producer,
        "node-1",
        &encode_node_batch(&node, Utc::now(), 1, &node_one),
    )
    .await?;
    env.produce(
        &producer,
        "node-1",
        &encode_node_batch(&node, Utc::now(), 2, &node_two),
    )
    .await?;
    Ok(())
}

async fn committed_offsets(env: &TestEnv) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.kafka.brokers)
        .set("group.id", &env.group_id)
        .create()?;
    let mut partitions = TopicPartitionList::new();
    for partition in 0..3 {
        partitions.add_partition(&env.topics.samples, partition);
    }
    let committed = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|element| match element.offset() {
            Offset::Offset(offset) => offset,
            _ => 0,
        })
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_batches_reach_the_hourly_rollup_exactly_once() -> anyhow::Result<()> {
    let env = TestEnv::new("e2e_exact").await?;
    let ingest = env.start_ingest(&env.clickhouse)?;
    produce_trace(&env).await?;
    env.eventually("8 sample rows", || async {
        Ok(env.raw_sample_rows().await? >= 8)
    })
    .await?;
    env.eventually("offsets committed", || async {
        Ok(committed_offsets(&env).await? == 2)
    })
    .await?;
    ingest.stop().await?;

    // Not one row more: ingest inserted each sample once.
    assert_eq!(env.raw_sample_rows().await?, 8);
    let customer = CustomerId::parse("acme")?;
    let usage = env
        .store
        .usage_by_hour(&customer, at(10, 0, 0), at(12, 0, 0))
        .await?;
    assert_eq!(
        cpu_by_sandbox_hour(&usage),
        vec![
            ("sbx-a".to_owned(), 10, 2_000),
            ("sbx-a".to_owned(), 11, 7_000),
            ("sbx-b".to_owned(), 10, 700),
        ]
    );
    // Network counters travel the same way: 150 - 100 and 1,000 - 150.
    assert_eq!(usage[0].usage.net_tx_bytes, 50);
    assert_eq!(usage[1].usage.net_tx_bytes, 850);
    // Allocated vCPU-µs: 2 vCPU x 1 s per seq step (sample() sets seq x 2e6).
    assert_eq!(usage[1].usage.vcpu_alloc_usec, 4_000_000);

    // A window starting at 11:00 still bills hour 11 against hour 10's last counter.
    let later = env
        .store
        .usage_by_hour(&customer, at(11, 0, 0), at(12, 0, 0))
        .await?;
    assert_eq!(
        cpu_by_sandbox_hour(&later),
        vec![("sbx-a".to_owned(), 11, 7_000)]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_batch_changes_no_rollup() -> anyhow::Result<()> {
    let env = TestEnv::new("e2e_replay").await?;
    let ingest = env.start_ingest(&env.clickhouse)?;
    produce_trace(&env).await?;
    // The same two messages again, as a crashed collector or ingest would replay them.
    produce_trace(&env).await?;
    env.eventually("4 messages consumed and committed", || async {
        Ok(committed_offsets(&env).await? == 4)
    })
    .await?;
    ingest.stop().await?;

    let distinct: u64 = env
        .store
        .client()
        .query("SELECT count() FROM usage_samples FINAL")
        .fetch_one()
        .await?;
    assert_eq!(distinct, 8, "duplicates collapse to the sample identity");
    let customer = CustomerId::parse("acme")?;
    let usage = env
        .store
        .usage_by_hour(&customer, at(10, 0, 0), at(12, 0, 0))
        .await?;
    let cpu: Vec<u64> = usage.iter().map(|u| u.usage.cpu_used_usec).collect();
    assert_eq!(cpu, vec![2_000, 7_000, 700]);
    assert_eq!(usage.iter().map(|u| u.samples).sum::<u64>(), 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_wait_for_clickhouse_and_nothing_is_lost_meanwhile() -> anyhow::Result<()> {
    let env = TestEnv::new("e2e_commit_after_insert").await?;
    // A ClickHouse that is down: nothing listens on this port.
    let mut unreachable = env.clickhouse.clone();
    unreachable.url = "http://127.0.0.1:9".to_owned();
    let ingest = env.start_ingest(&unreachable)?;
    produce_trace(&env).await?;
    env.eventually("insert failures", || async {
        Ok(ingest.counter("idlemeter_ingest_insert_failures_total") >= 3)
    })
    .await?;
    assert_eq!(
        committed_offsets(&env).await?,
        0,
        "no offset may be committed before the insert is acknowledged"
    );
    // The lag gauge keeps reporting while inserts are retried: both messages
    // are waiting (the gauge is refreshed every 5 s).
    env.eventually_within(Duration::from_secs(20), "lag of 2 messages", || async {
        Ok(ingest.gauge("idlemeter_ingest_lag_messages") == 2)
    })
    .await?;
    ingest.stop().await?;

    // Same group, ClickHouse back: the uncommitted messages are consumed again.
    let ingest = env.start_ingest(&env.clickhouse)?;
    env.eventually("8 rows", || async { Ok(env.raw_sample_rows().await? >= 8) })
        .await?;
    env.eventually("offsets committed", || async {
        Ok(committed_offsets(&env).await? == 2)
    })
    .await?;
    ingest.stop().await?;
    assert_eq!(env.raw_sample_rows().await?, 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_and_good_samples_kept() -> anyhow::Result<()> {
    let env = TestEnv::new("e2e_dead_letter").await?;
    let ingest = env.start_ingest(&env.clickhouse)?;
    let producer = env.producer()?;
    let (node_one, node_two) = trace();

    // 1. Not protobuf at all.
    env.produce(&producer, "node-1", b"{\"this is\": \"json\"}")
        .await?;
    // 2. A batch whose second sample has no state: the other three must land.
    let mut partly_bad = v1::NodeBatch {
        schema_version: idlemeter_proto::SCHEMA_VERSION,
        node: "node-1".to_owned(),
        sent_unix_ms: 0,
        batch_seq: 1,
        samples: node_one.iter().map(sample_to_wire).collect(),
    };
    partly_bad.samples[1].state = 0;
    env.produce(
        &producer,
        "node-1",
        &prost::Message::encode_to_vec(&partly_bad),
    )
    .await?;
    // 3. A good batch after them.
    let node = NodeId::parse("node-1")?;
    env.produce(
        &producer,
        "node-1",
        &encode_node_batch(&node, Utc::now(), 2, &node_two),
    )
    .await?;

    env.eventually("7 good rows", || async {
        Ok(env.raw_sample_rows().await? >= 7)
    })
    .await?;
    env.eventually("2 dead letters", || async {
        Ok(ingest.counter("idlemeter_ingest_dead_letters_total") == 2)
    })
    .await?;
    ingest.stop().await?;
    assert_eq!(env.raw_sample_rows().await?, 7);

    let reasons: Vec<String> = env
        .dead_letters(2)
        .await?
        .into_iter()
        .map(|letter| letter.reason)
        .collect();
    assert!(
        reasons[0].contains("not a protobuf NodeBatch"),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[1].contains("sample 1") && reasons[1].contains("state"),
        "{}",
        reasons[1]
    );
    Ok(())
}

/// The detail fields (GPU, pressure, peak memory, block I/O) travel the whole
/// path: wire → ingest → their own columns of `usage_samples`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_detail_reaches_its_columns() -> anyhow::Result<()> {
    let env = TestEnv::new("e2e_detail").await?;
    let mut detailed = sample("sbx-d", 1, 1, at(10, 0, 0), 1_000, 0);
    detailed.detail = idlemeter_core::SampleDetail {
        gpu_busy_ms: 11,
        gpu_mem_used_bytes: 12,
        cpu_pressure_usec: 13,
        mem_pressure_usec: 14,
        io_pressure_usec: 15,
        mem_peak_bytes: 16,
        io_read_bytes: 17,
        io_write_bytes: 18,
    };
    let node = NodeId::parse("node-1")?;
    let producer = env.producer()?;
    env.produce(
        &producer,
        "node-1",
        &encode_node_batch(&node, Utc::now(), 1, &[detailed]),
    )
    .await?;
    let ingest = env.start_ingest(&env.clickhouse)?;
    env.eventually("the sample stored", || async {
        Ok(env.distinct_samples().await? >= 1)
    })
    .await?;
    ingest.stop().await?;
    let rows = env
        .store
        .query_rows(
            "SELECT gpu_busy_ms, gpu_mem_used_bytes, cpu_pressure_usec, mem_pressure_usec, \
             io_pressure_usec, mem_peak_bytes, io_read_bytes, io_write_bytes \
             FROM usage_samples FINAL WHERE sandbox = 'sbx-d'",
        )
        .await?;
    // The first row names the columns.
    assert_eq!(
        rows[1..],
        vec![(11..=18).map(|n: u32| n.to_string()).collect::<Vec<_>>()]
    );
    Ok(())
}

/// Migration 0007 adds columns, which ClickHouse 18.16 cannot do with IF NOT
/// EXISTS: a run that crashed after the ALTER but before its record must
/// still complete on rerun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecorded_add_column_migration_reruns_cleanly() -> anyhow::Result<()> {
    let env = TestEnv::new("e2e_rerun_alter").await?;
    env.store
        .client()
        .query("ALTER TABLE schema_migrations DELETE WHERE name = '0007_sample_detail.sql'")
        .execute()
        .await?;
    env.eventually("the record gone", || async {
        let rows = env
            .store
            .query_rows(
                "SELECT count() FROM schema_migrations WHERE name = '0007_sample_detail.sql'",
            )
            .await?;
        Ok(rows.get(1) == Some(&vec!["0".to_owned()]))
    })
    .await?;
    let report = env.store.migrate(0).await?;
    assert_eq!(report.applied, vec!["0007_sample_detail.sql"]);
    Ok(())
}
