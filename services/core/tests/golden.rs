//! Golden bills: the shipped price sheets against small hand-computed traces
//! (fixtures/*.jsonl). The arithmetic is written out beside each assertion; a
//! change here changes what customers pay.

use idlemeter_core::{rate_jsonl, CustomerBill, InvoiceLine, LineKind, RateReport};

const E2B: &str = include_str!("../../../prices/e2b.toml");
const CODESANDBOX: &str = include_str!("../../../prices/codesandbox.toml");
const MODAL: &str = include_str!("../../../prices/modal.toml");
const SPRITES: &str = include_str!("../../../prices/sprites.toml");
const NORTHFLANK: &str = include_str!("../../../prices/northflank.toml");

fn rate(sheet: &str, samples: &str) -> RateReport {
    let report = rate_jsonl(sheet, "test-sheet.toml", samples).expect("sheet loads and rates");
    assert_eq!(report.currency, "USD");
    report
}

fn bill<'a>(report: &'a RateReport, customer: &str) -> &'a CustomerBill {
    report
        .customers
        .iter()
        .find(|bill| bill.customer.as_str() == customer)
        .expect("customer billed")
}

/// The priced lines of a resource (its idle line, which bills nothing, aside).
fn lines<'a>(bill: &'a CustomerBill, resource: &str) -> Vec<&'a InvoiceLine> {
    bill.lines
        .iter()
        .filter(|line| line.resource == resource && line.kind != LineKind::Idle)
        .collect()
}

/// (quantity, unit price, amount) of the single line of a resource.
fn only_line(bill: &CustomerBill, resource: &str) -> (String, String, String) {
    let found = lines(bill, resource);
    assert_eq!(found.len(), 1, "one {resource} line in {:?}", bill.lines);
    let line = found[0];
    (
        line.quantity.to_string(),
        line.unit_price.to_string(),
        line.amount.to_string(),
    )
}

fn money(bill: &CustomerBill) -> [String; 4] {
    [bill.subtotal, bill.fees, bill.credits, bill.total].map(|amount| amount.to_string())
}

fn owned(parts: (&str, &str, &str)) -> (String, String, String) {
    (parts.0.to_owned(), parts.1.to_owned(), parts.2.to_owned())
}

#[test]
fn e2b_bills_allocated_vcpu_and_memory_per_second() {
    let report = rate(E2B, include_str!("fixtures/e2b_one_hour.jsonl"));
    let acme = bill(&report, "acme");
    // vCPU: 2 vCPU allocated x 3600 s = 7200 vCPU-s x $0.000014 = $0.1008 -> $0.10
    assert_eq!(only_line(acme, "vcpu"), owned(("7200", "0.000014", "0.10")));
    // memory: 512 MiB = 0.5 GiB x 3600 s = 1800 GiB-s x $0.0000045 = $0.0081 -> $0.01
    assert_eq!(
        only_line(acme, "memory"),
        owned(("1800", "0.0000045", "0.01"))
    );
    // Hobby: the $100 one-time credit covers the $0.11 subtotal.
    let credit = lines(acme, "credit.one_time")[0];
    assert_eq!(
        credit.credit_available.map(|c| c.to_string()).as_deref(),
        Some("100.00")
    );
    assert_eq!(money(acme), ["0.11", "0.00", "-0.11", "0.00"]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn e2b_pro_plan_adds_its_monthly_fee() {
    let sheet = format!("{E2B}\n[customers.bigco]\nplan = \"pro\"\n");
    let report = rate(&sheet, include_str!("fixtures/e2b_one_hour.jsonl"));
    let bigco = bill(&report, "bigco");
    // usage $0.10 + $0.01 = $0.11; Pro fee $150; no credit: $150.11
    assert_eq!(only_line(bigco, "plan.pro"), owned(("1", "150", "150.00")));
    assert_eq!(money(bigco), ["0.11", "150.00", "0.00", "150.11"]);
    assert_eq!(bigco.plan.as_deref(), Some("pro"));
}

#[test]
fn codesandbox_rounds_each_running_span_up_to_the_minute() {
    let report = rate(
        CODESANDBOX,
        include_str!("fixtures/codesandbox_minutes.jsonl"),
    );
    let acme = bill(&report, "acme");
    // Spans: 10:00:00-10:03:25 (3 min 25 s, bills 4 min) and, after a suspended
    // stretch that bills nothing, 10:10:00-10:10:30 (30 s, bills 1 min): 300 s.
    // vCPU: 16 x 300 s = 4800 vCPU-s = 1.3333... vCPU-h x $0.0446 = $0.059466... -> $0.06
    // (unrounded spans, 235 s, would have been $0.0466 -> $0.05)
    let vcpu = lines(acme, "vcpu")[0];
    assert_eq!(vcpu.quantity_base.as_deref(), Some("4800000000"));
    assert_eq!(vcpu.amount.to_string(), "0.06");
    assert_eq!(vcpu.quantity.to_string(), "1.333333333333");
    // memory: 64 GB x 300 s = 19200 GB-s = 5.3333... GB-h x $0.0149 = $0.079466... -> $0.08
    assert_eq!(lines(acme, "memory")[0].amount.to_string(), "0.08");
    // Free plan: 400 credits x $0.01486 = $5.944 -> $5.94 available, $0.14 applied.
    assert_eq!(money(acme), ["0.14", "0.00", "-0.14", "0.00"]);
}

#[test]
fn modal_bills_max_of_requested_and_used_with_minimums() {
    let report = rate(
        MODAL,
        include_str!("fixtures/modal_max_requested_used.jsonl"),
    );
    let acme = bill(&report, "acme");
    // Request 0.125 vCPU is below the 0.25 vCPU (0.125 core) minimum: requested = 0.25.
    // Hour 1: used 14400 vCPU-s (4 vCPU busy) > requested 0.25 x 3600 = 900: 14400.
    // Hour 2: used 180 vCPU-s < requested 900: 900.
    // 15300 vCPU-s x $0.00000655 = $0.100215 -> $0.10
    assert_eq!(
        only_line(acme, "vcpu"),
        owned(("15300", "0.00000655", "0.10"))
    );
    // Memory requested 64 MiB is below the 128 MiB (0.125 GiB) minimum.
    // Hour 1: used 8 GiB x 3600 = 28800 GiB-s. Hour 2: used 32 MiB < 128 MiB: 0.125 x 3600 = 450.
    // 29250 GiB-s x $0.00000222 = $0.064935 -> $0.06
    assert_eq!(
        only_line(acme, "memory"),
        owned(("29250", "0.00000222", "0.06"))
    );
    // H100: 1 GPU x 7200 s x $0.001097 = $7.8984 -> $7.90
    assert_eq!(
        only_line(acme, "gpu.H100"),
        owned(("7200", "0.001097", "7.90"))
    );
    // Starter: $30 of monthly credits cover the $8.06.
    assert_eq!(money(acme), ["8.06", "0.00", "-8.06", "0.00"]);
}

#[test]
fn sprites_bill_compute_only_while_a_session_or_connection_is_open() {
    let report = rate(SPRITES, include_str!("fixtures/sprites_idle.jsonl"));
    let acme = bill(&report, "acme");
    // Hour 1 active (an exec session), hour 2 idle (running, nothing open),
    // hour 3 suspended, hour 4 active (two connections).
    // vCPU: 2 vCPU x 2 active h = 4 vCPU-h x $0.07 = $0.28
    assert_eq!(only_line(acme, "vcpu"), owned(("4", "0.07", "0.28")));
    // memory: 4 GB x 2 active h = 8 GB-h x $0.04375 = $0.35
    assert_eq!(only_line(acme, "memory"), owned(("8", "0.04375", "0.35")));
    // hot NVMe bills while running, idle or not, and not while suspended:
    // 10 GB x 3 h = 30 GB-h = 30/730 GB-month x $0.50 = $0.020547... -> $0.02
    let disk = lines(acme, "disk")[0];
    assert_eq!(disk.amount.to_string(), "0.02");
    assert_eq!(disk.quantity_base.as_deref(), Some("108000000000000000"));
    // No plan: the total is the usage.
    assert_eq!(money(acme), ["0.65", "0.00", "0.00", "0.65"]);
    // The idle hour is on the bill: an idle line, at zero, for each resource
    // billed only while active (vCPU and memory), none for disk.
    let idle: Vec<(&str, String, String, String)> = acme
        .lines
        .iter()
        .filter(|line| line.kind == LineKind::Idle)
        .map(|line| {
            (
                line.resource.as_str(),
                line.quantity.to_string(),
                line.unit.clone(),
                line.amount.to_string(),
            )
        })
        .collect();
    let second = |resource| {
        (
            resource,
            "3600".to_owned(),
            "second".to_owned(),
            "0.00".to_owned(),
        )
    };
    assert_eq!(idle, [second("vcpu"), second("memory")]);
    assert_eq!(report.idle_policy, "session-or-connection/v2");
}

#[test]
fn sprites_level_10_includes_usage_before_pricing_it() {
    let sheet = format!("{SPRITES}\n[customers.acme]\nplan = \"level_10\"\n");
    let report = rate(&sheet, include_str!("fixtures/sprites_idle.jsonl"));
    let acme = bill(&report, "acme");
    // 4 vCPU-h, 8 GB-h and 30/730 GB-month are all within 450 / 1800 / 50 included.
    let vcpu = lines(acme, "vcpu");
    assert_eq!(vcpu.len(), 1);
    assert_eq!(vcpu[0].kind, LineKind::Included);
    assert_eq!(vcpu[0].amount.to_string(), "0.00");
    // Only the $20 plan fee is due.
    assert_eq!(money(acme), ["0.00", "20.00", "0.00", "20.00"]);
}

#[test]
fn northflank_price_change_splits_usage_at_the_effective_date() {
    let sheet = include_str!("fixtures/northflank_price_change.toml");
    let report = rate(
        sheet,
        include_str!("fixtures/northflank_price_change.jsonl"),
    );
    let acme = bill(&report, "acme");
    // One interval 10:30-11:30, 4 vCPU, 8 GB, one H100; new prices from 11:00.
    let vcpu: Vec<(String, String)> = lines(acme, "vcpu")
        .iter()
        .map(|line| (line.quantity.to_string(), line.amount.to_string()))
        .collect();
    // before: 4 x 0.5 h = 2 vCPU-h x $0.01667 = $0.03334 -> $0.03
    // after:  2 vCPU-h x $0.02 = $0.04
    assert_eq!(
        vcpu,
        vec![
            ("2".to_owned(), "0.03".to_owned()),
            ("2".to_owned(), "0.04".to_owned())
        ]
    );
    // memory: 8 GB x 0.5 h = 4 GB-h x $0.00833 = $0.03332 -> $0.03, in each version
    // H100: 0.5 h x $2.74 = $1.37, in each version
    let gpu: Vec<String> = lines(acme, "gpu.H100")
        .iter()
        .map(|line| line.amount.to_string())
        .collect();
    assert_eq!(gpu, vec!["1.37", "1.37"]);
    // 0.03 + 0.03 + 1.37 + 0.04 + 0.03 + 1.37 = 2.87
    assert_eq!(money(acme), ["2.87", "0.00", "0.00", "2.87"]);
    let versions: Vec<String> = acme
        .lines
        .iter()
        .filter_map(|line| line.price_version.map(|at| at.to_rfc3339()))
        .collect();
    assert_eq!(versions[0], "2026-01-01T00:00:00+00:00");
    assert_eq!(versions[versions.len() - 1], "2026-03-02T11:00:00+00:00");
}

#[test]
fn northflank_sheet_loads_and_bills_nothing_for_a_lone_baseline() {
    let baseline = include_str!("fixtures/e2b_one_hour.jsonl")
        .lines()
        .next()
        .expect("a line");
    let report = rate(NORTHFLANK, baseline);
    let acme = bill(&report, "acme");
    assert!(acme.lines.is_empty());
    assert_eq!(money(acme), ["0.00", "0.00", "0.00", "0.00"]);
}

#[test]
fn bad_fields_name_line_and_field_and_good_lines_still_bill() {
    let report = rate(E2B, include_str!("fixtures/bad_fields.jsonl"));
    let errors: Vec<(u64, &str)> = report
        .errors
        .iter()
        .map(|error| (error.line, error.field.as_str()))
        .collect();
    // line 2: vcpu "two" is not a number; line 4: cpu_used_usec went from 3000 to 10.
    assert_eq!(errors, vec![(2, "vcpu"), (4, "cpu_used_usec")]);
    assert!(
        report.errors[1].reason.contains("backwards"),
        "{}",
        report.errors[1].reason
    );
    // Lines 1 and 3 still bill their hour: 7200 vCPU-s x $0.000014 = $0.10.
    let acme = bill(&report, "acme");
    assert_eq!(only_line(acme, "vcpu"), owned(("7200", "0.000014", "0.10")));
}

#[test]
fn output_document_has_the_stable_shape_with_decimal_strings() {
    let report = rate(E2B, include_str!("fixtures/e2b_one_hour.jsonl"));
    let json = serde_json::to_value(&report).expect("serializes");
    assert_eq!(json["currency"], "USD");
    let first = &json["customers"][0];
    assert_eq!(first["customer"], "acme");
    for key in ["resource", "quantity", "unit", "unit_price", "amount"] {
        assert!(first["lines"][0][key].is_string(), "{key} is a string");
    }
    assert_eq!(first["lines"][0]["amount"], "0.10");
    assert_eq!(first["subtotal"], "0.11");
    assert_eq!(first["total"], "0.00");
    assert!(json["errors"].as_array().is_some_and(Vec::is_empty));
}

/// Two customers whose sandboxes share an id are two series, not one: each
/// pays for its own hour. (Merged, the samples would interleave into one
/// series and the bill would mix both customers' usage.)
/// E2B, 1 vCPU for 3600 s = 3600 x $0.000014 = $0.0504 -> $0.05 each; the
/// second customer's sandbox runs 2 vCPU: $0.1008 -> $0.10.
#[test]
fn customers_sharing_a_sandbox_id_are_billed_separately() {
    let line = |customer: &str, seq: u32, hour: u32, vcpu: u32| {
        format!(
            "{{\"ts\": \"2026-03-02T{hour:02}:00:00Z\", \"customer\": \"{customer}\", \"node\": \"n\", \"sandbox\": \"shared\", \"epoch\": 1, \"seq\": {seq}, \"state\": \"running\", \"vcpu\": {vcpu}, \"mem_bytes\": 0, \"gpu_model\": null, \"gpu_count\": 0, \"disk_bytes\": 0, \"cpu_used_usec\": 0, \"mem_used_bytes\": 0, \"net_rx_bytes\": 0, \"net_tx_bytes\": 0, \"exec_sessions\": 0, \"open_conns\": 0}}\n"
        )
    };
    let samples = [
        line("a", 1, 10, 1),
        line("b", 1, 12, 2),
        line("a", 2, 11, 1),
        line("b", 2, 13, 2),
    ]
    .concat();
    let report = rate(E2B, &samples);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(only_line(bill(&report, "a"), "vcpu").2, "0.05");
    assert_eq!(only_line(bill(&report, "b"), "vcpu").2, "0.10");
}
