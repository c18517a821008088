//! The collector's counters and batches across faults: a SIGKILLed collector
//! process continues its counters without losing or doubling a billable
//! millisecond, and batches produced while Kafka is unreachable wait in the
//! spool and arrive in order once it is back.

use std::collections::BTreeMap;
use std::time::Duration;

use idlemeter_bus::KafkaSettings;
use idlemeter_core::UsageSample;
use idlemeter_tests::collector::{
    collector_config, CollectorProcess, RunningCollector, SampleTail, ShippedSample, TestCgroups,
};
use idlemeter_tests::TestEnv;

/// 1 vCPU and 1 MiB of disk: vCPU-µs grow by 1,000 and MiB-ms by 1 per running ms.
const LABELS: &str = "vcpu_milli = 1000\ndisk_bytes = 1048576\n";

fn prepare_labels(work: &std::path::Path, name: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(work.join("labels"))?;
    std::fs::write(work.join(format!("labels/{name}.toml")), LABELS)?;
    Ok(())
}

/// One sample per seq, checking that any repeat of a seq is the same sample.
fn distinct_by_seq(samples: &[ShippedSample]) -> anyhow::Result<Vec<UsageSample>> {
    let mut by_seq: BTreeMap<u64, UsageSample> = BTreeMap::new();
    for shipped in samples {
        if let Some(earlier) = by_seq.get(&shipped.sample.seq) {
            anyhow::ensure!(
                earlier == &shipped.sample,
                "two different samples share seq {}",
                shipped.sample.seq
            );
        }
        by_seq.insert(shipped.sample.seq, shipped.sample.clone());
    }
    Ok(by_seq.into_values().collect())
}

fn max_seq(samples: &[ShippedSample]) -> u64 {
    samples.iter().map(|s| s.sample.seq).max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_collector_continues_its_counters_without_loss_or_double_count(
) -> anyhow::Result<()> {
    let env = TestEnv::new("collector_kill").await?;
    env.kafka
        .ensure_topics(&[(env.topics.commands.as_str(), 1)])
        .await?;
    let mut cgroups = TestCgroups::new("kill")?;
    let sandbox = cgroups.add_sandbox("acme.survivor")?;
    cgroups.spawn_burner(&sandbox)?;
    let work = tempfile::tempdir()?;
    prepare_labels(work.path(), "acme.survivor")?;
    let node = format!("node-kill-{}", std::process::id());
    let config = collector_config(&cgroups.parent, work.path(), &node);
    let log = work.path().join("collector.log");
    let mut tail = SampleTail::new(&env)?;

    let first = CollectorProcess::spawn(&env, &config, &log)?;
    tail.wait_for("five samples from the first process", |s| max_seq(s) >= 5)
        .await?;
    first.kill_hard()?;
    let seq_at_kill = max_seq(&tail.samples);
    // Stay down for a while: this interval must be billed exactly once.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Samples the first process sent before the kill may still be on their
    // way: wait for five taken by the second one.
    let restarted_at = chrono::Utc::now();
    let _second = CollectorProcess::spawn(&env, &config, &log)?;
    tail.wait_for("five samples taken after the restart", |s| {
        s.iter()
            .filter(|shipped| shipped.sample.ts >= restarted_at)
            .count()
            >= 5
    })
    .await?;
    assert!(max_seq(&tail.samples) >= seq_at_kill + 5);

    let samples = distinct_by_seq(&tail.samples)?;
    let epoch = samples[0].epoch;
    assert!(
        samples.iter().all(|s| s.epoch == epoch),
        "the restart started a new epoch"
    );
    // Arrival order follows seq: batches were neither reordered nor replayed out of order.
    let arrival: Vec<u64> = tail.samples.iter().map(|s| s.sample.seq).collect();
    assert!(
        arrival.windows(2).all(|w| w[0] <= w[1]),
        "arrival order {arrival:?}"
    );
    let mut widest_gap_ms = 0;
    for pair in samples.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let elapsed_ms = u64::try_from((after.ts - before.ts).num_milliseconds())?;
        widest_gap_ms = widest_gap_ms.max(elapsed_ms);
        assert_eq!(
            after.vcpu_alloc_usec - before.vcpu_alloc_usec,
            1_000 * elapsed_ms,
            "vCPU integral between seq {} and {}",
            before.seq,
            after.seq
        );
        assert_eq!(after.disk_mib_ms - before.disk_mib_ms, elapsed_ms);
        assert!(after.cpu_used_usec >= before.cpu_used_usec);
    }
    assert!(
        widest_gap_ms >= 1_500,
        "the downtime should show as one long interval, widest was {widest_gap_ms} ms"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_spooled_while_kafka_is_unreachable_arrive_in_order() -> anyhow::Result<()> {
    let env = TestEnv::new("collector_cut").await?;
    env.kafka
        .ensure_topics(&[(env.topics.commands.as_str(), 1)])
        .await?;
    let mut cgroups = TestCgroups::new("cut")?;
    cgroups.add_sandbox("acme.patient")?;
    let work = tempfile::tempdir()?;
    prepare_labels(work.path(), "acme.patient")?;
    let config = collector_config(
        &cgroups.parent,
        work.path(),
        &format!("node-cut-{}", std::process::id()),
    );

    // Kafka unreachable: nothing listens on port 1.
    let dead_kafka = KafkaSettings {
        brokers: "127.0.0.1:1".to_owned(),
        ..KafkaSettings::default()
    };
    let cut_off = RunningCollector::start(config.clone(), &dead_kafka, env.topics.clone())?;
    env.eventually("eight batches spooled and a failed send", || async {
        Ok(cut_off.metric("idlemeter_collector_spool_batches") >= 8
            && cut_off.metric("idlemeter_collector_send_failures_total") >= 1)
    })
    .await?;
    assert_eq!(cut_off.metric("idlemeter_collector_batches_sent_total"), 0);
    cut_off.stop().await?;

    let reconnected = RunningCollector::start(config, &env.kafka, env.topics.clone())?;
    let mut tail = SampleTail::new(&env)?;
    tail.wait_for("the spooled backlog and live batches", |s| max_seq(s) >= 12)
        .await?;
    let batch_seqs: Vec<u64> = tail.samples.iter().map(|s| s.batch_seq).collect();
    assert_eq!(
        batch_seqs[0], 1,
        "the first batch ever produced arrives first"
    );
    assert!(
        batch_seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "batches arrive in order without gaps: {batch_seqs:?}"
    );
    let seqs: Vec<u64> = tail.samples.iter().map(|s| s.sample.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        reconnected.metric("idlemeter_collector_spool_dropped_batches_total"),
        0
    );
    reconnected.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_drops_the_oldest_batches_and_keeps_the_newest() -> anyhow::Result<()> {
    let env = TestEnv::new("collector_bound").await?;
    env.kafka
        .ensure_topics(&[(env.topics.commands.as_str(), 1)])
        .await?;
    let mut cgroups = TestCgroups::new("bound")?;
    cgroups.add_sandbox("acme.squeezed")?;
    let work = tempfile::tempdir()?;
    prepare_labels(work.path(), "acme.squeezed")?;
    let mut config = collector_config(
        &cgroups.parent,
        work.path(),
        &format!("node-bound-{}", std::process::id()),
    );
    // Room for about three one-sample batches.
    config.spool_max_bytes = 400;

    let dead_kafka = KafkaSettings {
        brokers: "127.0.0.1:1".to_owned(),
        ..KafkaSettings::default()
    };
    let cut_off = RunningCollector::start(config.clone(), &dead_kafka, env.topics.clone())?;
    env.eventually("batches dropped at the bound", || async {
        Ok(cut_off.metric("idlemeter_collector_spool_dropped_batches_total") >= 3)
    })
    .await?;
    cut_off.stop().await?;

    let reconnected = RunningCollector::start(config, &env.kafka, env.topics.clone())?;
    let mut tail = SampleTail::new(&env)?;
    tail.wait_for("batches after the outage", |s| s.len() >= 4)
        .await?;
    reconnected.stop().await?;
    // The oldest batch holds the epoch's first sample (its baseline): kept,
    // shrunk to it; the batches after it that later samples make up for
    // were dropped, not the newest.
    let first = &tail.samples[0];
    assert_eq!(
        (first.batch_seq, first.sample.seq),
        (1, 1),
        "the baseline is kept"
    );
    let batch_seqs: Vec<u64> = tail.samples.iter().map(|s| s.batch_seq).collect();
    assert!(
        batch_seqs.windows(2).any(|w| w[1] > w[0] + 1),
        "the oldest batches after it were dropped: {batch_seqs:?}"
    );
    // In order; gaps are allowed: a bound this tight keeps dropping while it drains.
    assert!(batch_seqs.windows(2).all(|w| w[0] < w[1]), "{batch_seqs:?}");
    // Cumulative counters: the newest samples still carry the whole disk integral.
    let last = &tail.samples[tail.samples.len() - 1].sample;
    let since_epoch_ms = u64::try_from(last.ts.timestamp_millis())? - last.epoch.0;
    assert_eq!(last.disk_mib_ms, since_epoch_ms);
    Ok(())
}

/// A live outage: the collector ships to a broker of the test's own, which is
/// killed (SIGKILL) mid-run and started again on its data seconds later. The
/// same collector process spools meanwhile and drains the backlog in order
/// once the broker is back; every batch number and every seq arrives, none
/// twice with different content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_kafka_outage_spools_and_drains_in_order() -> anyhow::Result<()> {
    let mut env = TestEnv::new("collector_live_cut").await?;
    let mut broker = idlemeter_tests::PrivateBroker::start("cut").await?;
    env.use_broker(broker.address()).await?;
    env.kafka
        .ensure_topics(&[(env.topics.commands.as_str(), 1)])
        .await?;
    let mut cgroups = TestCgroups::new("livecut")?;
    cgroups.add_sandbox("acme.steady")?;
    let work = tempfile::tempdir()?;
    prepare_labels(work.path(), "acme.steady")?;
    let config = collector_config(
        &cgroups.parent,
        work.path(),
        &format!("node-livecut-{}", std::process::id()),
    );
    let collector = RunningCollector::start(config.clone(), &env.kafka, env.topics.clone())?;
    env.eventually("batches sent before the outage", || async {
        Ok(collector.metric("idlemeter_collector_batches_sent_total") >= 5)
    })
    .await?;

    broker.kill();
    let sent_before = collector.metric("idlemeter_collector_batches_sent_total");
    env.eventually("a backlog of ten batches and failed sends", || async {
        Ok(collector.metric("idlemeter_collector_spool_batches") >= 10
            && collector.metric("idlemeter_collector_send_failures_total") >= 1)
    })
    .await?;
    let spooled_at_peak = collector.metric("idlemeter_collector_spool_batches");
    broker.resume().await?;
    env.eventually("the backlog drained", || async {
        Ok(collector.metric("idlemeter_collector_spool_batches") <= 1
            && collector.metric("idlemeter_collector_batches_sent_total")
                >= sent_before + spooled_at_peak)
    })
    .await?;
    collector.stop().await?;

    // Batches made after the drain but not yet sent stay spooled for the next
    // run (one sample each here): everything else must have arrived.
    let made = {
        let state = idlemeter_collector::state::CollectorState::load(&config.state_file())?;
        state
            .sandboxes
            .get("acme.steady")
            .map(|counters| counters.seq)
            .ok_or_else(|| anyhow::anyhow!("no counters in the state file: {state:?}"))?
    };
    let still_spooled = std::fs::read_dir(config.spool_dir())?
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|entry| entry.file_name().to_string_lossy().ends_with(".batch"))
        })
        .count() as u64;
    let last_seq = made - still_spooled;
    let mut tail = SampleTail::new(&env)?;
    tail.wait_for("every sample sent", |s| max_seq(s) >= last_seq)
        .await?;
    let samples = distinct_by_seq(&tail.samples)?;
    let seqs: Vec<u64> = samples.iter().map(|s| s.seq).collect();
    // A send acknowledged just as the collector stopped may have left its
    // file behind: at most `made` arrive, at least `last_seq`, with no hole.
    let shipped = seqs.last().copied().unwrap_or(0);
    assert!(
        (last_seq..=made).contains(&shipped),
        "{shipped} shipped, {made} made, {still_spooled} still spooled"
    );
    assert_eq!(
        seqs,
        (1..=shipped).collect::<Vec<_>>(),
        "every seq arrives, none missing"
    );
    // Arrival order: batch numbers never go back (a batch whose send timed
    // out during the outage may arrive twice, identical, one after the other).
    let batch_seqs: Vec<u64> = tail.samples.iter().map(|s| s.batch_seq).collect();
    assert!(
        batch_seqs
            .windows(2)
            .all(|w| w[1] == w[0] || w[1] == w[0] + 1),
        "batches arrive in order without gaps: {batch_seqs:?}"
    );
    assert!(
        spooled_at_peak >= 10,
        "the outage was live: {spooled_at_peak} batches waited"
    );
    let repeated = batch_seqs.windows(2).filter(|w| w[1] == w[0]).count();
    eprintln!(
        "{} batches read, {repeated} repeated, {spooled_at_peak} spooled at the peak",
        batch_seqs.len()
    );
    Ok(())
}
