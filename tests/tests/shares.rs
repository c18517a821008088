//! Replicas dividing customers (`idlemeter_bus::shares`) on the real broker:
//! every shard is held by exactly one live replica, and a replica that goes
//! leaves its shards to the others.

use std::time::Duration;

use idlemeter_bus::{shard_of, CustomerShares};
use idlemeter_tests::TestEnv;

const SHARDS: i32 = 8;

fn held(shares: &CustomerShares) -> Vec<i32> {
    shares.held().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_customer_has_one_replica_and_a_departed_replicas_customers_move() -> anyhow::Result<()>
{
    let env = TestEnv::new("shares").await?;
    let topic = format!("{}.shares", env.group_id);
    let group = format!("{topic}.rater");
    let one = CustomerShares::join(&env.kafka, &topic, &group, SHARDS).await?;
    let two = CustomerShares::join(&env.kafka, &topic, &group, SHARDS).await?;
    env.eventually_within(
        Duration::from_secs(60),
        "the shards divided between both",
        || async {
            let (a, b) = (held(&one), held(&two));
            Ok(!a.is_empty() && !b.is_empty() && a.len() + b.len() == SHARDS as usize)
        },
    )
    .await?;
    let (a, b) = (held(&one), held(&two));
    assert!(
        a.iter().all(|shard| !b.contains(shard)),
        "no shard held twice: {a:?} {b:?}"
    );
    let customers: Vec<String> = (0..200).map(|n| format!("customer-{n}")).collect();
    for customer in &customers {
        assert!(
            one.owns(customer) != two.owns(customer),
            "{customer} (shard {}) has exactly one replica",
            shard_of(customer, SHARDS)
        );
    }
    let generation = two.generation();
    drop(one);
    env.eventually_within(
        Duration::from_secs(60),
        "the survivor to hold every shard",
        || async { Ok(held(&two).len() == SHARDS as usize) },
    )
    .await?;
    assert!(
        two.generation() > generation,
        "the change is visible to caches"
    );
    assert!(customers.iter().all(|customer| two.owns(customer)));
    Ok(())
}
