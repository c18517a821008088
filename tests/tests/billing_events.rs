//! Billing events: a close through the ledger queues `invoice.issued` for
//! each invoice in the issuing transaction; delivery signs them, sends
//! them to a webhook that fails twice and to a Kafka topic, retries with
//! the same delivery id, and each is accepted once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use chrono::{TimeZone, Utc};
use idlemeter_invoicer::events::EventDelivery;
use idlemeter_invoicer::{Invoicer, InvoicerConfig};
use idlemeter_tests::{TestEnv, SIMPLE_SHEET};
use serde_json::Value;

const SECRET: &str = "whsec-billing";

/// Every request the receiver saw: (delivery id, signature, body, accepted).
type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>, bool)>>>;

/// A receiver that answers 500 to its first `failures` requests.
async fn receiver(failures: usize) -> anyhow::Result<(String, Seen)> {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let record = record.clone();
            async move {
                let mut seen = record.lock().expect("not poisoned");
                let accepted = seen.len() >= failures;
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                seen.push((
                    header("idlemeter-delivery"),
                    header("idlemeter-signature"),
                    body.to_vec(),
                    accepted,
                ));
                if accepted {
                    StatusCode::NO_CONTENT
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoice_issued_is_signed_retried_and_accepted_once_per_delivery_id() -> anyhow::Result<()>
{
    let env = TestEnv::new("billing_events").await?;
    let october = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
    let samples: Vec<_> = ["a-cust", "b-cust", "c-cust"]
        .iter()
        .flat_map(|customer| {
            [1u64, 2].map(|seq| {
                let mut sample = idlemeter_tests::sample(
                    "sbx",
                    1,
                    seq,
                    october + chrono::Duration::hours(seq as i64 * 5),
                    seq * 1_000_000,
                    0,
                );
                sample.customer =
                    idlemeter_core::CustomerId::parse(customer.to_string()).expect("id");
                sample
            })
        })
        .collect();
    env.store.insert_samples(&samples).await?;
    let terms = idlemeter_tests::terms(idlemeter_core::Period::Month);
    idlemeter_tests::rater_pass(
        &env,
        SIMPLE_SHEET,
        "test.toml",
        terms.clone(),
        Utc.with_ymd_and_hms(2026, 11, 1, 1, 0, 0).unwrap(),
    )
    .await?;
    let ledger = env.ledger().await?;
    let lock = tempfile::tempdir()?;
    let closed = Invoicer::new(
        env.store.clone(),
        idlemeter_tests::sheet_source(SIMPLE_SHEET, "test.toml"),
        InvoicerConfig {
            lock_file: lock.path().join("lock").display().to_string(),
            ..InvoicerConfig::default()
        },
        terms,
    )?
    .with_ledger(ledger.clone())
    .close_period(
        october,
        Utc.with_ymd_and_hms(2026, 11, 5, 0, 0, 0).unwrap(),
        false,
        &|_, _| {},
    )
    .await?;
    assert_eq!(closed.issued_count, 3);
    let totals: std::collections::BTreeMap<String, String> = closed
        .issued
        .iter()
        .map(|invoice| {
            (
                format!("invoice.issued:idlemeter:{}", invoice.number),
                invoice.total.to_string(),
            )
        })
        .collect();

    let (url, seen) = receiver(2).await?;
    let topic = format!("{}.billing.events", env.group_id);
    env.kafka.ensure_topics(&[(topic.as_str(), 1)]).await?;
    let delivery = EventDelivery::new(ledger.clone())
        .with_webhook(idlemeter_webhook::WebhookSender::new(&url, SECRET)?)
        .with_publisher(env.kafka.publisher("billing-events", &topic)?)
        .with_retry(Duration::from_millis(20), Duration::from_millis(100));
    for _ in 0..200 {
        delivery.deliver_due().await?;
        if ledger
            .pending(idlemeter_ledger::BILLING_EVENTS_TOPIC, 10)
            .await?
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ledger
        .pending(idlemeter_ledger::BILLING_EVENTS_TOPIC, 10)
        .await?
        .is_empty());

    let seen = seen.lock().expect("not poisoned").clone();
    assert_eq!(seen.len(), 5, "three events, two of them retried once");
    let mut accepted: Vec<&str> = seen
        .iter()
        .filter(|(_, _, _, ok)| *ok)
        .map(|(id, _, _, _)| id.as_str())
        .collect();
    accepted.sort_unstable();
    assert_eq!(
        accepted,
        totals.keys().map(String::as_str).collect::<Vec<_>>()
    );
    let now = Utc::now().timestamp();
    for (id, signature, body, _) in &seen {
        assert!(
            totals.contains_key(id),
            "a retry carries its delivery id: {id}"
        );
        idlemeter_webhook::verify(SECRET.as_bytes(), signature, body, now, 300)
            .map_err(|error| anyhow::anyhow!("{id}: {error:?}"))?;
        let event: Value = serde_json::from_slice(body)?;
        assert_eq!(event["id"], *id);
        assert_eq!(event["type"], "invoice.issued");
        assert_eq!(event["data"]["total"], totals[id]);
    }

    // The same events on the topic, keyed by delivery id, once each.
    use rdkafka::consumer::Consumer as _;
    use rdkafka::Message as _;
    let consumer = env.kafka.consumer(
        "billing-reader",
        &format!("{}.billing-reader", env.group_id),
    )?;
    consumer.subscribe(&[topic.as_str()])?;
    let mut keys = Vec::new();
    while keys.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let event: Value = serde_json::from_slice(message.payload().unwrap_or_default())?;
        assert_eq!(event["id"], key);
        keys.push(key);
    }
    keys.sort_unstable();
    assert_eq!(keys, totals.keys().cloned().collect::<Vec<_>>());
    Ok(())
}

/// `customer.spend_limit_reached`: queued once per customer and period when
/// the newest figure's spend reaches the record's limit, never for one
/// below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_limit_reached_is_an_event_once_per_period() -> anyhow::Result<()> {
    let env = TestEnv::new("spend_limits").await?;
    let ledger = env.ledger().await?;
    let start = Utc
        .with_ymd_and_hms(2026, 10, 5, 0, 0, 0)
        .single()
        .expect("a date");
    // $10 each on the one-dollar-a-vCPU-hour sheet.
    let mut samples = idlemeter_tests::running_span("big-spender", 1, start, 10, 1000, 0);
    samples.extend(idlemeter_tests::running_span(
        "careful", 1, start, 10, 1000, 0,
    ));
    env.store.insert_samples(&samples).await?;
    for (id, limit) in [("big-spender", "5"), ("careful", "50")] {
        ledger
            .save_customer(
                "",
                &idlemeter_ledger::CustomerRecord {
                    id: id.to_owned(),
                    name: String::new(),
                    currency: "USD".to_owned(),
                    tax_rate: None,
                    tax_id: String::new(),
                    billing_email: String::new(),
                    spend_limit: Some(limit.parse()?),
                    metadata: serde_json::Map::new(),
                },
            )
            .await?;
    }
    ledger.relay(&env.store).await?;
    idlemeter_tests::rater_pass(
        &env,
        SIMPLE_SHEET,
        "t.toml",
        idlemeter_core::BillingTerms::default(),
        start + chrono::Duration::hours(12),
    )
    .await?;
    let now = start + chrono::Duration::hours(12);
    let check = || idlemeter_invoicer::events::check_spend_limits(&ledger, &env.store, "", now);
    assert_eq!(check().await?, 1);
    assert_eq!(check().await?, 0, "once per period");
    let events = ledger
        .pending(idlemeter_ledger::BILLING_EVENTS_TOPIC, 10)
        .await?;
    assert_eq!(events.len(), 1);
    let event: idlemeter_ledger::BillingEvent = serde_json::from_value(events[0].payload.clone())?;
    assert_eq!(event.event_type, "customer.spend_limit_reached");
    assert_eq!(event.data["customer"], "big-spender");
    assert_eq!(event.data["spend"], "10");
    assert_eq!(event.data["spend_limit"], "5");
    Ok(())
}
