//! The outbox's copy to ClickHouse: every row the ledger wrote for the
//! dashboards, the rater and the API (issued invoices, credit notes, wallet
//! deposits, customers, subscriptions) is inserted there, then marked
//! delivered (API key versions too). A crash between the two leaves the items pending and the next
//! relay copies them again; ClickHouse collapses the repeat (same keys,
//! same versions).

use idlemeter_store::{
    ApiKeyRow, CreditNoteRows, CustomerRow, IssuedRows, Store, SubscriptionRow, WalletDepositRow,
};
use serde::de::DeserializeOwned;

use crate::{
    Error, Ledger, OutboxItem, Result, API_KEYS_TOPIC, CREDIT_NOTES_TOPIC, CUSTOMERS_TOPIC,
    INVOICES_TOPIC, SUBSCRIPTIONS_TOPIC, WALLET_DEPOSITS_TOPIC,
};

/// Outbox items relayed per topic and round.
const RELAY_BATCH: i64 = 500;

fn parse<T: DeserializeOwned>(items: &[OutboxItem]) -> Result<Vec<T>> {
    items
        .iter()
        .map(|item| {
            serde_json::from_value(item.payload.clone()).map_err(|error| {
                Error::Relay(format!("outbox item {} ({}): {error}", item.id, item.key))
            })
        })
        .collect()
}

fn stored<T>(result: idlemeter_store::Result<T>) -> Result<T> {
    result.map_err(|error| Error::Relay(error.to_string()))
}

impl Ledger {
    /// Copies what the outbox holds for ClickHouse into `store`, then marks
    /// it delivered; returns how many items.
    pub async fn relay(&self, store: &Store) -> Result<usize> {
        let mut relayed = 0;
        loop {
            let customers = self.pending(CUSTOMERS_TOPIC, RELAY_BATCH).await?;
            let subscriptions = self.pending(SUBSCRIPTIONS_TOPIC, RELAY_BATCH).await?;
            let deposits = self.pending(WALLET_DEPOSITS_TOPIC, RELAY_BATCH).await?;
            let invoices = self.pending(INVOICES_TOPIC, RELAY_BATCH).await?;
            let notes = self.pending(CREDIT_NOTES_TOPIC, RELAY_BATCH).await?;
            let keys = self.pending(API_KEYS_TOPIC, RELAY_BATCH).await?;
            let items = [
                &customers,
                &subscriptions,
                &deposits,
                &invoices,
                &notes,
                &keys,
            ];
            if items.iter().all(|items| items.is_empty()) {
                return Ok(relayed);
            }
            let customer_rows: Vec<CustomerRow> = parse(&customers)?;
            if !customer_rows.is_empty() {
                stored(store.insert_customers(&customer_rows).await)?;
            }
            let subscription_rows: Vec<SubscriptionRow> = parse(&subscriptions)?;
            if !subscription_rows.is_empty() {
                stored(store.insert_subscriptions(&subscription_rows).await)?;
            }
            for key in parse::<ApiKeyRow>(&keys)? {
                stored(store.insert_api_key(&key).await)?;
            }
            let deposit_rows: Vec<WalletDepositRow> = parse(&deposits)?;
            if !deposit_rows.is_empty() {
                stored(store.insert_wallet_deposits(&deposit_rows).await)?;
            }
            // Lines first, then the headers: a header is the commit marker.
            let (mut headers, mut lines) = (Vec::new(), Vec::new());
            for document in parse::<IssuedRows>(&invoices)? {
                headers.push(document.header);
                lines.extend(document.lines);
            }
            if !headers.is_empty() {
                stored(store.insert_invoice_lines(&lines).await)?;
                stored(store.insert_invoices(&headers).await)?;
            }
            let (mut note_headers, mut note_lines) = (Vec::new(), Vec::new());
            for document in parse::<CreditNoteRows>(&notes)? {
                note_headers.push(document.header);
                note_lines.extend(document.lines);
            }
            stored(store.insert_credit_notes(&note_headers, &note_lines).await)?;
            let ids: Vec<i64> = items
                .iter()
                .flat_map(|items| items.iter().map(|item| item.id))
                .collect();
            self.delivered(&ids).await?;
            relayed += ids.len();
        }
    }
}
