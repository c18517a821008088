//! The customer usage API, black box: a running API on a random port over the
//! real ClickHouse, with two tenants' usage rated by the real rater and
//! invoiced by the real invoicer. Happy paths, bad input, and every route
//! tried with another tenant's ids.

use std::sync::Arc;

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use idlemeter_api::auth::generate;
use idlemeter_api::{Api, ApiConfig};
use idlemeter_core::{CustomerId, UsageSample};
use idlemeter_invoicer::{Invoicer, InvoicerConfig};
use idlemeter_rater::{Period, Rater, RaterConfig};
use idlemeter_store::DecisionRow;
use idlemeter_tests::{counter_in, sample, TestEnv, SIMPLE_SHEET as SHEET};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::Value;

const ISSUER: &str = "api-test";

/// What the rater, the invoicer and the API bill under here: daily periods
/// (the rater rates every hour from a customer's first sample of its
/// current and previous period; daily ones keep that to a few hours).
fn terms() -> idlemeter_core::BillingTerms {
    idlemeter_core::BillingTerms {
        issuer: ISSUER.to_owned(),
        period: Period::Day,
        ..idlemeter_core::BillingTerms::default()
    }
}

/// Samples every 10 s for two hours from `start`: 2 vCPU allocated, so 20
/// vCPU-seconds a sample; 1 CPU-second used a sample.
fn two_hours(customer: &str, sandbox: &str, start: DateTime<Utc>) -> Vec<UsageSample> {
    (0..720u64)
        .map(|k| {
            let seq = k + 1;
            UsageSample {
                customer: CustomerId::parse(customer).expect("id"),
                vcpu_alloc_usec: seq * 20_000_000,
                ..sample(
                    sandbox,
                    1,
                    seq,
                    start + Duration::seconds(10 * k as i64),
                    seq * 1_000_000,
                    0,
                )
            }
        })
        .collect()
}

fn month_start(time: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(time.year(), time.month(), 1, 0, 0, 0)
        .single()
        .expect("valid")
}

struct Fixture {
    env: TestEnv,
    base: String,
    http: reqwest::Client,
    registry: prometheus::Registry,
    /// Customer keys of acme and globex, and an admin key.
    acme: String,
    globex: String,
    admin: String,
    /// 10:00 on the 5th of last month: where the usage is.
    day: DateTime<Utc>,
    globex_invoice: u64,
    acme_invoice: u64,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
    }
}

fn rfc(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Fixture {
    async fn start(name: &str, config: ApiConfig) -> anyhow::Result<Self> {
        let env = TestEnv::new(name).await?;
        let now = Utc::now();
        let this_month = month_start(now);
        let last_month = month_start(this_month - Duration::days(1));
        let day = last_month + Duration::days(4) + Duration::hours(10);
        let mut samples = two_hours("acme", "sb-a1", day);
        samples.extend(two_hours("acme", "sb-a2", day));
        samples.extend(two_hours("globex", "sb-g1", day));
        // The open period: acme's sb-a1 again (a new epoch), for cost so far
        // and the invoice preview.
        let open = (now - Duration::hours(2)).max(this_month);
        samples.extend(
            two_hours("acme", "sb-a1", open)
                .into_iter()
                .map(|s| UsageSample {
                    epoch: idlemeter_core::Epoch(2),
                    ..s
                }),
        );
        env.store_as_ingest(&samples).await?;

        // The rater rates every hour from a customer's first sample of its
        // current and previous period; daily periods keep that to a few hours
        // here (monthly ones would rate the rest of last month, ~80 s).
        let registry = prometheus::Registry::new();
        let rater = Rater::new(
            env.store.clone(),
            SHEET,
            RaterConfig {
                sheet: "test.toml".to_owned(),
                grace_seconds: 0,
                ..RaterConfig::default()
            },
            &registry,
        )?
        .with_terms(terms())?;
        rater.rate_closed_hours(day + Duration::hours(3)).await?;
        rater.rate_closed_hours(now).await?;
        let invoicer = || {
            Invoicer::new(
                env.store.clone(),
                idlemeter_tests::sheet_source(SHEET, "test.toml"),
                InvoicerConfig {
                    lock_file: std::env::temp_dir()
                        .join(format!("{}.lock", env.clickhouse.database))
                        .display()
                        .to_string(),
                    ..InvoicerConfig::default()
                },
                terms(),
            )
        };
        let outcome = invoicer()?
            .close_period(day - Duration::hours(10), now, false, &|_, _| {})
            .await?;
        let number_of = |customer: &str| {
            outcome
                .issued
                .iter()
                .find(|invoice| invoice.customer == customer)
                .map(|invoice| invoice.number)
                .expect("invoiced")
        };
        let (acme_invoice, globex_invoice) = (number_of("acme"), number_of("globex"));
        env.store
            .insert_decisions(&[DecisionRow {
                decision_id: "acme:sb-a1:1:idle_window:1".to_owned(),
                customer: "acme".to_owned(),
                sandbox: "sb-a1".to_owned(),
                node: "node-1".to_owned(),
                epoch: 1,
                at_ms: (day + Duration::hours(1)).timestamp_millis(),
                day: 0,
                rule: "idle_window".to_owned(),
                action: "suspend".to_owned(),
                attempt: 1,
                policy_version: "test/1".to_owned(),
                reason: "idle for 10 minutes".to_owned(),
                signals: r#"{"exec_sessions":0}"#.to_owned(),
                recorded_at: 1,
            }])
            .await?;

        let stamp = idlemeter_store::unix_seconds(now);
        let keys = [
            generate(Some(&CustomerId::parse("acme")?), "acme ci", stamp),
            generate(Some(&CustomerId::parse("globex")?), "globex ci", stamp),
            generate(None, "finance", stamp),
        ];
        for key in &keys {
            env.store.insert_api_key(&key.row).await?;
        }
        let billing = idlemeter_api::Billing::new(
            idlemeter_tests::sheet_source(SHEET, "test.toml"),
            terms(),
        )?;
        // With a ledger: the admin customer routes are exercised too.
        let api = Api::new(env.store.clone(), billing, config, &registry)
            .await?
            .with_ledger(env.ledger().await?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(api.serve(listener, async move {
            let _ = stopped.await;
        }));
        let [acme, globex, admin] = keys.map(|key| key.key);
        Ok(Self {
            env,
            base,
            http: reqwest::Client::new(),
            registry,
            acme,
            globex,
            admin,
            day,
            globex_invoice,
            acme_invoice,
            shutdown: Some(stop),
        })
    }

    async fn get(&self, key: &str, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await?;
        let status = response.status();
        let body = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        ))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        key: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let body = response.text().await?;
        Ok((
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        ))
    }
}

/// The key alert secrets are sealed with in these tests.
const TEST_SECRETS_KEY: &str = "5eca1ed05eca1ed05eca1ed05eca1ed05eca1ed05eca1ed05eca1ed05eca1ed0";

fn test_config() -> ApiConfig {
    ApiConfig {
        listen: "127.0.0.1:0".to_owned(),
        alert_interval_s: 0,
        alert_private_targets: true,
        rate_limit_per_s: 0,
        secrets_key: idlemeter_core::Secret::new(TEST_SECRETS_KEY),
        ..ApiConfig::default()
    }
}

/// The `raw` and `quantity` of `resource` in every window of `sandbox`.
fn usage_of(page: &Value, sandbox: &str, resource: &str) -> Vec<(u64, String)> {
    page["sandboxes"]
        .as_array()
        .expect("sandboxes")
        .iter()
        .filter(|s| s["sandbox"] == sandbox)
        .flat_map(|s| s["windows"].as_array().expect("windows").clone())
        .map(|w| {
            let usage = w["usage"]
                .as_array()
                .expect("usage")
                .iter()
                .find(|u| u["resource"] == resource)
                .expect("resource present")
                .clone();
            (
                usage["raw"].as_u64().expect("raw"),
                usage["quantity"].as_str().expect("quantity").to_owned(),
            )
        })
        .collect()
}

fn decimal(value: &Value) -> Decimal {
    value
        .as_str()
        .expect("decimal string")
        .parse()
        .expect("decimal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_answers_its_tenant_with_the_numbers_stored() -> anyhow::Result<()> {
    let f = Fixture::start("api_happy", test_config()).await?;
    let (from, to) = (rfc(f.day), rfc(f.day + Duration::hours(2)));

    let (status, me) = f.get(&f.acme, "/v1/me").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["role"].as_str(), me["customer"].as_str()),
        (Some("customer"), Some("acme"))
    );

    // Hours: the epoch's first sample bills nothing, so hour 10 is 359
    // intervals of 20 vCPU-s and hour 11 is 360.
    let (status, page) = f
        .get(
            &f.acme,
            &format!("/v1/customers/acme/usage?from={from}&to={to}&window=hour"),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(
        usage_of(&page, "sb-a1", "vcpu"),
        [
            (7_180_000_000, "7180".to_owned()),
            (7_200_000_000, "7200".to_owned())
        ]
    );
    assert_eq!(usage_of(&page, "sb-a2", "cpu").len(), 2);
    assert!(page["next_cursor"].is_null());
    // A day is the sum of its hours; minutes are 6 samples each.
    let (_, page) = f
        .get(&f.acme, &format!("/v1/customers/acme/usage?from={from}&to={to}&window=day&sandbox=sb-a1&resource=vcpu"))
        .await?;
    assert_eq!(
        usage_of(&page, "sb-a1", "vcpu"),
        [(14_380_000_000, "14380".to_owned())]
    );
    assert_eq!(page["sandboxes"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        page["sandboxes"][0]["windows"][0]["usage"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let minutes = (
        rfc(f.day + Duration::minutes(30)),
        rfc(f.day + Duration::minutes(33)),
    );
    let (_, page) = f
        .get(
            &f.acme,
            &format!(
                "/v1/customers/acme/usage?from={}&to={}&window=minute&sandbox=sb-a1",
                minutes.0, minutes.1
            ),
        )
        .await?;
    assert_eq!(
        usage_of(&page, "sb-a1", "vcpu")
            .iter()
            .map(|(raw, _)| *raw)
            .collect::<Vec<_>>(),
        [120_000_000; 3]
    );
    // Pages of one sandbox: sb-a1, then sb-a2, then the end.
    let (_, first) = f
        .get(
            &f.acme,
            &format!("/v1/customers/acme/usage?from={from}&to={to}&window=hour&limit=1"),
        )
        .await?;
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    assert_eq!(first["sandboxes"][0]["sandbox"], "sb-a1");
    let (_, second) = f
        .get(
            &f.acme,
            &format!(
                "/v1/customers/acme/usage?from={from}&to={to}&window=hour&limit=1&cursor={cursor}"
            ),
        )
        .await?;
    assert_eq!(second["sandboxes"][0]["sandbox"], "sb-a2");
    assert!(second["next_cursor"].is_null());

    // Cost by hour over last month adds up to the issued invoice (same
    // samples, same sheet, rated by the rater and by the invoicer).
    let month = month_start(f.day);
    let next_month = month_start(month + Duration::days(32));
    let (status, history) = f
        .get(
            &f.acme,
            &format!(
                "/v1/customers/acme/cost/history?from={}&to={}&window=day",
                rfc(month),
                rfc(next_month)
            ),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{history}");
    let windows = history["windows"].as_array().expect("windows");
    assert_eq!(windows.len(), 1, "only the 5th cost anything: {history}");
    let (_, invoice) = f
        .get(
            &f.acme,
            &format!("/v1/customers/acme/invoices/{}", f.acme_invoice),
        )
        .await?;
    assert_eq!(
        decimal(&history["totals"]["USD"]),
        decimal(&invoice["total"])
    );
    assert_eq!(decimal(&windows[0]["amount"]), decimal(&invoice["total"]));
    // 2 x 14380 vCPU-s at $1/vCPU-hour = $7.99 (7.98888..., one rounding).
    assert_eq!(decimal(&invoice["total"]), "7.99".parse::<Decimal>()?);
    let (_, hourly) = f
        .get(
            &f.acme,
            &format!("/v1/customers/acme/cost/history?from={from}&to={to}&window=hour"),
        )
        .await?;
    let hours: Vec<Decimal> = hourly["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .map(|w| decimal(&w["amount"]))
        .collect();
    assert_eq!(hours.len(), 2);
    assert_eq!(hours.iter().sum::<Decimal>(), "7.99".parse::<Decimal>()?);

    // Cost so far: the open period's latest snapshot, line by line. In the
    // first hour of a day (daily periods here) nothing of today is rated yet,
    // and the answer is zero, not yesterday's total.
    let (status, now) = f.get(&f.acme, "/v1/customers/acme/cost").await?;
    assert_eq!(status, StatusCode::OK, "{now}");
    let latest = f.env.store.latest_spend("acme").await?.expect("rated");
    let today = idlemeter_store::unix_seconds(Utc::now()) / 86_400 * 86_400;
    if latest.period_start == today {
        assert_eq!(decimal(&now["total"]), latest.total);
        let lines: Decimal = now["lines"]
            .as_array()
            .expect("lines")
            .iter()
            .map(|l| decimal(&l["amount"]))
            .sum();
        assert_eq!(lines, latest.total);
        assert!(latest.total > Decimal::ZERO);
    } else {
        assert_eq!(decimal(&now["total"]), Decimal::ZERO, "{now}");
        assert!(now["as_of"].is_null());
    }

    // Invoices: list, one as JSON and as CSV, and the open period's draft.
    let (_, list) = f.get(&f.acme, "/v1/customers/acme/invoices").await?;
    let numbers: Vec<u64> = list["invoices"]
        .as_array()
        .expect("list")
        .iter()
        .map(|i| i["number"].as_u64().expect("n"))
        .collect();
    assert_eq!(numbers, [f.acme_invoice]);
    let csv = f
        .http
        .get(format!(
            "{}/v1/customers/acme/invoices/{}?format=csv",
            f.base, f.acme_invoice
        ))
        .bearer_auth(&f.acme)
        .send()
        .await?;
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().await?;
    assert!(csv.starts_with("issuer,number,customer"), "{csv}");
    assert!(csv.contains(",acme,"), "{csv}");
    // The draft is the rater's newest figure of the open period: in the
    // first hour of a day none exists yet, and the answer says so.
    let (status, draft) = f.get(&f.acme, "/v1/customers/acme/invoice-preview").await?;
    if latest.period_start == today {
        assert_eq!(status, StatusCode::OK, "{draft}");
        assert_eq!(
            (draft["status"].as_str(), draft["customer"].as_str()),
            (Some("draft"), Some("acme"))
        );
        assert!(decimal(&draft["total"]) > Decimal::ZERO);
    } else {
        assert_eq!(status, StatusCode::NOT_FOUND, "{draft}");
        assert_eq!(draft["type"], "urn:idlemeter:problem:nothing-to-bill");
    }

    // Alerts: create, list, delete, gone.
    let body = serde_json::json!({"threshold": "5.50", "webhook_url": "http://127.0.0.1:9/hook"});
    let (status, alert) = f
        .send(
            reqwest::Method::POST,
            &f.acme,
            "/v1/customers/acme/alerts",
            Some(body),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{alert}");
    assert_eq!(alert["threshold"], "5.5");
    let id = alert["id"].as_str().expect("id").to_owned();
    let (_, alerts) = f.get(&f.acme, "/v1/customers/acme/alerts").await?;
    assert_eq!(alerts["alerts"][0]["id"], id.as_str());
    let path = format!("/v1/customers/acme/alerts/{id}");
    let (status, _) = f
        .send(reqwest::Method::DELETE, &f.acme, &path, None)
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = f
        .send(reqwest::Method::DELETE, &f.acme, &path, None)
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, alerts) = f.get(&f.acme, "/v1/customers/acme/alerts").await?;
    assert_eq!(alerts["alerts"].as_array().map(Vec::len), Some(0));

    // Sandboxes and their latest state; one with its policy decisions.
    let (_, list) = f.get(&f.acme, "/v1/customers/acme/sandboxes").await?;
    let names: Vec<&str> = list["sandboxes"]
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["sandbox"].as_str().expect("id"))
        .collect();
    assert_eq!(names, ["sb-a1", "sb-a2"]);
    assert_eq!(
        list["sandboxes"][0]["epoch"], 2,
        "sb-a1's latest sample is of its new epoch"
    );
    let (status, one) = f.get(&f.acme, "/v1/customers/acme/sandboxes/sb-a1").await?;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["state"], "running");
    assert_eq!(one["recent_decisions"][0]["action"], "suspend");
    assert_eq!(one["recent_decisions"][0]["signals"]["exec_sessions"], 0);

    // The admin key sees both tenants.
    let (status, list) = f.get(&f.admin, "/v1/customers/globex/sandboxes").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["sandboxes"][0]["sandbox"], "sb-g1");

    // The OpenAPI document and its page for people, without a key.
    let docs = f
        .http
        .get(format!("{}/docs", f.base))
        .send()
        .await?
        .text()
        .await?;
    assert!(docs.contains("/v1/customers/{customer}/usage"), "{docs}");
    assert!(docs.contains("<table>"), "parameters are listed");

    // Every request was counted by route and status.
    assert!(counter_in(&f.registry, "idlemeter_api_requests_total") >= 20);
    // By the route's whole pattern (customer routes are nested), never by
    // the path itself: one series per route, whatever the ids.
    let routes: Vec<String> = f
        .registry
        .gather()
        .iter()
        .filter(|family| family.name() == "idlemeter_api_requests_total")
        .flat_map(|family| family.get_metric().iter())
        .flat_map(|metric| metric.get_label().iter())
        .filter(|label| label.name() == "route")
        .map(|label| label.value().to_owned())
        .collect();
    assert!(
        routes
            .iter()
            .any(|route| route == "/v1/customers/{customer}/usage"),
        "{routes:?}"
    );
    assert!(
        !routes.iter().any(|route| route.contains("acme")),
        "{routes:?}"
    );
    Ok(())
}

async fn problem(f: &Fixture, key: &str, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let response = f
        .http
        .get(format!("{}{path}", f.base))
        .bearer_auth(key)
        .send()
        .await?;
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{path}"
    );
    let body: Value = response.json().await?;
    assert_eq!(
        body["status"].as_u64(),
        Some(u64::from(status.as_u16())),
        "{body}"
    );
    Ok((
        status,
        body["detail"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_bad_keys_get_problems_that_say_what_was_wrong() -> anyhow::Result<()> {
    let f = Fixture::start("api_bad", test_config()).await?;
    let usage = "/v1/customers/acme/usage";
    let (from, to) = (rfc(f.day), rfc(f.day + Duration::hours(2)));
    let cases = [
        (
            format!("{usage}?from={to}&to={from}&window=hour"),
            "must be before",
        ),
        (
            format!("{usage}?from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&window=minute"),
            "more than the limit",
        ),
        (
            format!("{usage}?from={from}&to={to}&window=hour&limit=0"),
            "limit 0 is out of range",
        ),
        (
            format!("{usage}?from={from}&to={to}&window=hour&cursor=zz"),
            "cursor",
        ),
        (
            format!("{usage}?from=yesterday&to={to}&window=hour"),
            "from",
        ),
        (
            format!("{usage}?from={from}&to={to}&window=fortnight"),
            "window",
        ),
        (format!("{usage}?from={from}&to={to}"), "window"),
        (
            format!("/v1/customers/acme/cost/history?from={from}&to={to}&window=minute"),
            "rated per hour",
        ),
        ("/v1/customers/acme/invoices/abc".to_owned(), "path"),
        (
            "/v1/customers/acme/sandboxes/sb-a1?decisions=101".to_owned(),
            "decisions 101",
        ),
    ];
    for (path, expected) in &cases {
        let (status, detail) = problem(&f, &f.acme, path).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {detail}");
        assert!(
            detail.contains(expected),
            "{path}: {detail:?} should say {expected:?}"
        );
    }

    // Keys: none, malformed, unknown, and revoked.
    let response = f.http.get(format!("{}/v1/me", f.base)).send().await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("www-authenticate"));
    for key in [
        "nonsense",
        "imk_0000_1111",
        &f.acme.replace("imk_", "imk_0"),
    ] {
        let (status, _) = problem(&f, key, "/v1/me").await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key}");
    }
    let (status, created) = f
        .send(
            reqwest::Method::POST,
            &f.admin,
            "/v1/keys",
            Some(serde_json::json!({"customer": "acme", "name": "temp"})),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let temp = created["key"].as_str().expect("key").to_owned();
    assert_eq!(f.get(&temp, "/v1/me").await?.0, StatusCode::OK);
    let path = format!("/v1/keys/{}", created["key_id"].as_str().expect("id"));
    assert_eq!(
        f.send(reqwest::Method::DELETE, &f.admin, &path, None)
            .await?
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(f.get(&temp, "/v1/me").await?.0, StatusCode::UNAUTHORIZED);
    // A customer key cannot create keys, and cannot tell the route exists.
    let (status, _) = f
        .send(
            reqwest::Method::POST,
            &f.acme,
            "/v1/keys",
            Some(serde_json::json!({"customer": "globex"})),
        )
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Alerts: bad threshold, bad URL, unknown field, not JSON.
    let alerts = format!("{}/v1/customers/acme/alerts", f.base);
    for (body, expected) in [
        (
            r#"{"threshold": "lots", "webhook_url": "http://a/b"}"#,
            "not a decimal",
        ),
        (
            r#"{"threshold": "-1", "webhook_url": "http://a/b"}"#,
            "above 0",
        ),
        (
            r#"{"threshold": "1", "webhook_url": "ftp://a/b"}"#,
            "http://",
        ),
        (
            r#"{"threshold": "1", "webhook_url": "http://a/b", "extra": 1}"#,
            "unknown field",
        ),
        (r#"{"threshold": 1"#, "body"),
    ] {
        let response = f
            .http
            .post(&alerts)
            .bearer_auth(&f.acme)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let problem: Value = response.json().await?;
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(expected),
            "{body}: {detail:?} should say {expected:?}"
        );
    }
    let response = f
        .http
        .post(&alerts)
        .bearer_auth(&f.acme)
        .body("{}")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_limit_is_told_when_to_retry() -> anyhow::Result<()> {
    let f = Fixture::start(
        "api_rate",
        ApiConfig {
            rate_limit_per_s: 1,
            rate_limit_burst: 2,
            ..test_config()
        },
    )
    .await?;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let response = f
            .http
            .get(format!("{}/v1/me", f.base))
            .bearer_auth(&f.acme)
            .send()
            .await?;
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = response.headers().get("retry-after").cloned();
        }
    }
    assert_eq!(&statuses[..2], [StatusCode::OK, StatusCode::OK]);
    assert!(
        statuses[2..].contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    assert_eq!(retry_after.expect("Retry-After"), "1");
    // Another key has its own bucket.
    assert_eq!(f.get(&f.globex, "/v1/me").await?.0, StatusCode::OK);
    Ok(())
}

/// Every templated route of the OpenAPI document, with `{param}` filled from `ids`.
fn routes(doc: &Value, ids: &[(&str, String)]) -> Vec<(reqwest::Method, String)> {
    let mut out = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            let mut path = template.clone();
            for (name, value) in ids {
                path = path.replace(&format!("{{{name}}}"), value);
            }
            let method = method.to_uppercase().parse().expect("method");
            out.push((method, path));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_shows_one_tenant_anything_of_another() -> anyhow::Result<()> {
    let f = Fixture::start("api_tenancy", test_config()).await?;
    let body = serde_json::json!({"threshold": "1234.5678", "webhook_url": "http://127.0.0.1:9/globex-private-hook"});
    let (_, globex_alert) = f
        .send(
            reqwest::Method::POST,
            &f.globex,
            "/v1/customers/globex/alerts",
            Some(body.clone()),
        )
        .await?;
    let body = serde_json::json!({"threshold": "1", "webhook_url": "http://127.0.0.1:9/hook"});
    let globex_alert = globex_alert["id"].as_str().expect("id").to_owned();
    let doc: Value = f
        .http
        .get(format!("{}/openapi.json", f.base))
        .send()
        .await?
        .json()
        .await?;
    let query = format!(
        "?from={}&to={}&window=hour",
        rfc(f.day),
        rfc(f.day + Duration::hours(2))
    );
    let globex_ids = |customer: &str| {
        vec![
            ("customer", customer.to_owned()),
            ("sandbox", "sb-g1".to_owned()),
            ("number", f.globex_invoice.to_string()),
            ("alert_id", globex_alert.clone()),
            ("key_id", "0000000000000000".to_owned()),
        ]
    };
    let mut tried = 0;
    let mut leaks = Vec::new();
    // acme's key on globex's ids, under globex and under acme's own name; an
    // absent tenant ("nobody") must answer the same as globex.
    for customer in ["globex", "acme", "nobody"] {
        for (method, path) in routes(&doc, &globex_ids(customer)) {
            // No tenant in these routes: /v1/me answers the caller; events
            // refuse customer keys (403; their tenancy is in events.rs) and
            // the meter list is the platform's definitions.
            if path == "/v1/me"
                || path == "/api/v1/events"
                || path == "/api/v1/meters"
                || (customer == "acme"
                    && !path.contains("sb-g1")
                    && !path.contains(&globex_alert)
                    && !path.contains(&format!("/invoices/{}", f.globex_invoice)))
            {
                continue; // acme's own data, or no tenant in the route
            }
            let url = format!("{}{path}{query}", f.base);
            let mut request = f.http.request(method.clone(), &url).bearer_auth(&f.acme);
            if method == reqwest::Method::POST {
                request = request.json(&body);
            }
            let response = request.send().await?;
            tried += 1;
            let status = response.status();
            let text = response.text().await?;
            // A 404 problem may echo the ids asked for, nothing else of globex's.
            let problem: Value = serde_json::from_str(&text).unwrap_or_default();
            let shows_globex = [
                "globex-private-hook",
                "1234.5678",
                "globex ci",
                "first_seen",
            ]
            .iter()
            .any(|marker| text.contains(marker));
            if status != StatusCode::NOT_FOUND
                || problem["type"] != "urn:idlemeter:problem:not-found"
                || shows_globex
            {
                leaks.push(format!("{method} {path} -> {status} {text}"));
            }
        }
    }
    assert!(tried >= 20, "only {tried} requests tried");
    assert!(
        leaks.is_empty(),
        "{} of {tried} requests leaked:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
    // An absent tenant and a foreign one are answered identically.
    let foreign = f.get(&f.acme, "/v1/customers/globex/sandboxes").await?;
    let absent = f.get(&f.acme, "/v1/customers/nobody/sandboxes").await?;
    assert_eq!(foreign.0, absent.0);
    assert_eq!(
        foreign.1.to_string().replace("globex", "X"),
        absent.1.to_string().replace("nobody", "X")
    );
    // globex's alert survived acme's DELETE attempts.
    let (_, alerts) = f.get(&f.globex, "/v1/customers/globex/alerts").await?;
    assert_eq!(alerts["alerts"][0]["id"], globex_alert.as_str());
    println!("{tried} cross-tenant requests, 0 leaks");
    Ok(())
}

/// (signature header, delivery id header, body) of one webhook received.
type Delivery = (String, String, Vec<u8>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_alert_fires_once_per_period_with_a_signed_webhook() -> anyhow::Result<()> {
    let f = Fixture::start("api_alerts", test_config()).await?;
    // A receiver that records what it was sent.
    let received: Arc<tokio::sync::Mutex<Vec<Delivery>>> = Arc::default();
    let sink = received.clone();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    sink.lock().await.push((
                        header("idlemeter-signature"),
                        header("idlemeter-delivery"),
                        body.to_vec(),
                    ));
                    axum::http::StatusCode::NO_CONTENT
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let (_, spend) = f.env.store.period_spend("acme").await?.expect("rated");
    assert!(spend > Decimal::ZERO);
    let create =
        |threshold: String| serde_json::json!({"threshold": threshold, "webhook_url": hook});
    let (status, low) = f
        .send(
            reqwest::Method::POST,
            &f.acme,
            "/v1/customers/acme/alerts",
            Some(create(spend.to_string())),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{low}");
    let (_, _high) = f
        .send(
            reqwest::Method::POST,
            &f.acme,
            "/v1/customers/acme/alerts",
            Some(create((spend + Decimal::ONE).to_string())),
        )
        .await?;

    // Evaluated as of the latest rated period (the fixture rates daily
    // periods; in the first hour of a day today has no rated hour yet).
    let latest = f.env.store.latest_spend("acme").await?.expect("rated");
    let as_of = idlemeter_api::views::time(latest.period_start) + Duration::minutes(30);
    let delivery = idlemeter_api::alerts::AlertDelivery::new(
        f.env.store.clone(),
        Period::Day,
        true, // the receiver is on loopback
        idlemeter_api::sealed::Sealer::from_key(&idlemeter_core::Secret::new(TEST_SECRETS_KEY))?,
        std::time::Duration::from_secs(1),
        &f.registry,
    );
    assert_eq!(
        delivery.check_once(as_of).await?,
        1,
        "the alert at the spend fires, the one above does not"
    );
    assert_eq!(delivery.check_once(as_of).await?, 0, "once per period");
    // The next period starts from nothing: last period's spend does not fire.
    assert_eq!(delivery.check_once(as_of + Duration::days(1)).await?, 0);
    let got = received.lock().await.clone();
    assert_eq!(got.len(), 1);
    let (signature, delivery_id, body) = &got[0];
    // Signed with the alert's own secret, shown once when it was created.
    let secret = low["webhook_secret"].as_str().expect("secret shown once");
    idlemeter_webhook::verify(
        secret.as_bytes(),
        signature,
        body,
        Utc::now().timestamp(),
        300,
    )?;
    let (_, list) = f.get(&f.acme, "/v1/customers/acme/alerts").await?;
    assert!(
        !list.to_string().contains(secret),
        "the secret is not listed"
    );
    // Finding "secrets": the table holds the secret sealed, not in plain text.
    let stored = f.env.store.spend_alerts(Some("acme")).await?;
    assert!(!stored.is_empty());
    for row in &stored {
        assert!(
            row.webhook_secret.starts_with("sealed1:"),
            "{}",
            row.webhook_secret
        );
        assert!(!row.webhook_secret.contains(&secret["whsec_".len()..]));
    }
    let notice: Value = serde_json::from_slice(body)?;
    assert_eq!(notice["alert_id"], low["id"]);
    assert_eq!(decimal(&notice["spend"]), spend);
    assert!(delivery_id.starts_with(low["id"].as_str().expect("id")));
    Ok(())
}

fn schemathesis() -> std::path::PathBuf {
    std::env::var_os("IDLEMETER_SCHEMATHESIS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            std::path::PathBuf::from(home)
                .join(".cache/idlemeter/schemathesis-venv/bin/schemathesis")
        })
}

/// Findings "slow clients hold the API" and "fail-open revocation" (the
/// public pages and finance links): a half-open connection is closed after
/// the header timeout, connections past the limit are refused, anonymous
/// pages are rate-limited, and a finance link dies with its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_anonymous_pages_and_finance_links_are_bounded() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MAX_CONNECTIONS: usize = 6;
    let f = Fixture::start(
        "api_hardening",
        ApiConfig {
            header_read_timeout_ms: 1_000,
            max_connections: MAX_CONNECTIONS as u32,
            public_rate_limit_per_s: 1,
            ..test_config()
        },
    )
    .await?;

    // A finance link made by a key works while that key does.
    let (status, created) = f
        .send(
            reqwest::Method::POST,
            &f.admin,
            "/v1/keys",
            Some(serde_json::json!({"name": "finance temp"})),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let temp = created["key"].as_str().expect("key").to_owned();
    let (status, link) = f
        .send(reqwest::Method::POST, &temp, "/v1/finance/link", None)
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{link}");
    let page = format!("{}{}", f.base, link["url"].as_str().expect("url"));
    assert_eq!(f.http.get(&page).send().await?.status(), StatusCode::OK);
    let path = format!("/v1/keys/{}", created["key_id"].as_str().expect("id"));
    assert_eq!(
        f.send(reqwest::Method::DELETE, &f.admin, &path, None)
            .await?
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        f.http.get(&page).send().await?.status(),
        StatusCode::UNAUTHORIZED,
        "the link died with its key"
    );

    // Anonymous pages share one bucket (1 a second, burst 2).
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            f.http
                .get(format!("{}/openapi.json", f.base))
                .send()
                .await?
                .status(),
        );
    }
    assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );

    // Pooled keep-alive connections idle past the header timeout are closed.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let address = f.base.trim_start_matches("http://").to_owned();

    // Half-open: headers never finished. Closed after the timeout.
    let mut slow = tokio::net::TcpStream::connect(&address).await?;
    slow.write_all(b"GET /docs HTTP/1.1\r\nHost: x\r\n").await?;
    let mut buffer = [0u8; 512];
    let read = tokio::time::timeout(std::time::Duration::from_secs(15), slow.read(&mut buffer))
        .await
        .map_err(|_| anyhow::anyhow!("a half-open connection was still open after 15 s"))?;
    if let Ok(n) = read {
        // Closed (0), or told so before closing; never answered the page.
        let answer = String::from_utf8_lossy(&buffer[..n]);
        assert!(!answer.contains("200 OK"), "{answer}");
        if n > 0 {
            let rest =
                tokio::time::timeout(std::time::Duration::from_secs(5), slow.read(&mut buffer))
                    .await?;
            assert!(matches!(rest, Ok(0) | Err(_)), "then closed");
        }
    }

    // Past the limit, a new connection is answered 503 and closed.
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(&address).await?);
    }
    let mut extra = tokio::net::TcpStream::connect(&address).await?;
    let n =
        tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut buffer)).await??;
    let answer = String::from_utf8_lossy(&buffer[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    drop(held);
    Ok(())
}

/// schemathesis (PyPI, pinned in the Makefile) generates requests from
/// /openapi.json, valid and invalid, against the running API with an admin
/// key (so generated tenant ids reach the queries): no 5xx, and every
/// response matches its documented schema and content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_survives_fuzzing() -> anyhow::Result<()> {
    let binary = schemathesis();
    assert!(
        binary.exists(),
        "{} is missing: run `make schemathesis-venv` or set IDLEMETER_SCHEMATHESIS",
        binary.display()
    );
    let f = Fixture::start("api_fuzz", test_config()).await?;
    let work = tempfile::tempdir()?;
    // No cache: a run must not replay an earlier run's failures. Dictionaries
    // steer most generated ids and ranges to data that exists, so the
    // queries behind the 200s are fuzzed too, not only the 404s.
    let config = format!(
        r#"[cache]
enabled = false

[dictionaries.tenants]
values = ["acme", "globex"]
[dictionaries.sandboxes]
values = ["sb-a1", "sb-a2", "sb-g1"]
[dictionaries.invoices]
values = [{acme}, {globex}]
[dictionaries.froms]
values = ["{from}"]
[dictionaries.tos]
values = ["{to}"]

[parameters]
"path.customer" = {{ dictionary = "tenants", probability = 0.7 }}
"path.sandbox" = {{ dictionary = "sandboxes", probability = 0.7 }}
"path.number" = {{ dictionary = "invoices", probability = 0.7 }}
"query.from" = {{ dictionary = "froms", probability = 0.5 }}
"query.to" = {{ dictionary = "tos", probability = 0.5 }}
"#,
        acme = f.acme_invoice,
        globex = f.globex_invoice,
        from = rfc(f.day),
        to = rfc(f.day + Duration::hours(2)),
    );
    std::fs::write(work.path().join("st.toml"), config)?;
    let junit =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/schemathesis-junit.xml");
    let mut command = std::process::Command::new(&binary);
    command
        .current_dir(work.path())
        .env(
            "HYPOTHESIS_STORAGE_DIRECTORY",
            work.path().join("hypothesis"),
        )
        .arg("--config-file")
        .arg("st.toml")
        .arg("run")
        .arg(format!("{}/openapi.json", f.base))
        .args(["--url", &f.base])
        .args(["-H", &format!("Authorization: Bearer {}", f.admin)])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args([
            "--max-examples",
            "25",
            "--seed",
            "42",
            "--generation-database",
            "none",
        ])
        .args(["--workers", "1", "--no-color"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&junit);
    // The API keeps serving on the runtime's workers meanwhile.
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found problems (report: {}):\n{stdout}\n{}",
        junit.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
