//! The idle policy service against the real broker and ClickHouse: an idle
//! sandbox gets exactly one suspend command, one decision row and one signed
//! webhook at the exact time its window closes; a busy one gets nothing; and a
//! service killed mid-streak and restarted decides at the same instant, neither
//! forgetting the streak nor suspending early.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use chrono::{DateTime, TimeZone, Utc};
use idlemeter_bus::GroupConsumer;
use idlemeter_core::NodeId;
use idlemeter_policy::webhook::{DELIVERY_HEADER, SIGNATURE_HEADER};
use idlemeter_policy::{verify, PolicyConfig, PolicyService};
use idlemeter_proto::{decode_command, encode_node_batch, v1};
use idlemeter_rater::{Period, Rater, RaterConfig};
use idlemeter_store::{to_column, RatedLineRow};
use idlemeter_tests::{counted_trace, counter_in, sample, TestEnv};
use rdkafka::consumer::Consumer;
use rdkafka::Message;
use rust_decimal::Decimal;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const POLICY: &str = r#"
[policy]
name = "test"
version = "7"

[rules]
idle_window_s = 30
idle_action = "suspend"
reissue_after_s = 3600
"#;

const SECRET: &str = "whsec-policy-test";

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 3, 9, 0, 0)
        .single()
        .expect("valid time")
}

/// Produces ticks `ticks` of two sandboxes on node-1: `sbx-idle` with nothing
/// open, `sbx-busy` with an exec session.
async fn produce_ticks(env: &TestEnv, ticks: std::ops::Range<u64>) -> anyhow::Result<()> {
    let producer = env.producer()?;
    let node = NodeId::parse("node-1")?;
    for tick in ticks {
        let ts = start() + chrono::Duration::seconds(tick as i64);
        let mut idle = sample("sbx-idle", 1, tick + 1, ts, 1000 * tick, 0);
        idle.exec_sessions = 0;
        let busy = sample("sbx-busy", 1, tick + 1, ts, 1000 * tick, 0);
        env.produce(
            &producer,
            node.as_str(),
            &encode_node_batch(&node, Utc::now(), tick, &[idle, busy]),
        )
        .await?;
    }
    Ok(())
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<idlemeter_policy::Result<()>>,
    registry: prometheus::Registry,
}

impl Running {
    fn counter(&self, name: &str) -> u64 {
        counter_in(&self.registry, name)
    }
}

async fn start_policy(env: &TestEnv, webhook_url: &str) -> anyhow::Result<Running> {
    start_policy_with(env, webhook_url, POLICY, |_| {}).await
}

async fn start_policy_with(
    env: &TestEnv,
    webhook_url: &str,
    policy: &str,
    configure: impl FnOnce(&mut PolicyConfig),
) -> anyhow::Result<Running> {
    let registry = prometheus::Registry::new();
    let mut config = PolicyConfig {
        file: "test-policy.toml".to_owned(),
        group_id: format!("{}.policy", env.group_id),
        snapshot_interval_ms: 200,
        webhook_url: webhook_url.to_owned(),
        webhook_secret: SECRET.into(),
        // The trace is from the past: send its decisions anyway, and do not
        // forget its sandboxes for being quiet since then.
        stale_after_s: 0,
        forget_after_s: 10 * 365 * 86_400,
        ..PolicyConfig::default()
    };
    configure(&mut config);
    let service = PolicyService::build(
        &env.kafka,
        env.store.clone(),
        env.topics.clone(),
        config,
        policy,
        &registry,
    )
    .await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(service.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Ok(Running {
        stop,
        task,
        registry,
    })
}

type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A webhook receiver on a free port that keeps every request.
async fn webhook_receiver() -> anyhow::Result<(String, Received)> {
    let received: Received = Arc::default();
    let kept = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let kept = Arc::clone(&kept);
            async move {
                kept.lock().expect("not poisoned").push((headers, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, received))
}

/// Every command on the test's commands topic, read from the beginning.
async fn commands(env: &TestEnv, expected: usize) -> anyhow::Result<Vec<v1::SandboxCommand>> {
    let consumer: GroupConsumer = env.kafka.consumer(
        "policy-test-reader",
        &format!("{}.commands-reader", env.group_id),
    )?;
    consumer.subscribe(&[env.topics.commands.as_str()])?;
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while found.len() < expected && tokio::time::Instant::now() < deadline {
        if let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        {
            found.push(decode_command(message.payload().unwrap_or_default())?);
        }
    }
    // Anything more would be a duplicate: give it a moment to show up.
    while let Ok(Ok(message)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await
    {
        found.push(decode_command(message.payload().unwrap_or_default())?);
    }
    Ok(found)
}

/// (sandbox, seconds after start()) of every stored decision, in time order.
async fn decision_times(env: &TestEnv) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(env
        .store
        .decisions_of("acme")
        .await?
        .iter()
        .map(|row| {
            (
                row.sandbox.clone(),
                (row.at_ms - start().timestamp_millis()) / 1000,
            )
        })
        .collect())
}

async fn ensure_topics(env: &TestEnv) -> anyhow::Result<()> {
    env.kafka
        .ensure_topics(&[
            (env.topics.commands.as_str(), 1),
            (env.topics.leases.as_str(), 1),
        ])
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sandbox_is_suspended_once_at_its_window_and_a_busy_one_never() -> anyhow::Result<()>
{
    let env = TestEnv::new("policy_decides").await?;
    ensure_topics(&env).await?;
    let (url, received) = webhook_receiver().await?;
    let policy = start_policy(&env, &url).await?;
    produce_ticks(&env, 0..45).await?;
    // Observed counts samples as they are read; decisions_total counts
    // decisions once their row and command are acknowledged.
    env.eventually("all samples observed and the decision stored", || async {
        Ok(
            policy.counter("idlemeter_policy_samples_observed_total") >= 90
                && policy.counter("idlemeter_policy_decisions_total") >= 1,
        )
    })
    .await?;

    // The decision row: exactly one, at start + 30 s, with the policy version.
    let rows = env.store.decisions_of("acme").await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row.sandbox, "sbx-idle");
    assert_eq!(
        row.at_ms,
        (start() + chrono::Duration::seconds(30)).timestamp_millis()
    );
    assert_eq!(
        (row.rule.as_str(), row.action.as_str()),
        ("idle_window", "suspend")
    );
    assert_eq!(row.policy_version, "test/7");
    assert!(row.signals.contains("\"window_s\":30"), "{}", row.signals);

    // The command: exactly one, for the collector of node-1.
    let sent = commands(&env, 1).await?;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].sandbox, "sbx-idle");
    assert_eq!(sent[0].node, "node-1");
    assert_eq!(sent[0].action, v1::CommandAction::Suspend as i32);
    assert_eq!(sent[0].command_id, row.decision_id);
    assert_eq!(sent[0].policy_version, "test/7");

    // The webhook: signed, named by the decision id, the body is the decision.
    env.eventually("the webhook", || async {
        Ok(!received.lock().expect("not poisoned").is_empty())
    })
    .await?;
    let (headers, body) = received.lock().expect("not poisoned")[0].clone();
    let signature = headers[SIGNATURE_HEADER].to_str()?;
    verify(
        SECRET.as_bytes(),
        signature,
        &body,
        Utc::now().timestamp(),
        300,
    )
    .map_err(|error| anyhow::anyhow!("{error}"))?;
    assert!(verify(b"wrong", signature, &body, Utc::now().timestamp(), 300).is_err());
    assert_eq!(headers[DELIVERY_HEADER].to_str()?, row.decision_id);
    let decision: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(decision["sandbox"], "sbx-idle");
    assert_eq!(decision["rule"], "idle_window");

    policy.stop.send(()).ok();
    policy.task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_restarted_service_decides_at_the_same_instant() -> anyhow::Result<()> {
    let env = TestEnv::new("policy_restart").await?;
    ensure_topics(&env).await?;
    let first = start_policy(&env, "").await?;
    produce_ticks(&env, 0..20).await?;
    env.eventually("20 ticks observed", || async {
        Ok(first.counter("idlemeter_policy_samples_observed_total") >= 40)
    })
    .await?;
    // Let at least one snapshot (every 200 ms) cover part of the streak, then
    // produce more and kill the service without its shutdown path: the last
    // ticks are neither snapshotted nor committed and will be replayed.
    env.eventually("a snapshot", || async {
        Ok(first.counter("idlemeter_policy_snapshots_total") >= 2)
    })
    .await?;
    produce_ticks(&env, 20..25).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    first.task.abort();
    let _ = first.task.await;
    assert!(
        env.store.decisions_of("acme").await?.is_empty(),
        "nothing decided before 30 s"
    );

    let second = start_policy(&env, "").await?;
    produce_ticks(&env, 25..45).await?;
    env.eventually_within(Duration::from_secs(60), "the idle decision", || async {
        Ok(!env.store.decisions_of("acme").await?.is_empty())
    })
    .await?;
    // Give a wrong (early or late, or doubled) decision time to appear.
    env.eventually("the last ticks observed", || async {
        Ok(second.counter("idlemeter_policy_samples_observed_total") >= 40)
    })
    .await?;
    let times = decision_times(&env).await?;
    assert_eq!(
        times,
        vec![("sbx-idle".to_owned(), 30)],
        "the streak that began at 0 s closes at 30 s, once"
    );
    let sent = commands(&env, 1).await?;
    assert_eq!(sent.len(), 1, "one command: {sent:?}");
    second.stop.send(()).ok();
    second.task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_on_kafka_holds_the_sandbox_until_it_expires() -> anyhow::Result<()> {
    let env = TestEnv::new("policy_lease").await?;
    ensure_topics(&env).await?;
    let policy = start_policy(&env, "").await?;
    let producer = env.producer()?;
    let lease = serde_json::json!({
        "customer": "acme",
        "sandbox": "sbx-idle",
        "until": (start() + chrono::Duration::seconds(60)).to_rfc3339(),
        "holder": "customer",
    });
    for payload in [b"not a lease".to_vec(), serde_json::to_vec(&lease)?] {
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&env.topics.leases)
                    .key("acme/sbx-idle")
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)?;
    }
    env.eventually("the lease observed and the garbage refused", || async {
        Ok(
            policy.counter("idlemeter_policy_leases_observed_total") == 1
                && policy.counter("idlemeter_policy_messages_refused_total") == 1,
        )
    })
    .await?;
    produce_ticks(&env, 0..100).await?;
    // Observed counts samples as they are read; decisions_total counts
    // decisions once their row and command are acknowledged.
    env.eventually("all samples observed and the decision stored", || async {
        Ok(
            policy.counter("idlemeter_policy_samples_observed_total") >= 200
                && policy.counter("idlemeter_policy_decisions_total") >= 1,
        )
    })
    .await?;
    let rows = env.store.decisions_of("acme").await?;
    let times = decision_times(&env).await?;
    // Held until 60 s, then the 30 s window: 90 s, not 30 s.
    assert_eq!(times, vec![("sbx-idle".to_owned(), 90)]);
    assert!(
        rows[0].signals.contains("lease_until"),
        "{}",
        rows[0].signals
    );
    policy.stop.send(()).ok();
    policy.task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_at_their_spend_limit_has_every_running_sandbox_suspended() -> anyhow::Result<()>
{
    let env = TestEnv::new("policy_budget").await?;
    ensure_topics(&env).await?;
    // This month (spend of an earlier month does not count against the limit).
    let month_start = {
        use chrono::Datelike;
        let now = Utc::now();
        Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
            .single()
            .expect("valid")
            .timestamp() as u32
    };
    // The rater's latest snapshot for acme: 30.00 + 25.00 = 55.00, over the
    // limit of 50. An older snapshot (as_of an hour earlier) of 10.00 must not
    // be the one read.
    let line = |as_of: u32, line_no: u16, amount: &str| -> anyhow::Result<RatedLineRow> {
        Ok(RatedLineRow {
            customer: "acme".to_owned(),
            period_start: month_start,
            as_of,
            sheet: "prices/sprites.toml".to_owned(),
            sheet_checksum: "c".to_owned(),
            idle_policy: "session-or-connection/v2".to_owned(),
            currency: "USD".to_owned(),
            line_no,
            kind: "usage".to_owned(),
            resource: "vcpu".to_owned(),
            price_version: String::new(),
            quantity: to_column(Decimal::ONE)?,
            quantity_base: "1".to_owned(),
            unit: "vcpu-hour".to_owned(),
            unit_price: to_column(Decimal::ONE)?,
            amount: to_column(amount.parse()?)?,
            rated_at: month_start + 7_200,
        })
    };
    env.store
        .insert_rated_lines(&[
            line(month_start + 3_600, 0, "10.00")?,
            line(month_start + 7_200, 0, "30.00")?,
            line(month_start + 7_200, 1, "25.00")?,
        ])
        .await?;
    let capped = format!("{POLICY}\n[customers.acme]\nspend_limit = \"50\"\n");
    let policy = start_policy_with(&env, "", &capped, |config| {
        config.spend_poll_interval_s = 1;
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    produce_ticks(&env, 0..5).await?;
    env.eventually("both sandboxes capped", || async {
        Ok(env.store.decisions_of("acme").await?.len() >= 2)
    })
    .await?;
    let rows = env.store.decisions_of("acme").await?;
    let mut capped: Vec<(String, String, String, i64)> = rows
        .iter()
        .map(|row| {
            (
                row.sandbox.clone(),
                row.rule.clone(),
                row.action.clone(),
                (row.at_ms - start().timestamp_millis()) / 1000,
            )
        })
        .collect();
    capped.sort();
    // The busy sandbox too: a budget cap is not about idleness.
    assert_eq!(
        capped,
        vec![
            (
                "sbx-busy".to_owned(),
                "budget_cap".to_owned(),
                "suspend".to_owned(),
                0
            ),
            (
                "sbx-idle".to_owned(),
                "budget_cap".to_owned(),
                "suspend".to_owned(),
                0
            ),
        ]
    );
    let signals: serde_json::Value = serde_json::from_str(&rows[0].signals)?;
    assert_eq!(signals["spend"], "55.000000000000", "{signals}");
    policy.stop.send(()).ok();
    policy.task.await??;
    Ok(())
}

/// A budget cap acts on the rater's live figure of the open hour: the
/// customer is suspended before any hour is rated (issue "Money from
/// counters").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_cap_suspends_on_live_spend_before_the_hour_closes() -> anyhow::Result<()> {
    use chrono::DurationRound;
    let env = TestEnv::new("policy_live_cap").await?;
    ensure_topics(&env).await?;
    // acme's last 50 minutes, four sandboxes every 10 s, as stored by ingest.
    let now = Utc::now();
    let from =
        (now - chrono::Duration::seconds(3000)).duration_trunc(chrono::Duration::seconds(1))?;
    let mut samples = Vec::new();
    for sandbox in 0..4 {
        samples.extend(counted_trace(
            "acme",
            &format!("sbx-{sandbox}"),
            from,
            10,
            299,
        ));
    }
    env.store.insert_samples(&samples).await?;
    let rater = Rater::new(
        env.store.clone(),
        include_str!("../../prices/sprites.toml"),
        RaterConfig {
            sheet: "prices/sprites.toml".to_owned(),
            ..RaterConfig::default()
        },
        &prometheus::Registry::new(),
    )?
    .with_terms(idlemeter_tests::terms(Period::Month))?;
    rater.rate_live(now).await?;
    let (_, live) = env.store.period_spend("acme").await?.expect("live spend");
    assert!(
        live > Decimal::new(5, 2),
        "spend {live} is enough to cap at 0.05"
    );
    let rated_hours: u64 = env
        .store
        .client()
        .query("SELECT count() FROM rated_usage")
        .fetch_one()
        .await?;
    assert_eq!(rated_hours, 0, "no hour is rated: the spend is live");

    let capped = format!("{POLICY}\n[customers.acme]\nspend_limit = \"0.05\"\n");
    let policy = start_policy_with(&env, "", &capped, |config| {
        config.spend_poll_interval_s = 1;
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    produce_ticks(&env, 0..5).await?;
    env.eventually("both sandboxes capped", || async {
        Ok(env.store.decisions_of("acme").await?.len() >= 2)
    })
    .await?;
    let rows = env.store.decisions_of("acme").await?;
    assert!(rows.iter().all(|row| row.rule == "budget_cap"), "{rows:?}");
    let signals: serde_json::Value = serde_json::from_str(&rows[0].signals)?;
    let read: Decimal = signals["spend"].as_str().expect("spend signal").parse()?;
    assert_eq!(read.normalize(), live.normalize(), "{signals}");
    policy.stop.send(()).ok();
    policy.task.await??;
    Ok(())
}

/// Issue "Idle policy": `idlemeter policy replay` on a file of the samples
/// the service read (shuffled, a third duplicated) decides exactly what the
/// service decided: same instants, sandboxes, rules, actions and reasons.
/// The stream has an idle sandbox, a collector gap that hides the end of a
/// session, and samples lost in transit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_offline_decides_what_the_service_decided() -> anyhow::Result<()> {
    let env = TestEnv::new("policy_replay_equal").await?;
    ensure_topics(&env).await?;
    let policy = start_policy(&env, "").await?;
    let node = NodeId::parse("node-1")?;
    let producer = env.producer()?;
    // (sandbox, tick, seq, session open)
    let mut plan: Vec<(&str, u64, u64, bool)> = Vec::new();
    for tick in 0..130u64 {
        plan.push(("sbx-idle", tick, tick + 1, false));
        // A session until 10, no sample 11..=70, idle from 71: decided at 101.
        if !(11..=70).contains(&tick) {
            let seq = if tick <= 10 { tick + 1 } else { tick - 59 };
            plan.push(("sbx-gap", tick, seq, tick <= 10));
        }
        // Idle, samples 20..=24 lost in transit (seq jumps): decided at 55.
        if !(20..=24).contains(&tick) {
            plan.push(("sbx-lost", tick, tick + 1, false));
        }
    }
    let mut all = Vec::new();
    for tick in 0..130u64 {
        let ts = start() + chrono::Duration::seconds(tick as i64);
        let batch: Vec<_> = plan
            .iter()
            .filter(|(_, at, _, _)| *at == tick)
            .map(|(sandbox, _, seq, busy)| {
                let mut sample = sample(sandbox, 1, *seq, ts, 1000 * seq, 0);
                sample.exec_sessions = u32::from(*busy);
                sample
            })
            .collect();
        env.produce(
            &producer,
            node.as_str(),
            &encode_node_batch(&node, Utc::now(), tick, &batch),
        )
        .await?;
        all.extend(batch);
    }
    env.eventually(
        "every sample observed and three decisions stored",
        || async {
            Ok(
                policy.counter("idlemeter_policy_samples_observed_total") >= all.len() as u64
                    && policy.counter("idlemeter_policy_decisions_total") >= 3,
            )
        },
    )
    .await?;
    policy.stop.send(()).ok();
    policy.task.await??;
    let mut served: Vec<(i64, String, String, String, String)> = env
        .store
        .decisions_of("acme")
        .await?
        .into_iter()
        .map(|row| (row.at_ms, row.sandbox, row.rule, row.action, row.reason))
        .collect();
    served.sort();
    let at = |second: i64| (start() + chrono::Duration::seconds(second)).timestamp_millis();
    assert_eq!(
        served
            .iter()
            .map(|(at_ms, sandbox, ..)| (*at_ms, sandbox.as_str()))
            .collect::<Vec<_>>(),
        [
            (at(30), "sbx-idle"),
            (at(55), "sbx-lost"),
            (at(101), "sbx-gap")
        ]
    );

    let mut lines: Vec<String> = all.iter().map(idlemeter_core::jsonl::to_line).collect();
    let duplicates: Vec<String> = lines.iter().step_by(3).cloned().collect();
    lines.extend(duplicates);
    lines.reverse();
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("policy.toml"), POLICY)?;
    std::fs::write(dir.path().join("samples.jsonl"), lines.join("\n"))?;
    let output = std::process::Command::new(idlemeter_tests::collector::idlemeter_binary()?)
        .args(["policy", "replay", "--policy"])
        .arg(dir.path().join("policy.toml"))
        .arg("--samples")
        .arg(dir.path().join("samples.jsonl"))
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let document: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let mut replayed: Vec<(i64, String, String, String, String)> = document["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .map(|decision| {
            let text = |key: &str| decision[key].as_str().unwrap_or_default().to_owned();
            let at_ms = DateTime::parse_from_rfc3339(&text("at"))
                .map(|at| at.timestamp_millis())
                .unwrap_or_default();
            (
                at_ms,
                text("sandbox"),
                text("rule"),
                text("action"),
                text("reason"),
            )
        })
        .collect();
    replayed.sort();
    assert_eq!(replayed, served);
    Ok(())
}
