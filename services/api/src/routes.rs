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

use crate::auth::{self, Principal, Scope};
use crate::problem::{
    AuthProblems, BodyProblems, Json, Path, Problem, Problems, Query, QueryProblems,
};
use crate::views::{
    cost_windows, time, usage_windows, CostHistory, Resource, SandboxUsage, UsagePage, WindowWidth,
};
use crate::AppState;

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
    responses((status = 200, body = Me), AuthProblems),
    security(("api_key" = [])))]
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start of the range (RFC 3339), rounded down to a window.
    pub from: DateTime<Utc>,
    /// End of the range (RFC 3339, exclusive), rounded up to a window.
    pub to: DateTime<Utc>,
    /// Window width; at most `max_windows` (default 2000) windows per request.
    pub window: WindowWidth,
    /// Only this sandbox.
    pub sandbox: Option<String>,
    /// Only this resource.
    pub resource: Option<Resource>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Sandboxes per page (1 to `max_page`, default 100); fewer when the
    /// page would hold more than 100,000 windows.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/usage", tag = "usage",
    summary = "Usage by sandbox, resource and window (minute, hour or day) over a time range",
    params(("customer" = String, Path, description = "Customer id"), UsageQuery),
    responses((status = 200, body = UsagePage),
        QueryProblems),
    security(("api_key" = [])))]
pub async fn usage(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(customer): Path<String>,
    Query(query): Query<UsageQuery>,
) -> ApiResult<axum::Json<UsagePage>> {
    let customer = principal.tenant(&customer)?;
    let window: idlemeter_store::Window = query.window.into();
    let (from, to) = aligned_range(&state, query.from, query.to, window.seconds())?;
    // A page holds at most `max_windows` windows per sandbox and
    // MAX_PAGE_WINDOWS in all: long ranges get fewer sandboxes a page.
    let windows_each = (to - from) / window.seconds();
    let limit =
        page_limit(&state, query.limit)?.min((MAX_PAGE_WINDOWS / windows_each.max(1)).max(1));
    let after = decode_cursor('s', query.cursor.as_deref())?.unwrap_or_default();
    let only = match &query.sandbox {
        Some(sandbox) => match SandboxId::parse(sandbox.clone()) {
            Ok(id) => Some(id),
            // Not a valid id: no sandbox has it.
            Err(_) => return Ok(axum::Json(empty_usage(&customer, query.window, from, to))),
        },
        None => None,
    };
    let mut page = state
        .store
        .sandboxes_with_usage(
            customer.as_str(),
            from,
            to,
            &after,
            only.as_ref().map(SandboxId::as_str),
            limit + 1,
        )
        .await?;
    let next_cursor = if page.len() > limit as usize {
        page.truncate(limit as usize);
        page.last().map(|last| encode_cursor('s', last))
    } else {
        None
    };
    let (Some(first), Some(last)) = (page.first(), page.last()) else {
        return Ok(axum::Json(empty_usage(&customer, query.window, from, to)));
    };
    let range = SandboxRange {
        first: first.clone(),
        last: last.clone(),
    };
    let usage = state
        .store
        .usage_by_window(customer.as_str(), &range, from, to, window)
        .await?;
    let only_resources: Vec<Resource> = query.resource.into_iter().collect();
    // `usage` is sorted by (sandbox, window): one pass groups it.
    let (start, end) = (time(from), time(to));
    let mut sandboxes: Vec<SandboxUsage> = Vec::with_capacity(page.len());
    for group in usage
        .iter()
        .filter(|u| u.hour >= start && u.hour < end)
        .collect::<Vec<_>>()
        .chunk_by(|a, b| a.sandbox == b.sandbox)
    {
        sandboxes.push(SandboxUsage {
            sandbox: group[0].sandbox.as_str().to_owned(),
            windows: usage_windows(group, window.seconds(), &only_resources),
        });
    }
    Ok(axum::Json(UsagePage {
        customer: customer.as_str().to_owned(),
        window: query.window,
        from: time(from),
        to: time(to),
        sandboxes,
        next_cursor,
    }))
}

fn empty_usage(customer: &CustomerId, window: WindowWidth, from: u32, to: u32) -> UsagePage {
    UsagePage {
        customer: customer.as_str().to_owned(),
        window,
        from: time(from),
        to: time(to),
        sandboxes: Vec::new(),
        next_cursor: None,
    }
}

/// One line of the bill so far.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostNowLine {
    pub kind: String,
    pub resource: String,
    #[schema(value_type = String)]
    pub quantity: Decimal,
    pub unit: String,
    #[schema(value_type = String)]
    pub unit_price: Decimal,
    #[schema(value_type = String)]
    pub amount: Decimal,
}

/// What the open period has cost so far, as the online rater last rated it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostNow {
    pub customer: String,
    /// The open billing period (`[billing] period`).
    pub period_start: Option<DateTime<Utc>>,
    /// The end of the last hour rated, or, for a live figure, the second of
    /// the newest sample rated; absent before the period's first.
    pub as_of: Option<DateTime<Utc>>,
    /// True while the figure is the rater's live rating of the open hour
    /// (refreshed every few seconds); false for a closed hour's final
    /// snapshot.
    pub provisional: bool,
    pub currency: Option<String>,
    pub sheet: Option<String>,
    pub lines: Vec<CostNowLine>,
    /// The sum of `lines` (checked): what the invoice would ask to be paid
    /// if the period closed at `as_of`.
    #[schema(value_type = String)]
    pub total: Decimal,
    /// What the period has cost: `total` plus what a prepaid wallet paid
    /// (the `wallet` line). Spend alerts and budget caps compare this.
    #[schema(value_type = String)]
    pub spend: Decimal,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/cost", tag = "cost",
    summary = "Cost so far in the current billing period (the live figure of the open hour, or the latest closed hour's snapshot)",
    params(("customer" = String, Path, description = "Customer id")),
    responses((status = 200, body = CostNow),
        Problems),
    security(("api_key" = [])))]
pub async fn cost_now(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(customer): Path<String>,
) -> ApiResult<axum::Json<CostNow>> {
    let customer = principal.tenant(&customer)?;
    let mut answer = CostNow {
        customer: customer.as_str().to_owned(),
        period_start: None,
        as_of: None,
        provisional: false,
        currency: None,
        sheet: None,
        lines: Vec::new(),
        total: Decimal::ZERO,
        spend: Decimal::ZERO,
    };
    let (current, _) = state.billing.terms.period.bounds(state.now());
    answer.period_start = Some(current);
    let Some(spend) = state.store.latest_spend(customer.as_str()).await? else {
        return Ok(axum::Json(answer));
    };
    // Before the open period's first rated hour the latest snapshot is last
    // period's: this period has cost nothing rated yet.
    if spend.period_start != unix_seconds(current) {
        return Ok(axum::Json(answer));
    }
    answer.provisional = spend.provisional;
    let rows = state.store.spend_lines(&customer, &spend).await?;
    for row in &rows {
        answer.currency.get_or_insert_with(|| row.currency.clone());
        answer.sheet.get_or_insert_with(|| row.sheet.clone());
        answer.lines.push(CostNowLine {
            kind: row.kind.clone(),
            resource: row.resource.clone(),
            quantity: from_column(row.quantity)?.normalize(),
            unit: row.unit.clone(),
            unit_price: from_column(row.unit_price)?.normalize(),
            amount: from_column(row.amount)?.normalize(),
        });
    }
    answer.total = answer
        .lines
        .iter()
        .map(|line| line.amount)
        .sum::<Decimal>()
        .normalize();
    answer.spend = answer
        .lines
        .iter()
        .filter(|line| line.kind != "wallet")
        .map(|line| line.amount)
        .sum::<Decimal>()
        .normalize();
    // A live figure is replaced every few seconds: its lines are the newest
    // one, written in one insert, which may be newer than the total read a
    // moment before. A final snapshot never changes, so its lines must sum
    // to its total.
    let as_of = match rows.first() {
        Some(row) if spend.provisional => row.as_of,
        _ => {
            if answer.total != spend.total.normalize() {
                return Err(Problem::internal(format!(
                    "cost of {customer}: lines sum to {} but the snapshot totals {}",
                    answer.total, spend.total
                )));
            }
            spend.as_of
        }
    };
    answer.as_of = Some(time(as_of));
    Ok(axum::Json(answer))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CostHistoryQuery {
    /// Start of the range (RFC 3339), rounded down to a window.
    pub from: DateTime<Utc>,
    /// End of the range (RFC 3339, exclusive), rounded up to a window.
    pub to: DateTime<Utc>,
    /// `hour` or `day` (cost is rated per hour).
    pub window: WindowWidth,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/cost/history", tag = "cost",
    summary = "Cost per hour or day over a time range, from the rated snapshots",
    params(("customer" = String, Path, description = "Customer id"), CostHistoryQuery),
    responses((status = 200, body = CostHistory),
        QueryProblems),
    security(("api_key" = [])))]
pub async fn cost_history(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(customer): Path<String>,
    Query(query): Query<CostHistoryQuery>,
) -> ApiResult<axum::Json<CostHistory>> {
    let customer = principal.tenant(&customer)?;
    if query.window == WindowWidth::Minute {
        return Err(Problem::bad_request(
            "window=minute: cost is rated per hour; use hour or day",
        ));
    }
    let width = idlemeter_store::Window::from(query.window).seconds();
    let (from, to) = aligned_range(&state, query.from, query.to, width)?;
    let lines = state
        .store
        .snapshot_lines(customer.as_str(), from, to)
        .await?;
    let rated_until = lines.iter().map(|line| line.as_of).max().map(time);
    let (windows, totals) =
        cost_windows(customer.as_str(), &lines, from, to, width).map_err(Problem::internal)?;
    Ok(axum::Json(CostHistory {
        customer: customer.as_str().to_owned(),
        window: query.window,
        from: time(from),
        to: time(to),
        windows,
        totals,
        rated_until,
    }))
}

#[utoipa::path(get, path = "/v1/customers/{customer}/invoice-preview", tag = "invoices",
    summary = "A draft invoice of the open period: what it would be if it closed now",
    params(("customer" = String, Path, description = "Customer id")),
    responses((status = 200, body = Invoice),
        Problems),
    security(("api_key" = [])))]
pub async fn invoice_preview(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(customer): Path<String>,
) -> ApiResult<axum::Json<Invoice>> {
    let customer = principal.tenant(&customer)?;
    match crate::preview::draft(&state, &customer, state.now()).await? {
        Some(draft) => Ok(axum::Json(draft.normalized())),
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "nothing-to-bill",
            format!(
                "nothing to bill for customer {:?} in the open period yet",
                customer.as_str()
            ),
        )),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Items per page (1 to `max_page`, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// An issued invoice, without its lines.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceSummary {
    pub issuer: String,
    pub number: u64,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub currency: String,
    #[schema(value_type = String)]
    pub total: Decimal,
    pub issued_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InvoiceList {
    /// Newest first.
    pub invoices: Vec<InvoiceSummary>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/credit-notes", tag = "invoices",
    summary = "Credit notes on the customer's invoices, oldest first",
    description = "Each note credits amounts of one issued invoice (which never changes) and says where its total went: `next_invoice` (the credit balance, applied by the next invoice's `balance.applied` line) or `wallet` (a deposit).",
    params(("customer" = String, Path, description = "Customer id")),
    responses((status = 200, body = Vec<idlemeter_store::CreditNote>),
        QueryProblems),
    security(("api_key" = [])))]
pub async fn credit_notes(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(customer): Path<String>,
) -> ApiResult<axum::Json<Vec<idlemeter_store::CreditNote>>> {
    let customer = principal.tenant(&customer)?;
    let headers = state
        .store
        .credit_notes_of(&state.billing.terms.issuer, customer.as_str())
        .await?;
    let mut notes = Vec::with_capacity(headers.len());
    for header in &headers {
        let lines = state.store.credit_note_lines(header).await?;
        notes.push(idlemeter_store::CreditNote::from_rows(header, &lines)?);
    }
    Ok(axum::Json(notes))
}

#[utoipa::path(get, path = "/v1/customers/{customer}/invoices", tag = "invoices",
    summary = "Issued invoices, newest first",
    params(("customer" = String, Path, description = "Customer id"), PageQuery),
    responses((status = 200, body = InvoiceList),
        QueryProblems),
    security(("api_key" = [])))]
pub async fn invoices(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(customer): Path<String>,
    Query(query): Query<PageQuery>,
) -> ApiResult<axum::Json<InvoiceList>> {
    let customer = principal.tenant(&customer)?;
    let limit = page_limit(&state, query.limit)?;
    let before = match decode_cursor('n', query.cursor.as_deref())? {
        Some(number) => number
            .parse::<u64>()
            .map_err(|_| Problem::bad_request("cursor is not one this endpoint returned"))?,
        None => u64::MAX,
    };
    let mut rows = state
        .store
        .invoices_of(
            &state.billing.terms.issuer,
            customer.as_str(),
            before,
            limit + 1,
        )
        .await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last()
            .map(|last| encode_cursor('n', &last.number.to_string()))
    } else {
        None
    };
    let invoices = rows
        .iter()
        .map(|row| {
            Ok(InvoiceSummary {
                issuer: row.issuer.clone(),
                number: row.number,
                period_start: time(row.period_start),
                period_end: time(row.period_end),
                currency: row.currency.clone(),
                total: from_column(row.total)?.normalize(),
                issued_at: time(row.issued_at),
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(axum::Json(InvoiceList {
        invoices,
        next_cursor,
    }))
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InvoiceFormat {
    Json,
    Csv,
    Pdf,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InvoiceQuery {
    /// `json` (default), `csv` or `pdf`; `Accept: text/csv` or
    /// `application/pdf` also selects it.
    pub format: Option<InvoiceFormat>,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/invoices/{number}", tag = "invoices",
    summary = "One issued invoice, as JSON, CSV or PDF",
    params(("customer" = String, Path, description = "Customer id"),
        ("number" = u64, Path, description = "Invoice number"), InvoiceQuery),
    responses((status = 200, description = "The invoice", content((Invoice = "application/json"), (String = "text/csv"), (Vec<u8> = "application/pdf"))),
        QueryProblems),
    security(("api_key" = [])))]
pub async fn invoice(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path((customer, number)): Path<(String, u64)>,
    Query(query): Query<InvoiceQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let customer = principal.tenant(&customer)?;
    let not_found = || Problem::not_found("invoice", &number.to_string());
    let header = state
        .store
        .invoice_of(&state.billing.terms.issuer, customer.as_str(), number)
        .await?
        .ok_or_else(not_found)?;
    let lines = state.store.invoice_lines(&header).await?;
    let invoice = Invoice::from_rows(&header, &lines).map_err(Problem::internal)?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let format = query.format.unwrap_or(if accept.contains("text/csv") {
        InvoiceFormat::Csv
    } else if accept.contains("application/pdf") {
        InvoiceFormat::Pdf
    } else {
        InvoiceFormat::Json
    });
    if format == InvoiceFormat::Pdf {
        let parties = idlemeter_store::pdf::Parties::of(&invoice, &state.billing.terms.seller);
        return Ok((
            [(header::CONTENT_TYPE, "application/pdf")],
            idlemeter_store::pdf::to_pdf(&invoice, &parties),
        )
            .into_response());
    }
    if format == InvoiceFormat::Csv {
        Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            idlemeter_store::document::to_csv(&invoice),
        )
            .into_response())
    } else {
        Ok(axum::Json(invoice.normalized()).into_response())
    }
}

/// A spend alert to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAlert {
    /// Notify when the period's spend reaches this amount (a positive decimal
    /// string, in the customer's billing currency).
    #[schema(example = "250.00")]
    pub threshold: String,
    /// Where to POST the signed notification (`http://`; put a TLS proxy in
    /// front for https).
    #[schema(example = "http://hooks.example.com/idlemeter")]
    pub webhook_url: String,
}

/// A spend alert: fires once per billing period, when the rated spend of the
/// period reaches `threshold`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Alert {
    pub id: String,
    pub customer: String,
    #[schema(value_type = String)]
    pub threshold: Decimal,
    pub webhook_url: String,
    pub created_at: DateTime<Utc>,
}

/// A created alert, with the secret its webhooks are signed with: shown
/// here once, never again.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedAlert {
    #[serde(flatten)]
    pub alert: Alert,
    /// HMAC-SHA256 key of the `Idlemeter-Signature` header of this alert's
    /// webhooks.
    pub webhook_secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertList {
    pub alerts: Vec<Alert>,
}

fn alert_view(row: &SpendAlertRow) -> ApiResult<Alert> {
    Ok(Alert {
        id: row.alert_id.clone(),
        customer: row.customer.clone(),
        threshold: from_column(row.threshold)?.normalize(),
        webhook_url: row.webhook_url.clone(),
        created_at: time(row.created_at),
    })
}

/// Most alerts one customer may have.
const MAX_ALERTS: usize = 100;

#[utoipa::path(post, path = "/v1/customers/{customer}/alerts", tag = "alerts",
    summary = "Create a spend alert",
    params(("customer" = String, Path, description = "Customer id")),
    request_body = NewAlert,
    responses((status = 201, body = CreatedAlert),
        BodyProblems),
    security(("api_key" = [])))]
pub async fn create_alert(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(customer): Path<String>,
    Json(new): Json<NewAlert>,
) -> ApiResult<(StatusCode, axum::Json<CreatedAlert>)> {
    let customer = principal.tenant(&customer)?;
    let threshold: Decimal = new.threshold.trim().parse().map_err(|_| {
        Problem::bad_request(format!(
            "threshold {:?} is not a decimal number",
            new.threshold
        ))
    })?;
    if threshold <= Decimal::ZERO || threshold > Decimal::from(1_000_000_000_000u64) {
        return Err(Problem::bad_request(format!(
            "threshold {threshold} must be above 0 and at most 1000000000000"
        )));
    }
    let threshold = to_column(threshold).map_err(|_| {
        Problem::bad_request(format!(
            "threshold {threshold} has more than 12 decimal places"
        ))
    })?;
    if new.webhook_url.len() > 2048 {
        return Err(Problem::bad_request(
            "webhook_url is longer than 2048 bytes",
        ));
    }
    crate::alerts::check_url(&new.webhook_url, state.config.alert_private_targets)
        .map_err(Problem::bad_request)?;
    let existing = state.store.spend_alerts(Some(customer.as_str())).await?;
    if existing.iter().filter(|row| row.deleted == 0).count() >= MAX_ALERTS {
        return Err(Problem::bad_request(format!(
            "customer already has {MAX_ALERTS} alerts, the limit; delete one first"
        )));
    }
    let now_unix = unix_seconds(state.now());
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
    let alert_id = format!("al_{}", hex::encode(id));
    let webhook_secret = format!("whsec_{}", hex::encode(secret));
    // Stored sealed: the table never holds a usable secret.
    let sealed = state
        .sealer
        .seal(
            &webhook_secret,
            &crate::sealed::alert_context(customer.as_str(), &alert_id),
        )
        .map_err(|error| Problem::unavailable(error.to_string()))?;
    let row = SpendAlertRow {
        customer: customer.as_str().to_owned(),
        alert_id,
        threshold,
        currency: String::new(),
        webhook_url: new.webhook_url,
        webhook_secret: sealed,
        created_at: now_unix,
        deleted: 0,
        version: 1,
    };
    state.store.insert_spend_alert(&row).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedAlert {
            webhook_secret,
            alert: alert_view(&row)?,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/customers/{customer}/alerts", tag = "alerts",
    summary = "The customer's spend alerts",
    params(("customer" = String, Path, description = "Customer id")),
    responses((status = 200, body = AlertList),
        Problems),
    security(("api_key" = [])))]
pub async fn list_alerts(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(customer): Path<String>,
) -> ApiResult<axum::Json<AlertList>> {
    let customer = principal.tenant(&customer)?;
    let rows = state.store.spend_alerts(Some(customer.as_str())).await?;
    let alerts = rows
        .iter()
        .filter(|row| row.deleted == 0)
        .map(alert_view)
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(axum::Json(AlertList { alerts }))
}

#[utoipa::path(delete, path = "/v1/customers/{customer}/alerts/{alert_id}", tag = "alerts",
    summary = "Delete a spend alert",
    params(("customer" = String, Path, description = "Customer id"), ("alert_id" = String, Path, description = "Alert id")),
    responses((status = 204, description = "Deleted"),
        Problems),
    security(("api_key" = [])))]
pub async fn delete_alert(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path((customer, alert_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let customer = principal.tenant(&customer)?;
    let rows = state.store.spend_alerts(Some(customer.as_str())).await?;
    let row = rows
        .into_iter()
        .find(|row| row.alert_id == alert_id && row.deleted == 0)
        .ok_or_else(|| Problem::not_found("alert", &alert_id))?;
    state
        .store
        .insert_spend_alert(&SpendAlertRow {
            deleted: 1,
            version: row.version + 1,
            ..row
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A sandbox as its latest sample shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxState {
    pub sandbox: String,
    /// `running`, `suspended` or `stopped`.
    pub state: String,
    pub node: String,
    pub epoch: u64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub vcpu_milli: u32,
    pub mem_bytes: u64,
    pub gpu_model: String,
    pub gpu_count: u32,
    pub disk_bytes: u64,
    pub exec_sessions: u32,
    pub open_conns: u32,
}

fn time_ms(ms: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)).unwrap_or_default()
}

/// The stored state of a sandbox, or the live one where that is newer.
fn sandbox_now(
    row: Option<idlemeter_store::SandboxStateRow>,
    live: Option<&crate::live::LiveSandbox>,
) -> Option<SandboxState> {
    let Some(live) = live else {
        return row.map(sandbox_view);
    };
    let sample = &live.sample;
    let live_ms = u64::try_from(sample.ts.timestamp_millis()).unwrap_or(0);
    if let Some(row) = &row {
        if (row.epoch, row.last_seen_ms) >= (sample.epoch.0, live_ms) {
            return Some(sandbox_view(row.clone()));
        }
    }
    let first_seen_ms = row.as_ref().map_or_else(
        || u64::try_from(live.minute.first_ts_ms).unwrap_or(0),
        |row| row.first_seen_ms,
    );
    Some(SandboxState {
        sandbox: sample.sandbox.to_string(),
        state: sample.state.as_str().to_owned(),
        node: sample.node.to_string(),
        epoch: sample.epoch.0,
        first_seen: time_ms(first_seen_ms),
        last_seen: time_ms(live_ms),
        vcpu_milli: sample.vcpu.0,
        mem_bytes: sample.mem_bytes,
        gpu_model: sample.gpu_model.clone().unwrap_or_default(),
        gpu_count: sample.gpu_count,
        disk_bytes: sample.disk_bytes,
        exec_sessions: sample.exec_sessions,
        open_conns: sample.open_conns,
    })
}

/// The minute a sandbox is in, as far as its samples have arrived: what it
/// used between the minute's first and newest sample.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenMinute {
    pub minute: DateTime<Utc>,
    pub epoch: u64,
    /// Samples spanned (last seq - first seq + 1).
    pub samples: u64,
    pub cpu_used_usec: u64,
    pub vcpu_alloc_usec: u64,
    pub mem_alloc_kib_ms: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub running_ms: u64,
    pub active_ms: u64,
}

fn open_minute_view(live: &crate::live::LiveSandbox) -> OpenMinute {
    let row = &live.minute;
    let used = |index: usize| row.hi[index].saturating_sub(row.lo[index]);
    // Indices of idlemeter_core::MINUTE_COUNTERS.
    OpenMinute {
        minute: DateTime::from_timestamp(row.minute_s, 0).unwrap_or_default(),
        epoch: row.epoch.0,
        samples: row.last_seq - row.first_seq + 1,
        cpu_used_usec: used(0),
        net_rx_bytes: used(1),
        net_tx_bytes: used(2),
        vcpu_alloc_usec: used(3),
        mem_alloc_kib_ms: used(4),
        running_ms: used(8),
        active_ms: used(10),
    }
}

fn sandbox_view(row: idlemeter_store::SandboxStateRow) -> SandboxState {
    SandboxState {
        sandbox: row.sandbox,
        state: row.state,
        node: row.node,
        epoch: row.epoch,
        first_seen: time_ms(row.first_seen_ms),
        last_seen: time_ms(row.last_seen_ms),
        vcpu_milli: row.vcpu_milli,
        mem_bytes: row.mem_bytes,
        gpu_model: row.gpu_model,
        gpu_count: row.gpu_count,
        disk_bytes: row.disk_bytes,
        exec_sessions: row.exec_sessions,
        open_conns: row.open_conns,
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxState>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/sandboxes", tag = "sandboxes",
    summary = "Sandboxes and their current state",
    params(("customer" = String, Path, description = "Customer id"), PageQuery),
    responses((status = 200, body = SandboxList),
        QueryProblems),
    security(("api_key" = [])))]
pub async fn sandboxes(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(customer): Path<String>,
    Query(query): Query<PageQuery>,
) -> ApiResult<axum::Json<SandboxList>> {
    let customer = principal.tenant(&customer)?;
    let limit = page_limit(&state, query.limit)?;
    let after = decode_cursor('s', query.cursor.as_deref())?.unwrap_or_default();
    let mut rows = state
        .store
        .sandbox_states(customer.as_str(), &after, None, limit + 1)
        .await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|last| encode_cursor('s', &last.sandbox))
    } else {
        None
    };
    let live = state.live.as_deref();
    let sandboxes = rows
        .into_iter()
        .filter_map(|row| {
            let current = live.and_then(|live| {
                let id = SandboxId::parse(row.sandbox.clone()).ok()?;
                live.get(&customer, &id)
            });
            sandbox_now(Some(row), current.as_ref())
        })
        .collect();
    Ok(axum::Json(SandboxList {
        sandboxes,
        next_cursor,
    }))
}

/// An idle-policy decision about a sandbox.
#[derive(Debug, Serialize, ToSchema)]
pub struct Decision {
    pub id: String,
    pub at: DateTime<Utc>,
    pub rule: String,
    pub action: String,
    pub policy_version: String,
    pub reason: String,
    /// The signals that decided it.
    #[schema(value_type = Object)]
    pub signals: serde_json::Value,
}

fn decision_view(row: DecisionRow) -> Decision {
    Decision {
        at: DateTime::from_timestamp_millis(row.at_ms).unwrap_or_default(),
        signals: serde_json::from_str(&row.signals)
            .unwrap_or(serde_json::Value::String(row.signals)),
        id: row.decision_id,
        rule: row.rule,
        action: row.action,
        policy_version: row.policy_version,
        reason: row.reason,
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxDetail {
    #[serde(flatten)]
    pub state: SandboxState,
    /// The minute the sandbox is in, from the stream (absent where this API
    /// does not read the stream, or the sandbox sent nothing lately).
    pub open_minute: Option<OpenMinute>,
    /// Newest first.
    pub recent_decisions: Vec<Decision>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SandboxQuery {
    /// How many recent policy decisions (0 to 100, default 20).
    #[param(minimum = 0, maximum = 100)]
    pub decisions: Option<u32>,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/sandboxes/{sandbox}", tag = "sandboxes",
    summary = "One sandbox: its current state and recent idle-policy decisions",
    params(("customer" = String, Path, description = "Customer id"), ("sandbox" = String, Path, description = "Sandbox id"), SandboxQuery),
    responses((status = 200, body = SandboxDetail),
        QueryProblems),
    security(("api_key" = [])))]
pub async fn sandbox(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path((customer, sandbox)): Path<(String, String)>,
    Query(query): Query<SandboxQuery>,
) -> ApiResult<axum::Json<SandboxDetail>> {
    let customer = principal.tenant(&customer)?;
    let decisions = query.decisions.unwrap_or(20);
    if decisions > 100 {
        return Err(Problem::bad_request(format!(
            "decisions {decisions} is out of range: 0 to 100"
        )));
    }
    let not_found = || Problem::not_found("sandbox", &sandbox);
    let id = SandboxId::parse(sandbox.clone()).map_err(|_| not_found())?;
    let row = state
        .store
        .sandbox_states(customer.as_str(), "", Some(id.as_str()), 1)
        .await?
        .into_iter()
        .next();
    let live = state
        .live
        .as_deref()
        .and_then(|live| live.get(&customer, &id));
    let current = sandbox_now(row, live.as_ref()).ok_or_else(not_found)?;
    let recent = if decisions == 0 {
        Vec::new()
    } else {
        state
            .store
            .recent_decisions(customer.as_str(), id.as_str(), decisions)
            .await?
    };
    Ok(axum::Json(SandboxDetail {
        state: current,
        open_minute: live.as_ref().map(open_minute_view),
        recent_decisions: recent.into_iter().map(decision_view).collect(),
    }))
}

/// A key to create (admin only).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// The tenant the key sees; absent for another admin key.
    pub customer: Option<String>,
    /// A label for people (who holds the key, what for).
    #[serde(default)]
    pub name: String,
}

/// A created key. `key` is shown here once and never again.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub key_id: String,
    pub key: String,
    pub role: String,
    pub customer: Option<String>,
    pub name: String,
}

#[utoipa::path(post, path = "/v1/keys", tag = "keys",
    summary = "Create an API key (admin keys only)",
    request_body = NewKey,
    responses((status = 201, body = CreatedKey),
        BodyProblems),
    security(("api_key" = [])))]
pub async fn create_key(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Json(new): Json<NewKey>,
) -> ApiResult<(StatusCode, axum::Json<CreatedKey>)> {
    // The router lets admin keys only this far (lib.rs, require_admin).
    debug_assert!(principal.is_admin());
    let customer = new
        .customer
        .map(|c| {
            CustomerId::parse(c.clone())
                .map_err(|error| Problem::bad_request(format!("customer: {error}")))
        })
        .transpose()?;
    if new.name.len() > 256 {
        return Err(Problem::bad_request("name is longer than 256 bytes"));
    }
    let created = auth::generate(customer.as_ref(), &new.name, unix_seconds(state.now()));
    idlemeter_ledger::record_api_key(state.ledger.as_ref(), &state.store, &created.row)
        .await
        .map_err(Problem::internal)?;
    state.keys.reload().await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedKey {
            key_id: created.row.key_id,
            key: created.key,
            role: created.row.role,
            customer: customer.map(|c| c.as_str().to_owned()),
            name: created.row.name,
        }),
    ))
}

#[utoipa::path(delete, path = "/v1/keys/{key_id}", tag = "keys",
    summary = "Revoke an API key (admin keys only)",
    params(("key_id" = String, Path, description = "Key id (the part after imk_)")),
    responses((status = 204, description = "Revoked"),
        Problems),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
    Path(key_id): Path<String>,
) -> ApiResult<StatusCode> {
    debug_assert!(principal.is_admin());
    let row = state
        .store
        .api_keys()
        .await?
        .into_iter()
        .find(|row| row.key_id == key_id && row.revoked_at == 0)
        .ok_or_else(|| Problem::not_found("key", &key_id))?;
    let revoked = auth::revoked(&row, unix_seconds(state.now()));
    idlemeter_ledger::record_api_key(state.ledger.as_ref(), &state.store, &revoked)
        .await
        .map_err(Problem::internal)?;
    state.keys.reload().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FinanceQuery {
    /// Start of the range (RFC 3339; default 30 days before `to`), rounded down to a day.
    pub from: Option<DateTime<Utc>>,
    /// End of the range (RFC 3339, exclusive; default now), rounded up to a day.
    pub to: Option<DateTime<Utc>>,
}

/// Most days the finance panels cover at once.
const MAX_FINANCE_DAYS: u32 = 400;

fn finance_range(query: &FinanceQuery, now: DateTime<Utc>) -> ApiResult<(u32, u32)> {
    let to = query.to.unwrap_or(now);
    let from = match query.from {
        Some(from) => from,
        None => to
            .checked_sub_signed(chrono::Duration::days(30))
            .ok_or_else(|| Problem::bad_request("to is out of range"))?,
    };
    if from >= to {
        return Err(Problem::bad_request("from must be before to"));
    }
    let in_range = |t: DateTime<Utc>| t.timestamp() >= 0 && t.timestamp() <= i64::from(LAST_TIME);
    if !in_range(from) || !in_range(to) {
        return Err(Problem::bad_request(
            "from and to must lie between 1970-01-01T00:00:00Z and 2106-02-06T00:00:00Z",
        ));
    }
    let (from, to) = (unix_seconds(from), unix_seconds(to));
    let (from, to) = (from - from % 86_400, to.div_ceil(86_400) * 86_400);
    if (to - from) / 86_400 > MAX_FINANCE_DAYS {
        return Err(Problem::bad_request(format!(
            "the range covers more than {MAX_FINANCE_DAYS} days"
        )));
    }
    Ok((from, to))
}

async fn run_panels(
    state: &AppState,
    from: u32,
    to: u32,
) -> ApiResult<Vec<crate::finance::PanelData>> {
    let mut out = Vec::new();
    for panel in crate::finance::panels() {
        out.push(
            crate::finance::run(
                &state.store,
                &panel,
                from,
                to,
                state.config.sample_interval_s,
            )
            .await?,
        );
    }
    Ok(out)
}

#[utoipa::path(get, path = "/v1/finance/panels", tag = "finance",
    summary = "Every finance dashboard panel's data for a range (admin keys only)",
    params(FinanceQuery),
    responses((status = 200, body = Vec<crate::finance::PanelData>),
        QueryProblems),
    security(("api_key" = [])))]
pub async fn finance_panels(
    State(state): AppStateRef,
    Query(query): Query<FinanceQuery>,
) -> ApiResult<axum::Json<Vec<crate::finance::PanelData>>> {
    let (from, to) = finance_range(&query, state.now())?;
    Ok(axum::Json(run_panels(&state, from, to).await?))
}

/// Margin in a range: a row per sandbox and one per customer (sandbox
/// `""`), as `dashboards/queries/sandbox_margin.sql` computes it.
#[derive(Debug, Serialize, ToSchema)]
pub struct MarginRow {
    pub customer: String,
    /// `""` on the customer's own row (all their revenue and cost).
    pub sandbox: String,
    pub currency: String,
    /// The node type the sandbox's cost came from (most of it).
    pub node_type: String,
    /// Decimal strings: revenue (a sandbox's: its share of its customer's
    /// vCPU, memory and GPU usage lines), allocated node cost, and their
    /// difference.
    pub revenue: String,
    pub cost: String,
    pub margin: String,
}

#[utoipa::path(get, path = "/v1/admin/margin", tag = "finance",
    summary = "Revenue, allocated node cost and margin per customer and sandbox for a range (admin keys only)",
    description = "Node cost is allocated to sandboxes by their share of each node's capacity (GPU-seconds on GPU nodes, vCPU-seconds on others) under the loaded node cost sheet; customers billed in another currency than the cost sheet's are left out. See idlemeter_core::margin.",
    params(FinanceQuery),
    responses((status = 200, body = Vec<MarginRow>),
        QueryProblems),
    security(("api_key" = [])))]
pub async fn margin(
    State(state): AppStateRef,
    Query(query): Query<FinanceQuery>,
) -> ApiResult<axum::Json<Vec<MarginRow>>> {
    let (from, to) = finance_range(&query, state.now())?;
    let sql = crate::finance::fill(
        "SELECT customer, sandbox, currency, node_type, toString(revenue), toString(cost), \
         toString(margin) FROM ({sandbox_margin}) ORDER BY customer, sandbox",
        &from.to_string(),
        &to.to_string(),
        "1",
    );
    let mut rows = state.store.query_rows(&sql).await?;
    if !rows.is_empty() {
        rows.remove(0);
    }
    let money = |text: &str| {
        text.parse::<rust_decimal::Decimal>()
            .map(|value| value.normalize().to_string())
            .unwrap_or_else(|_| text.to_owned())
    };
    Ok(axum::Json(
        rows.into_iter()
            .filter(|row| row.len() == 7)
            .map(|row| MarginRow {
                customer: row[0].clone(),
                sandbox: row[1].clone(),
                currency: row[2].clone(),
                node_type: row[3].clone(),
                revenue: money(&row[4]),
                cost: money(&row[5]),
                margin: money(&row[6]),
            })
            .collect(),
    ))
}

/// A link to the built-in finance page.
#[derive(Debug, Serialize, ToSchema)]
pub struct FinanceLink {
    /// Path and query to open in a browser on this API (this replica).
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/v1/finance/link", tag = "finance",
    summary = "A short-lived link to the built-in finance page, for a browser (admin keys only)",
    responses((status = 201, body = FinanceLink),
        Problems),
    security(("api_key" = [])))]
pub async fn finance_link(
    State(state): AppStateRef,
    Extension(principal): Extension<Principal>,
) -> (StatusCode, axum::Json<FinanceLink>) {
    let token = state.links.issue(&principal.key_id);
    let expires_at =
        state.now() + chrono::Duration::from_std(crate::finance::LINK_TTL).unwrap_or_default();
    (
        StatusCode::CREATED,
        axum::Json(FinanceLink {
            url: format!("/finance?token={token}"),
            expires_at,
        }),
    )
}

#[derive(Debug, Deserialize)]
pub struct FinancePageQuery {
    pub token: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// The built-in finance page (HTML), for a link from `POST /v1/finance/link`.
pub async fn finance_page(
    State(state): AppStateRef,
    Query(query): Query<FinancePageQuery>,
) -> ApiResult<axum::response::Html<String>> {
    let expired = || {
        Problem::unauthorized(
            "this finance page link is missing, wrong or expired, or the key that made it was revoked: ask for one with POST /v1/finance/link",
        )
    };
    let key_id = query
        .token
        .as_deref()
        .and_then(|token| state.links.key_of(token))
        .ok_or_else(expired)?;
    // Bound to its key: revoked keys' links stop, and the page counts
    // against the key's rate limit and running requests.
    if !state.keys.is_admin(&key_id).await {
        return Err(expired());
    }
    state
        .limiter
        .check(&key_id, std::time::Instant::now())
        .map_err(Problem::too_many_requests)?;
    let _slot = state
        .in_flight
        .enter(
            &format!("admin key {key_id}"),
            state.config.max_in_flight_per_tenant,
        )
        .ok_or_else(|| Problem::too_many_requests(1))?;
    let (from, to) = finance_range(
        &FinanceQuery {
            from: query.from,
            to: query.to,
        },
        state.now(),
    )?;
    let panels = run_panels(&state, from, to).await?;
    Ok(axum::response::Html(crate::finance::page(
        &panels,
        time(from),
        time(to),
    )))
}
