//! The core crate decides money; it must stay free of I/O so that rating is a
//! pure, replayable function. This fails if its dependency tree ever gains an
//! async runtime, a Kafka or ClickHouse client or an HTTP server.

use std::process::Command;

#[test]
fn core_depends_on_no_runtime_and_no_adapter() {
    let output = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--package",
            "idlemeter-core",
            "--edges",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(
        tree.contains("rust_decimal"),
        "unexpected cargo tree output:\n{tree}"
    );
    for forbidden in [
        "tokio ",
        "rdkafka ",
        "clickhouse ",
        "axum ",
        "hyper ",
        "reqwest ",
    ] {
        assert!(
            !tree.lines().any(|line| line.starts_with(forbidden)),
            "idlemeter-core depends on {forbidden}:\n{tree}"
        );
    }
}
