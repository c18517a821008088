//! The invoice preview: the invoice closing the open period now would issue.
//!
//! It is the close's computation on the live state: the quantities of the
//! rater's newest figure of the period (read back from its usage lines, a
//! few rows whatever the customer's sample rate), billed by
//! [`idlemeter_core::bill`] with the customer's account as at now. Its
//! cost and memory are those of one figure and one account, so a preview of
//! a customer with a month of 1 Hz samples costs what one of an idle
//! customer does.

use chrono::{DateTime, Utc};
use idlemeter_core::rating::CustomerUsage;
use idlemeter_core::CustomerId;
use idlemeter_store::{unix_seconds, BillContext, Invoice};

use crate::problem::Problem;
use crate::AppState;

/// The draft, or `None` when nothing was used and nothing is charged.
pub async fn draft(
    state: &AppState,
    customer: &CustomerId,
    now: DateTime<Utc>,
) -> Result<Option<Invoice>, Problem> {
    let billing = state.billing_of(customer.as_str()).await?;
    let (start, end) = billing.terms.period.bounds(now);
    let figure = state.store.latest_spend(customer.as_str()).await?;
    let lines = match &figure {
        Some(figure) if figure.period_start == unix_seconds(start) => {
            if figure.sheet_checksum != billing.sheet_checksum {
                return Err(Problem::unavailable(format!(
                    "the rater's figures are under sheet checksum {}, this API's sheet {} is {}: \
                     give both the same sheet and idle policy",
                    figure.sheet_checksum, billing.sheet_label, billing.sheet_checksum
                )));
            }
            state.store.spend_lines(customer, figure).await?
        }
        // Nothing rated in the open period yet: a fee, an adjustment.
        _ => Vec::new(),
    };
    let usage = CustomerUsage::from_lines(
        customer.clone(),
        &billing.sheet,
        lines.iter().map(|line| {
            (
                line.kind.as_str(),
                line.resource.as_str(),
                line.price_version.as_str(),
                line.quantity_base.as_str(),
            )
        }),
    )
    .map_err(Problem::internal)?;
    let account = state
        .accounts(billing)
        .read(customer.as_str(), customer.as_str(), start, now)
        .await?
        .account(customer);
    let bill = idlemeter_core::bill(&billing.sheet, &usage, &account).map_err(Problem::internal)?;
    if bill.bills_nothing() {
        return Ok(None);
    }
    let mut draft = Invoice::from_bill(
        &billing.terms.issuer,
        0,
        &bill,
        BillContext {
            start,
            end,
            currency: billing.sheet.currency.code().to_owned(),
            sheet: billing.sheet_label.clone(),
            sheet_checksum: billing.sheet_checksum.clone(),
            idle_policy: billing.idle_policy.clone(),
        },
    );
    draft.status = "draft".to_owned();
    if !draft.lines_add_up() {
        return Err(Problem::internal(format!(
            "preview of {customer}: lines do not add up to the total {}",
            draft.total
        )));
    }
    Ok(Some(draft))
}
