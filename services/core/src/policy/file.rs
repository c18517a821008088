//! The idle-suspend policy file: a versioned TOML document reviewed in git.
//!
//! ```toml
//! [policy]
//! name = "sprites"
//! version = "2026-11-01"
//!
//! [rules]
//! idle_window_s = 30          # suspend after 30 s without activity
//! idle_action = "suspend"     # suspend | stop | notify
//! max_session_s = 86400       # optional cap on one continuous running span
//! max_session_action = "stop"
//! reissue_after_s = 30        # send the command again if the sandbox still runs
//! gap_after_s = 10            # a longer interval between samples is missing data, never idle
//!
//! [rules.activity]            # which signals keep a sandbox awake
//! exec_sessions = true
//! open_conns = true
//! api_calls = true
//! net_bytes_per_s = 4096      # optional: rx + tx above this rate is activity
//! cpu_percent = "20"          # optional: CPU used above this share of the allocation
//!
//! [rules.hysteresis]          # against suspend/resume storms
//! short_run_s = 120           # a running span shorter than this ended by an idle suspend is a flap
//! backoff_factor = 2          # each consecutive flap multiplies the idle window...
//! max_idle_window_s = 1800    # ...up to this
//!
//! [plans.pro.rules]           # a plan's overrides (any rule field)
//! max_session_s = 86400
//!
//! [customers."cust-42"]       # a customer's plan and overrides
//! plan = "pro"
//! spend_limit = "500"         # budget cap in the sheet's currency (optional)
//! [customers."cust-42".rules]
//! idle_window_s = 600
//! ```
//!
//! Rules resolve as base, then the customer's plan (or `policy.default_plan`),
//! then the customer's own overrides. Every field of `[rules]` has a default
//! (Sprites-like: 30 s, sessions and connections count, suspend), so a policy
//! states only what it changes. A refused file names the file, line and field.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::ids::CustomerId;
use crate::pricing::{SheetError, SheetText};

/// What a decision asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Freeze the sandbox; its disk persists and storage keeps billing.
    Suspend,
    /// Stop it for good.
    Stop,
    /// Only tell the platform (webhook and decisions table); no command.
    Notify,
    /// Thaw a suspended sandbox (a keep-alive lease or a platform's wake
    /// request while it is suspended). Not an action a rule may choose.
    Resume,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Suspend => "suspend",
            Action::Stop => "stop",
            Action::Notify => "notify",
            Action::Resume => "resume",
        }
    }
}

/// Which signals count as activity over an interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivitySignals {
    /// An open exec/PTY session.
    pub exec_sessions: bool,
    /// An open inbound connection.
    pub open_conns: bool,
    /// An API call to the sandbox (SDK call, stdin write) during the interval.
    pub api_calls: bool,
    /// Network bytes (rx + tx) per second above this rate.
    pub net_bytes_per_s: Option<u64>,
    /// CPU used above this percentage of the allocated vCPUs.
    pub cpu_percent: Option<Decimal>,
}

/// Against suspend/resume storms: a sandbox that is resumed and then idles
/// out again quickly gets a longer window each time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hysteresis {
    pub short_run_s: u64,
    pub backoff_factor: u32,
    pub max_idle_window_s: u64,
}

/// The resolved rules for one customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    pub activity: ActivitySignals,
    pub idle_window_s: u64,
    pub idle_action: Action,
    pub max_session_s: Option<u64>,
    pub max_session_action: Action,
    pub reissue_after_s: u64,
    /// An interval longer than this (or with samples lost within it) is a
    /// gap: missing data, never idle time.
    #[serde(default = "default_gap_after_s")]
    pub gap_after_s: u64,
    pub hysteresis: Hysteresis,
    pub spend_limit: Option<Decimal>,
}

fn default_gap_after_s() -> u64 {
    crate::rating::DEFAULT_GAP_AFTER_S
}

impl Rules {
    /// The idle window after `flaps` consecutive flaps.
    pub fn window_after_flaps(&self, flaps: u32) -> u64 {
        let mut window = self.idle_window_s;
        for _ in 0..flaps {
            window = window.saturating_mul(u64::from(self.hysteresis.backoff_factor));
            if window >= self.hysteresis.max_idle_window_s {
                return self.hysteresis.max_idle_window_s.max(self.idle_window_s);
            }
        }
        window
    }
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub version: String,
    base: Rules,
    plans: BTreeMap<String, Rules>,
    default_plan: Option<String>,
    customers: BTreeMap<CustomerId, Rules>,
}

impl Policy {
    /// `name/version`, recorded with every decision.
    pub fn version_label(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }

    /// The rules in force for `customer`.
    pub fn rules_for(&self, customer: &CustomerId) -> &Rules {
        if let Some(rules) = self.customers.get(customer) {
            return rules;
        }
        self.default_plan
            .as_ref()
            .and_then(|plan| self.plans.get(plan))
            .unwrap_or(&self.base)
    }

    /// Customers with a spend limit, and the limit.
    pub fn spend_limits(&self) -> Vec<(CustomerId, Decimal)> {
        self.customers
            .iter()
            .filter_map(|(customer, rules)| {
                rules.spend_limit.map(|limit| (customer.clone(), limit))
            })
            .collect()
    }

    /// Parses and validates a policy from its TOML text; `path` labels errors.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, SheetError> {
        let located = SheetText { text, path };
        let raw: RawPolicy =
            toml::from_str(text).map_err(|error| located.locate_toml_error(&error))?;
        let name = raw.policy.name.clone();
        let version = raw.policy.version.clone();
        for (field, value) in [("policy.name", &name), ("policy.version", &version)] {
            if value.trim().is_empty() || value.contains('/') {
                return Err(located.error_at(None, field, "must be non-empty and without '/'"));
            }
        }
        let base = resolve(&Rules::default(), &raw.rules, None, &located, "rules")?;
        let mut plans = BTreeMap::new();
        for (plan, overrides) in &raw.plans {
            let rules = resolve(
                &base,
                &overrides.rules,
                None,
                &located,
                &format!("plans.{plan}.rules"),
            )?;
            plans.insert(plan.clone(), rules);
        }
        if let Some(plan) = &raw.policy.default_plan {
            if !plans.contains_key(plan.get_ref()) {
                return Err(located.error_at(
                    Some(plan.span()),
                    "policy.default_plan",
                    format!(
                        "plan {:?} has no [plans.{}] table",
                        plan.get_ref(),
                        plan.get_ref()
                    ),
                ));
            }
        }
        let default_plan = raw.policy.default_plan.map(Spanned::into_inner);
        let mut customers = BTreeMap::new();
        for (customer, terms) in &raw.customers {
            let field = format!("customers.{customer}");
            let id = CustomerId::parse(customer.clone())
                .map_err(|error| located.error_at(None, field.clone(), error.to_string()))?;
            let plan_rules = match &terms.plan {
                Some(plan) => plans.get(plan.get_ref()).ok_or_else(|| {
                    located.error_at(
                        Some(plan.span()),
                        format!("{field}.plan"),
                        format!(
                            "plan {:?} has no [plans.{}] table",
                            plan.get_ref(),
                            plan.get_ref()
                        ),
                    )
                })?,
                None => default_plan
                    .as_ref()
                    .and_then(|plan| plans.get(plan))
                    .unwrap_or(&base),
            };
            let spend_limit = match &terms.spend_limit {
                Some(limit) => Some(parse_decimal(
                    limit,
                    &located,
                    &format!("{field}.spend_limit"),
                )?),
                None => None,
            };
            let rules = resolve(
                plan_rules,
                &terms.rules,
                spend_limit,
                &located,
                &format!("{field}.rules"),
            )?;
            customers.insert(id, rules);
        }
        Ok(Self {
            name,
            version,
            base,
            plans,
            default_plan,
            customers,
        })
    }
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            activity: ActivitySignals {
                exec_sessions: true,
                open_conns: true,
                api_calls: true,
                net_bytes_per_s: None,
                cpu_percent: None,
            },
            idle_window_s: 30,
            idle_action: Action::Suspend,
            max_session_s: None,
            max_session_action: Action::Stop,
            reissue_after_s: 30,
            gap_after_s: crate::rating::DEFAULT_GAP_AFTER_S,
            hysteresis: Hysteresis {
                short_run_s: 120,
                backoff_factor: 2,
                max_idle_window_s: 1800,
            },
            spend_limit: None,
        }
    }
}

fn parse_decimal(
    value: &Spanned<String>,
    located: &SheetText<'_>,
    field: &str,
) -> Result<Decimal, SheetError> {
    let parsed: Decimal = value.get_ref().parse().map_err(|error| {
        located.error_at(
            Some(value.span()),
            field,
            format!("{:?} is not a decimal: {error}", value.get_ref()),
        )
    })?;
    if parsed <= Decimal::ZERO {
        return Err(located.error_at(Some(value.span()), field, "must be positive"));
    }
    Ok(parsed)
}

/// `parent` with `overrides` applied, validated.
fn resolve(
    parent: &Rules,
    overrides: &RawRules,
    spend_limit: Option<Decimal>,
    located: &SheetText<'_>,
    table: &str,
) -> Result<Rules, SheetError> {
    let mut rules = parent.clone();
    let positive = |value: &Spanned<u64>, key: &str| -> Result<u64, SheetError> {
        if *value.get_ref() == 0 {
            return Err(located.error_at(
                Some(value.span()),
                format!("{table}.{key}"),
                "must be at least 1 second",
            ));
        }
        Ok(*value.get_ref())
    };
    if let Some(value) = &overrides.idle_window_s {
        rules.idle_window_s = positive(value, "idle_window_s")?;
    }
    let ending = |action: Action, key: &str| -> Result<Action, SheetError> {
        if action == Action::Resume {
            return Err(located.error_at(
                None,
                format!("{table}.{key}"),
                "must be suspend, stop or notify (resume wakes a sandbox, it ends nothing)",
            ));
        }
        Ok(action)
    };
    if let Some(action) = overrides.idle_action {
        rules.idle_action = ending(action, "idle_action")?;
    }
    if let Some(value) = &overrides.max_session_s {
        rules.max_session_s = Some(positive(value, "max_session_s")?);
    }
    if let Some(action) = overrides.max_session_action {
        rules.max_session_action = ending(action, "max_session_action")?;
    }
    if let Some(value) = &overrides.reissue_after_s {
        rules.reissue_after_s = positive(value, "reissue_after_s")?;
    }
    if let Some(value) = &overrides.gap_after_s {
        rules.gap_after_s = positive(value, "gap_after_s")?;
    }
    if let Some(activity) = &overrides.activity {
        let signals = &mut rules.activity;
        signals.exec_sessions = activity.exec_sessions.unwrap_or(signals.exec_sessions);
        signals.open_conns = activity.open_conns.unwrap_or(signals.open_conns);
        signals.api_calls = activity.api_calls.unwrap_or(signals.api_calls);
        if let Some(rate) = activity.net_bytes_per_s {
            signals.net_bytes_per_s = Some(rate);
        }
        if let Some(percent) = &activity.cpu_percent {
            let field = format!("{table}.activity.cpu_percent");
            let parsed = parse_decimal(percent, located, &field)?;
            if parsed > Decimal::ONE_HUNDRED {
                return Err(located.error_at(Some(percent.span()), field, "must be at most 100"));
            }
            signals.cpu_percent = Some(parsed);
        }
    }
    if let Some(hysteresis) = &overrides.hysteresis {
        if let Some(value) = &hysteresis.short_run_s {
            rules.hysteresis.short_run_s = *value.get_ref();
        }
        if let Some(value) = &hysteresis.backoff_factor {
            if *value.get_ref() == 0 {
                return Err(located.error_at(
                    Some(value.span()),
                    format!("{table}.hysteresis.backoff_factor"),
                    "must be at least 1 (1 turns backoff off)",
                ));
            }
            rules.hysteresis.backoff_factor = *value.get_ref();
        }
        if let Some(value) = &hysteresis.max_idle_window_s {
            rules.hysteresis.max_idle_window_s = *value.get_ref();
        }
    }
    if rules.hysteresis.max_idle_window_s < rules.idle_window_s {
        return Err(located.error_at(
            None,
            format!("{table}.hysteresis.max_idle_window_s"),
            format!(
                "{} s is shorter than the idle window of {} s",
                rules.hysteresis.max_idle_window_s, rules.idle_window_s
            ),
        ));
    }
    if spend_limit.is_some() {
        rules.spend_limit = spend_limit;
    }
    Ok(rules)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    policy: RawHeader,
    #[serde(default)]
    rules: RawRules,
    #[serde(default)]
    plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    customers: BTreeMap<String, RawCustomer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    version: String,
    #[serde(default)]
    default_plan: Option<Spanned<String>>,
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    idle_window_s: Option<Spanned<u64>>,
    idle_action: Option<Action>,
    max_session_s: Option<Spanned<u64>>,
    max_session_action: Option<Action>,
    reissue_after_s: Option<Spanned<u64>>,
    gap_after_s: Option<Spanned<u64>>,
    activity: Option<RawActivity>,
    hysteresis: Option<RawHysteresis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActivity {
    exec_sessions: Option<bool>,
    open_conns: Option<bool>,
    api_calls: Option<bool>,
    net_bytes_per_s: Option<u64>,
    cpu_percent: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHysteresis {
    short_run_s: Option<Spanned<u64>>,
    backoff_factor: Option<Spanned<u32>>,
    max_idle_window_s: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    #[serde(default)]
    rules: RawRules,
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustomer {
    plan: Option<Spanned<String>>,
    spend_limit: Option<Spanned<String>>,
    #[serde(default)]
    rules: RawRules,
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[policy]
name = "test"
version = "1"
default_plan = "hobby"

[rules]
idle_window_s = 30

[rules.activity]
cpu_percent = "20"

[plans.hobby.rules]
max_session_s = 3600

[plans.pro.rules]
max_session_s = 86400

[customers."cust-pro"]
plan = "pro"
spend_limit = "500"

[customers."cust-pro".rules]
idle_window_s = 600
"#;

    #[test]
    fn rules_resolve_base_then_plan_then_customer() {
        let policy = Policy::from_toml(POLICY, "p.toml").expect("valid");
        assert_eq!(policy.version_label(), "test/1");
        let hobby = policy.rules_for(&CustomerId::parse("anyone").expect("id"));
        assert_eq!(hobby.max_session_s, Some(3600));
        assert_eq!(hobby.idle_window_s, 30);
        assert_eq!(hobby.activity.cpu_percent, Some(Decimal::from(20)));
        let pro = policy.rules_for(&CustomerId::parse("cust-pro").expect("id"));
        assert_eq!(pro.max_session_s, Some(86400));
        assert_eq!(pro.idle_window_s, 600);
        assert_eq!(pro.spend_limit, Some(Decimal::from(500)));
        assert_eq!(pro.activity.cpu_percent, Some(Decimal::from(20)));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let rules = Rules::default();
        assert_eq!(rules.window_after_flaps(0), 30);
        assert_eq!(rules.window_after_flaps(1), 60);
        assert_eq!(rules.window_after_flaps(3), 240);
        assert_eq!(rules.window_after_flaps(10), 1800);
    }

    #[test]
    fn bad_files_name_line_and_field() {
        let cases = [
            (
                POLICY.replace("idle_window_s = 30", "idle_window_s = 0"),
                "p.toml:8: field `rules.idle_window_s`: must be at least 1 second",
            ),
            (
                POLICY.replace("plan = \"pro\"", "plan = \"gold\""),
                "p.toml:20: field `customers.cust-pro.plan`: plan \"gold\" has no [plans.gold] table",
            ),
            (
                POLICY.replace("cpu_percent = \"20\"", "cpu_percent = \"lots\""),
                "p.toml:11: field `rules.activity.cpu_percent`",
            ),
            (
                POLICY.replace("idle_window_s = 30", "idle_windows = 30"),
                "p.toml:8: field `rules.idle_windows`: unknown field",
            ),
            (
                POLICY.replace("idle_window_s = 30", "idle_window_s = 30\nidle_action = \"resume\""),
                "p.toml: field `rules.idle_action`: must be suspend, stop or notify",
            ),
            (
                POLICY.replace("idle_window_s = 30", "gap_after_s = 0"),
                "p.toml:8: field `rules.gap_after_s`: must be at least 1 second",
            ),
        ];
        for (text, expected) in cases {
            let error = Policy::from_toml(&text, "p.toml").expect_err("must be refused");
            assert!(
                error.to_string().starts_with(expected),
                "{error} should start with {expected}"
            );
        }
    }
}
