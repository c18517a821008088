//! `idlemeter`: one binary, one subcommand per service or tool. This file is
//! wiring only: parse arguments and configuration, build, run, shut down.

mod commands;
mod settings;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::settings::Settings;

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
    /// Run the node collector: sample sandbox cgroups, ship node batches, act on commands.
    Collector,
    /// Produce usage from a simulated fleet of sandboxes to Kafka.
    Simulate(commands::simulate::SimulateArgs),
    /// Print the effective configuration (defaults + file + environment) as JSON.
    Config,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    idlemeter_telemetry::init_tracing();
    let settings = Settings::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Migrate => commands::migrate(&settings).await,
            Command::Ingest => commands::ingest(&settings).await,
            Command::Collector => commands::collector(&settings).await,
            Command::Simulate(args) => commands::simulate::run(&settings, args).await,
            Command::Config => {
                println!("{}", toml_of(&settings)?);
                Ok(())
            }
        }
    })
}

fn toml_of(settings: &Settings) -> anyhow::Result<String> {
    // figment has no TOML writer; JSON is as readable for a quick look.
    Ok(serde_json::to_string_pretty(settings)?)
}
