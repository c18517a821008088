//! Reading usage back from the hourly rollup (migration 0002).

use chrono::{DateTime, Utc};
use idlemeter_core::rollup::HourUsage;
use idlemeter_core::CustomerId;

use crate::api::{unix_seconds, SandboxRange, Window};
use crate::{Result, Store};

impl Store {
    /// Usage of one customer per (sandbox, hour) for hours in `[from, to)`.
    pub async fn usage_by_hour(
        &self,
        customer: &CustomerId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<HourUsage>> {
        let every_sandbox = SandboxRange {
            first: String::new(),
            // Above every id (ids are printable ASCII).
            last: "\u{7f}".to_owned(),
        };
        self.usage_by_window(
            customer.as_str(),
            &every_sandbox,
            unix_seconds(from),
            unix_seconds(to),
            Window::Hour,
        )
        .await
    }
}
