//! Resuming a partition from the group's commit, on the real broker.
//!
//! Ingest commits the first offset it still needs (the first sample of an
//! open minute), which is rarely where a producer's record batch began. A
//! Kafka broker serves a fetch from any offset; tansu 0.6 with memory
//! storage, the broker of this suite, answers a fetch that starts inside a
//! batch with the next batch, and the rest of the batch is lost to the
//! consumer (found by the scale-out test: a minute of samples of one
//! partition gone after a rebalance; tansu with sqlite storage serves the
//! offset asked for). So: consumers say when the broker skipped offsets,
//! and `[kafka] single_message_batches` makes every offset a batch's first.

use std::time::Duration;

use idlemeter_bus::KafkaSettings;
use idlemeter_tests::TestEnv;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const MESSAGES: i64 = 400;

/// Sends `count` messages to partition 0 of `topic` at once, so that the
/// producer packs them into batches as it sees fit.
async fn produce(kafka: &KafkaSettings, topic: &str, count: i64) -> anyhow::Result<()> {
    let producer = kafka.producer("broker-offsets")?;
    let sends = (0..count).map(|n| {
        let producer = producer.clone();
        async move {
            let payload = format!("message-{n}");
            producer
                .send(
                    FutureRecord::<(), _>::to(topic)
                        .partition(0)
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(error, _)| anyhow::anyhow!("produce to {topic}: {error}"))
        }
    });
    for sent in futures::future::join_all(sends).await {
        sent?;
    }
    Ok(())
}

/// A topic of one partition holding [`MESSAGES`] messages, produced with
/// or without `single_message_batches`.
async fn topic_of(
    test: &str,
    single_message_batches: bool,
) -> anyhow::Result<(TestEnv, KafkaSettings, String)> {
    let env = TestEnv::new(test).await?;
    let kafka = KafkaSettings {
        single_message_batches,
        ..env.kafka.clone()
    };
    let topic = format!("{}.offsets", env.group_id);
    kafka.ensure_topics(&[(topic.as_str(), 1)]).await?;
    produce(&kafka, &topic, MESSAGES).await?;
    Ok((env, kafka, topic))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_resuming_inside_a_batch_is_served_its_commit_or_told_what_was_skipped(
) -> anyhow::Result<()> {
    let (env, kafka, topic) = topic_of("broker_offsets_group", false).await?;

    // The group's commit, inside whatever batch holds offset 37.
    let group = format!("{}.resume", env.group_id);
    let committer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut commit = TopicPartitionList::new();
    commit.add_partition_offset(&topic, 0, Offset::Offset(37))?;
    committer.commit(&commit, CommitMode::Sync)?;
    drop(committer);

    let consumer = kafka.consumer("broker-offsets", &group)?;
    consumer.subscribe(&[topic.as_str()])?;
    // A later batch, which a broker that skips ahead serves instead.
    produce(&kafka, &topic, 3).await?;
    let first = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no message within 60 s"))??
        .offset();
    let skipped = consumer.context().skipped_before(&topic, 0, first);
    assert_eq!(
        skipped,
        (first - 37) as u64,
        "the group resumed at 37 and its first message was {first}: every offset between was skipped, and said so"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_single_message_batches_every_offset_is_served() -> anyhow::Result<()> {
    let (env, kafka, topic) = topic_of("broker_offsets_single", true).await?;
    let mut served = Vec::new();
    for start in [0, 1, 37, 150, 211, MESSAGES - 1] {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", format!("{}.probe.{start}", env.group_id))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&topic, 0, Offset::Offset(start))?;
        consumer.assign(&assignment)?;
        let first = consumer
            .poll(Duration::from_secs(10))
            .transpose()?
            .map(|message| message.offset());
        served.push((start, first));
    }
    let asked: Vec<(i64, Option<i64>)> = served
        .iter()
        .map(|(start, _)| (*start, Some(*start)))
        .collect();
    assert_eq!(served, asked, "(offset asked for, first offset served)");
    Ok(())
}
