//! API keys (`api_keys`, migration 0006): the secret's hash and scope.

use crate::sql::Fetch;
use crate::{Result, Store};

/// One row of `api_keys`; field order is column order.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct ApiKeyRow {
    pub key_id: String,
    /// Empty for an admin key.
    pub customer: String,
    /// `customer` or `admin`.
    pub role: String,
    /// Hex SHA-256 of the secret part of the key.
    pub secret_sha256: String,
    pub name: String,
    /// Unix seconds.
    pub created_at: u32,
    /// Unix seconds; 0 while valid.
    pub revoked_at: u32,
    pub version: u64,
}

impl Store {
    pub async fn insert_api_key(&self, row: &ApiKeyRow) -> Result<()> {
        self.insert_rows("api_keys", std::slice::from_ref(row))
            .await
    }

    /// Every key's latest version, revoked ones included.
    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRow>> {
        self.client
            .query("SELECT ?fields FROM api_keys FINAL ORDER BY key_id")
            .all("api keys")
            .await
    }
}
