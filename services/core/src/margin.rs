//! Margin: what a customer and each of their sandboxes are billed, less the
//! share of node cost they are allocated.
//!
//! A node cost sheet prices each node type per hour, GPU nodes included,
//! and says which nodes are of which type: `nodes` is a node id, or a
//! prefix ending in `*` (`"gpu-*"`; `"*"` matches every node). The first
//! matching type in file order wins.
//!
//! **The allocation rule.** A node-hour's cost is allocated to the
//! sandboxes on it by their share of the node's capacity of one resource:
//! GPU-seconds allocated on a node type with GPUs, vCPU-seconds on the
//! others (`allocate_by` chooses another: `vcpu`, `memory` or `gpu`). A
//! sandbox that held 2 of a 96-vCPU node's vCPUs for an hour is allocated
//! 2/96 of that node-hour's cost. Capacity no sandbox held is the node's
//! unallocated cost: it is nobody's margin, and shows as the difference
//! between the fleet's cost and the sum of the allocated costs. Costs are
//! exact decimals (12 places, truncated); margins round to the currency's
//! minor unit only when displayed.
//!
//! **Revenue.** A customer's revenue is what their bills moved in the
//! range (the revenue panels' figure: usage, fees, credits and
//! adjustments, without tax or wallet payments). A sandbox's revenue is its
//! share of its customer's usage lines of the resource each line bills:
//! vCPU lines by allocated vCPU-seconds, memory lines by allocated
//! GiB-seconds, GPU lines by allocated GPU-seconds (the lines of every GPU
//! model together: a customer running two models on two sandboxes shares
//! their sum, an approximation). The shares are of all the customer's
//! sandboxes, including those on nodes no type prices. Fees, credits,
//! disk, egress and meters stay with the customer. Margin is revenue less cost,
//! and exists only where both are in one currency: nothing is converted.

use rust_decimal::Decimal;
use serde::Deserialize;

/// What a node type's cost is allocated by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocateBy {
    Vcpu,
    Memory,
    Gpu,
}

impl AllocateBy {
    pub fn as_str(self) -> &'static str {
        match self {
            AllocateBy::Vcpu => "vcpu",
            AllocateBy::Memory => "memory",
            AllocateBy::Gpu => "gpu",
        }
    }
}

/// One node type of a cost sheet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeType {
    pub name: String,
    /// A node id, or a prefix ending in `*`.
    pub nodes: String,
    pub cost_per_hour: Decimal,
    pub vcpus: u64,
    pub memory_gib: u64,
    pub gpus: u64,
    pub allocate_by: AllocateBy,
}

impl NodeType {
    /// The node's capacity of its allocation resource for one hour, in the
    /// unit of that resource's usage counter: vCPU-microseconds,
    /// KiB-milliseconds of memory or GPU-milliseconds.
    pub fn capacity_per_hour(&self) -> u128 {
        match self.allocate_by {
            AllocateBy::Vcpu => u128::from(self.vcpus) * 3_600_000_000,
            AllocateBy::Memory => u128::from(self.memory_gib) * 1_048_576 * 3_600_000,
            AllocateBy::Gpu => u128::from(self.gpus) * 3_600_000,
        }
    }

    /// The cost allocated to `allocated` units of the allocation resource
    /// (see [`Self::capacity_per_hour`]): exact to 12 places, truncated.
    pub fn cost_of(&self, allocated: u128) -> Option<Decimal> {
        let capacity = self.capacity_per_hour();
        if capacity == 0 {
            return None;
        }
        let allocated =
            Decimal::try_from_i128_with_scale(i128::try_from(allocated).ok()?, 0).ok()?;
        let capacity = Decimal::try_from_i128_with_scale(i128::try_from(capacity).ok()?, 0).ok()?;
        Some(
            self.cost_per_hour
                .checked_mul(allocated)?
                .checked_div(capacity)?
                .round_dp_with_strategy(12, rust_decimal::RoundingStrategy::ToZero),
        )
    }

    /// The pattern as (prefix, exact): `("gpu-", false)` for `gpu-*`,
    /// `("node-7", true)` for `node-7`.
    pub fn prefix(&self) -> (&str, bool) {
        match self.nodes.strip_suffix('*') {
            Some(prefix) => (prefix, false),
            None => (self.nodes.as_str(), true),
        }
    }

    /// Whether the node id matches this type's pattern.
    pub fn matches(&self, node: &str) -> bool {
        match self.prefix() {
            (prefix, false) => node.starts_with(prefix),
            (id, true) => node == id,
        }
    }
}

/// A validated node cost sheet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCosts {
    /// ISO 4217 code of every cost.
    pub currency: String,
    /// In file order: the first type whose pattern matches a node is its type.
    pub types: Vec<NodeType>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCosts {
    sheet: RawHeader,
    types: Vec<RawType>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    currency: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawType {
    name: String,
    nodes: String,
    cost_per_hour: String,
    #[serde(default)]
    vcpus: u64,
    #[serde(default)]
    memory_gib: u64,
    #[serde(default)]
    gpus: u64,
    allocate_by: Option<AllocateBy>,
}

impl NodeCosts {
    /// Parses and checks a cost sheet; errors name the type and the field.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, String> {
        let raw: RawCosts = toml::from_str(text).map_err(|error| format!("{path}: {error}"))?;
        let currency = raw.sheet.currency;
        if currency.len() != 3 || !currency.bytes().all(|byte| byte.is_ascii_uppercase()) {
            return Err(format!(
                "{path}: sheet.currency {currency:?} is not an ISO 4217 code"
            ));
        }
        let mut types = Vec::new();
        for (index, raw) in raw.types.into_iter().enumerate() {
            let at = format!("{path}: types[{index}] ({})", raw.name);
            let cost_per_hour: Decimal = raw
                .cost_per_hour
                .parse()
                .map_err(|error| format!("{at}.cost_per_hour {:?}: {error}", raw.cost_per_hour))?;
            if cost_per_hour.is_sign_negative() {
                return Err(format!("{at}.cost_per_hour is negative"));
            }
            let allocate_by = raw.allocate_by.unwrap_or(if raw.gpus > 0 {
                AllocateBy::Gpu
            } else {
                AllocateBy::Vcpu
            });
            let node_type = NodeType {
                name: raw.name,
                nodes: raw.nodes,
                cost_per_hour,
                vcpus: raw.vcpus,
                memory_gib: raw.memory_gib,
                gpus: raw.gpus,
                allocate_by,
            };
            let stars = node_type.nodes.matches('*').count();
            if node_type.nodes.is_empty()
                || stars > 1
                || (stars == 1 && !node_type.nodes.ends_with('*'))
            {
                return Err(format!(
                    "{at}.nodes {:?}: give a node id or a prefix ending in * (\"gpu-*\", \"*\")",
                    node_type.nodes
                ));
            }
            if node_type.capacity_per_hour() == 0 {
                return Err(format!(
                    "{at}: allocated by {} but it has none (set {})",
                    allocate_by.as_str(),
                    match allocate_by {
                        AllocateBy::Vcpu => "vcpus",
                        AllocateBy::Memory => "memory_gib",
                        AllocateBy::Gpu => "gpus",
                    }
                ));
            }
            types.push(node_type);
        }
        if types.is_empty() {
            return Err(format!("{path}: no [[types]]"));
        }
        Ok(Self { currency, types })
    }

    /// The type of a node: the first whose pattern matches.
    pub fn type_of(&self, node: &str) -> Option<&NodeType> {
        self.types.iter().find(|node_type| node_type.matches(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHEET: &str = r#"
[sheet]
currency = "USD"

[[types]]
name = "p5.48xlarge"
nodes = "gpu-*"
cost_per_hour = "98.32"
vcpus = 192
memory_gib = 2048
gpus = 8

[[types]]
name = "c7i.metal"
nodes = "*"
cost_per_hour = "9.60"
vcpus = 96
memory_gib = 192
"#;

    #[test]
    fn the_first_matching_type_prices_a_node_and_gpu_nodes_allocate_by_gpu() {
        let costs = NodeCosts::from_toml(SHEET, "costs.toml").expect("valid");
        let gpu = costs.type_of("gpu-a1").expect("typed");
        assert_eq!(
            (gpu.name.as_str(), gpu.allocate_by),
            ("p5.48xlarge", AllocateBy::Gpu)
        );
        let cpu = costs.type_of("node-7").expect("typed");
        assert_eq!(
            (cpu.name.as_str(), cpu.allocate_by),
            ("c7i.metal", AllocateBy::Vcpu)
        );
        // 2 of 96 vCPUs for an hour: 9.60 x 2 / 96 = 0.20.
        assert_eq!(cpu.cost_of(2 * 3_600_000_000), Some(Decimal::new(20, 2)));
        // 1 of 8 GPUs for 30 minutes: 98.32 / 8 / 2 = 6.145.
        assert_eq!(gpu.cost_of(1_800_000), Some(Decimal::new(6145, 3)));
        assert_eq!(gpu.prefix(), ("gpu-", false));
        assert!(!gpu.matches("node-gpu-1"));
    }

    #[test]
    fn bad_sheets_name_the_type_and_field() {
        let no_gpus = SHEET.replace("gpus = 8", "allocate_by = \"gpu\"");
        let error = NodeCosts::from_toml(&no_gpus, "costs.toml").expect_err("no gpus");
        assert!(
            error.contains("p5.48xlarge") && error.contains("gpus"),
            "{error}"
        );
        let inner_star = SHEET.replace("\"gpu-*\"", "\"gpu-*-a\"");
        let error = NodeCosts::from_toml(&inner_star, "costs.toml").expect_err("a star inside");
        assert!(error.contains("prefix ending in *"), "{error}");
        let bad_cost = SHEET.replace("\"9.60\"", "\"cheap\"");
        let error = NodeCosts::from_toml(&bad_cost, "costs.toml").expect_err("bad cost");
        assert!(error.contains("cost_per_hour"), "{error}");
    }
}
