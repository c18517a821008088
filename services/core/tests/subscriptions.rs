//! Plans that change mid-period: each plan's fee, included usage and
//! monthly credit count per second for the share of the period the customer
//! was on it.

use chrono::{DateTime, TimeZone, Utc};
use idlemeter_core::jsonl::parse_samples;
use idlemeter_core::{
    rate_report, Account, BillingOptions, CustomerBill, CustomerId, PlanSpan, PriceSheet,
    SessionOrConnection, Subscription,
};
use rust_decimal::Decimal;

const E2B: &str = include_str!("../../../prices/e2b.toml");
const ONE_HOUR: &str = include_str!("fixtures/e2b_one_hour.jsonl");

/// November 2026: 30 days.
const NOVEMBER_SECONDS: u64 = 30 * 86_400;

fn dec(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

fn day(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0)
        .single()
        .expect("a date")
}

fn bill(sheet_text: &str, customer: &str, account: Account) -> CustomerBill {
    let sheet = PriceSheet::from_toml(sheet_text, "sheet.toml").expect("the sheet loads");
    let parsed = parse_samples(ONE_HOUR);
    let id = CustomerId::parse(customer).expect("an id");
    let report = rate_report(
        &sheet,
        &parsed.samples,
        &SessionOrConnection,
        &BillingOptions {
            accounts: [(id.clone(), account)].into(),
        },
        Vec::new(),
    )
    .expect("rates");
    let bill = report
        .customers
        .into_iter()
        .find(|bill| bill.customer == id)
        .expect("billed");
    assert_eq!(
        bill.lines.iter().map(|line| line.amount).sum::<Decimal>(),
        bill.total
    );
    bill
}

fn line(bill: &CustomerBill, resource: &str) -> (String, String, String) {
    let found = bill
        .lines
        .iter()
        .find(|line| line.resource == resource)
        .unwrap_or_else(|| panic!("a {resource} line in {:?}", bill.lines));
    (
        found.quantity.to_string(),
        found.unit_price.to_string(),
        found.amount.to_string(),
    )
}

fn spans(spans: &[(&str, u32, u64)]) -> Option<Subscription> {
    Some(Subscription {
        spans: spans
            .iter()
            .map(|(plan, from, days)| PlanSpan {
                plan: (*plan).to_owned(),
                from: day(*from),
                seconds: days * 86_400,
            })
            .collect(),
        period_seconds: NOVEMBER_SECONDS,
    })
}

#[test]
fn an_e2b_upgrade_from_hobby_to_pro_on_the_14th_prorates_the_fee_and_keeps_the_credit() {
    // Hobby from the 1st (13 days), Pro from the 14th (17 days).
    let bill = bill(
        E2B,
        "bigco",
        Account {
            subscription: spans(&[("hobby", 1, 13), ("pro", 14, 17)]),
            ..Account::default()
        },
    );
    // Usage $0.10 + $0.01. Pro's $150 for 17 of 30 days: 150 x 17 / 30 =
    // $85.00 (shown as 0.566667 month). Hobby has no fee.
    assert_eq!(
        line(&bill, "plan.pro"),
        ("0.566667".into(), "150".into(), "85.00".into())
    );
    assert!(bill.lines.iter().all(|line| line.resource != "plan.hobby"));
    assert_eq!(bill.fees, dec("85.00"));
    // Hobby's $100 one-time credit covers the $85.11: $14.89 is left.
    assert_eq!(line(&bill, "credit.one_time").2, "-85.11");
    assert_eq!(bill.one_time_credit_left, Some(dec("14.89")));
    assert_eq!(bill.total, dec("0.00"));
    assert_eq!(bill.plan.as_deref(), Some("pro"));
    let pro_line = bill
        .lines
        .iter()
        .find(|line| line.resource == "plan.pro")
        .expect("a fee line");
    assert_eq!(pro_line.price_version, Some(day(14)), "the span's start");
}

#[test]
fn a_whole_period_on_one_plan_bills_exactly_as_the_sheet_plan() {
    let with_sheet = bill(
        &format!("{E2B}\n[customers.bigco]\nplan = \"pro\"\n"),
        "bigco",
        Account::default(),
    );
    let with_subscription = bill(
        E2B,
        "bigco",
        Account {
            subscription: spans(&[("pro", 1, 30)]),
            ..Account::default()
        },
    );
    assert_eq!(with_sheet.lines, with_subscription.lines);
    assert_eq!(with_subscription.total, dec("150.11"));
}

#[test]
fn included_usage_and_monthly_credits_are_prorated_per_second() {
    // 7,200 vCPU-seconds of usage; "big" includes 10,000 and a $30 monthly
    // credit, "small" nothing; a downgrade after 10 of 30 days.
    let sheet = format!(
        "{E2B}\n[plans.big]\nmonthly_fee = \"30\"\nincluded = {{ vcpu = \"10000\" }}\n\
         [[plans.big.credits]]\nkind = \"monthly\"\namount = \"30\"\n\n[plans.small]\n"
    );
    let bill = bill(
        &sheet,
        "acme",
        Account {
            subscription: spans(&[("big", 1, 10), ("small", 11, 20)]),
            ..Account::default()
        },
    );
    // Included: 10,000 x 10 / 30 vCPU-s, rounded down to the base unit
    // (a vCPU-microsecond): 3,333.333333 at zero; the other 3,866.666667
    // at $0.000014 = $0.0541333... -> $0.05.
    let included = bill
        .lines
        .iter()
        .find(|line| line.resource == "vcpu" && line.unit_price.is_zero())
        .expect("an included line");
    assert_eq!(included.quantity, dec("3333.333333"));
    let priced = bill
        .lines
        .iter()
        .find(|line| line.resource == "vcpu" && !line.unit_price.is_zero())
        .expect("a priced line");
    assert_eq!(
        (priced.quantity, priced.amount),
        (dec("3866.666667"), dec("0.05"))
    );
    // Fee: $30 x 10/30 = $10.00. Monthly credit: $30 x 10/30 = $10.00,
    // all applied to $0.05 + $0.01 memory + $10.00.
    assert_eq!(line(&bill, "plan.big").2, "10.00");
    assert_eq!(line(&bill, "credit.monthly").2, "-10.00");
    assert_eq!(bill.total, dec("0.06"));
}
