//! Rates a JSONL file against a price sheet and prints the JSON document:
//! `cargo run -p idlemeter-core --example rate_files -- <sheet.toml> <samples.jsonl>`.
//! A stand-in for `idlemeter rate` until the CLI crate is wired.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, sheet_path, samples_path] = args.as_slice() else {
        eprintln!("usage: rate_files <sheet.toml> <samples.jsonl>");
        return ExitCode::from(2);
    };
    let read =
        |path: &str| std::fs::read_to_string(path).map_err(|error| format!("{path}: {error}"));
    let outcome = read(sheet_path).and_then(|sheet| {
        let samples = read(samples_path)?;
        let report = idlemeter_core::rate_jsonl(&sheet, sheet_path, &samples)
            .map_err(|error| error.to_string())?;
        serde_json::to_string_pretty(&report).map_err(|error| error.to_string())
    });
    match outcome {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
