//! `idlemeter`: one binary, one subcommand per service or tool. This file is
//! wiring only: parse arguments and configuration, build, run, shut down.

mod commands;
mod progress;
mod settings;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::settings::Settings;

/// mimalloc: ingest decodes and drops a million samples a second, and
/// glibc's malloc spent a quarter of its CPU on them (perf, issue "Ingest at a
/// million samples a second").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Idle-aware metering and billing for persistent sandboxes.
#[derive(Debug, Parser)]
#[command(name = "idlemeter", version, about, long_about = None)]
struct Cli {
    /// TOML configuration file; `IDLEMETER_<SECTION>__<KEY>` variables override it.
    #[arg(long, global = true, env = "IDLEMETER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the ClickHouse database and apply pending migrations.
    Migrate,
    /// Run the ingest service: Kafka usage.samples -> ClickHouse, exactly once.
    Ingest,
    /// Run the online rater: rate closed hours of stored usage into rated_usage.
    Rater,
    /// Run the idle-suspend policy service (samples in, commands and decisions
    /// out), or replay and what-if a policy offline.
    Policy(commands::policy::PolicyArgs),
    /// Run the invoicing scheduler: close each ended billing period into invoices.
    Invoicer,
    /// Run the customer usage API (HTTP; docs at /docs, schema at /openapi.json).
    Api,
    /// Create, list and revoke the usage API's keys.
    Keys(commands::api::KeysArgs),
    /// Close a period, show or preview invoices (finance's tools).
    Invoices(commands::invoices::InvoicesArgs),
    /// Customer records and plan changes, in the ledger.
    Customers(commands::customers::CustomersArgs),
    /// Load the node cost sheet (`[margin] node_costs`) for margin.
    MarginLoad,
    /// Run the node collector: sample sandbox cgroups, ship node batches, act on commands.
    Collector,
    /// Produce usage from a simulated fleet of sandboxes to Kafka.
    Simulate(commands::simulate::SimulateArgs),
    /// Rate a JSONL file of samples with a price sheet, offline; prints JSON.
    Rate(commands::rate::RateArgs),
    /// Print the effective configuration (defaults + file + environment) as JSON.
    Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            // `{:#}` prints the context chain on one line: what, where, why.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    idlemeter_telemetry::init_tracing();
    // Offline tools need neither servers nor configuration.
    if let Command::Rate(args) = &cli.command {
        return commands::rate::run(args);
    }
    if let Command::Policy(commands::policy::PolicyArgs {
        tool: Some(commands::policy::PolicyTool::Replay(args)),
    }) = &cli.command
    {
        return commands::policy::replay_command(args);
    }
    let settings = Settings::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Command::Policy(commands::policy::PolicyArgs {
        tool: Some(commands::policy::PolicyTool::Whatif(args)),
    }) = &cli.command
    {
        return runtime.block_on(commands::whatif::run(&settings, args));
    }
    runtime.block_on(async move {
        match cli.command {
            Command::Migrate => commands::migrate(&settings).await,
            Command::Ingest => commands::ingest(&settings).await,
            Command::Rater => commands::rater(&settings).await,
            Command::Collector => commands::collector(&settings).await,
            Command::Policy(_) => commands::policy(&settings).await,
            Command::Invoicer => commands::invoices::service(&settings).await,
            Command::Api => commands::api::serve(&settings).await,
            Command::Keys(args) => commands::api::keys(&settings, args).await,
            Command::Invoices(args) => commands::invoices::run(&settings, args).await,
            Command::Customers(args) => commands::customers::run(&settings, args).await,
            Command::MarginLoad => commands::margin_load(&settings).await,
            Command::Simulate(args) => commands::simulate::run(&settings, args).await,
            Command::Config => {
                println!("{}", serde_json::to_string_pretty(&settings)?);
                Ok(())
            }
            Command::Rate(_) => unreachable!("handled before the runtime starts"),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}
