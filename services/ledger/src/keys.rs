//! API keys in the ledger: each version of a key (created, revoked) is a
//! row, written with its copy for ClickHouse in one transaction; the API's
//! key cache keeps reading ClickHouse.

use idlemeter_store::{ApiKeyRow, Store};

use crate::{Context, Error, Ledger, Result};

/// The outbox topic of API key versions (their copy for ClickHouse).
pub const API_KEYS_TOPIC: &str = "api_keys";

impl Ledger {
    /// Records one version of a key and queues its copy for ClickHouse;
    /// `false` when that version was recorded before (nothing queued).
    pub async fn record_api_key(&self, row: &ApiKeyRow) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.context("begin")?;
        let inserted = insert(&tx, row).await?;
        if inserted {
            self.queue_copy(
                &tx,
                API_KEYS_TOPIC,
                &format!("{}/{}", row.key_id, row.version),
                row,
            )
            .await?;
        }
        tx.commit().await.context("committing the key")?;
        Ok(inserted)
    }

    /// Copies keys ClickHouse holds into the ledger (the move to it);
    /// returns how many versions were new. Nothing is queued: ClickHouse
    /// has them.
    pub async fn import_api_keys(&self, rows: &[ApiKeyRow]) -> Result<usize> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.context("begin")?;
        let mut imported = 0;
        for row in rows {
            if insert(&tx, row).await? {
                imported += 1;
            }
        }
        tx.commit().await.context("committing imported keys")?;
        Ok(imported)
    }
}

async fn insert(tx: &deadpool_postgres::Transaction<'_>, row: &ApiKeyRow) -> Result<bool> {
    let version = i64::try_from(row.version)
        .map_err(|_| Error::Refused(format!("key {} version overflows", row.key_id)))?;
    let inserted = tx
        .execute(
            "INSERT INTO api_keys (key_id, version, customer, role, secret_sha256, name, \
             created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT DO NOTHING",
            &[
                &row.key_id,
                &version,
                &row.customer,
                &row.role,
                &row.secret_sha256,
                &row.name,
                &i64::from(row.created_at),
                &i64::from(row.revoked_at),
            ],
        )
        .await
        .context(format!("recording key {}", row.key_id))?;
    Ok(inserted == 1)
}

/// Writes a key version where keys live: the ledger (then copied to
/// ClickHouse) when there is one, else ClickHouse.
pub async fn record_api_key(ledger: Option<&Ledger>, store: &Store, row: &ApiKeyRow) -> Result<()> {
    match ledger {
        Some(ledger) => {
            ledger.record_api_key(row).await?;
            ledger.relay(store).await?;
        }
        None => store
            .insert_api_key(row)
            .await
            .map_err(|error| Error::Relay(error.to_string()))?,
    }
    Ok(())
}
