//! `idlemeter invoices`: finance's tools over the invoicer. `close` issues a
//! period's invoices (or, with `--dry-run`, shows what it would issue and how
//! already issued ones would differ now); `show` prints one invoice as JSON,
//! CSV or HTML; `preview` prints a draft of a customer's open period.

use anyhow::Context;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use idlemeter_invoicer::{to_csv, to_html, to_json, Invoice, Invoicer};
use idlemeter_store::Store;

use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct InvoicesArgs {
    #[command(subcommand)]
    command: InvoicesCommand,
}

#[derive(Debug, clap::Subcommand)]
enum InvoicesCommand {
    /// Issue the invoices of a closed period: `--period 2026-10` (monthly) or `2026-10-05` (daily).
    Close {
        #[arg(long)]
        period: String,
        /// Compute and print, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print one issued invoice.
    Show {
        #[arg(long)]
        number: u64,
        #[arg(long, default_value = "json")]
        format: Format,
    },
    /// Record a prepaid wallet deposit (same --id twice records it once).
    Deposit {
        #[arg(long)]
        customer: String,
        /// Decimal amount in the sheet's currency, e.g. 100 or 49.99.
        #[arg(long)]
        amount: String,
        #[arg(long)]
        id: String,
        /// When it was paid (RFC 3339); default now.
        #[arg(long)]
        at: Option<DateTime<Utc>>,
    },
    /// Issue a credit note on an issued invoice (needs the ledger): every
    /// charge line still creditable, or the lines named with `--line`.
    CreditNote {
        /// The credited invoice's number.
        #[arg(long)]
        number: u64,
        /// `N` credits what is left of line N; `N=AMOUNT` that amount of it.
        /// Repeat for several lines; none credits the whole invoice.
        #[arg(long = "line")]
        lines: Vec<String>,
        /// `next-invoice` (the customer's credit balance, applied to their
        /// next invoice before the wallet) or `wallet` (a deposit).
        #[arg(long, default_value = "next-invoice")]
        settle: String,
        /// Why: printed on the note.
        #[arg(long)]
        reason: String,
    },
    /// Copy the invoices, wallet deposits and API keys ClickHouse holds into the ledger (`[ledger] url`)
    /// under their own numbers: the move of invoicing to PostgreSQL.
    ImportToLedger,
    /// Print a draft of a customer's open period (never stored).
    Preview {
        #[arg(long)]
        customer: String,
        #[arg(long, default_value = "json")]
        format: Format,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    Json,
    Csv,
    Html,
    /// Binary: redirect stdout to a file.
    Pdf,
}

/// Writes `invoice` to stdout in `format`; a PDF prints the seller of
/// `[billing] seller`.
fn print_invoice(invoice: &Invoice, format: Format, settings: &Settings) -> anyhow::Result<()> {
    use std::io::Write as _;
    let bytes = match format {
        Format::Json => to_json(invoice).into_bytes(),
        Format::Csv => to_csv(invoice).into_bytes(),
        Format::Html => to_html(invoice).into_bytes(),
        Format::Pdf => idlemeter_store::pdf::to_pdf(
            invoice,
            &idlemeter_store::pdf::Parties::of(invoice, &settings.billing.seller),
        ),
    };
    std::io::stdout().write_all(&bytes)?;
    Ok(())
}

/// Closes one sheet's period, reporting on stderr; returns the issued
/// invoices' summaries and how many customers were left out.
async fn close(
    invoicer: &Invoicer,
    start: DateTime<Utc>,
    dry_run: bool,
) -> anyhow::Result<(Vec<serde_json::Value>, usize)> {
    let bar = std::sync::OnceLock::new();
    let progress = |done: usize, total: usize| {
        bar.get_or_init(|| crate::progress::Progress::new("invoices", total as u64, "customers"))
            .set(done as u64);
    };
    let outcome = invoicer
        .close_period(start, Utc::now(), dry_run, &progress)
        .await?;
    if let Some(bar) = bar.get() {
        bar.finish();
    }
    let verb = if dry_run { "would issue" } else { "issued" };
    eprintln!(
        "invoices ({}): {verb} {}, {} already issued, {} customers with nothing to bill, {} caught up from samples",
        invoicer.currency(),
        outcome.issued_count,
        outcome.already_issued.len(),
        outcome.nothing_to_bill,
        outcome.caught_up
    );
    for (customer, reason) in &outcome.failed {
        eprintln!(
            "invoices: {customer} not invoiced: {reason} (in rating_errors; the next run retries)"
        );
    }
    for (number, customer, issued, now) in &outcome.differences {
        eprintln!(
            "invoices: #{number} ({customer}) was issued at {issued}; re-rated now it would be {now}: the next invoice carries the difference as an adjustment"
        );
    }
    let summary = outcome
        .issued
        .iter()
        .map(|invoice| {
            serde_json::json!({
                "number": invoice.number,
                "customer": invoice.customer,
                "total": invoice.total.to_string(),
                "currency": invoice.currency,
            })
        })
        .collect();
    Ok((summary, outcome.failed.len()))
}

/// `--line N` or `--line N=AMOUNT`, repeated; none is the whole invoice.
fn credit_request(lines: &[String]) -> anyhow::Result<idlemeter_core::credit_note::CreditRequest> {
    use idlemeter_core::credit_note::CreditRequest;
    if lines.is_empty() {
        return Ok(CreditRequest::Full);
    }
    let parsed = lines
        .iter()
        .map(|text| {
            let (number, amount) = match text.split_once('=') {
                Some((number, amount)) => (number, Some(amount)),
                None => (text.as_str(), None),
            };
            let number: u16 = number
                .trim()
                .parse()
                .with_context(|| format!("--line {text:?}: expected N or N=AMOUNT"))?;
            let amount = amount
                .map(|amount| amount.trim().parse::<rust_decimal::Decimal>())
                .transpose()
                .with_context(|| format!("--line {text:?}: the amount is not a decimal"))?;
            Ok((number, amount))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(CreditRequest::Lines(parsed))
}

fn parse_period(text: &str) -> anyhow::Result<DateTime<Utc>> {
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d"))
        .with_context(|| format!("--period {text:?}: expected YYYY-MM or YYYY-MM-DD"))?;
    Ok(Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight exists")))
}

/// The rater's price sheet and idle policy files, read: what every service
/// that computes money rates with.
pub(crate) struct SheetFiles {
    pub sheet: String,
    pub policy: Option<String>,
}

impl SheetFiles {
    pub(crate) fn read(settings: &Settings) -> anyhow::Result<Self> {
        let rater = &settings.rater;
        let sheet = std::fs::read_to_string(&rater.sheet)
            .with_context(|| format!("reading price sheet {}", rater.sheet))?;
        let policy = if rater.idle_policy.is_empty() {
            None
        } else {
            Some(
                std::fs::read_to_string(&rater.idle_policy)
                    .with_context(|| format!("reading idle policy {}", rater.idle_policy))?,
            )
        };
        Ok(Self { sheet, policy })
    }

    pub(crate) fn source<'a>(&'a self, settings: &'a Settings) -> idlemeter_store::SheetSource<'a> {
        idlemeter_store::SheetSource {
            sheet_text: &self.sheet,
            sheet_label: &settings.rater.sheet,
            policy: self
                .policy
                .as_deref()
                .map(|text| (text, settings.rater.idle_policy.as_str())),
        }
    }
}

/// The invoicer of the primary sheet (`[rater] sheet`).
pub(crate) async fn invoicer(settings: &Settings) -> anyhow::Result<Invoicer> {
    let mut all = invoicers(settings).await?;
    Ok(all.remove(0))
}

/// One invoicer per sheet, the primary's first, each closing its
/// currency's customers (see `[rater] currency_sheets`).
pub(crate) async fn invoicers(settings: &Settings) -> anyhow::Result<Vec<Invoicer>> {
    let ledger = super::ledger(settings).await?;
    let meters = settings.events.load_meters()?;
    let files = SheetFiles::read(settings)?;
    let mut invoicers = Vec::new();
    for sheet in super::sheet_lanes(settings)? {
        let mut invoicer = Invoicer::new(
            Store::new(&settings.clickhouse),
            sheet.source(&files, settings),
            settings.invoicer.clone(),
            settings.billing.clone(),
        )?
        .with_meters(&meters)?;
        if let Some(lane) = sheet.lane {
            invoicer = invoicer.with_lane(lane)?;
        }
        if let Some(ledger) = &ledger {
            invoicer = invoicer.with_ledger(ledger.clone());
        }
        invoicers.push(invoicer);
    }
    Ok(invoicers)
}

/// The invoicer billing `customer`: the sheet of their record's currency,
/// else the primary.
async fn invoicer_of(settings: &Settings, customer: &str) -> anyhow::Result<Invoicer> {
    let currencies = Store::new(&settings.clickhouse)
        .customer_currencies(&settings.billing.issuer)
        .await?;
    let mut all = invoicers(settings).await?;
    let index = currencies
        .get(customer)
        .and_then(|currency| {
            all.iter()
                .position(|invoicer| invoicer.currency() == currency)
        })
        .unwrap_or(0);
    Ok(all.swap_remove(index))
}

pub async fn run(settings: &Settings, args: InvoicesArgs) -> anyhow::Result<()> {
    // `show` and `deposit` need no price sheet.
    match args.command {
        InvoicesCommand::CreditNote {
            number,
            lines,
            settle,
            reason,
        } => {
            let request = credit_request(&lines)?;
            let settlement = idlemeter_core::credit_note::Settlement::parse(&settle)
                .map_err(|reason| anyhow::anyhow!("--settle: {reason}"))?;
            let note = invoicer(settings)
                .await?
                .credit_note(number, &request, settlement, &reason)
                .await?;
            eprintln!(
                "invoices: credit note {} of {} {} on invoice {number} for {}, settled to {}",
                note.number, note.total, note.currency, note.customer, note.settlement
            );
            println!("{}", serde_json::to_string_pretty(&note)?);
        }
        InvoicesCommand::ImportToLedger => {
            let invoicer = invoicer(settings).await?;
            let bar = std::sync::OnceLock::new();
            let progress = |done: usize, total: usize| {
                bar.get_or_init(|| {
                    crate::progress::Progress::new("import", total as u64, "invoices")
                })
                .set(done as u64);
            };
            let report = invoicer.import_to_ledger(&progress).await?;
            if let Some(bar) = bar.get() {
                bar.finish();
            }
            // The API keys too: the ledger keeps every key from now on.
            if let Some(ledger) = super::ledger(settings).await? {
                let keys = Store::new(&settings.clickhouse).api_keys().await?;
                let imported = ledger.import_api_keys(&keys).await?;
                eprintln!(
                    "invoices: {imported} of {} API keys copied to the ledger",
                    keys.len()
                );
            }
            for conflict in &report.conflicts {
                eprintln!("invoices: not imported: {conflict}");
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.conflicts.is_empty() {
                anyhow::bail!(
                    "{} invoices conflict with the ledger",
                    report.conflicts.len()
                );
            }
        }
        InvoicesCommand::Close { period, dry_run } => {
            let start = parse_period(&period)?;
            let mut summary: Vec<serde_json::Value> = Vec::new();
            let mut failed = 0;
            // Each sheet closes its currency's customers.
            for invoicer in invoicers(settings).await? {
                let (issued, left_out) = close(&invoicer, start, dry_run).await?;
                summary.extend(issued);
                failed += left_out;
            }
            println!("{}", serde_json::to_string_pretty(&summary)?);
            // Everyone else is invoiced; the run still fails, so a scheduler
            // or an operator sees the customers left out.
            anyhow::ensure!(
                failed == 0,
                "{failed} customers not invoiced (see above and rating_errors)"
            );
        }
        InvoicesCommand::Show { number, format } => {
            let store = Store::new(&settings.clickhouse);
            let issuer = &settings.billing.issuer;
            let header = store
                .invoices(issuer)
                .await?
                .into_iter()
                .find(|row| row.number == number)
                .with_context(|| format!("no invoice {number} from {issuer}"))?;
            let lines = store.invoice_lines(&header).await?;
            print_invoice(&Invoice::from_rows(&header, &lines)?, format, settings)?;
        }
        InvoicesCommand::Deposit {
            customer,
            amount,
            id,
            at,
        } => {
            let value: rust_decimal::Decimal = amount
                .parse()
                .with_context(|| format!("--amount {amount:?} is not a decimal"))?;
            anyhow::ensure!(
                value > rust_decimal::Decimal::ZERO,
                "--amount must be positive"
            );
            idlemeter_core::CustomerId::parse(customer.clone())
                .with_context(|| format!("--customer {customer:?}"))?;
            let at = at.unwrap_or_else(Utc::now);
            let row = idlemeter_store::WalletDepositRow {
                issuer: settings.billing.issuer.clone(),
                customer: customer.clone(),
                deposit_id: id.clone(),
                amount: idlemeter_store::to_column(value)?,
                deposited_at: u32::try_from(at.timestamp()).context("--at before 1970")?,
            };
            // In the ledger (and copied to ClickHouse) when there is one.
            let ledger = super::ledger(settings).await?;
            let new = idlemeter_invoicer::record_deposit(
                ledger.as_ref(),
                &Store::new(&settings.clickhouse),
                &row,
            )
            .await?;
            if new {
                eprintln!("invoices: deposit {id} of {value} recorded for {customer}");
            } else {
                eprintln!("invoices: deposit {id} of {customer} was recorded before; unchanged");
            }
        }
        InvoicesCommand::Preview { customer, format } => {
            match invoicer_of(settings, &customer)
                .await?
                .preview(&customer, Utc::now())
                .await?
            {
                Some(invoice) => print_invoice(&invoice, format, settings)?,
                None => eprintln!("invoices: nothing to bill for {customer} in the open period"),
            }
        }
    }
    Ok(())
}

pub async fn service(settings: &Settings) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let share = if settings.invoicer.divide_customers {
        anyhow::ensure!(
            !settings.ledger.url.expose().is_empty(),
            "[invoicer] divide_customers needs [ledger] url: replicas claim invoice numbers there"
        );
        let shares = settings
            .topics
            .share_customers(&settings.kafka, "invoicer")
            .await?;
        shares.share()
    } else {
        idlemeter_core::Share::everyone()
    };
    let invoicers = invoicers(settings)
        .await?
        .into_iter()
        .map(|invoicer| invoicer.with_share(share.clone()).with_metrics(&registry))
        .collect::<Result<Vec<_>, _>>()?;
    let needs = super::Needs {
        clickhouse: true,
        ..super::Needs::default()
    };
    super::serve(settings, registry, needs, async {
        let events = billing_events(settings).await?;
        let delivering = events.map(|delivery| {
            tokio::spawn(
                delivery
                    .run_until_stopped(std::time::Duration::from_secs(1), super::shutdown_signal()),
            )
        });
        // One shutdown signal stops every sheet's invoicer.
        let shutdown = futures::FutureExt::shared(super::shutdown_signal());
        let limits = spend_limits(settings).await?.map(|watch| {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = watch => {}
                    () = stop => {}
                }
            })
        });
        futures::future::try_join_all(
            invoicers
                .into_iter()
                .map(|invoicer| invoicer.run_until_stopped(shutdown.clone())),
        )
        .await?;
        if let Some(delivering) = delivering {
            delivering.await?;
        }
        if let Some(limits) = limits {
            limits.await?;
        }
        Ok(())
    })
    .await
}

/// With a ledger, compares customers' spend with their spend limits every
/// `[invoicer] spend_limit_check_s` (a future that runs until dropped).
async fn spend_limits(
    settings: &Settings,
) -> anyhow::Result<Option<impl std::future::Future<Output = ()>>> {
    let every = settings.invoicer.spend_limit_check_s;
    let Some(ledger) = super::ledger(settings).await? else {
        return Ok(None);
    };
    if every == 0 {
        return Ok(None);
    }
    let store = Store::new(&settings.clickhouse);
    let issuer = settings.billing.issuer.clone();
    Ok(Some(async move {
        let mut ticker = tokio::time::interval(std::time::Duration::from_secs(every));
        loop {
            ticker.tick().await;
            if let Err(error) =
                idlemeter_invoicer::events::check_spend_limits(&ledger, &store, &issuer, Utc::now())
                    .await
            {
                tracing::warn!(%error, "checking spend limits failed; retrying next tick");
            }
        }
    }))
}

/// The delivery of billing events the settings ask for: a ledger and a
/// webhook URL or a topic.
async fn billing_events(
    settings: &Settings,
) -> anyhow::Result<Option<idlemeter_invoicer::events::EventDelivery>> {
    let config = &settings.invoicer;
    if config.events_webhook_url.is_empty() && config.events_topic.is_empty() {
        return Ok(None);
    }
    let Some(ledger) = super::ledger(settings).await? else {
        anyhow::bail!(
            "[invoicer] events_webhook_url / events_topic need a ledger: billing events are queued in it ([ledger] url)"
        );
    };
    let mut delivery = idlemeter_invoicer::events::EventDelivery::new(ledger).with_retry(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(config.events_retry_max_s.max(1)),
    );
    if !config.events_webhook_url.is_empty() {
        let secret = config.events_webhook_secret.expose();
        anyhow::ensure!(
            !secret.is_empty(),
            "[invoicer] events_webhook_secret is empty: billing webhooks are always signed"
        );
        delivery = delivery.with_webhook(idlemeter_webhook::WebhookSender::new(
            &config.events_webhook_url,
            secret,
        )?);
    }
    if !config.events_topic.is_empty() {
        delivery = delivery.with_publisher(
            settings
                .kafka
                .publisher("idlemeter-billing-events", &config.events_topic)?,
        );
    }
    tracing::info!(?delivery, "delivering billing events");
    Ok(Some(delivery))
}
