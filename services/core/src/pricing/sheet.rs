//! Loading and validating a price sheet, and looking prices up while rating.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use toml::Spanned;

use crate::ids::CustomerId;
use crate::money::{Currency, RoundingRule};
use crate::pricing::raw::{RawCustomer, RawPlan, RawResource, RawSheet, RawTier};
use crate::pricing::{
    Basis, BillingUnit, Credit, CustomerTerms, IdleBilling, Plan, ResourceKind, ResourcePrice,
    ResourceSlot, SheetError, SheetText, StateSet, Tier, TieredPrice,
};
use crate::sample::LifecycleState;

/// The prices in force from one instant until the next version's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceVersion {
    pub effective_from: DateTime<Utc>,
    /// `effective_from` in Unix milliseconds, for the hot path.
    pub effective_from_ms: i64,
    pub note: Option<String>,
    /// Indexed by [`ResourceSlot`]; `None` where this version does not bill
    /// the resource.
    pub resources: Vec<Option<ResourcePrice>>,
}

/// A validated price sheet: every price, unit, plan and override in it has
/// been checked, so rating cannot meet a malformed price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceSheet {
    /// The label the sheet was loaded under, usually its path.
    pub label: String,
    pub platform: String,
    pub currency: Currency,
    pub line_rounding: RoundingRule,
    gpu_models: Vec<String>,
    /// Slugs of the meters any version prices, in order.
    meters: Vec<String>,
    versions: Vec<PriceVersion>,
    plans: BTreeMap<String, Plan>,
    default_plan: Option<String>,
    customers: BTreeMap<CustomerId, CustomerTerms>,
}

impl PriceSheet {
    /// Parses and validates a sheet from its TOML text. `path` only labels
    /// errors: the core never opens files.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, SheetError> {
        let sheet_text = SheetText { text, path };
        let raw: RawSheet =
            toml::from_str(text).map_err(|error| sheet_text.locate_toml_error(&error))?;
        SheetBuilder {
            sheet_text,
            raw: &raw,
        }
        .build()
    }

    /// Price versions in effective-date order.
    pub fn versions(&self) -> &[PriceVersion] {
        &self.versions
    }

    /// Number of resource slots: vCPU, memory, each GPU model, disk, egress,
    /// each meter.
    pub fn slot_count(&self) -> usize {
        self.gpu_models.len() + 4 + self.meters.len()
    }

    pub fn slot_kind(&self, slot: ResourceSlot) -> ResourceKind {
        let gpus = self.gpu_models.len();
        match slot.0 {
            0 => ResourceKind::Vcpu,
            1 => ResourceKind::Memory,
            index if index < 2 + gpus => ResourceKind::Gpu,
            index if index == 2 + gpus => ResourceKind::Disk,
            index if index == 3 + gpus => ResourceKind::Egress,
            _ => ResourceKind::Meter,
        }
    }

    /// The name of a slot as lines and sheets write it: `vcpu`, `gpu.H100`,
    /// `meter.tokens_total`.
    pub fn slot_name(&self, slot: ResourceSlot) -> String {
        match self.slot_kind(slot) {
            ResourceKind::Gpu => format!("gpu.{}", self.gpu_models[slot.0 - 2]),
            ResourceKind::Meter => format!("meter.{}", self.meter_slug(slot)),
            kind => kind.as_str().to_owned(),
        }
    }

    /// The slot a resource name (`vcpu`, `memory`, `gpu.H100`, `disk`, `egress`) names.
    pub fn slot_by_name(&self, name: &str) -> Option<ResourceSlot> {
        (0..self.slot_count())
            .map(ResourceSlot)
            .find(|slot| self.slot_name(*slot) == name)
    }

    /// The slug of a meter slot (empty for other slots).
    pub fn meter_slug(&self, slot: ResourceSlot) -> &str {
        slot.0
            .checked_sub(self.gpu_models.len() + 4)
            .and_then(|index| self.meters.get(index))
            .map_or("", String::as_str)
    }

    /// The meters some version prices, with their slots, in slug order.
    pub fn priced_meters(&self) -> impl Iterator<Item = (ResourceSlot, &str)> + '_ {
        let first = self.gpu_models.len() + 4;
        self.meters
            .iter()
            .enumerate()
            .map(move |(index, slug)| (ResourceSlot(first + index), slug.as_str()))
    }

    /// The slot of a GPU model, if any version prices it.
    pub fn gpu_slot(&self, model: &str) -> Option<ResourceSlot> {
        self.gpu_models
            .iter()
            .position(|known| known == model)
            .map(|index| ResourceSlot(index + 2))
    }

    /// Index of the version in force at `at_ms`, if any.
    pub fn version_at(&self, at_ms: i64) -> Option<usize> {
        self.versions
            .partition_point(|version| version.effective_from_ms <= at_ms)
            .checked_sub(1)
    }

    /// The customers the sheet puts on a plan of their own, with it.
    pub fn customer_plans(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.customers.iter().filter_map(|(customer, terms)| {
            terms.plan.as_deref().map(|plan| (customer.as_str(), plan))
        })
    }

    /// A plan by name.
    pub fn plan_named(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name)
    }

    /// The plan a customer is on: their own, else the sheet's default.
    pub fn plan_for(&self, customer: &CustomerId) -> Option<&Plan> {
        let name = self
            .customers
            .get(customer)
            .and_then(|terms| terms.plan.as_ref())
            .or(self.default_plan.as_ref())?;
        self.plans.get(name)
    }

    /// The price a customer pays for a resource in a version, with their
    /// negotiated unit price applied.
    pub fn price_for(
        &self,
        customer: &CustomerId,
        version: usize,
        slot: ResourceSlot,
    ) -> Option<TieredPrice> {
        let published = self
            .versions
            .get(version)?
            .resources
            .get(slot.0)?
            .as_ref()?;
        let negotiated = self
            .customers
            .get(customer)
            .and_then(|terms| terms.unit_prices.get(&slot));
        Some(match negotiated {
            Some(price) => TieredPrice::Flat(*price),
            None => published.price.clone(),
        })
    }
}

/// Turns the raw TOML shape into a [`PriceSheet`], locating every refusal.
struct SheetBuilder<'a> {
    sheet_text: SheetText<'a>,
    raw: &'a RawSheet,
}

type Built<T> = Result<T, SheetError>;

impl SheetBuilder<'_> {
    fn build(&self) -> Built<PriceSheet> {
        let header = &self.raw.sheet;
        let currency = Currency::parse(header.currency.get_ref(), header.minor_digits)
            .map_err(|reason| self.error(&header.currency, "sheet.currency", reason))?;
        let gpu_models: Vec<String> = self
            .raw
            .versions
            .iter()
            .flat_map(|version| version.resources.gpu.keys().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let meters: Vec<String> = self
            .raw
            .versions
            .iter()
            .flat_map(|version| version.resources.meters.keys().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut sheet = PriceSheet {
            label: self.sheet_text.path.to_owned(),
            platform: header.platform.clone(),
            currency,
            line_rounding: header.line_rounding,
            gpu_models,
            meters,
            versions: Vec::new(),
            plans: BTreeMap::new(),
            default_plan: None,
            customers: BTreeMap::new(),
        };
        sheet.versions = self.build_versions(&sheet)?;
        sheet.plans = self.build_plans(&sheet)?;
        sheet.default_plan =
            self.check_plan_name(&sheet, header.default_plan.as_ref(), "sheet.default_plan")?;
        sheet.customers = self.build_customers(&sheet)?;
        Ok(sheet)
    }

    fn error<T>(&self, spanned: &Spanned<T>, field: &str, reason: impl Into<String>) -> SheetError {
        self.sheet_text
            .error_at(Some(spanned.span()), field, reason)
    }

    fn error_at(
        &self,
        span: Option<Range<usize>>,
        field: &str,
        reason: impl Into<String>,
    ) -> SheetError {
        self.sheet_text.error_at(span, field, reason)
    }

    fn build_versions(&self, sheet: &PriceSheet) -> Built<Vec<PriceVersion>> {
        if self.raw.versions.is_empty() {
            return Err(self.error_at(
                None,
                "versions",
                "a sheet needs at least one [[versions]] table",
            ));
        }
        let mut versions: Vec<PriceVersion> = Vec::new();
        for raw_version in &self.raw.versions {
            let effective_from = parse_effective_from(raw_version.effective_from.get_ref())
                .map_err(|reason| {
                    self.error(
                        &raw_version.effective_from,
                        "versions.effective_from",
                        reason,
                    )
                })?;
            if let Some(previous) = versions.last() {
                if effective_from <= previous.effective_from {
                    return Err(self.error(
                        &raw_version.effective_from,
                        "versions.effective_from",
                        format!(
                            "{effective_from} is not after the previous version's {}",
                            previous.effective_from
                        ),
                    ));
                }
            }
            let resources = (0..sheet.slot_count())
                .map(ResourceSlot)
                .map(|slot| self.build_slot(sheet, &raw_version.resources, slot))
                .collect::<Built<Vec<_>>>()?;
            versions.push(PriceVersion {
                effective_from,
                effective_from_ms: effective_from.timestamp_millis(),
                note: raw_version.note.clone(),
                resources,
            });
        }
        Ok(versions)
    }

    fn build_slot(
        &self,
        sheet: &PriceSheet,
        resources: &crate::pricing::raw::RawResources,
        slot: ResourceSlot,
    ) -> Built<Option<ResourcePrice>> {
        let kind = sheet.slot_kind(slot);
        let raw = match kind {
            ResourceKind::Vcpu => resources.vcpu.as_ref(),
            ResourceKind::Memory => resources.memory.as_ref(),
            ResourceKind::Disk => resources.disk.as_ref(),
            ResourceKind::Egress => resources.egress.as_ref(),
            ResourceKind::Gpu => resources.gpu.get(&sheet.gpu_models[slot.0 - 2]),
            ResourceKind::Meter => resources.meters.get(sheet.meter_slug(slot)),
        };
        let field = format!("versions.resources.{}", sheet.slot_name(slot));
        raw.map(|raw| self.build_resource(raw, kind, &field))
            .transpose()
    }

    fn build_resource(
        &self,
        raw: &RawResource,
        kind: ResourceKind,
        field: &str,
    ) -> Built<ResourcePrice> {
        let month_hours = self.raw.sheet.month_hours;
        let unit = BillingUnit::parse(raw.unit.get_ref(), kind, month_hours)
            .map_err(|reason| self.error(&raw.unit, &format!("{field}.unit"), reason))?;
        let price = self.build_price(raw, &unit, field)?;
        let basis = self.check_basis(raw, kind, field)?;
        let increment_ms = self.check_increment(raw, kind, field)?;
        let bills_while = self.check_bills_while(raw, kind, field)?;
        let minimum_per_ms = self.check_minimum(raw, kind, &unit, field)?;
        Ok(ResourcePrice {
            kind,
            unit,
            price,
            basis,
            increment_ms,
            idle: self.check_idle(raw, kind, field)?,
            bills_while,
            minimum_per_ms,
        })
    }

    fn build_price(
        &self,
        raw: &RawResource,
        unit: &BillingUnit,
        field: &str,
    ) -> Built<TieredPrice> {
        match (&raw.unit_price, &raw.tiers) {
            (Some(price), None) => Ok(TieredPrice::Flat(price.get_ref().0)),
            (None, Some(tiers)) => {
                let mode = raw.tier_mode.ok_or_else(|| {
                    self.error(
                        tiers,
                        &format!("{field}.tier_mode"),
                        "tiers need tier_mode = \"graduated\" or \"volume\"",
                    )
                })?;
                let tiers = build_tiers(tiers.get_ref(), unit)
                    .map_err(|reason| self.error(tiers, &format!("{field}.tiers"), reason))?;
                Ok(TieredPrice::Tiered { mode, tiers })
            }
            (Some(price), Some(_)) => Err(self.error(
                price,
                &format!("{field}.unit_price"),
                "give either unit_price or tiers, not both",
            )),
            (None, None) => Err(self.error(
                &raw.unit,
                &format!("{field}.unit_price"),
                "missing: every priced resource needs unit_price or tiers",
            )),
        }
    }

    fn check_basis(&self, raw: &RawResource, kind: ResourceKind, field: &str) -> Built<Basis> {
        let default = match kind {
            ResourceKind::Egress | ResourceKind::Meter => Basis::Used,
            _ => Basis::Allocated,
        };
        let Some(basis) = &raw.basis else {
            return Ok(default);
        };
        let allowed = match kind {
            ResourceKind::Vcpu | ResourceKind::Memory => true,
            ResourceKind::Gpu | ResourceKind::Disk | ResourceKind::Egress | ResourceKind::Meter => {
                *basis.get_ref() == default
            }
        };
        if !allowed {
            return Err(self.error(
                basis,
                &format!("{field}.basis"),
                format!(
                    "{} bills on the {} basis only",
                    kind.as_str(),
                    default.as_str()
                ),
            ));
        }
        Ok(*basis.get_ref())
    }

    fn check_idle(&self, raw: &RawResource, kind: ResourceKind, field: &str) -> Built<IdleBilling> {
        match raw.idle {
            Some(IdleBilling::Free) if !kind.is_time_based() => Err(self.error(
                &raw.unit,
                &format!("{field}.idle"),
                format!(
                    "{} is a count, not running time: idle time cannot be free for it",
                    kind.as_str()
                ),
            )),
            idle => Ok(idle.unwrap_or(IdleBilling::Billed)),
        }
    }

    fn check_increment(&self, raw: &RawResource, kind: ResourceKind, field: &str) -> Built<u64> {
        match &raw.increment_seconds {
            None => Ok(1_000),
            Some(seconds) if !kind.is_time_based() => Err(self.error(
                seconds,
                &format!("{field}.increment_seconds"),
                format!(
                    "{} is a count, not a time: it has no time increment",
                    kind.as_str()
                ),
            )),
            Some(seconds) if *seconds.get_ref() == 0 => Err(self.error(
                seconds,
                &format!("{field}.increment_seconds"),
                "must be at least 1",
            )),
            Some(seconds) => Ok(u64::from(*seconds.get_ref()) * 1_000),
        }
    }

    fn check_bills_while(
        &self,
        raw: &RawResource,
        kind: ResourceKind,
        field: &str,
    ) -> Built<StateSet> {
        let default = match kind {
            ResourceKind::Disk => vec![LifecycleState::Running, LifecycleState::Suspended],
            ResourceKind::Egress | ResourceKind::Meter => vec![
                LifecycleState::Running,
                LifecycleState::Suspended,
                LifecycleState::Stopped,
            ],
            _ => vec![LifecycleState::Running],
        };
        match &raw.bills_while {
            None => Ok(StateSet::from_states(&default)),
            Some(states) if !kind.is_time_based() => Err(self.error(
                states,
                &format!("{field}.bills_while"),
                format!(
                    "{} bills what was counted, in any state of a sandbox",
                    kind.as_str()
                ),
            )),
            Some(states) => Ok(StateSet::from_states(states.get_ref())),
        }
    }

    fn check_minimum(
        &self,
        raw: &RawResource,
        kind: ResourceKind,
        unit: &BillingUnit,
        field: &str,
    ) -> Built<u64> {
        let Some(minimum) = &raw.minimum else {
            return Ok(0);
        };
        let field = format!("{field}.minimum");
        if !matches!(kind, ResourceKind::Vcpu | ResourceKind::Memory) {
            return Err(self.error(minimum, &field, "only vcpu and memory take a minimum"));
        }
        let base = to_base(minimum.get_ref().0, unit.measure_base())
            .map_err(|reason| self.error(minimum, &field, reason))?;
        u64::try_from(base).map_err(|_| self.error(minimum, &field, "is too large"))
    }

    fn build_plans(&self, sheet: &PriceSheet) -> Built<BTreeMap<String, Plan>> {
        self.raw
            .plans
            .iter()
            .map(|(name, raw)| {
                let plan = self.build_plan(sheet, name.get_ref(), raw)?;
                Ok((name.get_ref().clone(), plan))
            })
            .collect()
    }

    fn build_plan(&self, sheet: &PriceSheet, name: &str, raw: &RawPlan) -> Built<Plan> {
        let mut included_base = BTreeMap::new();
        for (resource, quantity) in &raw.included {
            let field = format!("plans.{name}.included.{}", resource.get_ref());
            let slot = self.resolve_slot(sheet, resource, &field)?;
            let unit = self.common_unit(sheet, slot, resource, &field)?;
            let base = to_base(quantity.0, unit.divisor())
                .map_err(|reason| self.error(resource, &field, reason))?;
            included_base.insert(slot, base);
        }
        let credits = raw
            .credits
            .iter()
            .map(|credit| Credit {
                kind: credit.kind,
                amount: credit.amount.0,
                note: credit.note.clone(),
            })
            .collect();
        Ok(Plan {
            name: name.to_owned(),
            monthly_fee: raw.monthly_fee.map_or(Decimal::ZERO, |fee| fee.0),
            included_base,
            credits,
        })
    }

    fn resolve_slot(
        &self,
        sheet: &PriceSheet,
        name: &Spanned<String>,
        field: &str,
    ) -> Built<ResourceSlot> {
        sheet.slot_by_name(name.get_ref()).ok_or_else(|| {
            self.error(
                name,
                field,
                format!("{:?} is not a resource this sheet prices", name.get_ref()),
            )
        })
    }

    /// Included usage is stated in the resource's unit, so every version must
    /// agree on that unit.
    fn common_unit<'s>(
        &self,
        sheet: &'s PriceSheet,
        slot: ResourceSlot,
        at: &Spanned<String>,
        field: &str,
    ) -> Built<&'s BillingUnit> {
        let mut units = sheet
            .versions
            .iter()
            .filter_map(|version| version.resources[slot.0].as_ref())
            .map(|price| &price.unit);
        let first = units
            .next()
            .expect("resolve_slot found a version pricing this slot");
        match units.find(|unit| unit.as_str() != first.as_str()) {
            Some(other) => Err(self.error(at, field, format!("versions disagree on the unit ({first} vs {other}) so the included quantity is ambiguous"))),
            None => Ok(first),
        }
    }

    fn check_plan_name(
        &self,
        sheet: &PriceSheet,
        name: Option<&Spanned<String>>,
        field: &str,
    ) -> Built<Option<String>> {
        let Some(name) = name else {
            return Ok(None);
        };
        if !sheet.plans.contains_key(name.get_ref()) {
            return Err(self.error(
                name,
                field,
                format!("{:?} is not a plan of this sheet", name.get_ref()),
            ));
        }
        Ok(Some(name.get_ref().clone()))
    }

    fn build_customers(&self, sheet: &PriceSheet) -> Built<BTreeMap<CustomerId, CustomerTerms>> {
        self.raw
            .customers
            .iter()
            .map(|(id, raw)| {
                let field = format!("customers.{}", id.get_ref());
                let customer = CustomerId::parse(id.get_ref().clone())
                    .map_err(|reason| self.error(id, &field, reason.to_string()))?;
                Ok((customer, self.build_terms(sheet, raw, &field)?))
            })
            .collect()
    }

    fn build_terms(
        &self,
        sheet: &PriceSheet,
        raw: &RawCustomer,
        field: &str,
    ) -> Built<CustomerTerms> {
        let plan = self.check_plan_name(sheet, raw.plan.as_ref(), &format!("{field}.plan"))?;
        let mut unit_prices = BTreeMap::new();
        for (resource, price) in &raw.unit_prices {
            let field = format!("{field}.unit_prices.{}", resource.get_ref());
            let slot = self.resolve_slot(sheet, resource, &field)?;
            let tiered = sheet
                .versions
                .iter()
                .filter_map(|version| version.resources[slot.0].as_ref())
                .any(|published| published.flat_unit_price().is_none());
            if tiered {
                return Err(self.error(
                    resource,
                    &field,
                    "a negotiated flat price cannot replace tiers",
                ));
            }
            unit_prices.insert(slot, price.0);
        }
        Ok(CustomerTerms { plan, unit_prices })
    }
}

fn parse_effective_from(datetime: &toml::value::Datetime) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(&datetime.to_string())
        .map(|parsed| parsed.with_timezone(&Utc))
        .map_err(|_| {
            format!("{datetime} needs a date, a time and a UTC offset, e.g. 2026-01-01T00:00:00Z")
        })
}

/// Tiers in the resource's unit, converted to base units, strictly rising,
/// with only the last one unbounded.
fn build_tiers(raw: &[RawTier], unit: &BillingUnit) -> Result<Vec<Tier>, String> {
    let mut tiers: Vec<Tier> = Vec::with_capacity(raw.len());
    for (index, tier) in raw.iter().enumerate() {
        let is_last = index + 1 == raw.len();
        let up_to_base = tier
            .up_to
            .map(|up_to| to_base(up_to.0, unit.divisor()))
            .transpose()?;
        match (up_to_base, is_last) {
            (None, false) => {
                return Err(format!(
                    "tier {} has no up_to but is not the last",
                    index + 1
                ))
            }
            (Some(_), true) => {
                return Err(
                    "the last tier must have no up_to, so every quantity has a price".to_owned(),
                )
            }
            _ => {}
        }
        let previous = tiers.last().and_then(|previous| previous.up_to_base);
        if let (Some(previous), Some(current)) = (previous, up_to_base) {
            if current <= previous {
                return Err(format!(
                    "tier {} does not rise above the previous tier",
                    index + 1
                ));
            }
        }
        tiers.push(Tier {
            up_to_base,
            unit_price: tier.unit_price.0,
        });
    }
    if tiers.is_empty() {
        return Err("tiers is empty".to_owned());
    }
    Ok(tiers)
}

/// Converts a quantity in a unit into whole base units, refusing fractions of
/// a base unit (they could not be billed exactly).
fn to_base(quantity: Decimal, base_per_unit: u128) -> Result<u128, String> {
    let factor = i128::try_from(base_per_unit)
        .ok()
        .and_then(|factor| Decimal::try_from_i128_with_scale(factor, 0).ok())
        .ok_or_else(|| "the unit is too large".to_owned())?;
    let base = quantity
        .checked_mul(factor)
        .ok_or_else(|| format!("{quantity} is too large"))?;
    if !base.fract().is_zero() {
        return Err(format!("{quantity} is not a whole number of base units"));
    }
    let mantissa = u128::try_from(base.trunc().normalize().mantissa())
        .map_err(|_| format!("{quantity} is negative"))?;
    Ok(mantissa)
}
