//! Sandbox state within a second: the API reads the samples topic from its
//! end and shows a sandbox's newest sample and open minute before (and
//! without) ingest storing anything, against the real broker and ClickHouse.

use std::time::Duration;

use chrono::Utc;
use idlemeter_api::auth::generate;
use idlemeter_core::{CustomerId, NodeId};
use idlemeter_proto::encode_node_batch;
use idlemeter_tests::bench::serve_api_with_live;
use idlemeter_tests::{counted, sample, TestEnv};

const SHEET: &str = include_str!("../../prices/e2b.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_reaches_the_sandbox_route_from_the_stream_before_it_is_stored(
) -> anyhow::Result<()> {
    let env = TestEnv::new("live_state").await?;
    let key = generate(Some(&CustomerId::parse("acme")?), "live", 0);
    env.store.insert_api_key(&key.row).await?;
    let (base, view) = serve_api_with_live(&env, SHEET, "prices/e2b.toml").await?;
    let url = format!("{base}/v1/customers/acme/sandboxes/sbx-live");
    let http = reqwest::Client::new();

    // No ingest runs: nothing is ever stored. Before the stream mentions
    // the sandbox, the API does not know it.
    let before = http.get(&url).bearer_auth(&key.key).send().await?;
    assert_eq!(before.status(), 404);

    // One sample a tick (the tail consumer starts at the topic's end, once
    // it has its partitions) until the API shows one of them.
    let producer = env.producer()?;
    let node = NodeId::parse("node-1")?;
    let start = Utc::now() - chrono::Duration::seconds(5);
    let mut shown = None;
    for seq in 1..=150u64 {
        let mut one = counted(sample(
            "sbx-live",
            3,
            seq,
            start + chrono::Duration::milliseconds(100 * seq as i64),
            1_000 * seq,
            0,
        ));
        one.exec_sessions = 1;
        env.produce(
            &producer,
            "node-1",
            &encode_node_batch(&node, Utc::now(), seq, &[one]),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = http.get(&url).bearer_auth(&key.key).send().await?;
        if answer.status() == 200 {
            shown = Some((seq, answer.json::<serde_json::Value>().await?));
            break;
        }
    }
    let (sent_up_to, body) = shown.expect("the stream's sample reaches the API within 30 s");
    assert_eq!(body["sandbox"], "sbx-live");
    assert_eq!(body["epoch"], 3);
    assert_eq!(body["state"], "running");
    let last_seen: chrono::DateTime<Utc> = body["last_seen"].as_str().expect("a time").parse()?;
    let newest = start + chrono::Duration::milliseconds(100 * sent_up_to as i64);
    assert!(
        last_seen <= newest && last_seen > start,
        "{last_seen} vs {newest}"
    );
    let minute = &body["open_minute"];
    assert_eq!(minute["epoch"], 3);
    assert!(minute["samples"].as_u64().expect("a count") >= 1);
    assert!(view.len() == 1);
    Ok(())
}
