//! The credit balance on a bill: credit notes and negative totals carried
//! forward pay before the wallet, and a negative spend is never issued as a
//! negative total.

use chrono::{TimeZone, Utc};
use idlemeter_core::invoice::{BALANCE_APPLIED, BALANCE_CARRIED};
use idlemeter_core::jsonl::parse_samples;
use idlemeter_core::{
    rate_report, Account, Adjustment, BillingOptions, CustomerBill, CustomerId, LineKind,
    PriceSheet, SessionOrConnection,
};
use rust_decimal::Decimal;

const E2B: &str = include_str!("../../../prices/e2b.toml");
const ONE_HOUR: &str = include_str!("fixtures/e2b_one_hour.jsonl");

fn dec(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

/// bigco is on Pro: $0.11 of usage and the $150 fee, $150.11 before tax.
fn bill_bigco(account: Account) -> CustomerBill {
    let text = format!("{E2B}\n[customers.bigco]\nplan = \"pro\"\n");
    let sheet = PriceSheet::from_toml(&text, "e2b.toml").expect("the shipped sheet loads");
    let parsed = parse_samples(ONE_HOUR);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let bigco = CustomerId::parse("bigco").expect("an id");
    let report = rate_report(
        &sheet,
        &parsed.samples,
        &SessionOrConnection,
        &BillingOptions {
            accounts: [(bigco.clone(), account)].into(),
        },
        Vec::new(),
    )
    .expect("rates");
    let bill = report
        .customers
        .into_iter()
        .find(|bill| bill.customer == bigco)
        .expect("bigco billed");
    let lines: Decimal = bill.lines.iter().map(|line| line.amount).sum();
    assert_eq!(lines, bill.total, "{:?}", bill.lines);
    bill
}

fn amount_of(bill: &CustomerBill, resource: &str) -> Option<Decimal> {
    bill.lines
        .iter()
        .find(|line| line.resource == resource)
        .map(|line| line.amount)
}

#[test]
fn the_credit_balance_pays_before_the_wallet() {
    let bill = bill_bigco(Account {
        credit_balance: dec("100.00"),
        wallet_balance: dec("60.00"),
        ..Account::default()
    });
    assert_eq!(bill.spend, dec("150.11"));
    assert_eq!(
        (
            bill.credit_balance,
            bill.balance_applied,
            bill.balance_carried
        ),
        (dec("100.00"), dec("100.00"), dec("0.00"))
    );
    assert_eq!(amount_of(&bill, BALANCE_APPLIED), Some(dec("-100.00")));
    // The wallet pays what the balance left: 50.11 of its 60.00.
    assert_eq!(bill.wallet_applied, dec("50.11"));
    assert_eq!(bill.total, dec("0.00"));
    let kinds: Vec<LineKind> = bill.lines.iter().map(|line| line.kind).collect();
    let balance_at = kinds.iter().position(|kind| *kind == LineKind::Balance);
    let wallet_at = kinds.iter().position(|kind| *kind == LineKind::Wallet);
    assert!(balance_at < wallet_at, "{kinds:?}");
}

#[test]
fn a_balance_larger_than_the_spend_pays_it_all_and_keeps_the_rest() {
    let bill = bill_bigco(Account {
        credit_balance: dec("500.004"),
        ..Account::default()
    });
    // Whole cents only: 500.00 available, 150.11 applied.
    assert_eq!(bill.credit_balance, dec("500.00"));
    assert_eq!(bill.balance_applied, dec("150.11"));
    assert_eq!(bill.total, dec("0.00"));
}

#[test]
fn a_negative_spend_is_carried_forward_not_issued() {
    let bill = bill_bigco(Account {
        adjustments: vec![Adjustment {
            period_start: Utc
                .with_ymd_and_hms(2026, 2, 1, 0, 0, 0)
                .single()
                .expect("a date"),
            amount: dec("-200.00"),
            note: "February re-rated".to_owned(),
        }],
        tax_rate: dec("0.2"),
        credit_balance: dec("10.00"),
        wallet_balance: dec("10.00"),
        ..Account::default()
    });
    // 150.11 - 200.00 = -49.89: no tax on a negative amount, nothing drawn
    // from the balance or the wallet, 49.89 carried to the balance.
    assert_eq!(bill.spend, dec("-49.89"));
    assert_eq!(bill.tax, dec("0.00"));
    assert_eq!(bill.balance_applied, dec("0.00"));
    assert_eq!(bill.balance_carried, dec("49.89"));
    assert_eq!(amount_of(&bill, BALANCE_CARRIED), Some(dec("49.89")));
    assert_eq!(bill.wallet_applied, dec("0.00"));
    assert_eq!(bill.total, dec("0.00"));
}
