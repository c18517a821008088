//! Sandboxes: their state now (live where the live view has it), list and detail with decisions.

use super::*;

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

pub(super) fn time_ms(ms: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)).unwrap_or_default()
}

/// The stored state of a sandbox, or the live one where that is newer.
pub(super) fn sandbox_now(
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
    Some(sandbox_view(idlemeter_store::SandboxStateRow::of_sample(
        sample,
        first_seen_ms,
    )))
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

pub(super) fn open_minute_view(live: &crate::live::LiveSandbox) -> OpenMinute {
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

pub(super) fn sandbox_view(row: idlemeter_store::SandboxStateRow) -> SandboxState {
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
    params(Tenant, PageQuery),
    responses((status = 200, body = SandboxList),
        QueryProblems))]
pub async fn sandboxes(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
    Query(query): Query<PageQuery>,
) -> ApiResult<axum::Json<SandboxList>> {
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

pub(super) fn decision_view(row: DecisionRow) -> Decision {
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
    params(Tenant, ("sandbox" = String, Path, description = "Sandbox id"), SandboxQuery),
    responses((status = 200, body = SandboxDetail),
        QueryProblems))]
pub async fn sandbox(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
    Path((_, sandbox)): Path<(String, String)>,
    Query(query): Query<SandboxQuery>,
) -> ApiResult<axum::Json<SandboxDetail>> {
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
