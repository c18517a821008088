//! Which customers a replica acts for.
//!
//! A service that runs as several replicas divides its customers between
//! them (the Kafka adapter's `CustomerShares` decides how); the services
//! themselves see only this predicate, so they stay free of the broker.

use std::sync::Arc;

/// Whether this replica acts for a customer. [`Share::everyone`] for a
/// service that runs alone.
#[derive(Clone)]
pub struct Share(Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl Share {
    pub fn new(admits: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(admits))
    }

    /// Every customer.
    pub fn everyone() -> Self {
        Self::new(|_| true)
    }

    pub fn admits(&self, customer: &str) -> bool {
        (self.0)(customer)
    }
}

impl Default for Share {
    fn default() -> Self {
        Self::everyone()
    }
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Share(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_admits_what_its_predicate_admits() {
        let even = Share::new(|customer| customer.len() % 2 == 0);
        assert!(even.admits("ab") && !even.admits("abc"));
        assert!(Share::everyone().admits("abc"));
    }
}
