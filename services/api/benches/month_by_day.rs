//! Latency of "usage and cost of one customer for a month, by day" through
//! the running API (HTTP, auth, JSON included), over the data that
//! `scripts/bench-api.sh` loads (>= 100M samples). Not a test: run
//! `make bench-api` (or the script), which loads the data and calls this.
//!
//! Prints p50/p90/p99/max of each call and of the pair (one after the other,
//! and at once), over ROUNDS rounds
//! (default 200) after 10 warm-up rounds, rotating over the 10 customers.
//!
//! Then the invoice preview (issue "One bill everywhere"): with the API's
//! clock at the month's last hour and each customer's live figure of the
//! month stored (as the rater writes it: its usage lines, here 4 sandboxes x
//! 2 vCPU all month), ROUNDS previews rotating over the customers, with the
//! process's resident memory before and after; then one tenant's thousand
//! previews at once while another tenant asks 100 in a row, for the other
//! tenant's p99. Last line: `preview: p99 <x> ms (target 50 ms: met|missed),
//! memory <flat|grew> ...`.

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
        password: Default::default(),
        cluster: None,
        max_replica_delay_s: idlemeter_store::DEFAULT_MAX_REPLICA_DELAY_S,
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
    let sheet = idlemeter_core::PriceSheet::from_toml(SHEET, "bench.toml")?;
    let month_end = from + days * 86_400;
    let asked_at = chrono::DateTime::from_timestamp(month_end - 1, 0).expect("valid");
    let api = Api::new(store.clone(), billing, config, &prometheus::Registry::new())
        .await?
        .with_clock(std::sync::Arc::new(move || asked_at));
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

    // The preview: each customer's live figure at the month's last second.
    let checksum = idlemeter_store::ratings_checksum(SHEET, None);
    let version = sheet.versions()[0].effective_from.to_rfc3339();
    let vcpu_usec = |seconds: i64| (4 * 2 * seconds as u128) * 1_000_000;
    let figures: Vec<idlemeter_store::RatedLineRow> = (0..10)
        .map(|c| idlemeter_store::RatedLineRow {
            customer: format!("bench-{c}"),
            period_start: from as u32,
            // Newer than the loaded final snapshots (so it is the figure
            // read), still of October.
            as_of: (month_end + 1) as u32,
            sheet: "bench.toml".to_owned(),
            sheet_checksum: checksum.clone(),
            idle_policy: "session-or-connection/v2".to_owned(),
            currency: "USD".to_owned(),
            line_no: 0,
            kind: "usage".to_owned(),
            resource: "vcpu".to_owned(),
            price_version: version.clone(),
            quantity: 0,
            quantity_base: vcpu_usec(days * 86_400).to_string(),
            unit: "vcpu-hour".to_owned(),
            unit_price: 0,
            amount: 0,
            rated_at: (month_end + 1) as u32,
        })
        .collect();
    store.insert_live_lines(&figures).await?;
    let rss = || -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            >> 10
    };
    let mut previews = Vec::new();
    let mut rss_warm = 0;
    for round in 0..rounds + 10 {
        let customer = format!("bench-{}", round % 10);
        let started = Instant::now();
        let draft: serde_json::Value = http
            .get(format!("{base}/v1/customers/{customer}/invoice-preview"))
            .bearer_auth(&key.key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let took = started.elapsed();
        if round == 0 {
            // 8 vCPU all month at $1 a vCPU-hour.
            let expected =
                rust_decimal::Decimal::from_i128_with_scale(vcpu_usec(days * 86_400) as i128, 0)
                    / rust_decimal::Decimal::from(3_600_000_000u64);
            let subtotal: rust_decimal::Decimal =
                draft["subtotal"].as_str().expect("subtotal").parse()?;
            assert_eq!(subtotal, expected.round_dp(2), "{draft}");
        }
        if round == 9 {
            rss_warm = rss();
        }
        if round >= 10 {
            previews.push(took);
        }
    }
    let rss_after = rss();
    previews.sort();
    let p99 = percentile(&previews, 99.0);
    report("invoice preview", previews);

    // One tenant's thousand previews at once; another tenant meanwhile.
    let noisy = generate(Some(&CustomerId::parse("bench-0")?), "noisy", 0);
    let quiet = generate(Some(&CustomerId::parse("bench-1")?), "quiet", 0);
    store.insert_api_key(&noisy.row).await?;
    store.insert_api_key(&quiet.row).await?;
    tokio::time::sleep(Duration::from_secs(6)).await; // the key cache reloads
    let burst = (0..1_000).map(|_| {
        let request = http
            .get(format!("{base}/v1/customers/bench-0/invoice-preview"))
            .bearer_auth(&noisy.key);
        tokio::spawn(async move { request.send().await.map(|response| response.status()) })
    });
    let burst = futures::future::join_all(burst);
    let other = async {
        let mut times = Vec::new();
        for _ in 0..100 {
            let started = Instant::now();
            http.get(format!("{base}/v1/customers/bench-1/invoice-preview"))
                .bearer_auth(&quiet.key)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            times.push(started.elapsed());
        }
        Ok::<_, anyhow::Error>(times)
    };
    let (statuses, other) = tokio::join!(burst, other);
    let mut other = other?;
    other.sort();
    let answered = statuses
        .iter()
        .filter(|status| matches!(status, Ok(Ok(code)) if code.is_success()))
        .count();
    let refused = statuses
        .iter()
        .filter(|status| matches!(status, Ok(Ok(code)) if code.as_u16() == 429))
        .count();
    println!(
        "burst: 1000 previews of one tenant at once: {answered} answered, {refused} refused (429)"
    );
    let other_p99 = percentile(&other, 99.0);
    report("another tenant, meanwhile", other);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "preview: p99 {:.2} ms (target 50 ms: {}), memory {} ({} MiB after warm-up, {} MiB after {rounds} previews), another tenant's p99 during a 1000-preview burst {:.2} ms",
        ms(p99),
        if ms(p99) <= 50.0 { "met" } else { "missed" },
        if rss_after <= rss_warm + 8 { "flat" } else { "grew" },
        rss_warm,
        rss_after,
        ms(other_p99),
    );
    Ok(())
}
