//! `idlemeter policy`: the policy service, and its offline tools.
//!
//! - `idlemeter policy` runs the service (see services/policy/README.md).
//! - `idlemeter policy replay --policy P --samples S [--leases L]` feeds a
//!   file of samples (the JSONL of `idlemeter rate`; shuffled and duplicated
//!   lines are fine) through the engine the service runs and prints one JSON
//!   document: `{"policy", "version", "decisions": [{"at", "customer",
//!   "sandbox", "epoch", "rule", "action", "reason"}], "errors": [{"file",
//!   "line", "field", "reason"}]}`. Exit status as `idlemeter rate`: 0 when
//!   every line was read, 2 when some were refused (the document is still
//!   printed), 1 when nothing could be replayed (unreadable file, bad policy).
//! - `idlemeter policy whatif` replays stored samples under a candidate
//!   policy and reports what it would have saved (see [`crate::commands::whatif`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use idlemeter_core::policy::{parse_leases, replay, Decision, Policy};
use idlemeter_core::LineError;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub tool: Option<PolicyTool>,
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyTool {
    /// Replay a JSONL file of samples through a policy, offline; prints JSON.
    Replay(ReplayArgs),
    /// Replay stored samples under a candidate policy: suspends, idle hours
    /// and money saved, suspends a user would have felt.
    Whatif(crate::commands::whatif::WhatifArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Idle policy file (TOML), e.g. policies/sprites.toml.
    #[arg(long)]
    policy: PathBuf,
    /// Samples, one JSON object per line (the format of `idlemeter rate`).
    #[arg(long)]
    samples: PathBuf,
    /// Keep-alive leases, one JSON object per line as on `sandbox.leases`,
    /// each with `at` (when it was taken).
    #[arg(long)]
    leases: Option<PathBuf>,
}

/// The document `replay` prints.
#[derive(Debug, Serialize)]
pub struct ReplayDocument {
    pub policy: String,
    pub version: String,
    pub decisions: Vec<ReplayedDecision>,
    pub errors: Vec<FileError>,
}

/// One decision, as `replay` prints it.
#[derive(Debug, Serialize)]
pub struct ReplayedDecision {
    pub at: String,
    pub customer: String,
    pub sandbox: String,
    pub epoch: u64,
    pub rule: &'static str,
    pub action: &'static str,
    pub reason: String,
}

impl From<&Decision> for ReplayedDecision {
    fn from(decision: &Decision) -> Self {
        Self {
            at: decision
                .at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            customer: decision.customer.as_str().to_owned(),
            sandbox: decision.sandbox.as_str().to_owned(),
            epoch: decision.epoch.0,
            rule: decision.rule.as_str(),
            action: decision.action.as_str(),
            reason: decision.reason.clone(),
        }
    }
}

/// A refused line of one of the input files.
#[derive(Debug, Serialize)]
pub struct FileError {
    pub file: String,
    pub line: u64,
    pub field: String,
    pub reason: String,
}

impl FileError {
    pub fn of(file: &Path, error: LineError) -> Self {
        Self {
            file: file.display().to_string(),
            line: error.line,
            field: error.field,
            reason: error.reason,
        }
    }
}

/// Reads and validates a policy file.
pub fn load_policy(path: &Path) -> anyhow::Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading idle policy {}", path.display()))?;
    Ok(Policy::from_toml(&text, &path.display().to_string())?)
}

pub fn replay_command(args: &ReplayArgs) -> anyhow::Result<ExitCode> {
    let policy = load_policy(&args.policy)?;
    let text = std::fs::read_to_string(&args.samples)
        .with_context(|| format!("reading samples {}", args.samples.display()))?;
    let parsed = idlemeter_core::jsonl::parse_samples(&text);
    let mut errors: Vec<FileError> = parsed
        .errors
        .into_iter()
        .map(|error| FileError::of(&args.samples, error))
        .collect();
    let leases = match &args.leases {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading leases {}", path.display()))?;
            let (leases, refused) = parse_leases(&text);
            errors.extend(refused.into_iter().map(|error| FileError::of(path, error)));
            leases
        }
        None => Vec::new(),
    };
    let samples = parsed.samples.into_iter().map(|n| n.sample).collect();
    let decisions = replay(&policy, samples, leases);
    let document = ReplayDocument {
        policy: policy.name.clone(),
        version: policy.version.clone(),
        decisions: decisions.iter().map(ReplayedDecision::from).collect(),
        errors,
    };
    println!("{}", serde_json::to_string_pretty(&document)?);
    report_refused(&document.errors)
}

/// Exit status 0, or 2 with a summary of the refused lines on stderr.
pub fn report_refused(errors: &[FileError]) -> anyhow::Result<ExitCode> {
    if errors.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "{} line(s) refused; the other lines were replayed (see `errors`):",
        errors.len()
    );
    for error in errors.iter().take(20) {
        eprintln!(
            "  {} line {}: field `{}`: {}",
            error.file, error.line, error.field, error.reason
        );
    }
    Ok(ExitCode::from(2))
}
