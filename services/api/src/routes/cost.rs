//! What a customer's usage costs: now, by window, and the open period's invoice preview.

use super::*;

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
    params(Tenant),
    responses((status = 200, body = CostNow),
        Problems))]
pub async fn cost_now(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
) -> ApiResult<axum::Json<CostNow>> {
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
    params(Tenant, CostHistoryQuery),
    responses((status = 200, body = CostHistory),
        QueryProblems))]
pub async fn cost_history(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
    Query(query): Query<CostHistoryQuery>,
) -> ApiResult<axum::Json<CostHistory>> {
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
    params(Tenant),
    responses((status = 200, body = Invoice),
        Problems))]
pub async fn invoice_preview(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
) -> ApiResult<axum::Json<Invoice>> {
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
