//! `idlemeter simulate`: a synthetic fleet producing node batches to Kafka at a
//! steady tick, for `make run`, demos and load tests.

use std::time::Duration;

use idlemeter_proto::encode_node_batch;
use idlemeter_simulator::{Fleet, FleetShape};
use rdkafka::producer::FutureRecord;

use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Sandboxes in the fleet.
    #[arg(long, default_value_t = 200)]
    sandboxes: usize,
    /// Nodes the sandboxes are spread over (one Kafka message per node per tick).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Customers owning the sandboxes.
    #[arg(long, default_value_t = 20)]
    customers: usize,
    /// Seconds between ticks.
    #[arg(long, default_value_t = 1.0)]
    interval_s: f64,
    /// Stop after this many ticks (default: run until interrupted).
    #[arg(long)]
    ticks: Option<u64>,
    /// Seed of the fleet's behaviour.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub async fn run(settings: &Settings, args: SimulateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.interval_s > 0.0, "--interval-s must be positive");
    settings
        .kafka
        .ensure_topics(&[(settings.topics.samples.as_str(), settings.topics.partitions)])
        .await?;
    let producer = settings.kafka.producer("idlemeter-simulate")?;
    let mut fleet = Fleet::new(FleetShape {
        sandboxes: args.sandboxes,
        nodes: args.nodes,
        customers: args.customers,
        seed: args.seed,
        // A new epoch per run: counters restart from zero, like a fleet whose
        // sandboxes all restarted.
        epoch: u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(1),
    });
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(args.interval_s));
    let shutdown = super::shutdown_signal();
    tokio::pin!(shutdown);
    let mut tick: u64 = 0;
    let mut samples_sent: u64 = 0;
    while args.ticks.is_none_or(|limit| tick < limit) {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut shutdown => break,
        }
        tick += 1;
        let now = chrono::Utc::now();
        let deliveries = fleet.tick(now).into_iter().map(|(node, samples)| {
            samples_sent += samples.len() as u64;
            let payload = encode_node_batch(&node, now, tick, &samples);
            let producer = producer.clone();
            let topic = settings.topics.samples.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(node.as_str())
                            .payload(&payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(error, _)| error)
            }
        });
        for delivery in futures::future::join_all(deliveries).await {
            delivery?;
        }
        if tick % 10 == 1 {
            tracing::info!(tick, samples_sent, "simulated fleet produced");
        }
    }
    tracing::info!(tick, samples_sent, "simulation finished");
    Ok(())
}
