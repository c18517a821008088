//! The invoice preview reads a figure's quantities back from its usage and
//! included lines (`CustomerUsage::from_lines`): that must be the exact
//! inverse of the lines `bill` writes, whatever the included allowances and
//! tiers split a quantity into, on every shipped sheet (Sprites with its
//! Level 10 plan's included allowances, Modal with its tiers).

use idlemeter_core::rating::CustomerUsage;
use idlemeter_core::{bill, Account, CustomerId, PriceSheet};
use proptest::prelude::*;

const SHEETS: [(&str, &str); 5] = [
    (
        "codesandbox",
        include_str!("../../../prices/codesandbox.toml"),
    ),
    ("e2b", include_str!("../../../prices/e2b.toml")),
    ("modal", include_str!("../../../prices/modal.toml")),
    (
        "northflank",
        include_str!("../../../prices/northflank.toml"),
    ),
    ("sprites", include_str!("../../../prices/sprites.toml")),
];

proptest! {
    #[test]
    fn usage_lines_read_back_to_the_quantities_billed(
        sheet_index in 0usize..SHEETS.len(),
        seeds in proptest::collection::vec(0u64..u64::MAX, 64),
        scale in 0u32..40,
    ) {
        let (name, text) = SHEETS[sheet_index];
        let sheet = PriceSheet::from_toml(text, name).expect("shipped sheet loads");
        // Sprites' Level 10 plan includes allowances: every customer on it.
        let with_plan = text.replacen("[sheet]\n", "[sheet]\ndefault_plan = \"level_10\"\n", 1);
        let sheet = if name == "sprites" {
            PriceSheet::from_toml(&with_plan, name).expect("sprites with a default plan loads")
        } else {
            sheet
        };
        let (versions, slots) = (sheet.versions().len(), sheet.slot_count());
        let mut stored = format!("{versions}x{slots}");
        for index in 0..versions * slots {
            // Zero, small and very large quantities (across every tier).
            let quantity = u128::from(seeds[index % seeds.len()] >> (scale + index as u32 % 24));
            if quantity > 0 && sheet.versions()[index / slots].resources[index % slots].is_some() {
                stored.push_str(&format!(" {}.{}={quantity}", index / slots, index % slots));
            }
        }
        let customer = CustomerId::parse("acme").expect("id");
        let usage = CustomerUsage::from_text(&stored, customer.clone(), &sheet).expect("quantities");
        let billed = bill(&sheet, &usage, &Account::default()).expect("billed");
        let lines: Vec<(&str, &str, String, String)> = billed
            .lines
            .iter()
            .map(|line| {
                (
                    line.kind.as_str(),
                    line.resource.as_str(),
                    line.price_version.map(|v| v.to_rfc3339()).unwrap_or_default(),
                    line.quantity_base.clone().unwrap_or_default(),
                )
            })
            .collect();
        let read_back = CustomerUsage::from_lines(
            customer,
            &sheet,
            lines
                .iter()
                .map(|(kind, resource, version, quantity)| (*kind, *resource, version.as_str(), quantity.as_str())),
        )
        .expect("lines read back");
        prop_assert_eq!(read_back, usage);
    }
}

/// Issue "Idle policy", idle on the bill: the idle time of a Sprites bill
/// survives every form its quantities are kept in (the stored text, the
/// bill's lines, a carried rating state), so a figure read back still says
/// how many seconds were idle.
#[test]
fn idle_time_survives_text_lines_and_carried_state() {
    use idlemeter_core::{jsonl::parse_samples, RatingState, SessionOrConnection};
    let sheet = PriceSheet::from_toml(SHEETS[4].1, "sprites.toml").expect("sheet");
    let samples = parse_samples(include_str!("fixtures/sprites_idle.jsonl"));
    let mut state = RatingState::new(&sheet);
    let refused = state.advance(&sheet, &samples.samples, &SessionOrConnection);
    assert!(refused.is_empty(), "{refused:?}");
    let rated = state.usage(&sheet, &SessionOrConnection);
    let usage = rated.customers[0].clone();
    assert_eq!(usage.idle_ms(0), 3_600_000, "hour 2 was idle");

    let customer = CustomerId::parse("acme").expect("id");
    let text = usage.to_text();
    assert!(text.ends_with(" i0=3600000"), "{text}");
    assert_eq!(
        CustomerUsage::from_text(&text, customer.clone(), &sheet).expect("text"),
        usage
    );

    let billed = bill(&sheet, &usage, &Account::default()).expect("billed");
    let lines: Vec<(&str, &str, String, String)> = billed
        .lines
        .iter()
        .map(|line| {
            (
                line.kind.as_str(),
                line.resource.as_str(),
                line.price_version
                    .map(|v| v.to_rfc3339())
                    .unwrap_or_default(),
                line.quantity_base.clone().unwrap_or_default(),
            )
        })
        .collect();
    let read_back = CustomerUsage::from_lines(
        customer,
        &sheet,
        lines.iter().map(|(kind, resource, version, quantity)| {
            (*kind, *resource, version.as_str(), quantity.as_str())
        }),
    )
    .expect("lines");
    assert_eq!(read_back, usage);

    let restored = RatingState::from_json(&state.to_json(), &sheet).expect("state");
    assert_eq!(
        restored.usage(&sheet, &SessionOrConnection).customers[0],
        usage
    );
}
