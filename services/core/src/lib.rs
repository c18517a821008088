//! The billing domain of idlemeter, free of I/O.
//!
//! Everything that decides money lives here: identities, units, usage samples,
//! price sheets, rating and idle policy evaluation. The crate has no tokio, no
//! network, no file system access and never reads the clock: time and data come
//! in as arguments. That is what makes rating a pure, replayable function of its
//! inputs, and what lets the property tests drive it with arbitrary traces.
//!
//! A CI check (`tests/core_is_pure.rs`) fails if this crate's dependency tree ever
//! gains tokio, rdkafka, clickhouse or axum.

pub mod ids;
pub mod rollup;
pub mod sample;

pub use ids::{CustomerId, Epoch, IdError, NodeId, SandboxId};
pub use sample::{LifecycleState, SampleError, UsageSample, VcpuMillis};
