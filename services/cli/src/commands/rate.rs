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
    /// Idle policy file (e.g. policies/sprites.toml) whose activity signals
    /// decide which running seconds are idle; default: idle means no exec
    /// session and no open connection.
    #[arg(long)]
    policy: Option<PathBuf>,
}

pub fn run(args: &RateArgs) -> anyhow::Result<ExitCode> {
    let sheet = std::fs::read_to_string(&args.prices)
        .with_context(|| format!("reading price sheet {}", args.prices.display()))?;
    let samples = std::fs::read_to_string(&args.samples)
        .with_context(|| format!("reading samples {}", args.samples.display()))?;
    let label = args.prices.display().to_string();
    let report = match &args.policy {
        None => idlemeter_core::rate_jsonl(&sheet, &label, &samples)?,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading idle policy {}", path.display()))?;
            let policy =
                idlemeter_core::policy::Policy::from_toml(&text, &path.display().to_string())?;
            let sheet = idlemeter_core::PriceSheet::from_toml(&sheet, &label)?;
            let parsed = idlemeter_core::jsonl::parse_samples(&samples);
            idlemeter_core::rate_report(
                &sheet,
                &parsed.samples,
                &idlemeter_core::policy::PolicyIdle::new(policy),
                &idlemeter_core::BillingOptions::default(),
                parsed.errors,
            )?
        }
    };
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
