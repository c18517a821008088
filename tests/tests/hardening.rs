//! Hostile input never stalls ingest, against the real broker and
//! ClickHouse: each test is named after the finding of the hardening review
//! it covers, and failed on the code before the fix (ingest retried the
//! poison forever and nothing after it in the partition was stored).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use idlemeter_core::{CustomerId, NodeId, UsageSample};
use idlemeter_ingest::{AllowedCustomers, IngestConfig, MAX_REASON_BYTES};
use idlemeter_proto::{encode_node_batch, sample_to_wire, v1};
use idlemeter_tests::{counted, sample, TestEnv};

fn node() -> NodeId {
    NodeId::parse("node-1").expect("valid id")
}

/// One sample, seq 1, of its own sandbox (so each is a stored baseline).
fn lone(sandbox: &str, ts: DateTime<Utc>) -> UsageSample {
    counted(sample(sandbox, 1, 1, ts, 0, 0))
}

/// The default window, as in production.
fn production_window(env: &TestEnv) -> IngestConfig {
    IngestConfig {
        max_sample_age_s: IngestConfig::default().max_sample_age_s,
        ..env.ingest_config()
    }
}

/// Produces `payload` from node-1, then a good sample of sandbox `after`
/// as the next message: whether the partition goes on past the payload.
async fn produce_then(
    env: &TestEnv,
    producer: &rdkafka::producer::FutureProducer,
    payload: &[u8],
    after: &str,
) -> anyhow::Result<()> {
    let now = Utc::now();
    env.produce(producer, "node-1", payload).await?;
    env.produce(
        producer,
        "node-1",
        &encode_node_batch(&node(), now, 2, &[lone(after, now)]),
    )
    .await
}

/// Waits until the stored sandboxes are exactly `expected`.
async fn await_stored(env: &TestEnv, what: &str, expected: &[String]) -> anyhow::Result<()> {
    env.eventually(what, || async {
        Ok(stored_sandboxes(env).await? == expected)
    })
    .await
}

async fn stored_sandboxes(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    Ok(env
        .store
        .client()
        .query("SELECT DISTINCT sandbox FROM usage_samples ORDER BY sandbox")
        .fetch_all::<String>()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_with_ts_spread_over_decades_are_dead_lettered_and_ingest_goes_on(
) -> anyhow::Result<()> {
    let env = TestEnv::new("hardening_ts_window").await?;
    let ingest = env.start_ingest_with(&env.clickhouse, production_window(&env))?;
    let producer = env.producer()?;
    let now = Utc::now();
    // One message: a good sample, then 150 from a broken clock, one a month
    // back from 2001 (150 monthly partitions), and one from 2100.
    let mut samples = vec![lone("good-1", now)];
    let start = DateTime::parse_from_rfc3339("2001-01-01T00:00:00Z")?.with_timezone(&Utc);
    for month in 0..150 {
        samples.push(lone(
            &format!("clock-{month}"),
            start + Duration::days(31 * month),
        ));
    }
    samples.push(lone("future", now + Duration::days(365 * 74)));
    // The partition goes on: a later message is stored too.
    produce_then(
        &env,
        &producer,
        &encode_node_batch(&node(), now, 1, &samples),
        "good-2",
    )
    .await?;
    await_stored(
        &env,
        "both good samples stored",
        &["good-1".into(), "good-2".into()],
    )
    .await?;
    let letters = env.dead_letters(1).await?;
    ingest.stop().await?;
    let reason = &letters[0].reason;
    assert!(
        reason.starts_with("151 of the batch's samples refused"),
        "{reason}"
    );
    assert!(
        reason.contains("field `ts`") && reason.contains("and 131 more"),
        "{reason}"
    );
    assert!(reason.len() <= MAX_REASON_BYTES);
    // The message is kept byte for byte: its samples can be replayed.
    let kept = idlemeter_proto::decode_node_batch(&letters[0].payload)?;
    assert_eq!(kept.samples.len(), 152);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_whose_reason_exceeds_the_broker_limit_are_dead_lettered_capped(
) -> anyhow::Result<()> {
    let env = TestEnv::new("hardening_reason_cap").await?;
    let ingest = env.start_ingest(&env.clickhouse)?;
    let producer = env.producer()?;
    let now = Utc::now();
    // 12,000 samples without a state: the payload fits the broker's 1 MB,
    // with the reasons joined (about 50 bytes each) it does not.
    let good = lone("good-1", now);
    let mut batch = v1::NodeBatch {
        schema_version: idlemeter_proto::SCHEMA_VERSION,
        node: "node-1".to_owned(),
        sent_unix_ms: now.timestamp_millis(),
        batch_seq: 1,
        samples: vec![sample_to_wire(&good)],
    };
    let mut bad = sample_to_wire(&lone("stateless", now));
    bad.state = 0;
    batch.samples.extend(std::iter::repeat_n(bad, 12_000));
    let payload = prost::Message::encode_to_vec(&batch);
    assert!(payload.len() < 900_000, "{} bytes", payload.len());
    produce_then(&env, &producer, &payload, "good-2").await?;
    await_stored(
        &env,
        "both good samples stored",
        &["good-1".into(), "good-2".into()],
    )
    .await?;
    let letters = env.dead_letters(1).await?;
    ingest.stop().await?;
    let reason = &letters[0].reason;
    assert!(reason.len() <= MAX_REASON_BYTES, "{} bytes", reason.len());
    assert!(
        reason.starts_with("12000 of the batch's samples refused")
            && reason.contains("and 11980 more"),
        "{reason}"
    );
    assert_eq!(letters[0].payload, payload, "kept byte for byte");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_clickhouse_refuses_for_good_are_dead_lettered_and_the_rest_stored(
) -> anyhow::Result<()> {
    let env = TestEnv::new("hardening_refused_rows").await?;
    // An operator's check on the table (a CONSTRAINT on current ClickHouse;
    // throwIf in a MATERIALIZED column works on 18.16 too): ClickHouse
    // refuses the whole insert while this row is in it.
    env.store
        .client()
        .query(
            "ALTER TABLE usage_samples ADD COLUMN poison_check UInt8 \
             MATERIALIZED throwIf(sandbox = 'poison')",
        )
        .execute()
        .await?;
    let ingest = env.start_ingest(&env.clickhouse)?;
    let producer = env.producer()?;
    let now = Utc::now();
    let mut samples: Vec<UsageSample> = (0..10)
        .map(|index| lone(&format!("good-{index:02}"), now))
        .collect();
    samples.insert(4, lone("poison", now));
    produce_then(
        &env,
        &producer,
        &encode_node_batch(&node(), now, 1, &samples),
        "good-10",
    )
    .await?;
    let expected: Vec<String> = (0..11).map(|index| format!("good-{index:02}")).collect();
    await_stored(&env, "every good sample stored", &expected).await?;
    let letters = env.dead_letters(1).await?;
    assert!(
        letters[0]
            .reason
            .contains("clickhouse refused this row for good")
            && letters[0].reason.contains("395"),
        "{}",
        letters[0].reason
    );
    let row: UsageSample = serde_json::from_slice(&letters[0].payload)?;
    assert_eq!(row.sandbox.as_str(), "poison");
    assert_eq!(
        ingest.counter("idlemeter_ingest_rows_dead_lettered_total"),
        1
    );
    ingest.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_is_a_trust_boundary_a_node_reports_only_its_allowed_customers() -> anyhow::Result<()>
{
    let env = TestEnv::new("hardening_allow_list").await?;
    let config = IngestConfig {
        allowed_customers: AllowedCustomers(BTreeMap::from([(
            "node-1".to_owned(),
            vec!["acme".to_owned()],
        )])),
        ..env.ingest_config()
    };
    let ingest = env.start_ingest_with(&env.clickhouse, config)?;
    let producer = env.producer()?;
    let now = Utc::now();
    let mut claimed = lone("stolen", now);
    claimed.customer = CustomerId::parse("globex")?;
    let samples = vec![lone("mine", now), claimed];
    env.produce(
        &producer,
        "node-1",
        &encode_node_batch(&node(), now, 1, &samples),
    )
    .await?;
    let letters = env.dead_letters(1).await?;
    await_stored(&env, "acme's sample stored", &["mine".into()]).await?;
    ingest.stop().await?;
    assert!(
        letters[0]
            .reason
            .contains("node node-1 is not allowed to report customer globex"),
        "{}",
        letters[0].reason
    );
    assert_eq!(stored_sandboxes(&env).await?, ["mine"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_broker_refuses_with_its_payload_goes_without_it() -> anyhow::Result<()> {
    let env = TestEnv::new("hardening_omitted").await?;
    // A producer whose message limit (100 kB) is below the letter's size:
    // librdkafka refuses it for good, as a broker with a smaller
    // `max.message.bytes` on the dead-letter topic would.
    let mut small = env.kafka.clone();
    small
        .properties
        .insert("message.max.bytes".to_owned(), "100000".to_owned());
    let producer = small.producer("hardening-small")?;
    let mut batch = idlemeter_ingest::Batch::default();
    batch.push_dead_letters(vec![idlemeter_ingest::DeadLetter {
        key: Some(b"node-1".to_vec()),
        payload: vec![0x5a; 200_000],
        reason: "not a protobuf NodeBatch".to_owned(),
        source: format!("{}/0/42", env.topics.samples),
        omitted: None,
    }]);
    let dropped = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        batch.send_dead_letters(&producer, &env.topics.samples_dead_letter),
    )
    .await??;
    assert_eq!(dropped, 0, "sent without its payload, not dropped");
    assert!(batch.dead_letters().is_empty());
    let letters = env.dead_letters(1).await?;
    assert_eq!(letters[0].omitted.as_deref(), Some("200000"));
    assert!(letters[0].payload.is_empty());
    assert_eq!(letters[0].reason, "not a protobuf NodeBatch");
    Ok(())
}
