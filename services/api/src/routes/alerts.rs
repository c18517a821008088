//! Spend alerts: create, list, delete.

use super::*;

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

pub(super) fn alert_view(row: &SpendAlertRow) -> ApiResult<Alert> {
    Ok(Alert {
        id: row.alert_id.clone(),
        customer: row.customer.clone(),
        threshold: from_column(row.threshold)?.normalize(),
        webhook_url: row.webhook_url.clone(),
        created_at: time(row.created_at),
    })
}

/// Most alerts one customer may have.
pub(super) const MAX_ALERTS: usize = 100;

#[utoipa::path(post, path = "/v1/customers/{customer}/alerts", tag = "alerts",
    summary = "Create a spend alert",
    params(Tenant),
    request_body = NewAlert,
    responses((status = 201, body = CreatedAlert),
        BodyProblems))]
pub async fn create_alert(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
    Json(new): Json<NewAlert>,
) -> ApiResult<(StatusCode, axum::Json<CreatedAlert>)> {
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
    params(Tenant),
    responses((status = 200, body = AlertList),
        Problems))]
pub async fn list_alerts(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
) -> ApiResult<axum::Json<AlertList>> {
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
    params(Tenant, ("alert_id" = String, Path, description = "Alert id")),
    responses((status = 204, description = "Deleted"),
        Problems))]
pub async fn delete_alert(
    State(state): AppStateRef,
    Tenant(customer): Tenant,
    Path((_, alert_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
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
