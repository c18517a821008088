//! Finance: dashboard panels, margin, the finance page and its signed link.

use super::*;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FinanceQuery {
    /// Start of the range (RFC 3339; default 30 days before `to`), rounded down to a day.
    pub from: Option<DateTime<Utc>>,
    /// End of the range (RFC 3339, exclusive; default now), rounded up to a day.
    pub to: Option<DateTime<Utc>>,
}

/// Most days the finance panels cover at once.
pub(super) const MAX_FINANCE_DAYS: u32 = 400;

pub(super) fn finance_range(query: &FinanceQuery, now: DateTime<Utc>) -> ApiResult<(u32, u32)> {
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

pub(super) async fn run_panels(
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
        QueryProblems))]
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
        QueryProblems))]
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
        Problems))]
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
