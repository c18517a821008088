//! Usage of a customer's sandboxes, by window.

use super::*;

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
    params(Tenant, UsageQuery),
    responses((status = 200, body = UsagePage),
        QueryProblems))]
pub async fn usage(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
    Query(query): Query<UsageQuery>,
) -> ApiResult<axum::Json<UsagePage>> {
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

pub(super) fn empty_usage(
    customer: &CustomerId,
    window: WindowWidth,
    from: u32,
    to: u32,
) -> UsagePage {
    UsagePage {
        customer: customer.as_str().to_owned(),
        window,
        from: time(from),
        to: time(to),
        sandboxes: Vec::new(),
        next_cursor: None,
    }
}
