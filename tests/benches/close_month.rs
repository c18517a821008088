//! Closing a month (issue "One bill everywhere"): `make bench-invoices`
//! closes October and then November 2026 for `CUSTOMERS` customers (default
//! 1,000,000) against the test ClickHouse, in a fresh database, and prints
//! customers/s for each. Not a test.
//!
//! What the close reads is what the rater stores, not samples: each
//! customer's period-end `rating_state` row. How those rows are made: every
//! customer has one sandbox sampled at 1 Hz all month, by one of
//! `TEMPLATES` profiles (vCPU and memory sizes). Each profile's month of
//! per-second samples (2.7 million, every counter, as the collector sends
//! them) is carried through `idlemeter_core::RatingState::advance`, the
//! rater's own function, and its period-end state is stored for each
//! customer of the profile under the customer's id; November continues
//! October's state. A rater rating a million customers hour by hour would
//! store the same rows; it is not what is measured here.
//!
//! The samples themselves are not stored, so the close's check that each
//! state rated every sample stored for the period (a count of the period's
//! sample rows per chunk of customers) runs over an empty table here; in
//! production it reads the period's `usage_samples` rows once per close.
//!
//! November's close reads adjustments as well: 1 % of customers have a
//! re-rated October (a newer state with more usage, as the rater writes it
//! when late samples arrive), 1 % have prepaid wallet deposits, and every
//! customer's one-time credit (the E2B Hobby plan's $100) carries over from
//! October's invoice.
//!
//! Last line: `bench-invoices: <N> customers/s closing a month with
//! adjustments (<S> s for <C> customers; target 60 s: met|missed)`.

use std::time::Instant;

use chrono::{DateTime, Duration, TimeZone, Utc};
use idlemeter_core::{
    BillingTerms, CustomerId, NumberedSample, Period, PriceSheet, RatingState, SessionOrConnection,
    UsageSample,
};
use idlemeter_invoicer::{Invoicer, InvoicerConfig};
use idlemeter_store::{
    ratings_checksum, to_column, ClickHouseSettings, RatingStateRow, SheetSource, Store,
    WalletDepositRow,
};
use idlemeter_tests::bench::setting;
use rust_decimal::Decimal;

const SHEET: &str = include_str!("../../prices/e2b.toml");
const SHEET_PATH: &str = "prices/e2b.toml";
const TEMPLATES: usize = 4;
const INSERT_BATCH: usize = 50_000;

fn month(month: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, month, 1, 0, 0, 0)
        .single()
        .expect("valid month")
}

fn customer(index: u64) -> String {
    format!("c{index:07}")
}

fn template_id(template: usize) -> String {
    format!("tmpl-{template}")
}

/// A profile's 1 Hz samples of `[from, to)`, epoch 1, seq continuing from
/// `first_seq`, with every counter.
fn samples(
    template: usize,
    first_seq: u64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> impl Iterator<Item = UsageSample> {
    let seconds = (to - from).num_seconds() as u64;
    (0..seconds).map(move |offset| {
        let seq = first_seq + offset;
        let mut sample = idlemeter_tests::sample(
            "sbx",
            1,
            seq,
            from + Duration::seconds(offset as i64),
            seq * 1_000,
            0,
        );
        sample.customer = CustomerId::parse(template_id(template)).expect("valid id");
        sample.vcpu = idlemeter_core::VcpuMillis(1000 * (1 + template as u32));
        sample.mem_bytes = (1u64 << 30) * (1 + template as u64);
        idlemeter_tests::counted(sample)
    })
}

/// The profile's state carried through `[from, to)`, a day of samples at a
/// time, and the seq to continue from.
fn rate(
    sheet: &PriceSheet,
    template: usize,
    state: &mut RatingState,
    first_seq: u64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> u64 {
    let mut day = from;
    let mut seq = first_seq;
    while day < to {
        let end = (day + Duration::days(1)).min(to);
        let batch: Vec<NumberedSample> = samples(template, seq, day, end)
            .enumerate()
            .map(|(index, sample)| NumberedSample {
                line: index as u64 + 1,
                sample,
            })
            .collect();
        seq += batch.len() as u64;
        let refused = state.advance(sheet, &batch, &SessionOrConnection);
        assert!(refused.is_empty(), "{refused:?}");
        day = end;
    }
    seq
}

/// A profile's period-end state as stored text: (state JSON, usage text).
fn stored(sheet: &PriceSheet, state: &RatingState) -> (String, String) {
    let usage = state
        .usage(sheet, &SessionOrConnection)
        .customers
        .into_iter()
        .next()
        .map(|usage| usage.to_text())
        .unwrap_or_default();
    (state.to_json(), usage)
}

struct Profile {
    json: String,
    usage: String,
}

async fn store_states(
    store: &Store,
    customers: u64,
    period_start: DateTime<Utc>,
    profiles: &[Profile],
    pick: impl Fn(u64) -> usize,
    revision: u64,
    only: impl Fn(u64) -> bool,
) -> anyhow::Result<u64> {
    let checksum = ratings_checksum(SHEET, None);
    let end = Period::Month.next(period_start);
    let mut rows = Vec::with_capacity(INSERT_BATCH);
    let mut written = 0;
    for index in (0..customers).filter(|index| only(*index)) {
        let profile = &profiles[pick(index)];
        let template = template_id(pick(index));
        rows.push(RatingStateRow {
            customer: customer(index),
            period_start: period_start.timestamp() as u32,
            sheet_checksum: checksum.clone(),
            as_of: end.timestamp() as u32,
            series: 1,
            state: profile.json.replace(
                &format!("\"{template}\""),
                &format!("\"{}\"", customer(index)),
            ),
            rated_at: end.timestamp() as u32,
            usage: profile.usage.clone(),
            // No samples are stored here, so the states count none (a
            // state counting samples that are not stored would be rated
            // again from them by the close).
            samples: 0,
            revision,
            counts_rated: 1,
        });
        if rows.len() == INSERT_BATCH {
            store.insert_rating_states(&rows).await?;
            written += rows.len() as u64;
            rows.clear();
        }
    }
    store.insert_rating_states(&rows).await?;
    written += rows.len() as u64;
    Ok(written)
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(setting("CUSTOMERS", 1_000_000)))
}

async fn run(customers: u64) -> anyhow::Result<()> {
    let database = format!("bench_invoices_{}", std::process::id());
    let store = Store::new(&ClickHouseSettings {
        url: std::env::var("IDLEMETER_CLICKHOUSE__URL")
            .unwrap_or_else(|_| "http://127.0.0.1:28123".to_owned()),
        database: database.clone(),
        user: "default".to_owned(),
        password: Default::default(),
        cluster: None,
        max_replica_delay_s: idlemeter_store::DEFAULT_MAX_REPLICA_DELAY_S,
    });
    store.migrate(0).await?;
    let sheet = PriceSheet::from_toml(SHEET, SHEET_PATH)?;
    let (october, november, december) = (month(10), month(11), month(12));

    // The profiles' months of 1 Hz samples, rated as the rater rates them.
    let started = Instant::now();
    let mut october_profiles = Vec::new();
    let mut november_profiles = Vec::new();
    for template in 0..TEMPLATES {
        let mut state = RatingState::new(&sheet);
        let seq = rate(&sheet, template, &mut state, 1, october, november);
        let (json, usage) = stored(&sheet, &state);
        october_profiles.push(Profile { json, usage });
        let mut next = state.next_period();
        rate(&sheet, template, &mut next, seq, november, december);
        let (json, usage) = stored(&sheet, &next);
        november_profiles.push(Profile { json, usage });
        eprintln!(
            "bench-invoices: profile {template}: {} samples a month rated; October {}",
            seq - 1,
            october_profiles[template].usage
        );
    }
    eprintln!(
        "bench-invoices: profiles rated in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let pick = |index: u64| (index % TEMPLATES as u64) as usize;
    let loaded = Instant::now();
    let written = store_states(
        &store,
        customers,
        october,
        &october_profiles,
        pick,
        1,
        |_| true,
    )
    .await?;
    eprintln!(
        "bench-invoices: {written} October states stored in {:.1} s",
        loaded.elapsed().as_secs_f64()
    );
    let terms = BillingTerms {
        issuer: "bench".to_owned(),
        period: Period::Month,
        ..BillingTerms::default()
    };
    let lock = tempfile::tempdir()?;
    let invoicer = Invoicer::new(
        store.clone(),
        SheetSource {
            sheet_text: SHEET,
            sheet_label: SHEET_PATH,
            policy: None,
        },
        InvoicerConfig {
            lock_file: lock.path().join("lock").display().to_string(),
            keep_issued: 0,
            ..InvoicerConfig::default()
        },
        terms,
    )?;
    let progress = |done: usize, total: usize| {
        if done.is_multiple_of((total / 10).max(1)) {
            eprintln!("bench-invoices:   {done}/{total} customers");
        }
    };
    let now = month(12) + Duration::days(2);
    let closing = Instant::now();
    let first = invoicer
        .close_period(october, now, false, &progress)
        .await?;
    let october_s = closing.elapsed().as_secs_f64();
    anyhow::ensure!(
        first.failed.is_empty(),
        "{:?}",
        &first.failed[..first.failed.len().min(3)]
    );
    eprintln!(
        "bench-invoices: October: {} invoices in {october_s:.1} s = {:.0} customers/s, totals {:?}, caught up {}; reading {:.1} s, billing {:.1} s, waiting for writes {:.1} s",
        first.issued_count,
        customers as f64 / october_s,
        first.issued_totals,
        first.caught_up,
        first.timings.read.as_secs_f64(),
        first.timings.bill.as_secs_f64(),
        first.timings.write_wait.as_secs_f64()
    );

    // November: states, late October usage for 1 %, wallets for 1 %.
    let loaded = Instant::now();
    store_states(
        &store,
        customers,
        november,
        &november_profiles,
        pick,
        1,
        |_| true,
    )
    .await?;
    let richer = |index: u64| (pick(index) + 1) % TEMPLATES;
    store_states(
        &store,
        customers,
        october,
        &october_profiles,
        richer,
        2,
        |index| index % 100 == 7,
    )
    .await?;
    let deposits: Vec<WalletDepositRow> = (0..customers)
        .filter(|index| index % 100 == 3)
        .map(|index| {
            Ok(WalletDepositRow {
                issuer: "bench".to_owned(),
                customer: customer(index),
                deposit_id: "d-1".to_owned(),
                amount: to_column(Decimal::new(2_500, 2))?,
                deposited_at: (november + Duration::days(3)).timestamp() as u32,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    store.insert_wallet_deposits(&deposits).await?;
    eprintln!(
        "bench-invoices: November states, 1 % re-rated Octobers and {} deposits stored in {:.1} s",
        deposits.len(),
        loaded.elapsed().as_secs_f64()
    );
    let closing = Instant::now();
    let second = invoicer
        .close_period(november, now, false, &progress)
        .await?;
    let november_s = closing.elapsed().as_secs_f64();
    anyhow::ensure!(
        second.failed.is_empty(),
        "{:?}",
        &second.failed[..second.failed.len().min(3)]
    );
    let adjusted: u64 = store
        .client()
        .query("SELECT count() FROM invoice_lines WHERE issuer = 'bench' AND kind = 'adjustment'")
        .fetch_one()
        .await?;
    eprintln!(
        "bench-invoices: November: {} invoices in {november_s:.1} s, {adjusted} adjustment lines, totals {:?}, caught up {}; reading {:.1} s, billing {:.1} s, waiting for writes {:.1} s",
        second.issued_count,
        second.issued_totals,
        second.caught_up,
        second.timings.read.as_secs_f64(),
        second.timings.bill.as_secs_f64(),
        second.timings.write_wait.as_secs_f64()
    );
    anyhow::ensure!(
        second.issued_count as u64 == customers,
        "every customer invoiced"
    );
    anyhow::ensure!(
        adjusted == customers.div_ceil(100),
        "1 % adjusted: {adjusted}"
    );
    let rate = customers as f64 / november_s;
    let verdict = if november_s <= 60.0 { "met" } else { "missed" };
    println!(
        "bench-invoices: {rate:.0} customers/s closing a month with adjustments ({november_s:.1} s for {customers} customers; target 60 s: {verdict})"
    );
    store
        .client()
        .query(&format!("DROP DATABASE IF EXISTS {database}"))
        .execute()
        .await?;
    Ok(())
}
