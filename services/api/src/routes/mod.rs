//! The `/v1` handlers. Every one takes the authenticated [`Principal`] and
//! turns the path's customer into a tenant it may see first
//! ([`Principal::tenant`]); everything after that is scoped to that tenant,
//! so another tenant's sandbox, invoice or alert is "not found" by
//! construction, never by a later check.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use chrono::{DateTime, Utc};
use idlemeter_core::{CustomerId, SandboxId};
use idlemeter_store::Invoice;
use idlemeter_store::{
    from_column, to_column, unix_seconds, DecisionRow, SandboxRange, SpendAlertRow,
};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{self, Principal, Scope, Tenant};
use crate::problem::{
    AuthProblems, BodyProblems, Json, Path, Problem, Problems, Query, QueryProblems,
};
use crate::views::{
    cost_windows, time, usage_windows, CostHistory, Resource, SandboxUsage, UsagePage, WindowWidth,
};
use crate::AppState;

mod alerts;
mod cost;
mod finance;
mod invoices;
mod keys;
mod sandboxes;
mod usage;

pub use alerts::*;
pub use cost::*;
pub use finance::*;
pub use invoices::*;
pub use keys::*;
pub use sandboxes::*;
pub use usage::*;

pub(crate) type ApiResult<T> = Result<T, Problem>;
pub(crate) type AppStateRef = State<Arc<AppState>>;

/// Most windows (all sandboxes together) one usage page holds.
const MAX_PAGE_WINDOWS: u32 = 100_000;

/// Latest time a ClickHouse `DateTime` holds, rounded down to a day.
const LAST_TIME: u32 = 4_294_886_400;

/// Opaque page cursors: a kind letter and the last key of the page, hex encoded.
fn encode_cursor(kind: char, key: &str) -> String {
    hex::encode(format!("{kind}:{key}"))
}

fn decode_cursor(kind: char, cursor: Option<&str>) -> ApiResult<Option<String>> {
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    let bad = || {
        Problem::bad_request(format!(
            "cursor {cursor:?} is not one this endpoint returned"
        ))
    };
    let bytes = hex::decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let key = text.strip_prefix(&format!("{kind}:")).ok_or_else(bad)?;
    Ok(Some(key.to_owned()))
}

fn page_limit(state: &AppState, limit: Option<u32>) -> ApiResult<u32> {
    let max = state.config.max_page;
    match limit {
        None => Ok(state.config.default_page.min(max)),
        Some(limit) if (1..=max).contains(&limit) => Ok(limit),
        Some(limit) => Err(Problem::bad_request(format!(
            "limit {limit} is out of range: 1 to {max}"
        ))),
    }
}

/// `[from, to)` as Unix seconds aligned to `width_s` (from down, to up), checked.
fn aligned_range(
    state: &AppState,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    width_s: u32,
) -> ApiResult<(u32, u32)> {
    if from >= to {
        return Err(Problem::bad_request(format!(
            "from ({}) must be before to ({})",
            from.to_rfc3339(),
            to.to_rfc3339()
        )));
    }
    let in_range = |t: DateTime<Utc>| t.timestamp() >= 0 && t.timestamp() <= i64::from(LAST_TIME);
    if !in_range(from) || !in_range(to) {
        return Err(Problem::bad_request(
            "from and to must lie between 1970-01-01T00:00:00Z and 2106-02-06T00:00:00Z",
        ));
    }
    let (from, to) = (unix_seconds(from), unix_seconds(to));
    let from = from - from % width_s;
    let to = to.div_ceil(width_s) * width_s;
    let count = (to - from) / width_s;
    let max = state.config.max_windows;
    if count > max {
        return Err(Problem::bad_request(format!(
            "the range holds {count} windows, more than the limit of {max}: narrow the range or use a wider window"
        )));
    }
    Ok((from, to))
}

/// Who is calling.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    pub key_id: String,
    /// `customer` or `admin`.
    pub role: String,
    /// The tenant a customer key sees; absent for an admin key.
    pub customer: Option<String>,
}

#[utoipa::path(get, path = "/v1/me", tag = "keys",
    summary = "The calling key: its id, role and tenant",
    responses((status = 200, body = Me), AuthProblems))]
pub async fn me(Extension(principal): Extension<Principal>) -> axum::Json<Me> {
    let (role, customer) = match &principal.scope {
        Scope::Admin => ("admin", None),
        Scope::Customer(customer) => ("customer", Some(customer.as_str().to_owned())),
        Scope::Ingest(customer) => ("ingest", customer.as_ref().map(|c| c.as_str().to_owned())),
    };
    axum::Json(Me {
        key_id: principal.key_id,
        role: role.to_owned(),
        customer,
    })
}
