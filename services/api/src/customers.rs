//! Admin routes over customers and their plans, kept in the ledger
//! (PostgreSQL) and copied to ClickHouse through its outbox before the
//! answer, so the next figure, preview or close reads them:
//!
//! - `PUT /v1/admin/customers/{customer}`: create or replace a record;
//! - `GET /v1/admin/customers/{customer}`: the record, its version and its
//!   plan changes;
//! - `POST /v1/admin/customers/{customer}/subscriptions`: a plan from an
//!   instant on (prorated per second in the period it falls in).
//!
//! Without `[ledger] url` they answer 503. The ledger's refusals (a
//! currency change after an invoice, a plan change inside an invoiced
//! period) are 409, with its reason.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use idlemeter_core::CustomerId;
use idlemeter_ledger::{CustomerRecord, SubscriptionRecord};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::openapi::{RefOr, Response};
use utoipa::{IntoParams, IntoResponses, ToSchema};

use crate::problem::{Json, Problem};
use crate::routes::{ApiResult, AppStateRef};
use crate::AppState;

/// A customer record as the admin routes take and give it. Decimals are
/// strings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerBody {
    #[serde(default)]
    pub name: String,
    /// ISO 4217 code; the customer is billed by the sheet of this currency.
    pub currency: String,
    /// In [0, 1): "0.2" is 20 %. Absent: the API's `[billing] tax_rates`.
    #[serde(default)]
    pub tax_rate: Option<String>,
    #[serde(default)]
    pub tax_id: String,
    #[serde(default)]
    pub billing_email: String,
    /// Spend per period that sends `customer.spend_limit_reached`.
    #[serde(default)]
    pub spend_limit: Option<String>,
    /// Free-form facts, a JSON object.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// A customer, its version and its plan changes.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerView {
    pub id: String,
    pub version: u64,
    pub customer: CustomerBody,
    pub subscriptions: Vec<PlanChange>,
}

/// A plan from an instant on.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanChange {
    /// A plan of the customer's sheet.
    pub plan: String,
    pub effective_from: DateTime<Utc>,
}

/// What saving did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Saved {
    pub version: u64,
    pub created: bool,
}

/// The customer in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct CustomerPath {
    /// Customer id.
    pub customer: String,
}

/// The answers of a ledger route beyond success: 400, 401, 404, 409, 415,
/// 429, 503.
#[derive(Debug)]
pub struct LedgerProblems;

impl IntoResponses for LedgerProblems {
    fn responses() -> std::collections::BTreeMap<String, RefOr<Response>> {
        let mut responses = crate::problem::BodyProblems::responses();
        responses.extend(crate::problem::problem_responses(&[
            (409, "The ledger refused the change; `detail` says why"),
            (503, "No ledger is configured ([ledger] url)"),
        ]));
        responses
    }
}

fn ledger(state: &AppState) -> Result<&idlemeter_ledger::Ledger, Problem> {
    state.ledger.as_ref().ok_or_else(|| {
        Problem::unavailable("customers live in the ledger: this API has no [ledger] url")
    })
}

fn customer_id(text: &str) -> Result<CustomerId, Problem> {
    CustomerId::parse(text.to_owned())
        .map_err(|error| Problem::bad_request(format!("customer: {error}")))
}

fn decimal(field: &str, text: &str) -> Result<Decimal, Problem> {
    text.parse()
        .map_err(|error| Problem::bad_request(format!("{field} {text:?}: {error}")))
}

/// The ledger's answer as a problem: its refusals are 409, the rest 500.
fn refused(error: idlemeter_ledger::Error) -> Problem {
    match error {
        idlemeter_ledger::Error::Refused(reason) => {
            Problem::new(StatusCode::CONFLICT, "conflict", reason)
        }
        other => Problem::internal(other),
    }
}

async fn relay(state: &AppState, ledger: &idlemeter_ledger::Ledger) -> Result<(), Problem> {
    ledger
        .relay(&state.store)
        .await
        .map_err(Problem::internal)?;
    Ok(())
}

#[utoipa::path(put, path = "/v1/admin/customers/{customer}", tag = "customers",
    summary = "Create or replace a customer's record (admin keys only)",
    params(CustomerPath),
    request_body = CustomerBody,
    responses((status = 200, body = Saved), LedgerProblems))]
pub async fn put_customer(
    State(state): AppStateRef,
    Path(path): Path<CustomerPath>,
    Json(body): Json<CustomerBody>,
) -> ApiResult<axum::Json<Saved>> {
    let ledger = ledger(&state)?;
    let id = customer_id(&path.customer)?;
    let record = CustomerRecord {
        id: id.as_str().to_owned(),
        name: body.name,
        currency: body.currency,
        tax_rate: body
            .tax_rate
            .as_deref()
            .map(|rate| decimal("tax_rate", rate))
            .transpose()?,
        tax_id: body.tax_id,
        billing_email: body.billing_email,
        spend_limit: body
            .spend_limit
            .as_deref()
            .map(|limit| decimal("spend_limit", limit))
            .transpose()?,
        metadata: body.metadata,
    };
    // A record that could not bill is the caller's mistake (400); a
    // change the ledger refuses is a conflict (409).
    record
        .validate()
        .map_err(|error| Problem::bad_request(error.to_string()))?;
    let saved = ledger
        .save_customer(&state.billing.terms.issuer, &record)
        .await
        .map_err(refused)?;
    relay(&state, ledger).await?;
    Ok(axum::Json(Saved {
        version: saved.version,
        created: saved.created,
    }))
}

#[utoipa::path(get, path = "/v1/admin/customers/{customer}", tag = "customers",
    summary = "A customer's record and plan changes (admin keys only)",
    params(CustomerPath),
    responses((status = 200, body = CustomerView), LedgerProblems))]
pub async fn get_customer(
    State(state): AppStateRef,
    Path(path): Path<CustomerPath>,
) -> ApiResult<axum::Json<CustomerView>> {
    let ledger = ledger(&state)?;
    let id = customer_id(&path.customer)?;
    let (record, version, plans) = ledger
        .customer(&state.billing.terms.issuer, id.as_str())
        .await
        .map_err(refused)?
        .ok_or_else(|| Problem::not_found("customer", id.as_str()))?;
    Ok(axum::Json(CustomerView {
        id: record.id.clone(),
        version,
        customer: CustomerBody {
            name: record.name,
            currency: record.currency,
            tax_rate: record.tax_rate.map(|rate| rate.normalize().to_string()),
            tax_id: record.tax_id,
            billing_email: record.billing_email,
            spend_limit: record
                .spend_limit
                .map(|limit| limit.normalize().to_string()),
            metadata: record.metadata,
        },
        subscriptions: plans
            .into_iter()
            .map(|change| PlanChange {
                plan: change.plan,
                effective_from: change.effective_from,
            })
            .collect(),
    }))
}

#[utoipa::path(post, path = "/v1/admin/customers/{customer}/subscriptions", tag = "customers",
    summary = "Put a customer on a plan from an instant on (admin keys only)",
    description = "The period the change falls in bills each plan per second: its fee, included usage and monthly credit for its share of the period.",
    params(CustomerPath),
    request_body = PlanChange,
    responses((status = 201, body = PlanChange), LedgerProblems))]
pub async fn post_subscription(
    State(state): AppStateRef,
    Path(path): Path<CustomerPath>,
    Json(change): Json<PlanChange>,
) -> ApiResult<(StatusCode, axum::Json<PlanChange>)> {
    let ledger = ledger(&state)?;
    let id = customer_id(&path.customer)?;
    if change.plan.contains('\0') {
        return Err(Problem::bad_request("plan holds a NUL character"));
    }
    let billing = state.billing_of(id.as_str()).await?;
    if billing.sheet.plan_named(&change.plan).is_none() {
        return Err(Problem::bad_request(format!(
            "plan {:?} is not in sheet {}",
            change.plan, billing.sheet_label
        )));
    }
    ledger
        .subscribe(
            &state.billing.terms.issuer,
            id.as_str(),
            &SubscriptionRecord {
                plan: change.plan.clone(),
                effective_from: change.effective_from,
            },
        )
        .await
        .map_err(refused)?;
    relay(&state, ledger).await?;
    Ok((StatusCode::CREATED, axum::Json(change)))
}
