//! The scheduler: closes each period once its grace has passed.

use super::*;

impl Invoicer {
    /// Runs the schedule until `shutdown`: at each firing, closes the latest
    /// period whose grace has passed (idempotent: what is issued is skipped).
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<()> {
        let schedule = self.config.schedule.schedule();
        tokio::pin!(shutdown);
        tracing::info!(schedule = %self.config.schedule, issuer = %self.terms.issuer, "invoicer started");
        loop {
            let Some(next) = schedule.upcoming(Utc).next() else {
                return Ok(());
            };
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            let now = Utc::now();
            let grace = chrono::Duration::seconds(self.config.grace_seconds as i64);
            let (current, _) = self.period_of(now - grace);
            let previous = self.terms.period.previous(current);
            let outcome = self.close_period(previous, now, false, &|_, _| {}).await;
            if let Some(metrics) = &self.metrics {
                metrics.observe(&outcome);
            }
            match outcome {
                Ok(outcome) if !outcome.failed.is_empty() => tracing::warn!(
                    period = %previous,
                    issued = outcome.issued_count,
                    failed = outcome.failed.len(),
                    "scheduled close left customers uninvoiced (see rating_errors); retrying them at the next firing"
                ),
                Ok(outcome) => tracing::info!(
                    period = %previous,
                    issued = outcome.issued_count,
                    already = outcome.already_issued.len(),
                    "scheduled close"
                ),
                Err(error) => {
                    tracing::warn!(period = %previous, %error, "scheduled close failed; retrying at the next firing")
                }
            }
        }
    }
}
