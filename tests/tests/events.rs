//! OpenMeter-compatible events, end to end on the real broker and ClickHouse:
//! an OpenMeter client's requests (its published event shapes, its content
//! types, a bearer token) against the API, through Kafka and ingest into
//! ClickHouse, read back with OpenMeter's meter query.

use std::sync::Arc;
use std::time::Duration;

use idlemeter_api::auth::{generate, generate_ingest};
use idlemeter_api::events::EventSink;
use idlemeter_api::Api;
use idlemeter_core::events::Meters;
use idlemeter_core::CustomerId;
use idlemeter_ingest::events::EventIngest;
use idlemeter_tests::TestEnv;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// OpenMeter's quickstart meters, in its keys, plus one meter of each other
/// aggregation.
const METERS: &str = r#"
[[meters]]
slug = "tokens_total"
description = "AI Token Usage"
eventType = "prompt"
aggregation = "SUM"
valueProperty = "$.tokens"
groupBy = { model = "$.model", type = "$.type" }

[[meters]]
slug = "api_requests_total"
description = "API Requests"
eventType = "request"
aggregation = "COUNT"
groupBy = { method = "$.method", route = "$.route" }

[[meters]]
slug = "largest_prompt"
eventType = "prompt"
aggregation = "MAX"
valueProperty = "$.tokens"

[[meters]]
slug = "models_used"
eventType = "prompt"
aggregation = "UNIQUE_COUNT"
valueProperty = "$.model"

[[meters]]
slug = "storage_bytes"
eventType = "storage"
aggregation = "LATEST"
valueProperty = "$.bytes"
"#;

/// An OpenMeter "prompt" event, as its quickstart sends one.
fn prompt(id: &str, subject: &str, time: &str, tokens: &str, model: &str, kind: &str) -> Value {
    json!({
        "specversion": "1.0",
        "type": "prompt",
        "id": id,
        "time": time,
        "source": "chat-app",
        "subject": subject,
        "data": {"tokens": tokens, "model": model, "type": kind}
    })
}

fn request(id: &str, subject: &str, time: &str, method: &str, route: &str) -> Value {
    json!({
        "specversion": "1.0",
        "type": "request",
        "id": id,
        "time": time,
        "source": "service-0",
        "subject": subject,
        "data": {"method": method, "route": route}
    })
}

struct Stack {
    base: String,
    http: reqwest::Client,
    env: TestEnv,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Stack {
    /// The API (with `keys` stored before it loads them) and event ingest.
    async fn start(keys: &[&idlemeter_api::auth::NewKey]) -> anyhow::Result<Self> {
        Self::start_with(keys, idlemeter_tests::ONE_DOLLAR_A_VCPU_SECOND, None).await
    }

    /// [`Self::start`], the API billing with `sheet` (as `test.toml`) and
    /// answering as if it were always `now`, when given.
    async fn start_with(
        keys: &[&idlemeter_api::auth::NewKey],
        sheet: &str,
        now: Option<chrono::DateTime<chrono::Utc>>,
    ) -> anyhow::Result<Self> {
        let env = TestEnv::new("events").await?;
        for key in keys {
            env.store.insert_api_key(&key.row).await?;
        }
        env.kafka
            .ensure_topics(&[(env.topics.events.as_str(), 3)])
            .await?;
        let meters = Meters::from_toml(METERS, "meters.toml").map_err(anyhow::Error::msg)?;
        let registry = prometheus::Registry::new();
        let billing = idlemeter_api::Billing::new(
            idlemeter_tests::sheet_source(sheet, "test.toml"),
            idlemeter_tests::terms(idlemeter_core::Period::Month),
        )?;
        let mut api = Api::new(
            env.store.clone(),
            billing,
            idlemeter_api::ApiConfig::default(),
            &registry,
        )
        .await?;
        if let Some(now) = now {
            api = api.with_clock(Arc::new(move || now));
        }
        let api = api.with_events(EventSink {
            publish: env.kafka.publisher("test-events", &env.topics.events)?,
            meters: Arc::new(meters.clone()),
            max_events: 100,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(api.serve(listener, async move {
            let _ = api_stopped.await;
        }));
        let ingest = EventIngest::build(
            &env.kafka,
            env.store.clone(),
            env.topics.clone(),
            env.ingest_config(),
            meters,
            &registry,
        )?;
        let (ingest_stop, ingest_stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(ingest.run_until_stopped(async move {
            let _ = ingest_stopped.await;
        }));
        Ok(Self {
            base,
            http: reqwest::Client::new(),
            env,
            stop: vec![api_stop, ingest_stop],
        })
    }

    async fn post(
        &self,
        key: &str,
        content_type: &str,
        body: &Value,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}/api/v1/events", self.base))
            .bearer_auth(key)
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    async fn query(&self, key: &str, meter: &str, query: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}/api/v1/meters/{meter}/query?{query}", self.base))
            .bearer_auth(key)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        anyhow::ensure!(status == StatusCode::OK, "{status}: {body}");
        Ok(body)
    }
}

/// Each row of a meter query's answer: `column`, the `group` value, the value.
fn rows_of(answer: &Value, column: &str, group: &str) -> Vec<(String, String, f64)> {
    answer["data"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    (
                        row[column].as_str().unwrap_or_default().to_owned(),
                        row["groupBy"][group]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        row["value"].as_f64().unwrap_or(-1.0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

const RANGE: &str = "from=2023-01-01T00:00:00Z&to=2023-01-02T00:00:00Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openmeter_client_pointed_at_idlemeter_is_metered_once_per_event() -> anyhow::Result<()>
{
    let customer = CustomerId::parse("customer-1")?;
    let keys = [
        generate_ingest(Some(&customer), "chat-app", 1),
        generate_ingest(None, "platform", 1),
        generate(Some(&customer), "customer-1 reads", 1),
        generate(Some(&CustomerId::parse("customer-2")?), "c2", 1),
    ];
    let stack = Stack::start(&keys.iter().collect::<Vec<_>>()).await?;
    let env = &stack.env;
    let [ingest_key, platform_key, reader, other_reader] = keys.map(|key| key.key);

    // OpenMeter's single-event request, then its batch request.
    let first = prompt(
        "00001",
        "customer-1",
        "2023-01-01T00:00:00.001Z",
        "123456",
        "gpt4-turbo",
        "input",
    );
    let (status, body) = stack
        .post(&ingest_key, "application/cloudevents+json", &first)
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let batch = json!([
        prompt("00002", "customer-1", "2023-01-01T00:10:00Z", "1000", "gpt4-turbo", "output"),
        prompt("00003", "customer-1", "2023-01-01T01:05:00Z", "500", "gpt-3.5", "input"),
        request("00001", "customer-1", "2023-01-01T00:00:00.001Z", "GET", "/hello"),
        request("00002", "customer-1/sbx-7", "2023-01-01T00:30:00Z", "POST", "/hello"),
        {"specversion": "1.0", "type": "storage", "id": "s1", "source": "disk", "subject": "customer-1",
         "time": "2023-01-01T00:00:00Z", "data": {"bytes": 100}},
        {"specversion": "1.0", "type": "storage", "id": "s2", "source": "disk", "subject": "customer-1",
         "time": "2023-01-01T02:00:00Z", "data": {"bytes": 40}},
    ]);
    let (status, body) = stack
        .post(&ingest_key, "application/cloudevents-batch+json", &batch)
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // The client retries both requests (a timeout it did not see answered),
    // and a platform-wide key sends the first event again: nothing doubles.
    for (key, content_type, body) in [
        (&ingest_key, "application/cloudevents+json", &first),
        (&ingest_key, "application/cloudevents-batch+json", &batch),
        (&platform_key, "application/json", &first),
    ] {
        let (status, answer) = stack.post(key, content_type, body).await?;
        assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    }

    // Stored once each: 7 distinct (source, id).
    let mut stored = 0;
    for _ in 0..100 {
        stored = env.store.events_of("customer-1").await?.len();
        if stored >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored, 7);

    let tokens = stack
        .query(
            &reader,
            "tokens_total",
            &format!("{RANGE}&windowSize=HOUR&groupBy=model"),
        )
        .await?;
    let rows = rows_of(&tokens, "windowStart", "model");
    assert_eq!(
        rows,
        vec![
            (
                "2023-01-01T00:00:00Z".to_owned(),
                "gpt4-turbo".to_owned(),
                124_456.0
            ),
            (
                "2023-01-01T01:00:00Z".to_owned(),
                "gpt-3.5".to_owned(),
                500.0
            ),
        ],
        "{tokens}"
    );
    assert_eq!(tokens["data"][0]["valueDecimal"], "124456.000000000000");
    let total = |body: &Value| body["data"][0]["value"].as_f64();
    assert_eq!(
        total(&stack.query(&reader, "tokens_total", RANGE).await?),
        Some(124_956.0)
    );
    assert_eq!(
        total(&stack.query(&reader, "api_requests_total", RANGE).await?),
        Some(2.0)
    );
    assert_eq!(
        total(&stack.query(&reader, "largest_prompt", RANGE).await?),
        Some(123_456.0)
    );
    assert_eq!(
        total(&stack.query(&reader, "models_used", RANGE).await?),
        Some(2.0)
    );
    assert_eq!(
        total(&stack.query(&reader, "storage_bytes", RANGE).await?),
        Some(40.0)
    );
    // By subject: the sandbox-level subject is its own group.
    let by_subject = stack
        .query(
            &reader,
            "api_requests_total",
            &format!("{RANGE}&groupBy=subject,method"),
        )
        .await?;
    let groups = rows_of(&by_subject, "subject", "method");
    assert_eq!(
        groups,
        vec![
            ("customer-1".to_owned(), "GET".to_owned(), 1.0),
            ("customer-1/sbx-7".to_owned(), "POST".to_owned(), 1.0),
        ]
    );
    // Another tenant sees none of it.
    let response = stack
        .http
        .get(format!(
            "{}/api/v1/meters/tokens_total/query?{RANGE}&customer=customer-1",
            stack.base
        ))
        .bearer_auth(&other_reader)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    for stop in stack.stop {
        let _ = stop.send(());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_are_named_and_the_good_ones_in_their_batch_kept() -> anyhow::Result<()> {
    let customer = CustomerId::parse("customer-1")?;
    let keys = [
        generate_ingest(Some(&customer), "chat-app", 1),
        generate(Some(&customer), "reads", 1),
    ];
    let stack = Stack::start(&keys.iter().collect::<Vec<_>>()).await?;
    let env = &stack.env;
    let [ingest_key, reader] = keys.map(|key| key.key);

    let batch = json!([
        prompt("g1", "customer-1", "2023-01-01T00:00:00Z", "10", "m", "input"),
        prompt("b1", "customer-1", "the first of January", "10", "m", "input"),
        prompt("b2", "customer-1", "2023-01-01T00:00:00Z", "ten", "m", "input"),
        prompt("b3", "customer-2", "2023-01-01T00:00:00Z", "10", "m", "input"),
        {"type": "prompt", "id": "b4", "source": "chat-app", "subject": "customer-1"},
        prompt("g2", "customer-1/user-9", "2023-01-01T00:05:00Z", "5", "m", "output"),
    ]);
    let (status, problem) = stack
        .post(&ingest_key, "application/cloudevents-batch+json", &batch)
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["type"], "urn:idlemeter:problem:invalid-events");
    assert_eq!(problem["accepted"], 2);
    let named: Vec<(u64, String, String)> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|error| {
            (
                error["index"].as_u64().unwrap_or(99),
                error["id"].as_str().unwrap_or_default().to_owned(),
                error["field"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        named,
        vec![
            (1, "b1".to_owned(), "time".to_owned()),
            (2, "b2".to_owned(), "data.tokens".to_owned()),
            (3, "b3".to_owned(), "subject".to_owned()),
            (4, "b4".to_owned(), "specversion".to_owned()),
        ],
        "{problem}"
    );
    let other_tenant = problem["errors"][2]["reason"].as_str().unwrap_or_default();
    assert!(other_tenant.contains("customer-2"), "{other_tenant}");

    // The good ones were kept; the other tenant got nothing.
    let mut value = None;
    for _ in 0..100 {
        let body = stack.query(&reader, "tokens_total", RANGE).await?;
        value = body["data"][0]["value"].as_f64();
        if value == Some(15.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(value, Some(15.0));
    assert!(env.store.events_of("customer-2").await?.is_empty());

    // Not JSON, the wrong content type, a read key, no key.
    let response = stack
        .http
        .post(format!("{}/api/v1/events", stack.base))
        .bearer_auth(&ingest_key)
        .header("content-type", "application/cloudevents+json")
        .body("{\"specversion\": ")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await?;
    assert!(
        body["errors"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not JSON"),
        "{body}"
    );
    let one = prompt("x", "customer-1", "2023-01-01T00:00:00Z", "1", "m", "input");
    assert_eq!(
        stack.post(&ingest_key, "text/plain", &one).await?.0,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(
        stack
            .post(&reader, "application/cloudevents+json", &one)
            .await?
            .0,
        StatusCode::FORBIDDEN
    );
    let response = stack
        .http
        .post(format!("{}/api/v1/events", stack.base))
        .header("content-type", "application/cloudevents+json")
        .body(one.to_string())
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    for stop in stack.stop {
        let _ = stop.send(());
    }
    Ok(())
}

/// The meters shipped in `meters/` load (`make run` uses them).
#[test]
fn the_shipped_meters_load() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../meters");
    let mut loaded = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let meters =
            Meters::from_toml(&text, &path.display().to_string()).map_err(anyhow::Error::msg)?;
        assert!(!meters.meters.is_empty(), "{}", path.display());
        loaded += 1;
    }
    assert!(loaded >= 1);
    Ok(())
}

/// Exactly once through a crash: events published straight to the topic (as
/// the API does), an ingest aborted mid-stream without committing, a second
/// one replaying from the committed offsets: every event stored once and
/// the meter's sum exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_an_ingest_crash_once_each() -> anyhow::Result<()> {
    let env = TestEnv::new("events_crash").await?;
    env.kafka
        .ensure_topics(&[(env.topics.events.as_str(), 3)])
        .await?;
    let meters = Meters::from_toml(METERS, "meters.toml").map_err(anyhow::Error::msg)?;
    let publish = env.kafka.publisher("test-events", &env.topics.events)?;
    let received = chrono::Utc::now();
    let customer = |subject: &str| idlemeter_api::events::customer_of_subject(subject);
    let mut expected = rust_decimal::Decimal::ZERO;
    let send = |from: usize, to: usize| {
        let events: Vec<Value> = (from..to)
            .map(|n| {
                prompt(
                    &format!("e{n}"),
                    &format!("customer-{}", n % 3),
                    "2023-01-01T00:00:00Z",
                    &(n + 1).to_string(),
                    "m",
                    "input",
                )
            })
            .collect();
        let parsed = idlemeter_core::events::parse_events(
            Value::Array(events).to_string().as_bytes(),
            idlemeter_core::events::Framing::Batch,
            received,
            &customer,
            &meters.meters,
        );
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        parsed
            .events
            .iter()
            .map(|event| {
                (
                    event.subject.clone(),
                    serde_json::to_vec(event).expect("json"),
                )
            })
            .collect::<Vec<_>>()
    };
    for n in 0..3000 {
        if n % 3 == 1 {
            expected += rust_decimal::Decimal::from(n + 1);
        }
    }
    publish(send(0, 1500)).await.map_err(anyhow::Error::msg)?;
    let start = |registry: &prometheus::Registry| -> anyhow::Result<_> {
        let ingest = EventIngest::build(
            &env.kafka,
            env.store.clone(),
            env.topics.clone(),
            env.ingest_config(),
            meters.clone(),
            registry,
        )?;
        Ok(tokio::spawn(
            ingest.run_until_stopped(std::future::pending()),
        ))
    };
    let first_registry = prometheus::Registry::new();
    let first = start(&first_registry)?;
    // Let it store part of the stream, then crash it (no shutdown path).
    for _ in 0..200 {
        if idlemeter_tests::counter_in(&first_registry, "idlemeter_ingest_events_stored_total") > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish(send(1500, 3000))
        .await
        .map_err(anyhow::Error::msg)?;
    first.abort();
    let _ = first.await;
    let second_registry = prometheus::Registry::new();
    let second = start(&second_registry)?;
    // And the whole stream once more, as a client retrying everything would.
    publish(send(0, 3000)).await.map_err(anyhow::Error::msg)?;
    let mut stored = 0;
    for _ in 0..300 {
        stored = 0;
        for c in 0..3 {
            stored += env.store.events_of(&format!("customer-{c}")).await?.len();
        }
        if stored >= 3000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored, 3000, "every event once");
    // Meter values are inserted after their events: wait for them too.
    let meter = meters.get("tokens_total").expect("meter").clone();
    let mut total = rust_decimal::Decimal::ZERO;
    for _ in 0..100 {
        let rows = env
            .store
            .query_meter(
                &meter,
                &idlemeter_store::MeterQuery {
                    customer: "customer-1",
                    subject: None,
                    from_ms: 1_672_531_200_000,
                    to_ms: 1_672_617_600_000,
                    window_ms: 0,
                    group_by: &[],
                    by_subject: false,
                },
            )
            .await?;
        assert!(rows.len() <= 1, "{rows:?}");
        total = match rows.first() {
            Some(row) => row.value.parse::<rust_decimal::Decimal>()?,
            None => rust_decimal::Decimal::ZERO,
        };
        if total >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(total, expected, "every event's tokens once");
    second.abort();
    Ok(())
}

/// A sheet pricing three of [`METERS`]: tokens and requests from 2020,
/// tokens cheaper and stored bytes priced from 01:00 on 2023-01-01.
const METERED_SHEET: &str = r#"
[sheet]
platform = "events"
currency = "USD"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z
[versions.resources.vcpu]
unit = "vcpu-second"
unit_price = "1"
[versions.resources.meters.tokens_total]
unit = "1000000 tokens"
unit_price = "2.00"
[versions.resources.meters.api_requests_total]
unit = "request"
unit_price = "0.01"

[[versions]]
effective_from = 2023-01-01T01:00:00Z
[versions.resources.vcpu]
unit = "vcpu-second"
unit_price = "1"
[versions.resources.meters.tokens_total]
unit = "1000000 tokens"
unit_price = "1.50"
[versions.resources.meters.api_requests_total]
unit = "request"
unit_price = "0.01"
[versions.resources.meters.storage_bytes]
unit = "1000000000 bytes"
unit_price = "0.10"
"#;

fn storage(id: &str, subject: &str, time: &str, bytes: u64) -> Value {
    json!({"specversion": "1.0", "type": "storage", "id": id, "source": "disk",
           "subject": subject, "time": time, "data": {"bytes": bytes}})
}

/// (kind resource, quantity, unit, amount) of each usage line of `lines`
/// (API cost lines or invoice lines, as JSON).
fn metered_lines(lines: &Value) -> Vec<(String, String, String, String)> {
    lines
        .as_array()
        .into_iter()
        .flatten()
        .filter(|line| {
            line["resource"]
                .as_str()
                .is_some_and(|r| r.starts_with("meter."))
        })
        .map(|line| {
            let decimal = |field: &str| {
                line[field]
                    .as_str()
                    .and_then(|text| text.parse::<rust_decimal::Decimal>().ok())
                    .map(|value| value.normalize().to_string())
                    .unwrap_or_default()
            };
            (
                format!(
                    "{} {}",
                    line["kind"].as_str().unwrap_or(""),
                    line["resource"].as_str().unwrap_or("")
                ),
                decimal("quantity"),
                line["unit"].as_str().unwrap_or("").to_owned(),
                decimal("amount"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metered_events_are_priced_per_version_on_the_figure_and_the_invoice() -> anyhow::Result<()>
{
    use chrono::{TimeZone, Utc};
    let customer = CustomerId::parse("customer-1")?;
    let keys = [
        generate_ingest(None, "platform", 1),
        generate(Some(&customer), "customer-1 reads", 1),
    ];
    let at = |day: u32, hour: u32| Utc.with_ymd_and_hms(2023, 1, day, hour, 0, 0).unwrap();
    let stack = Stack::start_with(
        &keys.iter().collect::<Vec<_>>(),
        METERED_SHEET,
        Some(at(1, 6) + chrono::Duration::minutes(30)),
    )
    .await?;
    let env = &stack.env;
    let [platform_key, reader] = keys.map(|key| key.key);
    let meters = Meters::from_toml(METERS, "meters.toml").map_err(anyhow::Error::msg)?;

    // customer-1: 1.5M tokens and 2 requests before 01:00 (first prices),
    // 2M tokens, 1 request and stored bytes after (second prices); the
    // LATEST of the bytes is 2.5 GB. customer-2 has events only; customer-3
    // a negative token count, which no price can bill.
    let batch = json!([
        prompt(
            "p1",
            "customer-1",
            "2023-01-01T00:00:00.001Z",
            "600000",
            "gpt4",
            "input"
        ),
        prompt(
            "p2",
            "customer-1",
            "2023-01-01T00:10:00Z",
            "900000",
            "gpt4",
            "output"
        ),
        prompt(
            "p3",
            "customer-1",
            "2023-01-01T01:05:00Z",
            "2000000",
            "gpt4",
            "input"
        ),
        request("r1", "customer-1", "2023-01-01T00:30:00Z", "GET", "/a"),
        request("r2", "customer-1", "2023-01-01T00:40:00Z", "GET", "/a"),
        request("r3", "customer-1", "2023-01-01T02:00:00Z", "POST", "/b"),
        storage("s1", "customer-1", "2023-01-01T00:20:00Z", 5_000_000_000),
        storage("s2", "customer-1", "2023-01-01T02:00:00Z", 3_000_000_000),
        storage("s3", "customer-1", "2023-01-01T03:00:00Z", 2_500_000_000),
        prompt(
            "p1",
            "customer-2",
            "2023-01-01T05:00:00Z",
            "1000000",
            "gpt4",
            "input"
        ),
        prompt(
            "p9",
            "customer-3",
            "2023-01-01T05:00:00Z",
            "-5",
            "gpt4",
            "input"
        ),
    ]);
    // Sent twice: collapses.
    for _ in 0..2 {
        let (status, body) = stack
            .post(&platform_key, "application/cloudevents-batch+json", &batch)
            .await?;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let wait_for = |customer: &'static str, count: usize| async move {
        for _ in 0..100 {
            if env.store.events_of(customer).await?.len() >= count {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("{customer}'s events did not arrive")
    };
    wait_for("customer-1", 9).await?;
    wait_for("customer-2", 1).await?;
    wait_for("customer-3", 1).await?;

    // The rater's hourly figure, at 06:00: customers found by their events.
    let registry = prometheus::Registry::new();
    let rater = idlemeter_rater::Rater::new(
        env.store.clone(),
        METERED_SHEET,
        idlemeter_rater::RaterConfig {
            sheet: "test.toml".to_owned(),
            grace_seconds: 0,
            ..idlemeter_rater::RaterConfig::default()
        },
        &registry,
    )?
    .with_terms(idlemeter_tests::terms(idlemeter_core::Period::Month))?
    .with_meters(&meters)?;
    let pass = rater.rate_closed_hours(at(1, 6)).await?;
    assert_eq!(
        pass.customers_failed, 1,
        "customer-3's negative sum: {pass:?}"
    );
    let answer: Value = stack
        .http
        .get(format!("{}/v1/customers/customer-1/cost", stack.base))
        .bearer_auth(&reader)
        .send()
        .await?
        .json()
        .await?;
    let line = |kind: &str, quantity: &str, unit: &str, amount: &str| {
        (
            kind.to_owned(),
            quantity.to_owned(),
            unit.to_owned(),
            amount.to_owned(),
        )
    };
    // Meters in slug order within each price version.
    let first_figure = vec![
        // Before 01:00: 2 requests at 0.01, 1.5M tokens at 2.00 per million.
        line("usage meter.api_requests_total", "2", "request", "0.02"),
        line("usage meter.tokens_total", "1.5", "1000000 tokens", "3"),
        // After: 1 request; the latest bytes, 2.5 GB at 0.10; 2M tokens at 1.50.
        line("usage meter.api_requests_total", "1", "request", "0.01"),
        line(
            "usage meter.storage_bytes",
            "2.5",
            "1000000000 bytes",
            "0.25",
        ),
        line("usage meter.tokens_total", "2", "1000000 tokens", "3"),
    ];
    assert_eq!(metered_lines(&answer["lines"]), first_figure, "{answer}");
    assert_eq!(answer["total"], "6.28", "{answer}");
    let rows = env.store.rating_errors_of("customer-3").await?;
    assert!(
        rows.iter()
            .any(|row| row.reason.contains("tokens_total") && row.reason.contains("below zero")),
        "{rows:?}"
    );

    // An event of the period arriving after the rater's figure is on the
    // invoice: the close aggregates the period again.
    let late = prompt(
        "p4",
        "customer-1",
        "2023-01-20T00:00:00Z",
        "1000000",
        "gpt4",
        "input",
    );
    let (status, body) = stack
        .post(&platform_key, "application/cloudevents+json", &late)
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    wait_for("customer-1", 10).await?;
    let lock = tempfile::tempdir()?;
    let invoicer = idlemeter_invoicer::Invoicer::new(
        env.store.clone(),
        idlemeter_tests::sheet_source(METERED_SHEET, "test.toml"),
        idlemeter_invoicer::InvoicerConfig {
            lock_file: lock.path().join("lock").display().to_string(),
            ..idlemeter_invoicer::InvoicerConfig::default()
        },
        idlemeter_tests::terms(idlemeter_core::Period::Month),
    )?
    .with_meters(&meters)?;
    let closed = invoicer
        .close_period(
            at(1, 0),
            Utc.with_ymd_and_hms(2023, 2, 2, 0, 0, 0).unwrap(),
            false,
            &|_, _| {},
        )
        .await?;
    let failed: Vec<&str> = closed
        .failed
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(failed, vec!["customer-3"], "{:?}", closed.failed);
    let issued: std::collections::BTreeMap<&str, &idlemeter_invoicer::Invoice> = closed
        .issued
        .iter()
        .map(|invoice| (invoice.customer.as_str(), invoice))
        .collect();
    let first = serde_json::to_value(&issued["customer-1"].lines)?;
    let mut expected = first_figure.clone();
    expected[4] = line("usage meter.tokens_total", "3", "1000000 tokens", "4.5");
    assert_eq!(metered_lines(&first), expected);
    assert_eq!(issued["customer-1"].total.to_string(), "7.78");
    let second = serde_json::to_value(&issued["customer-2"].lines)?;
    assert_eq!(
        metered_lines(&second),
        vec![line(
            "usage meter.tokens_total",
            "1",
            "1000000 tokens",
            "1.5"
        )]
    );
    assert_eq!(issued["customer-2"].total.to_string(), "1.50");
    for stop in stack.stop {
        let _ = stop.send(());
    }
    Ok(())
}
