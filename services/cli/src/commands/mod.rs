//! Subcommand bodies. Each builds what it needs from [`Settings`] and runs it.

pub mod api;
pub mod customers;
pub mod invoices;
pub mod policy;
pub mod rate;
pub mod simulate;
pub mod whatif;

use anyhow::Context;
use idlemeter_collector::Collector;
use idlemeter_ingest::Ingest;
use idlemeter_policy::PolicyService;
use idlemeter_rater::Rater;
use idlemeter_store::Store;
use idlemeter_telemetry::{serve_metrics, Health, Readiness};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::settings::Settings;

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutdown requested");
}

/// What a service needs to work, for its `/health`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    pub kafka: bool,
    pub clickhouse: bool,
    /// A gauge of messages behind (checked against `[metrics]
    /// ready_max_lag_messages`).
    pub lag_gauge: Option<&'static str>,
}

/// The readiness checks of a service that needs `needs`: the brokers answer
/// a metadata request, ClickHouse answers `SELECT 1`, the lag is bounded.
pub fn readiness(
    settings: &Settings,
    registry: &prometheus::Registry,
    needs: Needs,
) -> anyhow::Result<Readiness> {
    let mut readiness = Readiness::new().every(std::time::Duration::from_secs(
        settings.metrics.ready_check_every_s.max(1),
    ));
    if needs.kafka {
        let probe = std::sync::Arc::new(settings.kafka.probe("idlemeter-readiness")?);
        readiness = readiness.check("kafka", move || {
            let probe = std::sync::Arc::clone(&probe);
            async move {
                tokio::task::spawn_blocking(move || {
                    probe.check(std::time::Duration::from_millis(1500))
                })
                .await
                .unwrap_or_else(|error| Err(format!("kafka probe panicked: {error}")))
            }
        });
    }
    if needs.clickhouse {
        let store = Store::new(&settings.clickhouse);
        readiness = readiness.check("clickhouse", move || {
            let store = store.clone();
            async move {
                store
                    .ping()
                    .await
                    .map_err(|error| format!("clickhouse unreachable: {error}"))
            }
        });
    }
    if let Some(name) = needs.lag_gauge {
        let registry = registry.clone();
        let max = settings.metrics.ready_max_lag_messages;
        readiness = readiness.check("lag", move || {
            let lag = gauge_value(&registry, name);
            async move {
                match lag {
                    Some(lag) if lag > max => Err(format!(
                        "{lag} messages behind (more than [metrics] ready_max_lag_messages = {max})"
                    )),
                    _ => Ok(()),
                }
            }
        });
    }
    Ok(readiness)
}

fn gauge_value(registry: &prometheus::Registry, name: &str) -> Option<i64> {
    registry
        .gather()
        .iter()
        .find(|family| family.name() == name)
        .and_then(|family| family.get_metric().first())
        .map(|metric| metric.get_gauge().get_value() as i64)
}

/// Serves `/metrics`, `/health` (readiness: `readiness`'s checks) and
/// `/live` on `[metrics] listen` until shutdown.
pub async fn expose(
    settings: &Settings,
    registry: prometheus::Registry,
    readiness: Readiness,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let health = Health::default();
    health.set_healthy(true);
    readiness.spawn(health.clone(), &registry, shutdown_signal())?;
    let listener = TcpListener::bind(&settings.metrics.listen)
        .await
        .with_context(|| format!("binding metrics.listen {}", settings.metrics.listen))?;
    tracing::info!(address = %listener.local_addr()?, "metrics, /health and /live served");
    Ok(tokio::spawn(serve_metrics(
        listener,
        registry,
        health,
        shutdown_signal(),
    )))
}

/// The one shape of every long-running service: readiness checks for what
/// it `needs`, `/metrics`, `/health` and `/live` served (see [`expose`])
/// while `run` runs, then the metrics server's own end.
pub async fn serve(
    settings: &Settings,
    registry: prometheus::Registry,
    needs: Needs,
    run: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let ready = readiness(settings, &registry, needs)?;
    let metrics = expose(settings, registry, ready).await?;
    run.await?;
    metrics.await??;
    Ok(())
}

/// Creates those of `topics` that do not exist yet, with `[topics]
/// partitions` partitions each.
async fn ensure_topics(settings: &Settings, topics: &[&String]) -> anyhow::Result<()> {
    let wanted: Vec<(&str, i32)> = topics
        .iter()
        .map(|topic| (topic.as_str(), settings.topics.partitions))
        .collect();
    Ok(settings.kafka.ensure_topics(&wanted).await?)
}

pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = Store::new(&settings.clickhouse);
    let now = u32::try_from(chrono::Utc::now().timestamp())?;
    let report = store.migrate(now).await?;
    for name in &report.already_applied {
        println!("already applied  {name}");
    }
    for name in &report.applied {
        println!("applied          {name}");
    }
    println!(
        "database {}: {} applied now, {} already applied",
        store.database(),
        report.applied.len(),
        report.already_applied.len()
    );
    if !settings.ledger.url.is_empty() {
        let ledger = idlemeter_ledger::Ledger::connect(&settings.ledger).await?;
        let applied = ledger.migrate().await?;
        for name in &applied {
            println!("applied          ledger {name}");
        }
        println!(
            "ledger schema {}: {} applied now",
            settings.ledger.schema,
            applied.len()
        );
    }
    Ok(())
}

/// Loads `[margin] node_costs` into ClickHouse, where the margin panel
/// and route read it.
pub async fn margin_load(settings: &Settings) -> anyhow::Result<()> {
    let costs = settings
        .margin
        .load()?
        .context("[margin] node_costs is empty: name a node cost sheet")?;
    let version = Store::new(&settings.clickhouse)
        .load_node_costs(&costs)
        .await?;
    eprintln!(
        "margin: {} node types from {} loaded as version {version}",
        costs.types.len(),
        settings.margin.node_costs
    );
    Ok(())
}

/// The ledger of `settings`, migrated, when one is configured.
pub(crate) async fn ledger(
    settings: &Settings,
) -> anyhow::Result<Option<idlemeter_ledger::Ledger>> {
    if settings.ledger.url.is_empty() {
        return Ok(None);
    }
    let ledger = idlemeter_ledger::Ledger::connect(&settings.ledger).await?;
    ledger.migrate().await?;
    Ok(Some(ledger))
}

/// What ingest must keep for the rater's sheet and idle policy: every
/// sample under a threshold idle policy (it classifies intervals by their
/// rates), what the sheet reads otherwise, and what any sheet reads when the
/// sheet cannot be read here (an ingest host without the price files).
fn compact_rule(rater: &idlemeter_rater::RaterConfig) -> idlemeter_core::CompactRule {
    use idlemeter_core::{CompactRule, PriceSheet};
    if !rater.idle_policy.is_empty() {
        return CompactRule::KEEP_ALL;
    }
    let sheet = std::fs::read_to_string(&rater.sheet)
        .map_err(|error| error.to_string())
        .and_then(|text| {
            PriceSheet::from_toml(&text, &rater.sheet).map_err(|error| error.to_string())
        });
    match sheet {
        Ok(sheet) => CompactRule::for_sheets([&sheet]),
        Err(error) => {
            tracing::warn!(sheet = %rater.sheet, %error, "price sheet not readable: compaction keeps what any sheet needs");
            CompactRule::EVERY_SHEET
        }
    }
}

pub async fn ingest(settings: &Settings) -> anyhow::Result<()> {
    let topics = &settings.topics;
    ensure_topics(settings, &[&topics.samples, &topics.events]).await?;
    // Dead letters are read by people, in order: one partition.
    settings
        .kafka
        .ensure_topics(&[(topics.samples_dead_letter.as_str(), 1)])
        .await?;
    let registry = prometheus::Registry::new();
    let events = idlemeter_ingest::events::EventIngest::build(
        &settings.kafka,
        Store::new(&settings.clickhouse),
        settings.topics.clone(),
        settings.ingest.clone(),
        settings.events.load_meters()?,
        &registry,
    )?;
    let events = tokio::spawn(events.run_until_stopped(shutdown_signal()));
    let ingest = Ingest::build(
        &settings.kafka,
        &settings.clickhouse,
        settings.topics.clone(),
        settings.ingest.clone(),
        &registry,
    )?
    .compact_rule(compact_rule(&settings.rater));
    let needs = Needs {
        kafka: true,
        clickhouse: true,
        lag_gauge: Some("idlemeter_ingest_lag_messages"),
    };
    serve(settings, registry, needs, async {
        ingest.run_until_stopped(shutdown_signal()).await?;
        events.await??;
        Ok(())
    })
    .await
}

/// The rater of one sheet: the primary `[rater] sheet` or one of
/// `[rater] currency_sheets`, each in its currency's lane when there are
/// several.
async fn build_rater(
    settings: &Settings,
    sheet: SheetLane,
    registry: &prometheus::Registry,
) -> anyhow::Result<Rater> {
    let sheet_path = &sheet.path;
    let mut rater = Rater::new(
        Store::new(&settings.clickhouse),
        &sheet.text,
        idlemeter_rater::RaterConfig {
            sheet: sheet_path.clone(),
            ..settings.rater.clone()
        },
        registry,
    )?
    .with_terms(settings.billing.clone())?
    .with_meters(&settings.events.load_meters()?)?;
    let currency = rater.currency().to_owned();
    if let Some(lane) = sheet.lane {
        rater = rater.with_lane(lane)?;
    }
    if settings.rater.divide_customers {
        let shares = settings
            .topics
            .share_customers(&settings.kafka, &format!("rater.{currency}"))
            .await?;
        rater = rater.with_shares(shares);
    }
    let policy_path = &settings.rater.idle_policy;
    if !policy_path.is_empty() {
        let text = std::fs::read_to_string(policy_path)
            .with_context(|| format!("reading idle policy {policy_path}"))?;
        rater = rater.with_idle_policy(&text)?;
    }
    let live = &settings.rater;
    if live.live_interval_seconds > 0 && live.live_source == idlemeter_rater::LiveSource::Kafka {
        use rdkafka::consumer::Consumer;
        let consumer = settings.kafka.tail_consumer("idlemeter-rater-live")?;
        consumer.subscribe(&[settings.topics.samples.as_str()])?;
        let (sender, feed) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(idlemeter_rater::feed_from_kafka(consumer, sender));
        rater = rater.with_live_feed(feed);
    }
    tracing::info!(sheet = %sheet_path, checksum = rater.sheet_checksum(), "rater started");
    Ok(rater)
}

/// One price sheet of `settings`, read, with the customers it bills.
pub(crate) struct SheetLane {
    pub path: String,
    pub text: String,
    /// `None` when it is the only sheet (it bills everyone).
    pub lane: Option<idlemeter_store::CurrencyLane>,
}

impl SheetLane {
    /// The sheet with the idle policy of `files` (shared by every sheet).
    pub fn source<'a>(
        &'a self,
        files: &'a invoices::SheetFiles,
        settings: &'a Settings,
    ) -> idlemeter_store::SheetSource<'a> {
        idlemeter_store::SheetSource {
            sheet_text: &self.text,
            sheet_label: &self.path,
            ..files.source(settings)
        }
    }
}

/// Each sheet of `settings` (the primary first) with its lane: none when
/// there is one sheet; else each sheet's currency, the primary's also
/// taking customers without a record. Refuses two sheets of one currency.
pub(crate) fn sheet_lanes(settings: &Settings) -> anyhow::Result<Vec<SheetLane>> {
    let rater = &settings.rater;
    let read = |path: &String| {
        std::fs::read_to_string(path).with_context(|| format!("reading price sheet {path}"))
    };
    if rater.currency_sheets.is_empty() {
        return Ok(vec![SheetLane {
            path: rater.sheet.clone(),
            text: read(&rater.sheet)?,
            lane: None,
        }]);
    }
    let mut seen = std::collections::BTreeMap::new();
    let mut lanes = Vec::new();
    for (index, path) in std::iter::once(&rater.sheet)
        .chain(&rater.currency_sheets)
        .enumerate()
    {
        let text = read(path)?;
        let currency = idlemeter_core::PriceSheet::from_toml(&text, path)?
            .currency
            .code()
            .to_owned();
        if let Some(other) = seen.insert(currency.clone(), path.clone()) {
            anyhow::bail!(
                "sheets {other} and {path} both price in {currency}: [rater] currency_sheets takes one sheet per further currency"
            );
        }
        lanes.push(SheetLane {
            path: path.clone(),
            text,
            lane: Some(idlemeter_store::CurrencyLane {
                currency,
                primary: index == 0,
            }),
        });
    }
    Ok(lanes)
}

pub async fn rater(settings: &Settings) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let mut raters = Vec::new();
    for sheet in sheet_lanes(settings)? {
        raters.push(build_rater(settings, sheet, &registry).await?);
    }
    let live = &settings.rater;
    let needs = Needs {
        kafka: live.live_interval_seconds > 0
            && live.live_source == idlemeter_rater::LiveSource::Kafka,
        clickhouse: true,
        lag_gauge: None,
    };
    serve(settings, registry, needs, async {
        // One shutdown signal stops every sheet's rater.
        let shutdown = futures::FutureExt::shared(shutdown_signal());
        futures::future::try_join_all(
            raters
                .into_iter()
                .map(|rater| rater.run_until_stopped(shutdown.clone())),
        )
        .await?;
        Ok(())
    })
    .await
}

pub async fn policy(settings: &Settings) -> anyhow::Result<()> {
    let topics = &settings.topics;
    ensure_topics(
        settings,
        &[&topics.samples, &topics.commands, &topics.leases],
    )
    .await?;
    let file = &settings.policy.file;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading policy file {file}"))?;
    let registry = prometheus::Registry::new();
    let service = PolicyService::build(
        &settings.kafka,
        Store::new(&settings.clickhouse),
        settings.topics.clone(),
        settings.policy.clone(),
        &text,
        &registry,
    )
    .await?
    .with_period(settings.billing.period);
    let needs = Needs {
        kafka: true,
        clickhouse: true,
        lag_gauge: Some("idlemeter_policy_lag_messages"),
    };
    serve(settings, registry, needs, async {
        Ok(service.run_until_stopped(shutdown_signal()).await?)
    })
    .await
}

pub async fn collector(settings: &Settings) -> anyhow::Result<()> {
    ensure_topics(
        settings,
        &[&settings.topics.samples, &settings.topics.commands],
    )
    .await
    .unwrap_or_else(|error| {
        // The collector must sample and spool even while Kafka is down.
        tracing::warn!(%error, "could not ensure kafka topics; continuing");
    });
    let registry = prometheus::Registry::new();
    let collector = Collector::build(
        settings.collector.clone(),
        &settings.kafka,
        settings.topics.clone(),
        &registry,
    )?;
    tracing::info!(node = %collector.node(), "collector built");
    // The collector samples and spools while Kafka is down: ready means it
    // can ship.
    let needs = Needs {
        kafka: true,
        ..Needs::default()
    };
    serve(settings, registry, needs, async {
        Ok(collector.run_until_stopped(shutdown_signal()).await?)
    })
    .await
}
