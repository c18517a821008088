//! `idlemeter customers`: customer records and plan changes in the ledger
//! (`[ledger] url`), copied to ClickHouse where the rater, the API and the
//! invoicer read them. `import` brings in what exists today: a customers
//! TOML file, or `--from-config` the sheet's `[customers.X] plan` and
//! `[billing] tax_rates`.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use idlemeter_ledger::{CustomerRecord, Ledger, SubscriptionRecord};
use idlemeter_store::Store;
use rust_decimal::Decimal;

use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct CustomersArgs {
    #[command(subcommand)]
    command: CustomersCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CustomersCommand {
    /// Create or replace a customer's record.
    Set {
        #[arg(long)]
        id: String,
        /// ISO 4217 code; default the rater's sheet's.
        #[arg(long)]
        currency: Option<String>,
        #[arg(long, default_value = "")]
        name: String,
        /// 0.2 is 20 %; absent: `[billing] tax_rates` decides.
        #[arg(long)]
        tax_rate: Option<Decimal>,
        #[arg(long, default_value = "")]
        tax_id: String,
        #[arg(long, default_value = "")]
        email: String,
        /// Spend per period that sends `customer.spend_limit_reached`.
        #[arg(long)]
        spend_limit: Option<Decimal>,
        /// `key=value`, repeated.
        #[arg(long = "meta")]
        metadata: Vec<String>,
    },
    /// Put a customer on a plan of the rater's sheet from an instant on
    /// (RFC 3339); the period it falls in is prorated per second.
    Subscribe {
        #[arg(long)]
        id: String,
        #[arg(long)]
        plan: String,
        #[arg(long)]
        from: DateTime<Utc>,
    },
    /// Print a customer's record and plan changes as JSON.
    Show {
        #[arg(long)]
        id: String,
    },
    /// Print every customer id.
    List,
    /// Import customers from a TOML file (`[customers.<id>]` tables with the
    /// record's fields and optionally `plan` and `plan_from`), or with
    /// `--from-config` from the sheet's plans and `[billing] tax_rates`.
    Import {
        file: Option<String>,
        #[arg(long)]
        from_config: bool,
    },
}

/// One customer of an import file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportedCustomer {
    #[serde(default)]
    name: String,
    currency: Option<String>,
    tax_rate: Option<Decimal>,
    #[serde(default)]
    tax_id: String,
    #[serde(default)]
    billing_email: String,
    spend_limit: Option<Decimal>,
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    plan: Option<String>,
    plan_from: Option<toml::value::Datetime>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportFile {
    customers: BTreeMap<String, ImportedCustomer>,
}

/// The ledger, refusing to run without one.
async fn ledger(settings: &Settings) -> anyhow::Result<Ledger> {
    super::ledger(settings)
        .await?
        .context("customers live in the ledger: set [ledger] url (IDLEMETER_LEDGER__URL)")
}

fn sheet(settings: &Settings) -> anyhow::Result<idlemeter_core::PriceSheet> {
    let files = super::invoices::SheetFiles::read(settings)?;
    Ok(idlemeter_core::PriceSheet::from_toml(
        &files.sheet,
        &settings.rater.sheet,
    )?)
}

/// Records a plan change after checking the plan is in the sheet, then
/// copies it to ClickHouse.
async fn subscribe(
    settings: &Settings,
    ledger: &Ledger,
    sheet: &idlemeter_core::PriceSheet,
    id: &str,
    change: &SubscriptionRecord,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        sheet.plan_named(&change.plan).is_some(),
        "plan {:?} is not in sheet {}",
        change.plan,
        sheet.label
    );
    let done = ledger
        .subscribe(&settings.billing.issuer, id, change)
        .await?;
    if let Some(replaced) = done.replaced {
        eprintln!(
            "customers: {id}'s change at {} was to {replaced}; now {}",
            change.effective_from, change.plan
        );
    }
    Ok(())
}

pub async fn run(settings: &Settings, args: CustomersArgs) -> anyhow::Result<()> {
    let issuer = settings.billing.issuer.as_str();
    let ledger = ledger(settings).await?;
    let store = Store::new(&settings.clickhouse);
    match args.command {
        CustomersCommand::Set {
            id,
            currency,
            name,
            tax_rate,
            tax_id,
            email,
            spend_limit,
            metadata,
        } => {
            let currency = match currency {
                Some(currency) => currency,
                None => sheet(settings)?.currency.code().to_owned(),
            };
            let metadata = metadata
                .iter()
                .map(|pair| {
                    let (key, value) = pair
                        .split_once('=')
                        .with_context(|| format!("--meta {pair:?}: expected key=value"))?;
                    Ok((key.to_owned(), serde_json::Value::String(value.to_owned())))
                })
                .collect::<anyhow::Result<_>>()?;
            let record = CustomerRecord {
                id: id.clone(),
                name,
                currency,
                tax_rate,
                tax_id,
                billing_email: email,
                spend_limit,
                metadata,
            };
            let saved = ledger.save_customer(issuer, &record).await?;
            ledger.relay(&store).await?;
            eprintln!(
                "customers: {id} {} (version {})",
                if saved.created { "created" } else { "updated" },
                saved.version
            );
        }
        CustomersCommand::Subscribe { id, plan, from } => {
            let sheet = sheet(settings)?;
            let change = SubscriptionRecord {
                plan: plan.clone(),
                effective_from: from,
            };
            subscribe(settings, &ledger, &sheet, &id, &change).await?;
            ledger.relay(&store).await?;
            eprintln!("customers: {id} is on {plan} from {from}");
        }
        CustomersCommand::Show { id } => {
            let (record, version, plans) = ledger
                .customer(issuer, &id)
                .await?
                .with_context(|| format!("no customer {id:?} in the ledger"))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "customer": record,
                    "version": version,
                    "subscriptions": plans,
                }))?
            );
        }
        CustomersCommand::List => {
            for id in ledger.customer_ids(issuer).await? {
                println!("{id}");
            }
        }
        CustomersCommand::Import { file, from_config } => {
            let sheet = sheet(settings)?;
            let mut imported = match (file, from_config) {
                (Some(path), false) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {path}"))?;
                    toml::from_str::<ImportFile>(&text)
                        .with_context(|| format!("{path}: not a customers file"))?
                        .customers
                }
                (None, true) => from_config_customers(settings, &sheet)?,
                _ => anyhow::bail!("give a customers TOML file or --from-config (not both)"),
            };
            let total = imported.len();
            let bar = crate::progress::Progress::new("import", total as u64, "customers");
            for (done, (id, customer)) in std::mem::take(&mut imported).into_iter().enumerate() {
                let record = CustomerRecord {
                    id: id.clone(),
                    name: customer.name,
                    currency: customer
                        .currency
                        .unwrap_or_else(|| sheet.currency.code().to_owned()),
                    tax_rate: customer.tax_rate,
                    tax_id: customer.tax_id,
                    billing_email: customer.billing_email,
                    spend_limit: customer.spend_limit,
                    metadata: customer.metadata,
                };
                ledger
                    .save_customer(issuer, &record)
                    .await
                    .with_context(|| format!("customer {id}"))?;
                if let Some(plan) = customer.plan {
                    // From the given instant, else from the end of their
                    // last invoice (earlier periods were billed by the
                    // sheet's plan, which the import reproduces).
                    let from = match customer.plan_from {
                        Some(at) => at
                            .to_string()
                            .parse::<DateTime<Utc>>()
                            .with_context(|| format!("customer {id}: plan_from {at}"))?,
                        None => ledger
                            .invoiced_until(issuer, &id)
                            .await?
                            .unwrap_or(DateTime::UNIX_EPOCH),
                    };
                    let change = SubscriptionRecord {
                        plan,
                        effective_from: from,
                    };
                    subscribe(settings, &ledger, &sheet, &id, &change)
                        .await
                        .with_context(|| format!("customer {id}"))?;
                }
                bar.set(done as u64 + 1);
            }
            bar.finish();
            let relayed = ledger.relay(&store).await?;
            eprintln!("customers: {total} imported ({relayed} rows copied to ClickHouse)");
        }
    }
    Ok(())
}

/// What exists today outside the ledger: each customer the sheet names
/// (with their plan) and each of `[billing] tax_rates`, in the sheet's
/// currency.
fn from_config_customers(
    settings: &Settings,
    sheet: &idlemeter_core::PriceSheet,
) -> anyhow::Result<BTreeMap<String, ImportedCustomer>> {
    let mut customers: BTreeMap<String, ImportedCustomer> = BTreeMap::new();
    let blank = || ImportedCustomer {
        name: String::new(),
        currency: None,
        tax_rate: None,
        tax_id: String::new(),
        billing_email: String::new(),
        spend_limit: None,
        metadata: serde_json::Map::new(),
        plan: None,
        plan_from: None,
    };
    for (id, plan) in sheet.customer_plans() {
        customers.entry(id.to_owned()).or_insert_with(blank).plan = Some(plan.to_owned());
    }
    for (id, rate) in settings.billing.tax_rates.rates() {
        customers
            .entry(id.to_string())
            .or_insert_with(blank)
            .tax_rate = Some(*rate);
    }
    Ok(customers)
}
