//! Operations: the shipped alert rules pass `promtool test rules`, a real
//! Prometheus (Debian's package) scrapes every service started as the
//! `idlemeter` binary, every metric the rules and the operations dashboard
//! query is one the services expose, no rule fires on a healthy stack, and
//! `/health` reports real readiness.
//!
//! Needs `prometheus` and `promtool` on PATH (`make test` installs Debian's
//! `prometheus` package), or `IDLEMETER_PROMETHEUS` / `IDLEMETER_PROMTOOL`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use idlemeter_tests::collector::{idlemeter_binary, TestCgroups};
use idlemeter_tests::TestEnv;
use serde_json::Value;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .with_context(|| {
            format!("{name} not found on PATH nor in {env}: install Debian's `prometheus` package (make test does)")
        })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Metric names a PromQL text refers to (`idlemeter_*` and `up`).
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut start = 0;
    while let Some(found) = promql[start..].find("idlemeter_") {
        let begin = start + found;
        let preceded_by_word =
            begin > 0 && (bytes[begin - 1].is_ascii_alphanumeric() || bytes[begin - 1] == b'_');
        let end = promql[begin..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(promql.len(), |length| begin + length);
        if !preceded_by_word {
            names.insert(promql[begin..end].to_owned());
        }
        start = end;
    }
    names
}

fn rule_expressions() -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repository().join("dashboards/prometheus/alerts.yml"))?;
    // The rules file is YAML; its `expr:` values are one line or a `|` block.
    let mut rules = Vec::new();
    let mut alert = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert: ") {
            alert = name.trim().to_owned();
        } else if let Some(expr) = trimmed.strip_prefix("expr: ") {
            let mut expr = expr.trim().to_owned();
            if expr == "|" {
                let indent = line.len() - trimmed.len();
                expr.clear();
                while let Some(next) = lines.peek() {
                    if next.trim().is_empty() || next.len() - next.trim_start().len() <= indent {
                        break;
                    }
                    expr.push_str(next.trim());
                    expr.push(' ');
                    lines.next();
                }
            }
            rules.push((alert.clone(), expr));
        }
    }
    Ok(rules)
}

fn dashboard_expressions() -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repository().join("dashboards/operations.json"))?;
    let dashboard: Value = serde_json::from_str(&text)?;
    let mut expressions = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            expressions.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                target["expr"].as_str().context("expr")?.to_owned(),
            ));
        }
    }
    Ok(expressions)
}

#[test]
fn the_alert_rules_pass_promtool() -> anyhow::Result<()> {
    let promtool = tool("IDLEMETER_PROMTOOL", "promtool")?;
    let dir = repository().join("dashboards/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let output = Command::new(&promtool)
            .args(&args)
            .current_dir(&dir)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Every alert has a test that expects it to fire.
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml"))?;
    for (alert, _) in rule_expressions()? {
        anyhow::ensure!(
            tests.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
            )),
            "alert {alert} has no promtool test that expects it to fire"
        );
    }
    Ok(())
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        "sum(rate(idlemeter_a_total[5m])) / on() idlemeter_b_seconds_bucket{le=\"1\"} + my_idlemeter_c",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["idlemeter_a_total", "idlemeter_b_seconds_bucket"]
    );
}

/// Child processes killed when the test ends, pass or fail.
struct Processes(Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Processes {
    /// Fails with the log of any process that exited.
    fn ensure_running(&mut self, logs: &Path) -> anyhow::Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
                anyhow::bail!("{name} exited ({status}):\n{log}");
            }
        }
        Ok(())
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let response = http.get(url).send().await?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("{url} answered {status} without JSON"))?;
    Ok(body)
}

async fn query(http: &reqwest::Client, prometheus: &str, promql: &str) -> anyhow::Result<Value> {
    let response = http
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", promql)])
        .send()
        .await?;
    let body: Value = response.json().await?;
    anyhow::ensure!(
        body["status"] == "success",
        "Prometheus refused {promql}: {body}"
    );
    Ok(body["data"]["result"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_service_and_the_rules_and_panels_query_what_they_expose(
) -> anyhow::Result<()> {
    let prometheus = tool("IDLEMETER_PROMETHEUS", "prometheus")?;
    let env = TestEnv::new("operations").await?;
    let dir = tempfile::tempdir()?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let cgroups = TestCgroups::new("operations")?;
    let binary = idlemeter_binary()?;
    let sheet = repository().join("prices/northflank.toml");
    let policy = repository().join("policies/sprites.toml");
    let api_port = free_port()?;
    let services = ["ingest", "rater", "policy", "collector", "api", "invoicer"];
    let mut targets = Vec::new();
    let mut processes = Processes(Vec::new());
    for service in services {
        let port = free_port()?;
        targets.push((service, port));
        let log = std::fs::File::create(logs.join(format!("{service}.log")))?;
        let mut command = Command::new(&binary);
        command
            .arg(service)
            .env("RUST_LOG", "info")
            .env("IDLEMETER_CLICKHOUSE__URL", &env.clickhouse.url)
            .env("IDLEMETER_CLICKHOUSE__DATABASE", &env.clickhouse.database)
            .env("IDLEMETER_KAFKA__BROKERS", &env.kafka.brokers)
            .env("IDLEMETER_TOPICS__SAMPLES", &env.topics.samples)
            .env(
                "IDLEMETER_TOPICS__SAMPLES_DEAD_LETTER",
                &env.topics.samples_dead_letter,
            )
            .env("IDLEMETER_TOPICS__COMMANDS", &env.topics.commands)
            .env("IDLEMETER_TOPICS__LEASES", &env.topics.leases)
            .env("IDLEMETER_METRICS__LISTEN", format!("127.0.0.1:{port}"))
            .env("IDLEMETER_METRICS__READY_CHECK_EVERY_S", "1")
            .env("IDLEMETER_INGEST__GROUP_ID", &env.group_id)
            .env("IDLEMETER_RATER__SHEET", &sheet)
            .env("IDLEMETER_POLICY__FILE", &policy)
            .env(
                "IDLEMETER_POLICY__GROUP_ID",
                format!("{}.policy", env.group_id),
            )
            .env("IDLEMETER_API__LISTEN", format!("127.0.0.1:{api_port}"))
            .env(
                "IDLEMETER_INVOICER__LOCK_FILE",
                dir.path().join("invoicer.lock"),
            )
            .env("IDLEMETER_COLLECTOR__NODE", "ops-node-1")
            .env("IDLEMETER_COLLECTOR__CGROUP_PARENT", &cgroups.parent)
            .env("IDLEMETER_COLLECTOR__STATE_DIR", dir.path().join("state"))
            .env("IDLEMETER_COLLECTOR__LABELS_DIR", dir.path().join("labels"))
            .env(
                "IDLEMETER_COLLECTOR__ACTIVITY_DIR",
                dir.path().join("activity"),
            )
            .stdout(Stdio::null())
            .stderr(log);
        for controller in ["memory", "cpuacct", "freezer", "blkio"] {
            command.env(
                format!(
                    "IDLEMETER_COLLECTOR__CGROUP_V1_{}_PARENT",
                    controller.to_uppercase()
                ),
                dir.path().join(format!("no-v1-{controller}")),
            );
        }
        processes.0.push((service.to_owned(), command.spawn()?));
    }

    let prometheus_port = free_port()?;
    let scrape_configs: String = targets
        .iter()
        .map(|(service, port)| {
            format!(
                "  - job_name: idlemeter-{service}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n"
            )
        })
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n{scrape_configs}",
        repository()
            .join("dashboards/prometheus/alerts.yml")
            .canonicalize()?
            .display()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config)?;
    let log = std::fs::File::create(logs.join("prometheus.log"))?;
    processes.0.push((
        "prometheus".to_owned(),
        Command::new(&prometheus)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?,
    ));
    let base = format!("http://127.0.0.1:{prometheus_port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;

    // Every service scraped and ready: broker, ClickHouse and lag checks pass.
    let mut waited = 0;
    loop {
        processes.ensure_running(&logs)?;
        let ready = match query(&http, &base, "idlemeter_ready == 1").await {
            Ok(result) => result
                .as_array()
                .map(|series| {
                    series
                        .iter()
                        .filter_map(|one| one["metric"]["job"].as_str().map(str::to_owned))
                        .collect::<BTreeSet<_>>()
                })
                .unwrap_or_default(),
            Err(_) => BTreeSet::new(),
        };
        if ready.len() == services.len() {
            break;
        }
        waited += 1;
        anyhow::ensure!(
            waited < 120,
            "after 60 s only {ready:?} are scraped and ready; targets: {}",
            get_json(&http, &format!("{base}/api/v1/targets"))
                .await
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let targets_now = get_json(&http, &format!("{base}/api/v1/targets")).await?;
    let active = targets_now["data"]["activeTargets"]
        .as_array()
        .context("targets")?;
    assert_eq!(active.len(), services.len());
    for target in active {
        assert_eq!(target["health"], "up", "{target}");
    }

    // One API request, so the request metrics have a series.
    let answer = http
        .get(format!("http://127.0.0.1:{api_port}/v1/me"))
        .send()
        .await?;
    assert_eq!(answer.status(), reqwest::StatusCode::UNAUTHORIZED);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every metric a rule or a panel queries is one a service exposes.
    let exposed: BTreeSet<String> =
        get_json(&http, &format!("{base}/api/v1/label/__name__/values")).await?["data"]
            .as_array()
            .context("names")?
            .iter()
            .filter_map(|name| name.as_str().map(str::to_owned))
            .collect();
    let rules = rule_expressions()?;
    assert_eq!(rules.len(), 14, "{rules:?}");
    let panels = dashboard_expressions()?;
    assert!(panels.len() >= 30, "{} panel queries", panels.len());
    let mut missing = Vec::new();
    for (owner, expr) in rules.iter().chain(&panels) {
        for name in metric_names(expr) {
            if !exposed.contains(&name) {
                missing.push(format!("{owner}: {name}"));
            }
        }
        // And Prometheus accepts the query.
        query(&http, &base, expr)
            .await
            .with_context(|| owner.clone())?;
    }
    assert!(
        missing.is_empty(),
        "queried but not exposed by any service: {missing:#?}"
    );

    // The rules load and evaluate, and none fires on a healthy stack.
    let loaded = get_json(&http, &format!("{base}/api/v1/rules")).await?;
    let groups = loaded["data"]["groups"].as_array().context("groups")?;
    let evaluated: Vec<&Value> = groups
        .iter()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(evaluated.len(), 14);
    for rule in &evaluated {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(
            rule["state"], "inactive",
            "fires on a healthy stack: {rule}"
        );
    }

    // /health names its checks; /live answers.
    let ingest_port = targets[0].1;
    let health = get_json(&http, &format!("http://127.0.0.1:{ingest_port}/health")).await?;
    assert_eq!(health["status"], "ready", "{health}");
    for check in ["kafka", "clickhouse", "lag"] {
        assert_eq!(health["checks"][check], "ok", "{health}");
    }
    let live = http
        .get(format!("http://127.0.0.1:{ingest_port}/live"))
        .send()
        .await?;
    assert!(live.status().is_success());
    processes.ensure_running(&logs)?;
    drop(processes);
    drop(cgroups);
    Ok(())
}

/// A service whose ClickHouse is unreachable is alive but not ready, and
/// says why; a real server behind the same settings makes it ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_ready_while_clickhouse_is_unreachable() -> anyhow::Result<()> {
    let env = TestEnv::new("operations_health").await?;
    let dir = tempfile::tempdir()?;
    let binary = idlemeter_binary()?;
    let sheet = repository().join("prices/northflank.toml");
    let mut children = Processes(Vec::new());
    let mut ports = Vec::new();
    for clickhouse in [
        format!("http://127.0.0.1:{}", free_port()?),
        env.clickhouse.url.clone(),
    ] {
        let port = free_port()?;
        ports.push(port);
        let log = std::fs::File::create(dir.path().join(format!("invoicer-{port}.log")))?;
        children.0.push((
            format!("invoicer-{port}"),
            Command::new(&binary)
                .arg("invoicer")
                .env("IDLEMETER_CLICKHOUSE__URL", clickhouse)
                .env("IDLEMETER_CLICKHOUSE__DATABASE", &env.clickhouse.database)
                .env("IDLEMETER_RATER__SHEET", &sheet)
                .env("IDLEMETER_METRICS__LISTEN", format!("127.0.0.1:{port}"))
                .env("IDLEMETER_METRICS__READY_CHECK_EVERY_S", "1")
                .env(
                    "IDLEMETER_INVOICER__LOCK_FILE",
                    dir.path().join(format!("{port}.lock")),
                )
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        ));
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut answers = Vec::new();
    for port in &ports {
        let url = format!("http://127.0.0.1:{port}/health");
        let mut answer = None;
        for _ in 0..100 {
            if let Ok(response) = http.get(&url).send().await {
                let status = response.status();
                let body: Value = response.json().await?;
                // Wait for the first round of checks.
                if body["checks"]["clickhouse"] != "not checked yet" {
                    answer = Some((status, body));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        answers.push(answer.with_context(|| format!("{url} never answered after its checks"))?);
    }
    let (status, body) = &answers[0];
    assert_eq!(*status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not ready");
    let reason = body["checks"]["clickhouse"].as_str().unwrap_or_default();
    assert!(reason.starts_with("clickhouse unreachable"), "{body}");
    let live = http
        .get(format!("http://127.0.0.1:{}/live", ports[0]))
        .send()
        .await?;
    assert!(live.status().is_success(), "alive though not ready");
    let (status, body) = &answers[1];
    assert_eq!(*status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["clickhouse"], "ok");
    Ok(())
}
