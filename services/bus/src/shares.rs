//! Dividing customers among the replicas of a service.
//!
//! Customers are hashed into a fixed number of shards (FNV-1a of the id,
//! stable across processes, releases and platforms). Each shard is a partition
//! of a coordination topic that carries no messages; the replicas of a service
//! join one consumer group on it, and the broker's group protocol gives each
//! partition to exactly one live member. A replica acts for the customers of
//! the shards it holds. When a replica dies, the broker moves its shards to
//! the others within the session timeout (10 s); when one joins, it takes some.
//! There is no lease to tune and no store to add: the group coordinator that
//! already divides the samples topic divides the customers too.
//!
//! During a rebalance a shard may be held by nobody for a moment (the eager
//! protocol revokes before it assigns), never by two live members. A replica
//! cut off from the broker keeps its shards until it notices, so the work done
//! for a shard must stay idempotent (it is: rating collapses, alert firings
//! are recorded once), and whatever was due for a shard nobody held is done
//! by its next holder, because every pass recomputes what is due.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use rdkafka::consumer::Consumer;

use crate::{Error, KafkaSettings, Result};

/// The shard of a customer among `shards` (FNV-1a 64 of its id).
pub fn shard_of(customer: &str, shards: i32) -> i32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in customer.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // `shards` is checked positive where it is set; the remainder fits i32.
    i32::try_from(hash % u64::from(shards.max(1).unsigned_abs())).unwrap_or(0)
}

/// This replica's share of the customers.
#[derive(Clone)]
pub struct CustomerShares {
    inner: Arc<Inner>,
}

struct Inner {
    shards: i32,
    /// None: every customer (a single replica, no coordination).
    held: Option<Arc<Mutex<Held>>>,
    /// Polls the coordination consumer; stopped when the shares are dropped.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    shards: BTreeSet<i32>,
    /// Bumped at every change, so a holder of per-customer caches can tell
    /// that customers came or went.
    generation: u64,
}

impl std::fmt::Debug for CustomerShares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomerShares")
            .field("shards", &self.inner.shards)
            .field("held", &self.held())
            .finish()
    }
}

impl CustomerShares {
    /// Every customer: for a service that runs as one replica.
    pub fn all() -> Self {
        Self {
            inner: Arc::new(Inner {
                shards: 1,
                held: None,
                task: None,
            }),
        }
    }

    /// Joins `group` on the coordination topic `topic` (created with `shards`
    /// partitions if it does not exist) and holds what the broker assigns,
    /// until the returned value is dropped.
    pub async fn join(
        kafka: &KafkaSettings,
        topic: &str,
        group: &str,
        shards: i32,
    ) -> Result<Self> {
        if shards < 1 {
            return Err(Error::Config(format!(
                "coordination topic {topic} needs at least one shard, not {shards}"
            )));
        }
        kafka.ensure_topics(&[(topic, shards)]).await?;
        let consumer = kafka.consumer(&format!("{group}-shares"), group)?;
        consumer
            .subscribe(&[topic])
            .map_err(|source| Error::Kafka {
                context: format!("subscribe {topic}"),
                source,
            })?;
        let held = consumer.context().assigned_handle();
        let shares = Arc::new(Mutex::new(Held::default()));
        let task = {
            let shares = Arc::clone(&shares);
            let topic = topic.to_owned();
            tokio::spawn(async move {
                // The topic carries no messages: polling only drives the
                // group protocol (heartbeats, rebalances).
                let mut ticker = tokio::time::interval(std::time::Duration::from_millis(200));
                loop {
                    tokio::select! {
                        received = consumer.recv() => {
                            if let Err(error) = received {
                                tracing::warn!(%error, %topic, "coordination consumer");
                            }
                        }
                        _ = ticker.tick() => {}
                    }
                    let now: BTreeSet<i32> = held
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .iter()
                        .filter(|(name, _)| *name == topic)
                        .map(|(_, partition)| *partition)
                        .collect();
                    let mut shares = shares
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if shares.shards != now {
                        tracing::info!(%topic, shards = ?now, "customer shards held");
                        shares.shards = now;
                        shares.generation += 1;
                    }
                }
            })
        };
        Ok(Self {
            inner: Arc::new(Inner {
                shards,
                held: Some(shares),
                task: Some(task),
            }),
        })
    }

    /// The predicate the services take (they know nothing of Kafka).
    pub fn share(&self) -> idlemeter_core::Share {
        let shares = self.clone();
        idlemeter_core::Share::new(move |customer| shares.owns(customer))
    }

    /// Whether this replica acts for `customer`.
    pub fn owns(&self, customer: &str) -> bool {
        match &self.inner.held {
            None => true,
            Some(held) => held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .shards
                .contains(&shard_of(customer, self.inner.shards)),
        }
    }

    /// The shards held now (None: all, uncoordinated).
    pub fn held(&self) -> Option<Vec<i32>> {
        self.inner.held.as_ref().map(|held| {
            held.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .shards
                .iter()
                .copied()
                .collect()
        })
    }

    /// Changes at every rebalance that moved a shard to or from this replica.
    pub fn generation(&self) -> u64 {
        self.inner.held.as_ref().map_or(0, |held| {
            held.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .generation
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_customer_always_has_the_same_shard_and_customers_spread_over_all() {
        // Fixed values: the shard of a customer must never change between
        // releases, or two versions of a service would divide differently.
        assert_eq!(shard_of("acme", 64), shard_of("acme", 64));
        assert_eq!(shard_of("", 64), (0xcbf2_9ce4_8422_2325_u64 % 64) as i32);
        let mut counts = [0u32; 16];
        for n in 0..16_000 {
            let shard = shard_of(&format!("customer-{n}"), 16);
            assert!((0..16).contains(&shard));
            counts[shard as usize] += 1;
        }
        for count in counts {
            assert!((800..1200).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn a_single_replica_owns_everyone() {
        let all = CustomerShares::all();
        assert!(all.owns("acme") && all.owns("globex"));
        assert_eq!(all.held(), None);
    }
}
