//! The idle policy's offline tools, black box: `idlemeter policy replay` on
//! shuffled, duplicated input with a bad line, and `idlemeter policy whatif`
//! on samples stored in ClickHouse (and the same samples as a JSONL archive)
//! with answers worked out by hand.

use std::process::{Command, Output};

use chrono::{DateTime, Duration, TimeZone, Utc};
use idlemeter_core::jsonl::to_line;
use idlemeter_core::{compact_all, CompactRule, CustomerId, UsageSample};
use idlemeter_tests::collector::idlemeter_binary;
use idlemeter_tests::{sample, TestEnv};
use serde_json::Value;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 9, 8, 0, 0)
        .single()
        .expect("valid time")
}

/// One sample a second of `customer/sandbox` for each second in `seconds`,
/// with an exec session open where `busy` says so. Seconds left out are a
/// collector gap: time passes, seq does not.
fn trace(
    customer: &str,
    sandbox: &str,
    seconds: impl IntoIterator<Item = i64>,
    busy: impl Fn(i64) -> bool,
) -> Vec<UsageSample> {
    seconds
        .into_iter()
        .enumerate()
        .map(|(index, second)| {
            let mut sample = sample(
                sandbox,
                1,
                index as u64 + 1,
                start() + Duration::seconds(second),
                0,
                0,
            );
            sample.customer = CustomerId::parse(customer).expect("id");
            sample.exec_sessions = u32::from(busy(second));
            sample
        })
        .collect()
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("temp file writable");
    path
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "stdout is not JSON ({error}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

const POLICY: &str = "[policy]\nname = \"tools\"\nversion = \"3\"\n[rules]\nidle_window_s = 30\nreissue_after_s = 3600\n";

#[test]
fn replay_decides_on_shuffled_duplicated_input_as_on_the_stream() -> anyhow::Result<()> {
    // quiet: a session until 9, then idle: suspended at 9 + 30 = 39.
    // gappy: a session until 20, then nothing arrives until 111 (the session
    // ended unseen in the gap), then idle: suspended at 111 + 30 = 141.
    // busy: a session throughout: never.
    let mut samples = trace("acme", "quiet", 0..60, |s| s < 10);
    samples.extend(trace("acme", "gappy", (0..=20).chain(111..180), |s| {
        s <= 20
    }));
    samples.extend(trace("globex", "busy", 0..180, |_| true));
    let mut lines: Vec<String> = samples.iter().map(to_line).collect();
    // Shuffled (a fixed interleaving, newest first) and a third duplicated.
    lines.reverse();
    let duplicates: Vec<String> = lines.iter().step_by(3).cloned().collect();
    lines.extend(duplicates);
    let (front, back) = lines.split_at(lines.len() / 2);
    let mut shuffled: Vec<String> = back
        .iter()
        .zip(front)
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    shuffled.extend(back.iter().skip(front.len()).cloned());
    shuffled.insert(7, "{\"ts\": \"not a time\"}".to_owned());

    let dir = tempfile::tempdir()?;
    let policy = write(dir.path(), "policy.toml", POLICY);
    let file = write(dir.path(), "samples.jsonl", &(shuffled.join("\n") + "\n"));
    let output = Command::new(idlemeter_binary()?)
        .args(["policy", "replay", "--policy"])
        .arg(&policy)
        .arg("--samples")
        .arg(&file)
        .output()?;
    assert_eq!(output.status.code(), Some(2), "a refused line: exit 2");
    let document = json(&output);
    assert_eq!(document["policy"], "tools");
    assert_eq!(document["version"], "3");
    let errors = document["errors"].as_array().expect("errors");
    assert!(!errors.is_empty());
    assert!(errors.iter().all(|error| error["line"] == 8), "{errors:?}");
    let decided: Vec<(String, String, String, String)> = document["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .map(|d| {
            assert!(!d["reason"].as_str().unwrap_or_default().is_empty());
            assert_eq!(d["epoch"], 1);
            assert_eq!(d["customer"], "acme");
            (
                d["at"].as_str().unwrap_or_default().to_owned(),
                d["sandbox"].as_str().unwrap_or_default().to_owned(),
                d["rule"].as_str().unwrap_or_default().to_owned(),
                d["action"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let at = |second: i64| {
        (start() + Duration::seconds(second)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let expected = |second: i64, sandbox: &str| {
        (
            at(second),
            sandbox.to_owned(),
            "idle_window".to_owned(),
            "suspend".to_owned(),
        )
    };
    assert_eq!(decided, [expected(39, "quiet"), expected(141, "gappy")]);

    // The clean file: exit 0, same decisions.
    let clean = write(dir.path(), "clean.jsonl", &(lines.join("\n") + "\n"));
    let output = Command::new(idlemeter_binary()?)
        .args(["policy", "replay", "--policy"])
        .arg(&policy)
        .arg("--samples")
        .arg(&clean)
        .output()?;
    assert!(output.status.success());
    assert_eq!(json(&output)["decisions"].as_array().map(Vec::len), Some(2));
    Ok(())
}

/// $1 per allocated vCPU-second, idle or not; nothing else.
const SHEET: &str = idlemeter_tests::ONE_DOLLAR_A_VCPU_SECOND;

const CANDIDATE: &str = "[policy]\nname = \"candidate\"\nversion = \"1\"\n[rules]\nidle_window_s = 10\nreissue_after_s = 3600\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatif_reports_the_suspends_hours_and_money_a_candidate_would_have_saved(
) -> anyhow::Result<()> {
    let env = TestEnv::new("policy_whatif").await?;
    // acme/quiet: a session until 19, idle after: suspended at 19 + 10 = 29,
    //   idle to the end (119): 90 s saved, 2 vCPU x 90 s = $180.
    // acme/back: the same, but a session again from 50: 29 -> 49 = 20 s,
    //   $40, and felt (activity 21 s after the suspend).
    // globex/busy: a session throughout: nothing.
    let mut samples = trace("acme", "quiet", 0..120, |s| s < 20);
    samples.extend(trace("acme", "back", 0..120, |s| !(20..50).contains(&s)));
    samples.extend(trace("globex", "busy", 0..120, |_| true));
    // Every second kept, as ingest keeps them under a threshold policy.
    env.store
        .insert_compacted(&compact_all(samples.iter().cloned(), CompactRule::KEEP_ALL))
        .await?;
    let dir = tempfile::tempdir()?;
    let policy = write(dir.path(), "candidate.toml", CANDIDATE);
    let sheet = write(dir.path(), "sheet.toml", SHEET);
    let archive = write(
        dir.path(),
        "archive.jsonl",
        &samples.iter().map(to_line).collect::<Vec<_>>().join("\n"),
    );
    let whatif = |archive: Option<&std::path::Path>| -> anyhow::Result<Value> {
        let mut command = Command::new(idlemeter_binary()?);
        command
            .args(["policy", "whatif", "--policy"])
            .arg(&policy)
            .arg("--prices")
            .arg(&sheet)
            .args(["--from", &start().to_rfc3339()])
            .args(["--to", &(start() + Duration::hours(1)).to_rfc3339()])
            .env("IDLEMETER_CLICKHOUSE__URL", &env.clickhouse.url)
            .env("IDLEMETER_CLICKHOUSE__DATABASE", &env.clickhouse.database);
        if let Some(archive) = archive {
            command.arg("--samples").arg(archive);
        }
        let output = command.output()?;
        anyhow::ensure!(
            output.status.success(),
            "whatif failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(json(&output))
    };
    for (source, document) in [
        ("clickhouse", whatif(None)?),
        ("archive", whatif(Some(&archive))?),
    ] {
        assert_eq!(document["policy"], "candidate", "{source}");
        assert_eq!(document["currency"], "USD", "{source}");
        let customers = document["customers"].as_array().expect("customers");
        let of = |name: &str| {
            customers
                .iter()
                .find(|customer| customer["customer"] == name)
                .unwrap_or_else(|| panic!("{source}: {name} missing from {customers:?}"))
        };
        let acme = of("acme");
        assert_eq!(acme["suspends"], 2, "{source}");
        assert_eq!(acme["felt_suspends"], 1, "{source}");
        // 110 s = 0.030555... h
        assert_eq!(acme["idle_hours_saved"], "0.0306", "{source}");
        assert_eq!(acme["money_saved"], "220.00", "{source}");
        assert_eq!(acme["intervals_missing_data"], 0, "{source}");
        let globex = of("globex");
        assert_eq!(globex["suspends"], 0, "{source}");
        assert_eq!(globex["money_saved"], "0.00", "{source}");
        assert_eq!(document["total"]["suspends"], 2, "{source}");
        assert_eq!(document["total"]["money_saved"], "220.00", "{source}");
    }
    Ok(())
}
