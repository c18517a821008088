//! Configuration: one typed struct, loaded from built-in defaults, then an
//! optional TOML file, then environment variables `IDLEMETER_<SECTION>__<KEY>`
//! (for example `IDLEMETER_KAFKA__BROKERS=10.0.0.5:9092`,
//! `IDLEMETER_CLICKHOUSE__DATABASE=billing`). Later sources win.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use idlemeter_api::ApiConfig;
use idlemeter_bus::{KafkaSettings, Topics};
use idlemeter_collector::CollectorConfig;
use idlemeter_core::BillingTerms;
use idlemeter_ingest::IngestConfig;
use idlemeter_invoicer::InvoicerConfig;
use idlemeter_policy::PolicyConfig;
use idlemeter_rater::RaterConfig;
use idlemeter_store::ClickHouseSettings;
use serde::{Deserialize, Serialize};

/// Everything any subcommand may need.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub clickhouse: ClickHouseSettings,
    pub topics: Topics,
    pub ingest: IngestConfig,
    pub rater: RaterConfig,
    /// Issuer, period, tax rates and adjustment lookback: one set of terms
    /// for the rater, the invoicer and the API.
    pub billing: BillingTerms,
    pub collector: CollectorConfig,
    pub policy: PolicyConfig,
    pub invoicer: InvoicerConfig,
    pub api: ApiConfig,
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub events: EventsSettings,
    /// PostgreSQL, where billing entities change under transactions
    /// (`IDLEMETER_LEDGER__URL`); "" for none: invoices are then numbered
    /// in ClickHouse under the invoicer's lock file (one host only).
    #[serde(default)]
    pub ledger: idlemeter_ledger::LedgerSettings,
    #[serde(default)]
    pub margin: MarginSettings,
}

/// Margin: what nodes cost (see `idlemeter_core::margin`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MarginSettings {
    /// A node cost sheet (TOML: `[sheet] currency`, `[[types]]` with
    /// `nodes`, `cost_per_hour`, capacities); "" for none. The API loads
    /// it into ClickHouse at start (`idlemeter margin load` does too).
    pub node_costs: String,
}

impl MarginSettings {
    /// The node cost sheet, read and checked; `None` when not configured.
    pub fn load(&self) -> anyhow::Result<Option<idlemeter_core::margin::NodeCosts>> {
        if self.node_costs.is_empty() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.node_costs).map_err(|error| {
            anyhow::anyhow!("reading node cost sheet {}: {error}", self.node_costs)
        })?;
        idlemeter_core::margin::NodeCosts::from_toml(&text, &self.node_costs)
            .map(Some)
            .map_err(|error| anyhow::anyhow!(error))
    }
}

/// Usage events (OpenMeter-compatible): the meters over them and limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSettings {
    /// A TOML file of `[[meters]]` (OpenMeter's meter keys); "" for none
    /// (events are stored, nothing is metered). The API and ingest read
    /// the same file.
    pub meters: String,
    /// Events one `POST /api/v1/events` may carry.
    pub max_events_per_request: usize,
}

impl Default for EventsSettings {
    fn default() -> Self {
        Self {
            meters: String::new(),
            max_events_per_request: 1000,
        }
    }
}

impl EventsSettings {
    /// The meters of `meters`, checked; none when it is "".
    pub fn load_meters(&self) -> anyhow::Result<idlemeter_core::events::Meters> {
        if self.meters.is_empty() {
            return Ok(Default::default());
        }
        let text = std::fs::read_to_string(&self.meters)
            .map_err(|error| anyhow::anyhow!("reading meters {}: {error}", self.meters))?;
        idlemeter_core::events::Meters::from_toml(&text, &self.meters).map_err(anyhow::Error::msg)
    }
}

/// Where a long-running service serves `/metrics` and `/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// `host:port`; port 0 picks a free one (logged at start).
    pub listen: String,
    /// `/health` answers 503 while a consuming service (ingest, policy) is
    /// more than this many messages behind its topics.
    #[serde(default = "default_ready_max_lag")]
    pub ready_max_lag_messages: i64,
    /// How often the readiness checks run, in seconds.
    #[serde(default = "default_ready_every")]
    pub ready_check_every_s: u64,
}

fn default_ready_max_lag() -> i64 {
    100_000
}

fn default_ready_every() -> u64 {
    5
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            kafka: KafkaSettings {
                brokers: "127.0.0.1:19092".to_owned(),
                ..KafkaSettings::default()
            },
            clickhouse: ClickHouseSettings {
                url: "http://127.0.0.1:18123".to_owned(),
                database: "idlemeter".to_owned(),
                user: "default".to_owned(),
                password: Default::default(),
                cluster: None,
                max_replica_delay_s: idlemeter_store::DEFAULT_MAX_REPLICA_DELAY_S,
            },
            topics: Topics::default(),
            ingest: IngestConfig::default(),
            rater: RaterConfig::default(),
            billing: BillingTerms::default(),
            collector: CollectorConfig::default(),
            policy: PolicyConfig::default(),
            invoicer: InvoicerConfig::default(),
            api: ApiConfig::default(),
            events: EventsSettings::default(),
            margin: MarginSettings::default(),
            ledger: idlemeter_ledger::LedgerSettings::default(),
            metrics: MetricsSettings {
                listen: "127.0.0.1:9464".to_owned(),
                ready_max_lag_messages: default_ready_max_lag(),
                ready_check_every_s: default_ready_every(),
            },
        }
    }
}

impl Settings {
    /// Defaults ← `file` (if given; it must exist) ← `IDLEMETER_*` environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "config file {} does not exist",
                file.display()
            );
            figment = figment.merge(Toml::file(file));
        }
        let settings = figment
            // Only `SECTION__KEY` variables: IDLEMETER_CONFIG (the file's path) and the
            // service scripts' own IDLEMETER_* variables are not settings.
            .merge(
                Env::prefixed("IDLEMETER_")
                    .filter(|key| key.as_str().contains("__"))
                    .split("__"),
            )
            .extract()?;
        Ok(settings)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
mod tests {
    use super::*;

    #[test]
    fn file_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "idlemeter.toml",
                "[collector]\nnode = \"n-7\"\n[clickhouse]\nurl = \"http://ch:8123\"\ndatabase = \"from_file\"\n[ingest]\nbatch_max_samples = 7\n",
            )?;
            jail.set_env("IDLEMETER_CLICKHOUSE__DATABASE", "from_env");
            jail.set_env("IDLEMETER_CONFIG", "idlemeter.toml");
            jail.set_env("IDLEMETER_RUN_DIR", "/tmp/not-a-setting");
            jail.set_env("IDLEMETER_COLLECTOR__SPOOL_MAX_BYTES", "4096");
            let settings = Settings::load(Some(Path::new("idlemeter.toml"))).expect("loads");
            assert_eq!(settings.clickhouse.url, "http://ch:8123");
            assert_eq!(settings.clickhouse.database, "from_env");
            assert_eq!(settings.ingest.batch_max_samples, 7);
            assert_eq!(settings.kafka.brokers, "127.0.0.1:19092");
            assert_eq!(settings.collector.interval_ms, 1_000);
            assert_eq!(settings.collector.node, "n-7");
            assert_eq!(settings.collector.spool_max_bytes, 4096);
            Ok(())
        });
    }

    /// Finding "secrets": what `idlemeter config` prints (the settings as
    /// JSON) holds no secret, wherever it came from; the services still get
    /// the values.
    #[test]
    fn idlemeter_config_prints_every_secret_redacted() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "idlemeter.toml",
                "[kafka]\nbrokers = \"b:9092\"\nsasl_password = \"kafka-s3cret-1\"\n[kafka.properties]\n\"ssl.key.password\" = \"kafka-s3cret-2\"\n[policy]\nwebhook_secret = \"webhook-s3cret-3\"\n",
            )?;
            jail.set_env("IDLEMETER_CLICKHOUSE__PASSWORD", "clickhouse-s3cret-4");
            jail.set_env("IDLEMETER_POLICY__COMMAND_KEY", "command-s3cret-5");
            jail.set_env("IDLEMETER_COLLECTOR__COMMAND_KEY", "command-s3cret-5");
            jail.set_env("IDLEMETER_API__SECRETS_KEY", "api-s3cret-6");
            let settings = Settings::load(Some(Path::new("idlemeter.toml"))).expect("loads");
            assert_eq!(settings.clickhouse.password.expose(), "clickhouse-s3cret-4");
            assert_eq!(settings.kafka.sasl_password.expose(), "kafka-s3cret-1");
            assert_eq!(settings.policy.command_key.expose(), "command-s3cret-5");
            let printed = serde_json::to_string_pretty(&settings).expect("serialises");
            let debug = format!("{settings:?}");
            for shown in [&printed, &debug] {
                assert!(!shown.contains("s3cret"), "{shown}");
            }
            assert!(printed.contains("<redacted>"));
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("bad.toml", "[ingest]\nbatch_size = 7\n")?;
            let error = Settings::load(Some(Path::new("bad.toml"))).expect_err("refused");
            assert!(error.to_string().contains("batch_size"), "{error}");
            Ok(())
        });
    }
}
