//! `idlemeter policy whatif`: replay recorded samples under a candidate idle
//! policy and report, per customer and in total, the suspends it would have
//! made, the idle hours and the money they would have saved under the
//! customer's sheet, and the suspends a user would have felt (activity within
//! a minute). The rules are in `idlemeter_policy::whatif`.
//!
//! Samples come from ClickHouse (`usage_samples`, every customer with samples
//! in the range) or, with `--samples`, from a JSONL archive (an export of the
//! raw seconds: ClickHouse may hold compacted samples, whose merged intervals
//! a threshold policy cannot judge; see services/ingest/README.md). Prices
//! are `[rater] sheet` (or `--prices`), classified with `[rater] idle_policy`.
//!
//! Prints one JSON document: `{"policy", "version", "from", "to", "source",
//! "currency", "customers": [{"customer", "suspends", "idle_hours_saved",
//! "money_saved", "felt_suspends"}], "total": {...}, "errors": [...]}`.
//! Exit status 0, 2 when archive lines were refused, 1 when nothing ran.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use idlemeter_core::policy::{IdleRule, PolicyIdle};
use idlemeter_core::{CustomerId, PriceSheet, UsageSample};
use idlemeter_policy::whatif::{Savings, WhatIf};
use idlemeter_store::Store;
use serde::Serialize;

use crate::commands::policy::{load_policy, report_refused, FileError};
use crate::progress::Progress;
use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct WhatifArgs {
    /// The candidate idle policy (TOML).
    #[arg(long)]
    policy: PathBuf,
    /// Start of the range (RFC 3339), inclusive.
    #[arg(long)]
    from: DateTime<Utc>,
    /// End of the range (RFC 3339), exclusive.
    #[arg(long)]
    to: DateTime<Utc>,
    /// Read samples from this JSONL archive instead of ClickHouse.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Price sheet; default `[rater] sheet`.
    #[arg(long)]
    prices: Option<PathBuf>,
    /// A suspend followed by activity within this many seconds is one a
    /// user would have felt.
    #[arg(long, default_value_t = 60)]
    felt_within_s: i64,
}

#[derive(Debug, Serialize)]
struct WhatifDocument {
    policy: String,
    version: String,
    from: String,
    to: String,
    source: String,
    currency: String,
    customers: Vec<CustomerSavings>,
    total: Savings,
    errors: Vec<FileError>,
}

#[derive(Debug, Serialize)]
struct CustomerSavings {
    customer: String,
    #[serde(flatten)]
    savings: Savings,
}

pub async fn run(settings: &Settings, args: &WhatifArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.from < args.to,
        "--from {} is not before --to {}",
        args.from,
        args.to
    );
    let candidate = load_policy(&args.policy)?;
    let sheet_path = args
        .prices
        .clone()
        .unwrap_or_else(|| PathBuf::from(&settings.rater.sheet));
    let sheet_text = std::fs::read_to_string(&sheet_path)
        .with_context(|| format!("reading price sheet {}", sheet_path.display()))?;
    let sheet = PriceSheet::from_toml(&sheet_text, &sheet_path.display().to_string())?;
    let billing = if settings.rater.idle_policy.is_empty() {
        IdleRule::SessionOrConnection
    } else {
        let path = PathBuf::from(&settings.rater.idle_policy);
        IdleRule::Policy(Box::new(PolicyIdle::new(load_policy(&path)?)))
    };
    let whatif = WhatIf {
        candidate: &candidate,
        sheet: &sheet,
        billing: &billing,
        from: args.from,
        to: args.to,
        felt_within_s: args.felt_within_s,
    };
    let mut errors = Vec::new();
    let (source, customers) = match &args.samples {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading samples {}", path.display()))?;
            let parsed = idlemeter_core::jsonl::parse_samples(&text);
            errors.extend(
                parsed
                    .errors
                    .into_iter()
                    .map(|error| FileError::of(path, error)),
            );
            let mut by_customer: std::collections::BTreeMap<CustomerId, Vec<UsageSample>> =
                Default::default();
            for numbered in parsed.samples {
                by_customer
                    .entry(numbered.sample.customer.clone())
                    .or_default()
                    .push(numbered.sample);
            }
            let mut customers = Vec::new();
            let bar = Progress::new("whatif", by_customer.len() as u64, "customers");
            for (customer, samples) in by_customer {
                customers.push(measure(&whatif, customer, samples)?);
                bar.add(1);
            }
            bar.finish();
            (path.display().to_string(), customers)
        }
        None => {
            let store = Store::new(&settings.clickhouse);
            let (from_ms, to_ms) = (millis(args.from)?, millis(args.to)?);
            let listed = store.customers_with_samples(from_ms, to_ms).await?;
            let mut customers = Vec::new();
            let bar = Progress::new("whatif", listed.len() as u64, "customers");
            for (customer, _, _) in &listed {
                let samples = store.samples_for_rating(customer, from_ms, to_ms).await?;
                customers.push(measure(&whatif, customer.clone(), samples)?);
                bar.add(1);
            }
            bar.finish();
            ("clickhouse".to_owned(), customers)
        }
    };
    let mut total = Savings::default();
    for customer in &customers {
        total.add(&customer.savings);
    }
    let document = WhatifDocument {
        policy: candidate.name.clone(),
        version: candidate.version.clone(),
        from: args.from.to_rfc3339(),
        to: args.to.to_rfc3339(),
        source,
        currency: sheet.currency.code().to_owned(),
        customers,
        total,
        errors,
    };
    println!("{}", serde_json::to_string_pretty(&document)?);
    report_refused(&document.errors)
}

fn measure(
    whatif: &WhatIf<'_, IdleRule>,
    customer: CustomerId,
    samples: Vec<UsageSample>,
) -> anyhow::Result<CustomerSavings> {
    let savings = whatif
        .customer(samples)
        .with_context(|| format!("rating customer {customer}"))?;
    Ok(CustomerSavings {
        customer: customer.as_str().to_owned(),
        savings,
    })
}

fn millis(time: DateTime<Utc>) -> anyhow::Result<u64> {
    u64::try_from(time.timestamp_millis()).context("times before 1970 hold no samples")
}
