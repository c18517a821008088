//! The billing domain of idlemeter, free of I/O.
//!
//! Everything that decides money lives here: identities, units, usage samples,
//! price sheets, rating and idle policy evaluation. The crate has no tokio, no
//! network, no file system access and never reads the clock: time and data come
//! in as arguments. That is what makes rating a pure, replayable function of its
//! inputs, and what lets the property tests drive it with arbitrary traces.
//!
//! Where a sample becomes money: [`jsonl`] (or the Kafka edge) makes
//! [`UsageSample`]s, [`rating::rate_samples`] turns them into integer
//! quantities per customer, price version and resource, [`invoice`] prices
//! those into lines rounded once each, and [`report`] wraps the bills into the
//! output document. [`report::rate_jsonl`] does all of it for the CLI.
//!
//! A CI check (`tests/tests/core_is_pure.rs` in the workspace's tests crate) fails if this crate's dependency tree ever
//! gains tokio, rdkafka, clickhouse or axum.

pub mod compact;
pub mod counters;
pub mod credit_note;
pub mod error;
pub mod events;
pub mod ids;
pub mod invoice;
pub mod jsonl;
pub mod margin;
pub mod metering;
pub mod money;
pub mod period;
pub mod policy;
pub mod pricing;
pub mod publish;
pub mod rating;
pub mod report;
pub mod rollup;
pub mod sample;
pub mod secret;
pub mod share;
pub mod signature;
pub mod terms;

pub use compact::{
    compact_all, CompactRule, CompactStats, Compacted, Compactor, MinuteRow, MINUTE_COUNTERS,
};
pub use counters::{Counter, CounterSet, StateCounters};
pub use error::{Error, LineError, Result};
pub use ids::{CustomerId, Epoch, IdError, NodeId, SandboxId};
pub use invoice::{
    adjustment_for, bill, Account, Adjustment, BillingOptions, CustomerBill, InvoiceLine,
    InvoicedPeriod, LineKind, PlanSpan, Subscription,
};
pub use money::{Currency, Money, RoundingRule};
pub use period::{floor_hour, Period};
pub use pricing::{PriceSheet, SheetError};
pub use rating::{
    rate_samples, IdlePolicy, NumberedSample, RatedUsage, RatingState, SessionOrConnection,
};
pub use report::{rate_jsonl, rate_report, report_usage, RateReport};
pub use sample::{LifecycleState, SampleDetail, SampleError, UsageSample, VcpuMillis};
pub use secret::Secret;
pub use share::Share;
pub use terms::{BillingTerms, TaxRates, TermsError};
