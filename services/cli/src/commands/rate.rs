//! `idlemeter rate`: rate a JSONL file of samples against a price sheet, offline,
//! and print the JSON document on stdout. A stable interface others script
//! against: the document's shape is described in services/core/README.md.
//!
//! Exit status: 0 when every line was rated; 2 when some lines were refused (the
//! document is still printed, with the refused lines in `errors`, and a summary
//! goes to stderr); 1 when nothing could be rated (unreadable file, bad sheet).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct RateArgs {
    /// Price sheet (TOML), e.g. prices/e2b.toml.
    #[arg(long)]
    prices: PathBuf,
    /// Samples, one JSON object per line.
    #[arg(long)]
    samples: PathBuf,
}

pub fn run(args: &RateArgs) -> anyhow::Result<ExitCode> {
    let sheet = std::fs::read_to_string(&args.prices)
        .with_context(|| format!("reading price sheet {}", args.prices.display()))?;
    let samples = std::fs::read_to_string(&args.samples)
        .with_context(|| format!("reading samples {}", args.samples.display()))?;
    let report = idlemeter_core::rate_jsonl(&sheet, &args.prices.display().to_string(), &samples)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report.errors.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "{}: {} line(s) refused; the other lines were rated (see `errors`):",
        args.samples.display(),
        report.errors.len()
    );
    for error in report.errors.iter().take(20) {
        eprintln!(
            "  line {}: field `{}`: {}",
            error.line, error.field, error.reason
        );
    }
    Ok(ExitCode::from(2))
}
