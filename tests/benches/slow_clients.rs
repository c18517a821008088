//! A normal client's latency while slow clients hold connections (finding
//! "slow clients hold the API" of the hardening review).
//!
//! The API runs here against the test ClickHouse; `HELD` (1,000) clients
//! open a connection each and send half a request's headers, then nothing;
//! meanwhile one normal client sends `REQUESTS` (500) `GET /v1/me` one after
//! another on a fresh connection each. The same is measured with no held
//! connections first, for the ratio. The header-read timeout is raised to
//! 60 s so the held connections stay held for the whole measurement.
//!
//! `make bench-slow-clients`. Not a test. Last line:
//! `bench: normal client p99 <x> ms with <N> half-open connections held (p50 <y> ms; p99 <z> ms with none)`.

use std::time::{Duration, Instant};

use idlemeter_api::auth::generate;
use idlemeter_tests::bench::{percentile, setting};
use idlemeter_tests::TestEnv;
use tokio::io::AsyncWriteExt;

const SHEET: &str = include_str!("../../prices/e2b.toml");

/// Milliseconds of `requests` sequential `GET /v1/me`, sorted.
async fn latencies(base: &str, key: &str, requests: usize) -> anyhow::Result<Vec<f64>> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let mut millis = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let response = client
            .get(format!("{base}/v1/me"))
            .bearer_auth(key)
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        response.bytes().await?;
        millis.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    millis.sort_by(f64::total_cmp);
    Ok(millis)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let held = setting("HELD", 1_000) as usize;
    let requests = setting("REQUESTS", 500) as usize;
    let env = TestEnv::new("slow_clients_bench").await?;
    let key = generate(None, "bench", 0);
    env.store.insert_api_key(&key.row).await?;
    let api = idlemeter_api::Api::new(
        env.store.clone(),
        idlemeter_api::Billing::new(
            idlemeter_tests::sheet_source(SHEET, "prices/e2b.toml"),
            idlemeter_core::BillingTerms::default(),
        )?,
        idlemeter_api::ApiConfig {
            alert_interval_s: 0,
            rate_limit_per_s: 0,
            header_read_timeout_ms: 60_000,
            ..idlemeter_api::ApiConfig::default()
        },
        &prometheus::Registry::new(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let base = format!("http://{address}");
    tokio::spawn(api.serve(listener, std::future::pending()));

    let quiet = latencies(&base, &key.key, requests).await?;
    println!(
        "bench: no held connections: p50 {:.2} ms, p99 {:.2} ms over {requests} requests",
        percentile(&quiet, 50.0),
        percentile(&quiet, 99.0)
    );

    let started = Instant::now();
    let mut slow = Vec::with_capacity(held);
    for index in 0..held {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /v1/me HTTP/1.1\r\nHost: bench\r\nAuthoriz")
            .await?;
        slow.push(stream);
        if (index + 1) % 250 == 0 {
            println!("bench: {} half-open connections held", index + 1);
        }
    }
    println!(
        "bench: {held} half-open connections opened in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let loaded = latencies(&base, &key.key, requests).await?;
    drop(slow);
    println!(
        "bench: normal client p99 {:.2} ms with {held} half-open connections held (p50 {:.2} ms; p99 {:.2} ms with none)",
        percentile(&loaded, 99.0),
        percentile(&loaded, 50.0),
        percentile(&quiet, 99.0)
    );
    Ok(())
}
