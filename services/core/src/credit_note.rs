//! Credit notes: correcting an issued invoice without touching it.
//!
//! The rule, as a user states it:
//! - a credit note credits amounts of the invoice's charge lines (usage,
//!   fee, and adjustment lines of a positive amount), each at most what is
//!   left of that line after earlier credit notes of the same invoice;
//! - the credited amounts of all the invoice's notes together never exceed
//!   what the invoice made payable after its credits (`subtotal + fees +
//!   adjustments + credits`): a credit note refunds money billed, never a
//!   charge a plan credit already covered. A *full* credit note credits the
//!   charge lines in order until that is reached;
//! - tax is credited at the invoice's rate on the credited amount, rounded
//!   once by the sheet's rule; the note that brings the credited amount to
//!   the whole payable credits exactly the tax left, so notes that credit
//!   the whole invoice return exactly its tax;
//! - the note's total (`net + tax`) goes to the customer's credit balance
//!   (applied to the next invoice, before the wallet) or to the prepaid
//!   wallet, as the caller chooses.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::RoundingRule;

/// One line of the invoice being credited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditableLine {
    pub line_no: u16,
    /// The line kind as stored (`usage`, `fee`, `adjustment`, ...).
    pub kind: String,
    pub resource: String,
    pub amount: Decimal,
}

/// What the caller asks to credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditRequest {
    /// Everything still creditable.
    Full,
    /// These lines: the whole of what is left of each (`None`) or an amount.
    Lines(Vec<(u16, Option<Decimal>)>),
}

/// Where a credit note's total goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Settlement {
    /// The customer's credit balance, applied to their next invoice.
    NextInvoice,
    /// A deposit into the customer's prepaid wallet.
    Wallet,
}

impl Settlement {
    pub fn as_str(self) -> &'static str {
        match self {
            Settlement::NextInvoice => "next_invoice",
            Settlement::Wallet => "wallet",
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text.replace('-', "_").as_str() {
            "next_invoice" => Ok(Settlement::NextInvoice),
            "wallet" => Ok(Settlement::Wallet),
            other => Err(format!(
                "settlement {other:?} is neither next_invoice nor wallet"
            )),
        }
    }
}

/// The invoice a note credits and what earlier notes credited of it.
#[derive(Debug, Clone)]
pub struct CreditedInvoice<'a> {
    pub lines: &'a [CreditableLine],
    /// `subtotal + fees + adjustments + credits` of the invoice.
    pub payable: Decimal,
    pub tax_rate: Decimal,
    pub tax: Decimal,
    /// Credited so far, per invoice line number.
    pub credited_lines: &'a BTreeMap<u16, Decimal>,
    /// Net and tax credited by earlier notes.
    pub credited_net: Decimal,
    pub credited_tax: Decimal,
    pub minor_digits: u32,
    pub rounding: RoundingRule,
}

/// One line of a credit note: what it credits of an invoice line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditLine {
    pub invoice_line_no: u16,
    pub resource: String,
    /// Positive: the amount credited.
    pub amount: Decimal,
}

/// A credit note's figures, before it is numbered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditDraft {
    pub lines: Vec<CreditLine>,
    pub net: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
}

/// Why a credit note was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    #[error("invoice line {0} does not exist")]
    NoSuchLine(u16),
    #[error("invoice line {line_no} ({kind} {resource}) is not a charge: only usage, fee and positive adjustment lines are credited")]
    NotACharge {
        line_no: u16,
        kind: String,
        resource: String,
    },
    #[error("invoice line {line_no} is named twice")]
    Repeated { line_no: u16 },
    #[error("invoice line {line_no}: {asked} asked, {left} left to credit (amounts are positive, in minor units)")]
    TooMuch {
        line_no: u16,
        asked: Decimal,
        left: Decimal,
    },
    #[error("the invoice's notes would credit {credited} of the {payable} it made payable after its credits")]
    OverPayable { credited: Decimal, payable: Decimal },
    #[error("nothing is left to credit on this invoice")]
    Nothing,
}

fn is_charge(line: &CreditableLine) -> bool {
    matches!(line.kind.as_str(), "usage" | "fee" | "adjustment") && line.amount > Decimal::ZERO
}

/// The figures of a credit note on `invoice` (see the module doc).
pub fn credit_note(
    invoice: &CreditedInvoice<'_>,
    request: &CreditRequest,
) -> Result<CreditDraft, CreditError> {
    let zero = Decimal::new(0, invoice.minor_digits);
    let left_of = |line: &CreditableLine| {
        line.amount
            - invoice
                .credited_lines
                .get(&line.line_no)
                .copied()
                .unwrap_or(zero)
    };
    let payable_left = (invoice.payable - invoice.credited_net).max(zero);
    let mut lines = Vec::new();
    match request {
        CreditRequest::Full => {
            let mut room = payable_left;
            for line in invoice.lines.iter().filter(|line| is_charge(line)) {
                let amount = left_of(line).min(room);
                if amount > zero {
                    room -= amount;
                    lines.push(CreditLine {
                        invoice_line_no: line.line_no,
                        resource: line.resource.clone(),
                        amount,
                    });
                }
            }
        }
        CreditRequest::Lines(asked) => {
            let mut seen = std::collections::BTreeSet::new();
            for (line_no, amount) in asked {
                if !seen.insert(*line_no) {
                    return Err(CreditError::Repeated { line_no: *line_no });
                }
                let line = invoice
                    .lines
                    .iter()
                    .find(|line| line.line_no == *line_no)
                    .ok_or(CreditError::NoSuchLine(*line_no))?;
                if !is_charge(line) {
                    return Err(CreditError::NotACharge {
                        line_no: line.line_no,
                        kind: line.kind.clone(),
                        resource: line.resource.clone(),
                    });
                }
                let left = left_of(line);
                let amount = amount.unwrap_or(left);
                let whole_units = amount.round_dp(invoice.minor_digits) == amount;
                if amount <= zero || amount > left || !whole_units {
                    return Err(CreditError::TooMuch {
                        line_no: line.line_no,
                        asked: amount,
                        left,
                    });
                }
                lines.push(CreditLine {
                    invoice_line_no: line.line_no,
                    resource: line.resource.clone(),
                    amount,
                });
            }
        }
    }
    let net: Decimal = lines.iter().map(|line| line.amount).sum();
    if net <= zero {
        return Err(CreditError::Nothing);
    }
    if net > payable_left {
        return Err(CreditError::OverPayable {
            credited: invoice.credited_net + net,
            payable: invoice.payable,
        });
    }
    let tax_left = (invoice.tax - invoice.credited_tax).max(zero);
    let tax = if net == payable_left {
        tax_left
    } else {
        invoice
            .rounding
            .round(net * invoice.tax_rate, invoice.minor_digits)
            .min(tax_left)
    };
    let total = net + tax;
    debug_assert_eq!(
        lines.iter().map(|line| line.amount).sum::<Decimal>() + tax,
        total
    );
    Ok(CreditDraft {
        lines,
        net,
        tax,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(text: &str) -> Decimal {
        text.parse().expect("a decimal")
    }

    fn line(line_no: u16, kind: &str, resource: &str, amount: &str) -> CreditableLine {
        CreditableLine {
            line_no,
            kind: kind.to_owned(),
            resource: resource.to_owned(),
            amount: dec(amount),
        }
    }

    /// vCPU 60.00 + memory 30.00 + fee 150.00, a 100.00 monthly credit:
    /// payable 140.00, tax 20 % = 28.00.
    fn invoice_lines() -> Vec<CreditableLine> {
        vec![
            line(1, "usage", "vcpu", "60.00"),
            line(2, "usage", "memory", "30.00"),
            line(3, "fee", "plan.pro", "150.00"),
            line(4, "credit", "credit.monthly", "-100.00"),
            line(5, "tax", "tax", "28.00"),
        ]
    }

    fn invoice<'a>(
        lines: &'a [CreditableLine],
        credited: &'a BTreeMap<u16, Decimal>,
        net: &str,
        tax: &str,
    ) -> CreditedInvoice<'a> {
        CreditedInvoice {
            lines,
            payable: dec("140.00"),
            tax_rate: dec("0.2"),
            tax: dec("28.00"),
            credited_lines: credited,
            credited_net: dec(net),
            credited_tax: dec(tax),
            minor_digits: 2,
            rounding: RoundingRule::HalfUp,
        }
    }

    #[test]
    fn a_full_note_credits_the_payable_and_exactly_the_tax() {
        let lines = invoice_lines();
        let none = BTreeMap::new();
        let draft = credit_note(&invoice(&lines, &none, "0", "0"), &CreditRequest::Full)
            .expect("creditable");
        assert_eq!(
            draft
                .lines
                .iter()
                .map(|line| (line.invoice_line_no, line.amount))
                .collect::<Vec<_>>(),
            vec![(1, dec("60.00")), (2, dec("30.00")), (3, dec("50.00"))]
        );
        assert_eq!(
            (draft.net, draft.tax, draft.total),
            (dec("140.00"), dec("28.00"), dec("168.00"))
        );
    }

    #[test]
    fn partial_notes_add_up_to_the_invoice_and_no_further() {
        let lines = invoice_lines();
        let none = BTreeMap::new();
        let first = credit_note(
            &invoice(&lines, &none, "0", "0"),
            &CreditRequest::Lines(vec![(1, Some(dec("33.33")))]),
        )
        .expect("creditable");
        // 33.33 x 0.2 = 6.666 -> 6.67.
        assert_eq!((first.net, first.tax), (dec("33.33"), dec("6.67")));
        let credited = BTreeMap::from([(1, dec("33.33"))]);
        let rest = credit_note(
            &invoice(&lines, &credited, "33.33", "6.67"),
            &CreditRequest::Full,
        )
        .expect("creditable");
        assert_eq!(rest.net, dec("106.67"));
        assert_eq!(first.tax + rest.tax, dec("28.00"));
        let done = BTreeMap::from([(1, dec("60.00")), (2, dec("30.00")), (3, dec("50.00"))]);
        assert_eq!(
            credit_note(
                &invoice(&lines, &done, "140.00", "28.00"),
                &CreditRequest::Full
            ),
            Err(CreditError::Nothing)
        );
    }

    #[test]
    fn refusals_name_the_line_and_the_reason() {
        let lines = invoice_lines();
        let none = BTreeMap::new();
        let fresh = invoice(&lines, &none, "0", "0");
        assert_eq!(
            credit_note(&fresh, &CreditRequest::Lines(vec![(9, None)])),
            Err(CreditError::NoSuchLine(9))
        );
        assert!(matches!(
            credit_note(&fresh, &CreditRequest::Lines(vec![(4, None)])),
            Err(CreditError::NotACharge { line_no: 4, .. })
        ));
        assert!(matches!(
            credit_note(&fresh, &CreditRequest::Lines(vec![(2, Some(dec("30.01")))])),
            Err(CreditError::TooMuch { line_no: 2, .. })
        ));
        assert!(matches!(
            credit_note(&fresh, &CreditRequest::Lines(vec![(2, Some(dec("0.001")))])),
            Err(CreditError::TooMuch { line_no: 2, .. })
        ));
        // The whole fee (150.00) is more than the 140.00 payable.
        assert_eq!(
            credit_note(&fresh, &CreditRequest::Lines(vec![(3, None)])),
            Err(CreditError::OverPayable {
                credited: dec("150.00"),
                payable: dec("140.00")
            })
        );
        assert_eq!(
            credit_note(&fresh, &CreditRequest::Lines(vec![(1, None), (1, None)])),
            Err(CreditError::Repeated { line_no: 1 })
        );
    }
}
