//! API keys: create and revoke.

use super::*;

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
        BodyProblems))]
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
        Problems))]
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
