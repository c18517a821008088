//! The same migrations, queries and dashboard panels on a current ClickHouse
//! (26.x, embedded by chDB), so SQL that only 18.16 accepts cannot slip in.
//! See tests/chdb/check_sql.py and tests/chdb/check_dashboards.py.

use std::path::PathBuf;
use std::process::Command;

fn chdb_python() -> PathBuf {
    std::env::var_os("IDLEMETER_CHDB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/idlemeter/venv/bin/python")
        })
}

/// Runs tests/chdb/`script`; its stdout when it succeeded.
fn run_check(script: &str) -> String {
    let python = chdb_python();
    assert!(
        python.exists(),
        "{} is missing: run `make chdb-venv` (pip install chdb) or set IDLEMETER_CHDB_PYTHON",
        python.display()
    );
    let path = format!("{}/chdb/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(&python)
        .arg(path)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "chDB check {script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    stdout
}

#[test]
fn migrations_and_store_queries_run_on_current_clickhouse() {
    let stdout = run_check("check_sql.py");
    for line in [
        "ok  0006_api.sql",
        "ok  usage_window_rollup.sql",
        "ok  usage_window_minute.sql",
        "ok  samples_for_rating.sql (one customer)",
        "ok  samples_for_rating.sql (a range)",
        "ok  period_spend.sql",
        "ok  snapshot_lines.sql",
        "ok  sandbox_state.sql",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing `{line}` in:\n{stdout}"
        );
    }
}

#[test]
fn finance_panels_give_the_fixtures_answers_on_current_clickhouse() {
    let stdout = run_check("check_dashboards.py");
    assert!(stdout.contains("ok  panel revenue_by_day"), "{stdout}");
    assert!(stdout.contains("ok  panel metering_coverage"), "{stdout}");
}
