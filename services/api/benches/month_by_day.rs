//! Latency of "usage and cost of one customer for a month, by day" through
//! the running API (HTTP, auth, JSON included), over the data that
//! `scripts/bench-api.sh` loads (>= 100M samples). Not a test: run
//! `make bench-api` (or the script), which loads the data and calls this.
//!
//! Prints p50/p90/p99/max of each call and of the pair (one after the other,
//! and at once), over ROUNDS rounds
//! (default 200) after 10 warm-up rounds, rotating over the 10 customers.

use std::time::{Duration, Instant};

use idlemeter_api::auth::generate;
use idlemeter_api::{Api, ApiConfig};
use idlemeter_core::CustomerId;
use idlemeter_store::{ClickHouseSettings, Store};

const SHEET: &str = r#"
[sheet]
platform = "bench"
currency = "USD"
line_rounding = "half_up"

[[versions]]
effective_from = 2020-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "1"
basis = "allocated"
increment_seconds = 1
idle = "billed"
"#;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(name: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<28} n={:<4} p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        times.len(),
        ms(percentile(&times, 50.0)),
        ms(percentile(&times, 90.0)),
        ms(percentile(&times, 99.0)),
        ms(*times.last().expect("measured"))
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let from: i64 = env("BENCH_FROM", "1790812800").parse()?;
    let days: i64 = env("BENCH_DAYS", "30").parse()?;
    let rounds: usize = env("ROUNDS", "200").parse()?;
    let store = Store::new(&ClickHouseSettings {
        url: env("IDLEMETER_CLICKHOUSE__URL", "http://127.0.0.1:18123"),
        database: env("IDLEMETER_CLICKHOUSE__DATABASE", "api_bench"),
        user: "default".to_owned(),
        password: String::new(),
    });
    let samples: u64 = store
        .client()
        .query("SELECT count() FROM usage_samples")
        .fetch_one()
        .await?;
    println!("database {}: {samples} samples stored", store.database());
    // An admin key, so one key rotates over every customer (the same
    // queries a customer key runs for its own tenant).
    let key = generate(None, "bench", 0);
    store.insert_api_key(&key.row).await?;
    let billing = idlemeter_api::Billing::new(
        idlemeter_store::SheetSource {
            sheet_text: SHEET,
            sheet_label: "bench.toml",
            policy: None,
        },
        idlemeter_core::BillingTerms::default(),
    )?;
    let config = ApiConfig {
        alert_interval_s: 0,
        rate_limit_per_s: 0,
        ..ApiConfig::default()
    };
    let api = Api::new(store.clone(), billing, config, &prometheus::Registry::new()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(api.serve(listener, std::future::pending()));
    let http = reqwest::Client::new();
    let time = |unix: i64| {
        chrono::DateTime::from_timestamp(unix, 0)
            .expect("valid")
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let range = format!(
        "from={}&to={}&window=day",
        time(from),
        time(from + days * 86_400)
    );
    let (mut usage, mut cost, mut pair, mut parallel) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds + 10 {
        let customer = CustomerId::parse(format!("bench-{}", round % 10))?;
        let started = Instant::now();
        let page: serde_json::Value = http
            .get(format!("{base}/v1/customers/{customer}/usage?{range}"))
            .bearer_auth(&key.key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let usage_done = Instant::now();
        let history: serde_json::Value = http
            .get(format!(
                "{base}/v1/customers/{customer}/cost/history?{range}"
            ))
            .bearer_auth(&key.key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let done = Instant::now();
        if round == 0 {
            // A measured answer must be a right one: 4 sandboxes, one window a
            // day, 2 vCPU all day (the epoch's first sample bills nothing).
            let sandboxes = page["sandboxes"].as_array().expect("sandboxes");
            assert_eq!(sandboxes.len(), 4, "{page}");
            let windows = sandboxes[0]["windows"].as_array().expect("windows");
            assert_eq!(windows.len() as i64, days);
            assert_eq!(
                windows[1]["usage"][0]["raw"].as_u64(),
                Some(86_400 * 2_000_000)
            );
            assert_eq!(
                history["windows"].as_array().map(Vec::len),
                Some(days as usize),
                "{history}"
            );
            println!(
                "answers checked: {} usage windows, {} cost windows; {} + {} bytes",
                sandboxes.len() * windows.len(),
                days,
                page.to_string().len(),
                history.to_string().len()
            );
        }
        // The same two calls at once, as a dashboard issues them.
        let both = Instant::now();
        let get = |path: String| {
            let request = http.get(format!("{base}{path}")).bearer_auth(&key.key);
            async move { request.send().await?.error_for_status()?.bytes().await }
        };
        let (a, b) = tokio::join!(
            get(format!("/v1/customers/{customer}/usage?{range}")),
            get(format!("/v1/customers/{customer}/cost/history?{range}"))
        );
        a?;
        b?;
        if round >= 10 {
            usage.push(usage_done - started);
            cost.push(done - usage_done);
            pair.push(done - started);
            parallel.push(both.elapsed());
        }
    }
    report("usage, month by day", usage);
    report("cost history, month by day", cost);
    report("both, one after the other", pair);
    report("both at once", parallel);
    Ok(())
}
