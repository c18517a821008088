//! Loading price sheets: the shipped ones load, and a bad sheet is refused
//! with its path, line, field and reason.

use idlemeter_core::pricing::{Basis, ResourceSlot};
use idlemeter_core::{PriceSheet, SheetError};

const SHIPPED: [(&str, &str); 5] = [
    (
        "prices/northflank.toml",
        include_str!("../../../prices/northflank.toml"),
    ),
    ("prices/e2b.toml", include_str!("../../../prices/e2b.toml")),
    (
        "prices/codesandbox.toml",
        include_str!("../../../prices/codesandbox.toml"),
    ),
    (
        "prices/modal.toml",
        include_str!("../../../prices/modal.toml"),
    ),
    (
        "prices/sprites.toml",
        include_str!("../../../prices/sprites.toml"),
    ),
];

const MINIMAL: &str = r#"[sheet]
platform = "test"
currency = "USD"
line_rounding = "half_even"

[[versions]]
effective_from = 2026-01-01T00:00:00Z

[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "0.05"
"#;

fn refuse(text: &str) -> SheetError {
    PriceSheet::from_toml(text, "prices/bad.toml").expect_err("sheet must be refused")
}

#[test]
fn every_shipped_sheet_loads() {
    for (path, text) in SHIPPED {
        let sheet = PriceSheet::from_toml(text, path).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(sheet.currency.code(), "USD", "{path}");
    }
}

#[test]
fn modal_minimums_become_base_rates() {
    let sheet = PriceSheet::from_toml(SHIPPED[3].1, "prices/modal.toml").expect("loads");
    let version = &sheet.versions()[0];
    let vcpu = version.resources[0].as_ref().expect("vcpu priced");
    let memory = version.resources[1].as_ref().expect("memory priced");
    // 0.125 core = 0.25 vCPU = 250 thousandths; 128 MiB = 0.125 GiB = 2^27 bytes
    assert_eq!(vcpu.minimum_per_ms, 250);
    assert_eq!(memory.minimum_per_ms, 1 << 27);
    assert_eq!(vcpu.basis, Basis::MaxRequestedUsed);
    assert_eq!(sheet.slot_name(ResourceSlot(2)), "gpu.A100-80GB");
    assert_eq!(
        sheet
            .gpu_slot("T4")
            .map(|slot| sheet.slot_name(slot))
            .as_deref(),
        Some("gpu.T4")
    );
}

#[test]
fn a_float_price_is_refused_at_its_line_and_field() {
    let error = refuse(&MINIMAL.replace("unit_price = \"0.05\"", "unit_price = 0.05"));
    assert_eq!(error.path, "prices/bad.toml");
    assert_eq!(error.line, Some(11));
    assert_eq!(error.field, "versions.resources.vcpu.unit_price");
    assert!(error.reason.contains("float"), "{}", error.reason);
    assert!(error
        .to_string()
        .starts_with("prices/bad.toml:11: field `versions.resources.vcpu.unit_price`"));
}

#[test]
fn a_misspelt_key_is_refused_rather_than_ignored() {
    let error = refuse(&MINIMAL.replace("unit_price", "unit_prise"));
    assert_eq!(error.line, Some(11));
    assert!(error.reason.contains("unknown field"), "{}", error.reason);
    assert!(
        error.field.starts_with("versions.resources.vcpu"),
        "{}",
        error.field
    );
}

#[test]
fn a_unit_that_does_not_fit_the_resource_is_refused() {
    let error = refuse(&MINIMAL.replace("vcpu-hour", "GiB-hour"));
    assert_eq!(
        (error.line, error.field.as_str()),
        (Some(10), "versions.resources.vcpu.unit")
    );
    let error = refuse(&MINIMAL.replace("vcpu-hour", "vcpu-month"));
    assert!(error.reason.contains("month_hours"), "{}", error.reason);
}

#[test]
fn a_missing_price_is_refused() {
    let error = refuse(&MINIMAL.replace("unit_price = \"0.05\"\n", ""));
    assert_eq!(error.field, "versions.resources.vcpu.unit_price");
    assert_eq!(error.line, Some(10));
}

#[test]
fn versions_must_rise_in_effective_date() {
    let text = format!(
        "{MINIMAL}\n[[versions]]\neffective_from = 2025-06-01T00:00:00Z\n[versions.resources.vcpu]\nunit = \"vcpu-hour\"\nunit_price = \"0.06\"\n"
    );
    let error = refuse(&text);
    assert_eq!(
        (error.line, error.field.as_str()),
        (Some(14), "versions.effective_from")
    );
    assert!(error.reason.contains("not after"), "{}", error.reason);
}

#[test]
fn plans_and_customers_must_name_what_exists() {
    let error = refuse(&format!(
        "{MINIMAL}\n[plans.pro]\nincluded = {{ gpu = \"1\" }}\n"
    ));
    assert_eq!(error.field, "plans.pro.included.gpu");
    assert_eq!(error.line, Some(14));
    let error = refuse(&format!("{MINIMAL}\n[customers.acme]\nplan = \"gold\"\n"));
    assert_eq!(
        (error.line, error.field.as_str()),
        (Some(14), "customers.acme.plan")
    );
    let error = refuse(&MINIMAL.replace(
        "line_rounding = \"half_even\"",
        "line_rounding = \"nearest\"",
    ));
    assert_eq!(
        (error.line, error.field.as_str()),
        (Some(4), "sheet.line_rounding")
    );
}

#[test]
fn tiers_must_end_unbounded_and_rise() {
    let tiers = "tier_mode = \"graduated\"\ntiers = [{ up_to = \"10\", unit_price = \"1\" }, { up_to = \"5\", unit_price = \"0.5\" }, { unit_price = \"0.1\" }]\n";
    let error = refuse(&MINIMAL.replace("unit_price = \"0.05\"\n", tiers));
    assert_eq!(error.field, "versions.resources.vcpu.tiers");
    assert!(error.reason.contains("does not rise"), "{}", error.reason);
}
