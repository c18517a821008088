//! Black-box tests of `idlemeter rate`, the offline rating interface that
//! scripts depend on: its JSON shape, exit statuses and error messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rust_decimal::Decimal;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rate(sheet: &str, samples: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idlemeter"))
        .args(["rate", "--prices"])
        .arg(repo().join(sheet))
        .arg("--samples")
        .arg(repo().join(samples))
        .output()
        .expect("idlemeter runs")
}

fn decimal(value: &Value) -> Decimal {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{value} is not a decimal string"))
        .parse()
        .expect("decimal string")
}

#[test]
fn every_shipped_sheet_rates_a_trace_into_the_documented_shape() {
    let cases = [
        ("prices/e2b.toml", "e2b_one_hour.jsonl"),
        ("prices/codesandbox.toml", "codesandbox_minutes.jsonl"),
        ("prices/modal.toml", "modal_max_requested_used.jsonl"),
        ("prices/sprites.toml", "sprites_idle.jsonl"),
        ("prices/northflank.toml", "northflank_price_change.jsonl"),
    ];
    for (sheet, fixture) in cases {
        let output = rate(sheet, &format!("services/core/tests/fixtures/{fixture}"));
        assert!(
            output.status.success(),
            "{sheet}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let document: Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
        assert_eq!(document["currency"], "USD", "{sheet}");
        let customers = document["customers"].as_array().expect("customers array");
        assert!(!customers.is_empty(), "{sheet}: no customer rated");
        for customer in customers {
            assert!(customer["customer"].is_string());
            let lines = customer["lines"].as_array().expect("lines array");
            assert!(!lines.is_empty(), "{sheet}: no line");
            let mut sum = Decimal::ZERO;
            for line in lines {
                for field in ["resource", "unit"] {
                    assert!(
                        line[field].is_string(),
                        "{sheet}: line lacks {field}: {line}"
                    );
                }
                decimal(&line["quantity"]);
                decimal(&line["unit_price"]);
                sum += decimal(&line["amount"]);
            }
            decimal(&customer["subtotal"]);
            assert_eq!(
                sum,
                decimal(&customer["total"]),
                "{sheet}: lines must sum to the total"
            );
        }
    }
}

#[test]
fn refused_lines_are_listed_and_the_rest_is_rated_with_exit_status_2() {
    let output = rate(
        "prices/e2b.toml",
        "services/core/tests/fixtures/bad_fields.jsonl",
    );
    assert_eq!(output.status.code(), Some(2));
    let document: Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    let errors = document["errors"].as_array().expect("errors array");
    assert_eq!(errors[0]["line"], 2);
    assert_eq!(errors[0]["field"], "vcpu");
    assert!(!document["customers"]
        .as_array()
        .expect("customers")
        .is_empty());
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 2: field `vcpu`"));
}

#[test]
fn a_bad_sheet_is_refused_with_its_file_line_and_field() {
    let dir = std::env::temp_dir().join(format!("idlemeter-rate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sheet = dir.join("bad.toml");
    let good = std::fs::read_to_string(repo().join("prices/e2b.toml")).expect("sheet");
    // A float price: refused, money is never a float.
    std::fs::write(
        &sheet,
        good.replace("unit_price = \"0.000014\"", "unit_price = 0.000014"),
    )
    .expect("write sheet");
    let output = Command::new(env!("CARGO_BIN_EXE_idlemeter"))
        .args(["rate", "--prices"])
        .arg(&sheet)
        .arg("--samples")
        .arg(repo().join("services/core/tests/fixtures/e2b_one_hour.jsonl"))
        .output()
        .expect("idlemeter runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml:") && stderr.contains("unit_price"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

/// `--policy` makes the rater see activity as the idle policy does. Sprites
/// bills compute only while active; in this trace the second hour has an API
/// call (a stdin write) but no session. By default (sessions and connections
/// only) both hours are idle and no vCPU is billed; under policies/sprites.toml,
/// which counts API calls, the second hour bills 2 vCPU x 3600 s = 7200
/// vCPU-seconds = 2 CPU-hours.
#[test]
fn an_idle_policy_file_decides_which_running_seconds_are_idle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let line = |seq: u64, hour: u32, api_calls: u64| {
        format!(
            "{{\"ts\": \"2026-03-02T{hour:02}:00:00Z\", \"customer\": \"acme\", \"node\": \"n\", \"sandbox\": \"s\", \"epoch\": 1, \"seq\": {seq}, \"state\": \"running\", \"vcpu\": 2, \"mem_bytes\": 0, \"gpu_model\": null, \"gpu_count\": 0, \"disk_bytes\": 0, \"cpu_used_usec\": 0, \"mem_used_bytes\": 0, \"net_rx_bytes\": 0, \"net_tx_bytes\": 0, \"exec_sessions\": 0, \"open_conns\": 0, \"api_calls\": {api_calls}}}\n"
        )
    };
    let samples = dir.path().join("api.jsonl");
    std::fs::write(
        &samples,
        [line(1, 10, 0), line(2, 11, 0), line(3, 12, 1)].concat(),
    )
    .expect("write");
    let sprites = std::fs::read_to_string(repo().join("policies/sprites.toml")).expect("policy");
    // The samples are an hour apart: a policy must say so, or its hour-long
    // intervals are missing data (never idle).
    let hourly = dir.path().join("sprites-hourly.toml");
    std::fs::write(
        &hourly,
        sprites.replace("[rules]\n", "[rules]\ngap_after_s = 3600\n"),
    )
    .expect("write");
    // (vCPU usage quantity, idle seconds on the vCPU's idle line)
    let vcpu = |policy: Option<&std::path::Path>| -> (Decimal, Decimal) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_idlemeter"));
        command
            .args(["rate", "--prices"])
            .arg(repo().join("prices/sprites.toml"))
            .arg("--samples")
            .arg(&samples);
        if let Some(policy) = policy {
            command.arg("--policy").arg(policy);
        }
        let output = command.output().expect("idlemeter runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: Value = serde_json::from_slice(&output.stdout).expect("json");
        let lines = report["customers"][0]["lines"].as_array().expect("lines");
        let sum = |kind: &str| -> Decimal {
            lines
                .iter()
                .filter(|line| line["resource"] == "vcpu" && line["kind"] == kind)
                .map(|line| decimal(&line["quantity"]))
                .sum()
        };
        (sum("usage"), sum("idle"))
    };
    // The collector's rule: no session, no connection: both hours idle.
    assert_eq!(vcpu(None), (Decimal::ZERO, Decimal::from(7200)));
    // Sprites' policy counts API calls: the second hour is active.
    assert_eq!(vcpu(Some(&hourly)), (Decimal::from(2), Decimal::from(3600)));
    // As shipped (a sample expected every second), hour-long intervals are
    // gaps: missing data is billed, never idle.
    let shipped = repo().join("policies/sprites.toml");
    assert_eq!(vcpu(Some(&shipped)), (Decimal::from(4), Decimal::ZERO));
}
