//! Price sheets: what each resource costs, in which unit, on which basis, and
//! from when.
//!
//! A sheet is a TOML file a finance person reviews in git (see the shipped
//! `prices/*.toml` and the crate README for the format). [`PriceSheet::from_toml`]
//! validates it completely at load, so rating never meets a malformed price.
//!
//! Resources are addressed by a [`ResourceSlot`]: a small integer fixed per
//! sheet (vCPU, memory, one per GPU model, disk, egress), so the rating hot
//! path indexes arrays instead of hashing names.

mod error;
mod plan;
mod raw;
mod sheet;
mod tiers;
mod unit;

use serde::{Deserialize, Serialize};

pub use error::SheetError;
pub(crate) use error::SheetText;
pub use plan::{Credit, CustomerTerms, Plan};
pub use sheet::{PriceSheet, PriceVersion};
pub use tiers::{PricedBand, Tier, TierMode, TieredPrice};
pub use unit::{base_unit_name, BillingUnit, TimeUnit};

use rust_decimal::Decimal;

use crate::sample::LifecycleState;

/// The kinds of resource a sheet can price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    Vcpu,
    Memory,
    Gpu,
    Disk,
    Egress,
    /// A meter of usage events (`[[meters]]`, OpenMeter's definition),
    /// priced per unit of its aggregate over the price version's part of the
    /// period.
    Meter,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Vcpu => "vcpu",
            ResourceKind::Memory => "memory",
            ResourceKind::Gpu => "gpu",
            ResourceKind::Disk => "disk",
            ResourceKind::Egress => "egress",
            ResourceKind::Meter => "meter",
        }
    }

    /// Whether usage is a time integral (and so has increments and states).
    pub fn is_time_based(self) -> bool {
        !matches!(self, ResourceKind::Egress | ResourceKind::Meter)
    }
}

/// Index of a priced resource within one sheet: vCPU, memory, each GPU model
/// in name order, disk, egress, each meter in slug order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceSlot(pub usize);

/// What quantity a resource bills over a sample interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The allocation held while running, whatever the use.
    Allocated,
    /// What was used: CPU time from the counter, memory from the gauge.
    Used,
    /// Per interval, the larger of the allocation (the request) and the use.
    MaxRequestedUsed,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Allocated => "allocated",
            Basis::Used => "used",
            Basis::MaxRequestedUsed => "max_requested_used",
        }
    }
}

/// Whether running-but-idle seconds bill for a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleBilling {
    Billed,
    Free,
}

/// A recurring credit renews each billing period; a one-time credit is granted
/// once per account and is drawn down across periods by the invoicer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditKind {
    OneTime,
    Monthly,
}

impl CreditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CreditKind::OneTime => "one_time",
            CreditKind::Monthly => "monthly",
        }
    }
}

/// The set of lifecycle states in which a resource bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateSet {
    pub running: bool,
    pub suspended: bool,
    pub stopped: bool,
}

impl StateSet {
    pub fn from_states(states: &[LifecycleState]) -> Self {
        let mut set = StateSet::default();
        for state in states {
            match state {
                LifecycleState::Running => set.running = true,
                LifecycleState::Suspended => set.suspended = true,
                LifecycleState::Stopped => set.stopped = true,
            }
        }
        set
    }

    pub fn contains(self, state: LifecycleState) -> bool {
        match state {
            LifecycleState::Running => self.running,
            LifecycleState::Suspended => self.suspended,
            LifecycleState::Stopped => self.stopped,
        }
    }
}

/// The validated price of one resource in one sheet version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourcePrice {
    pub kind: ResourceKind,
    pub unit: BillingUnit,
    /// A flat unit price, or tiers.
    pub price: TieredPrice,
    pub basis: Basis,
    /// Each continuous billable span is rounded up to a multiple of this.
    pub increment_ms: u64,
    pub idle: IdleBilling,
    pub bills_while: StateSet,
    /// Floor of the billed rate, in base units per millisecond (thousandths of
    /// a vCPU, or bytes): Modal's 0.125 core is 250, its 128 MiB is 2^27.
    pub minimum_per_ms: u64,
}

impl ResourcePrice {
    /// True when running time bills only while active (`idle = "free"`):
    /// the resources whose money the idle rule decides.
    pub fn bills_only_active_time(&self) -> bool {
        self.idle == IdleBilling::Free
            && self
                .bills_while
                .contains(crate::sample::LifecycleState::Running)
    }

    /// The flat unit price, when the resource is not tiered.
    pub fn flat_unit_price(&self) -> Option<Decimal> {
        match &self.price {
            TieredPrice::Flat(price) => Some(*price),
            TieredPrice::Tiered { .. } => None,
        }
    }
}
