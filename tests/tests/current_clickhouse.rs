//! The same migrations and queries on a current ClickHouse (26.x, embedded by
//! chDB), so SQL that only 18.16 accepts cannot slip in. See tests/chdb/check_sql.py.

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

#[test]
fn migrations_and_store_queries_run_on_current_clickhouse() {
    let python = chdb_python();
    assert!(
        python.exists(),
        "{} is missing: run `make chdb-venv` (pip install chdb) or set IDLEMETER_CHDB_PYTHON",
        python.display()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/chdb/check_sql.py");
    let output = Command::new(&python)
        .arg(script)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chDB check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "ok  0006_api.sql",
        "ok  usage_window_rollup.sql",
        "ok  usage_window_minute.sql",
        "ok  samples_for_rating.sql",
        "ok  samples_for_rating_range.sql",
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
    let python = chdb_python();
    assert!(
        python.exists(),
        "{} is missing: run `make chdb-venv` (pip install chdb) or set IDLEMETER_CHDB_PYTHON",
        python.display()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/chdb/check_dashboards.py");
    let output = Command::new(&python)
        .arg(script)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chDB dashboards check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ok  panel revenue_by_day"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}
