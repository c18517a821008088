//! `idlemeter api` (the customer usage API) and `idlemeter keys` (its API keys).

use anyhow::Context;
use clap::{Args, Subcommand};
use idlemeter_api::{auth, Api};
use idlemeter_core::CustomerId;
use idlemeter_store::Store;
use tokio::net::TcpListener;

use crate::settings::Settings;

pub async fn serve(settings: &Settings) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let store = Store::new(&settings.clickhouse);
    let files = super::invoices::SheetFiles::read(settings)?;
    let billing = idlemeter_api::Billing::new(files.source(settings), settings.billing.clone())?;
    // The node cost sheet, when configured, is what margin reads.
    if let Some(costs) = settings.margin.load()? {
        let version = store.load_node_costs(&costs).await?;
        tracing::info!(sheet = %settings.margin.node_costs, version, "node costs loaded");
    }
    // One billing per further currency's sheet, beside the primary's.
    let mut currency_billing = Vec::new();
    for sheet in super::sheet_lanes(settings)?.iter().skip(1) {
        currency_billing.push(idlemeter_api::Billing::new(
            sheet.source(&files, settings),
            settings.billing.clone(),
        )?);
    }
    let mut api = Api::new(store, billing, settings.api.clone(), &registry)
        .await?
        .with_currency_sheets(currency_billing);
    if let Some(ledger) = super::ledger(settings).await? {
        api = api.with_ledger(ledger);
    }
    if settings.api.live_state {
        // Sandbox state within a second: the stream's newest samples, read
        // from the topic's end by this replica alone (never committed).
        let view = std::sync::Arc::new(idlemeter_api::live::LiveView::new());
        let consumer = settings.kafka.tail_consumer("idlemeter-api-live")?;
        rdkafka::consumer::Consumer::subscribe(&consumer, &[settings.topics.samples.as_str()])
            .context("subscribing to the samples topic for live state")?;
        let (sender, receiver) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(idlemeter_rater::feed_from_kafka(consumer, sender));
        tokio::spawn(idlemeter_api::live::follow(
            view.clone(),
            receiver,
            std::time::Duration::from_secs(settings.api.live_forget_s),
        ));
        api = api.with_live(view);
    }
    api = api.with_events(event_sink(settings).await?);
    let listener = TcpListener::bind(&settings.api.listen)
        .await
        .with_context(|| format!("binding api.listen {}", settings.api.listen))?;
    tracing::info!(address = %listener.local_addr()?, "usage api served (docs at /docs)");
    let needs = super::Needs {
        kafka: settings.api.live_state,
        clickhouse: true,
        lag_gauge: None,
    };
    super::serve(settings, registry.clone(), needs, async {
        let owns: Option<idlemeter_core::Share> =
            if settings.api.divide_alerts && settings.api.alert_interval_s > 0 {
                let shares = settings
                    .topics
                    .share_customers(&settings.kafka, "api.alerts")
                    .await?;
                Some(shares.share())
            } else {
                None
            };
        let alerts = {
            let api = api.clone();
            let registry = registry.clone();
            tokio::spawn(async move {
                api.deliver_alerts_until_stopped(&registry, owns, super::shutdown_signal())
                    .await
            })
        };
        api.serve(listener, super::shutdown_signal()).await?;
        alerts.abort();
        Ok(())
    })
    .await
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; prints it once (only its hash is stored).
    Create {
        /// The tenant the key sees (with --ingest: whose events it may send).
        #[arg(long, conflicts_with = "admin", required_unless_present_any = ["admin", "ingest"])]
        customer: Option<String>,
        /// An admin key (finance): sees every tenant.
        #[arg(long)]
        admin: bool,
        /// An ingest key: sends usage events (`POST /api/v1/events`) for
        /// --customer's subjects, or every customer's without it; reads nothing.
        #[arg(long, conflicts_with = "admin")]
        ingest: bool,
        /// A label: who holds the key, what for.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys (ids, tenants, state; never secrets).
    List,
    /// Revoke a key by id (every API replica refuses it within api.key_refresh_ms).
    Revoke { key_id: String },
}

fn now_unix() -> u32 {
    idlemeter_store::unix_seconds(chrono::Utc::now())
}

pub async fn keys(settings: &Settings, args: KeysArgs) -> anyhow::Result<()> {
    let store = Store::new(&settings.clickhouse);
    match args.command {
        KeysCommand::Create {
            customer,
            admin: _,
            ingest,
            name,
        } => {
            let customer = customer
                .map(|c| CustomerId::parse(c).context("--customer"))
                .transpose()?;
            let created = if ingest {
                auth::generate_ingest(customer.as_ref(), &name, now_unix())
            } else {
                auth::generate(customer.as_ref(), &name, now_unix())
            };
            // In the ledger (copied to ClickHouse) when there is one.
            let ledger = super::ledger(settings).await?;
            idlemeter_ledger::record_api_key(ledger.as_ref(), &store, &created.row).await?;
            eprintln!(
                "created {} key {} (shown once; store it now)",
                created.row.role, created.row.key_id
            );
            println!("{}", created.key);
        }
        KeysCommand::List => {
            println!("key_id\trole\tcustomer\tname\tcreated_at\trevoked_at");
            for row in store.api_keys().await? {
                let when = |unix: u32| {
                    if unix == 0 {
                        "-".to_owned()
                    } else {
                        idlemeter_api::views::time(unix).to_rfc3339()
                    }
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    row.key_id,
                    row.role,
                    row.customer,
                    row.name,
                    when(row.created_at),
                    when(row.revoked_at)
                );
            }
        }
        KeysCommand::Revoke { key_id } => {
            let row = store
                .api_keys()
                .await?
                .into_iter()
                .find(|row| row.key_id == key_id)
                .with_context(|| format!("no key {key_id:?}"))?;
            anyhow::ensure!(row.revoked_at == 0, "key {key_id} is already revoked");
            let ledger = super::ledger(settings).await?;
            idlemeter_ledger::record_api_key(
                ledger.as_ref(),
                &store,
                &auth::revoked(&row, now_unix()),
            )
            .await?;
            println!("revoked {key_id}");
        }
    }
    Ok(())
}

/// Events accepted by `POST /api/v1/events` go to the events topic, keyed
/// by subject, each acknowledged by the brokers (idempotent producer).
async fn event_sink(settings: &Settings) -> anyhow::Result<idlemeter_api::events::EventSink> {
    let topic = settings.topics.events.as_str();
    if let Err(error) = settings
        .kafka
        .ensure_topics(&[(topic, settings.topics.partitions)])
        .await
    {
        // The API serves reads while Kafka is down; events wait for it.
        tracing::warn!(%error, %topic, "could not ensure the events topic; continuing");
    }
    Ok(idlemeter_api::events::EventSink {
        publish: settings.kafka.publisher("idlemeter-api-events", topic)?,
        meters: std::sync::Arc::new(settings.events.load_meters()?),
        max_events: settings.events.max_events_per_request,
    })
}
