//! Finance dashboards: every panel's SQL (dashboards/panels.toml) against
//! ClickHouse 18.16 with fixture data whose answers are known
//! (dashboards/fixture/; the same fixture is checked on current ClickHouse by
//! tests/chdb/check_dashboards.py), the Grafana JSON generated from the same
//! panels, and the built-in page loaded in headless Chromium.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use idlemeter_api::auth::generate;
use idlemeter_api::{finance, Api, ApiConfig};
use idlemeter_tests::{TestEnv, SIMPLE_SHEET};
use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn expected() -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(format!("{ROOT}/dashboards/fixture/expected.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn unix(value: &Value) -> anyhow::Result<u32> {
    let time: DateTime<Utc> = value.as_str().unwrap_or_default().parse()?;
    Ok(u32::try_from(time.timestamp())?)
}

/// A migrated database holding the fixture.
async fn fixture_env(name: &str) -> anyhow::Result<TestEnv> {
    let env = TestEnv::new(name).await?;
    let sql = std::fs::read_to_string(format!("{ROOT}/dashboards/fixture/fixture.sql"))?;
    let text: Vec<&str> = sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect();
    for statement in text.join("\n").split(";\n") {
        let statement = statement.trim().trim_end_matches(';');
        if !statement.is_empty() {
            env.store.client().query(statement).execute().await?;
        }
    }
    // The minute rows ingest would have written (migration 0010's backfill).
    env.store
        .client()
        .query(idlemeter_store::minutes_from_samples_sql())
        .execute()
        .await?;
    Ok(env)
}

fn same(got: &str, want: &str) -> bool {
    got == want
        || match (got.parse::<f64>(), want.parse::<f64>()) {
            (Ok(g), Ok(w)) => (g - w).abs() <= 1e-9 * w.abs().max(1.0),
            _ => false,
        }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_gives_the_fixtures_known_answers() -> anyhow::Result<()> {
    let env = fixture_env("dash_panels").await?;
    let expected = expected()?;
    let (from, to) = (unix(&expected["from"])?, unix(&expected["to"])?);
    let panels = finance::panels();
    let mut failures = Vec::new();
    for panel in &panels {
        let data = finance::run(&env.store, panel, from, to, 1).await?;
        let want: Vec<Vec<String>> = serde_json::from_value(expected["panels"][&panel.id].clone())
            .map_err(|error| {
                anyhow::anyhow!(
                    "expected.json has no answer for panel {}: {error}",
                    panel.id
                )
            })?;
        let matches =
            data.rows.len() == want.len()
                && data.rows.iter().zip(&want).all(|(row, w)| {
                    row.len() == w.len() && row.iter().zip(w).all(|(g, x)| same(g, x))
                });
        if !matches {
            failures.push(format!(
                "{}: got {:?}, expected {want:?}",
                panel.id, data.rows
            ));
        }
        assert!(!data.columns.is_empty(), "{}: no column names", panel.id);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        expected["panels"].as_object().map(|p| p.len()),
        Some(panels.len()),
        "every panel has an expected answer and every answer a panel"
    );
    Ok(())
}

#[test]
fn the_grafana_dashboard_is_generated_from_the_panels() -> anyhow::Result<()> {
    let path = format!("{ROOT}/dashboards/finance.json");
    let generated = serde_json::to_string_pretty(&finance::grafana_dashboard())? + "\n";
    if std::env::var_os("UPDATE_DASHBOARDS").is_some() {
        std::fs::write(&path, &generated)?;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "dashboards/finance.json is not what dashboards/panels.toml generates; \
         run `UPDATE_DASHBOARDS=1 cargo test -p idlemeter-tests --test dashboards grafana` and commit it"
    );
    for panel in finance::panels() {
        assert!(committed.contains(&panel.title), "{} missing", panel.id);
    }
    Ok(())
}

fn chromium() -> PathBuf {
    std::env::var_os("IDLEMETER_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

fn headless(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let output = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .args(args)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finance_page_renders_every_chart_with_data_in_chromium() -> anyhow::Result<()> {
    assert!(
        chromium().exists(),
        "{} is missing: `make chromium` (Debian's chromium package) or set IDLEMETER_CHROMIUM",
        chromium().display()
    );
    let env = fixture_env("dash_page").await?;
    let admin = generate(None, "finance", 0);
    env.store.insert_api_key(&admin.row).await?;
    let billing = idlemeter_api::Billing::new(
        idlemeter_tests::sheet_source(SIMPLE_SHEET, "t.toml"),
        idlemeter_core::BillingTerms::default(),
    )?;
    let config = ApiConfig {
        alert_interval_s: 0,
        ..ApiConfig::default()
    };
    let api = Api::new(
        env.store.clone(),
        billing,
        config,
        &prometheus::Registry::new(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(api.serve(listener, std::future::pending()));
    let http = reqwest::Client::new();

    // Without a link the page is closed; a customer key cannot get one.
    assert_eq!(
        http.get(format!("{base}/finance")).send().await?.status(),
        401
    );
    let link: Value = http
        .post(format!("{base}/v1/finance/link"))
        .bearer_auth(&admin.key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let expected = expected()?;
    let url = format!(
        "{base}{}&from={}&to={}",
        link["url"].as_str().unwrap_or_default(),
        expected["from"].as_str().unwrap_or_default(),
        expected["to"].as_str().unwrap_or_default()
    );
    // The same numbers over the API, for finance's scripts.
    let panels: Value = http
        .get(format!(
            "{base}/v1/finance/panels?from={}&to={}",
            expected["from"].as_str().unwrap_or_default(),
            expected["to"].as_str().unwrap_or_default()
        ))
        .bearer_auth(&admin.key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(panels[0]["rows"][0][0], "2026-10-01 00:00:00");

    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || headless(&["--dump-dom", &url])
    })
    .await??;
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    assert!(
        !dom.contains("no data in this range"),
        "a panel is empty:\n{dom}"
    );
    for panel in finance::panels() {
        let start = dom
            .find(&format!("id=\"{}\"", panel.id))
            .unwrap_or_else(|| panic!("panel {} is not on the page", panel.id));
        let section = &dom[start..start + dom[start..].find("</section>").unwrap_or(0)];
        let rows = expected["panels"][&panel.id]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0);
        match panel.chart {
            finance::Chart::Stat => assert!(section.contains("class=\"stat\""), "{}", panel.id),
            _ => {
                let bars = section.matches("class=\"bar\"").count();
                assert!(bars >= rows, "{}: {bars} bars for {rows} rows", panel.id);
            }
        }
    }
    assert!(
        dom.contains("data-value=\"9"),
        "revenue of 2026-10-01 drawn"
    );

    let shot = Path::new(ROOT).join("target/finance-page.png");
    std::fs::create_dir_all(shot.parent().expect("parent"))?;
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || headless(&[&arg, "--window-size=1400,1700", &url]))
        .await??;
    let size = std::fs::metadata(&shot)?.len();
    assert!(
        size > 10_000,
        "screenshot {} is only {size} bytes",
        shot.display()
    );
    println!("screenshot: {}", shot.display());
    Ok(())
}
