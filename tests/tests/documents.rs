//! Invoice documents: the PDF, read back as text by poppler's `pdftotext`
//! (Debian's poppler-utils, installed by `make test`), carries the parties,
//! every line's figures, the sums and the total due, over as many pages as
//! the lines need.

use chrono::{TimeZone, Utc};
use idlemeter_store::document::{Invoice, Line};
use idlemeter_store::pdf::{to_pdf, Parties};
use rust_decimal::Decimal;

/// An invoice of `lines` usage lines, line `i` costing `i` cents, with a
/// credit, 20 % tax and a wallet payment; every sum worked by hand below.
fn invoice(lines: u16) -> Invoice {
    invoice_of(lines, 1)
}

/// [`invoice`] with line `i` costing `i x step` cents (`step` cents per
/// 0.1 gpu-hour).
fn invoice_of(lines: u16, step: i64) -> Invoice {
    let start = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
    let mut all: Vec<Line> = (1..=lines)
        .map(|i| Line {
            line_no: i,
            kind: "usage".to_owned(),
            resource: format!("gpu.model-{i:03}"),
            quantity: Decimal::new(i64::from(i), 1),
            unit: "gpu-hour".to_owned(),
            unit_price: Decimal::new(step * 10, 2),
            amount: Decimal::new(i64::from(i) * step, 2),
            for_period: start,
            note: String::new(),
        })
        .collect();
    // 1 + 2 + ... + n cents.
    let subtotal = Decimal::new(i64::from(lines) * (i64::from(lines) + 1) / 2 * step, 2);
    let credit = Decimal::new(-500, 2);
    let tax = ((subtotal + credit) * Decimal::new(2, 1)).round_dp(2);
    let wallet = Decimal::new(1000, 2);
    let total = subtotal + credit + tax - wallet;
    for (kind, resource, amount) in [
        ("credit", "credit.monthly", credit),
        ("tax", "tax", tax),
        ("wallet", "wallet", -wallet),
    ] {
        all.push(Line {
            line_no: all.len() as u16 + 1,
            kind: kind.to_owned(),
            resource: resource.to_owned(),
            quantity: Decimal::ONE,
            unit: String::new(),
            unit_price: amount,
            amount,
            for_period: start,
            note: String::new(),
        });
    }
    Invoice {
        issuer: "acme-cloud".to_owned(),
        number: 42,
        status: "issued".to_owned(),
        customer: "globex".to_owned(),
        period_start: start,
        period_end: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        currency: "EUR".to_owned(),
        plan: "pro".to_owned(),
        sheet: "prices/e2b.toml".to_owned(),
        sheet_checksum: "0123456789abcdef".to_owned(),
        lines: all,
        subtotal,
        fees: Decimal::new(0, 2),
        adjustments: Decimal::new(0, 2),
        credits: credit,
        tax_rate: Decimal::new(2, 1),
        tax,
        wallet_applied: wallet,
        balance_applied: Decimal::new(0, 2),
        balance_carried: Decimal::new(0, 2),
        buyer: vec!["Buyer GmbH".to_owned(), "Tax ID DE999".to_owned()],
        total,
        one_time_credit_left: Decimal::NEGATIVE_ONE,
    }
}

fn pdf_text(pdf: &[u8]) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("invoice.pdf");
    std::fs::write(&path, pdf)?;
    let output = std::process::Command::new("pdftotext")
        .args(["-layout"])
        .arg(&path)
        .arg("-")
        .output()
        .map_err(|error| {
            anyhow::anyhow!("pdftotext ({error}): install poppler-utils (`make test` does)")
        })?;
    anyhow::ensure!(
        output.status.success(),
        "pdftotext refused the document: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[test]
fn the_pdf_reads_back_with_every_figure_of_the_invoice() -> anyhow::Result<()> {
    let invoice = invoice(70);
    // The buyer is the invoice's own, frozen when it was issued.
    let parties = Parties::of(
        &invoice,
        &[
            "Acme Cloud GmbH".to_owned(),
            "Hauptstrasse 1, 10115 Berlin".to_owned(),
            "VAT DE123456789".to_owned(),
        ],
    );
    let pdf = to_pdf(&invoice, &parties);
    assert!(pdf.starts_with(b"%PDF-"));
    assert_eq!(pdf, to_pdf(&invoice, &parties), "the same bytes every time");
    let text = pdf_text(&pdf)?;
    let lines: Vec<&str> = text.lines().collect();
    let has = |needle: &str| lines.iter().any(|line| line.contains(needle));
    for needle in [
        "Invoice acme-cloud-42",
        "Period: 2026-10-01 00:00 to 2026-11-01 00:00 (UTC)",
        "Currency: EUR",
        "Acme Cloud GmbH",
        "VAT DE123456789",
        "Buyer GmbH",
        "Tax ID DE999",
        "Page 1 of 2",
        "Page 2 of 2",
        "Rated with price sheet prices/e2b.toml (0123456789ab)",
    ] {
        assert!(has(needle), "{needle:?} missing from:\n{text}");
    }
    // Every line: its resource, quantity, unit, price and amount on one row.
    for line in &invoice.lines {
        let row = lines
            .iter()
            .find(|row| {
                row.split_whitespace().nth(1) == Some(line.resource.as_str())
                    && row.split_whitespace().next() == Some(line.kind.as_str())
            })
            .unwrap_or_else(|| panic!("no row for {}:\n{text}", line.resource));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells.last().copied(),
            Some(line.amount.to_string().as_str()),
            "{row}"
        );
        assert!(
            cells.contains(&line.quantity.normalize().to_string().as_str()),
            "{row}"
        );
    }
    // The sums: usage 24.85 (1 + ... + 70 cents), credit -5.00, tax 20 % of
    // 19.85 = 3.97, wallet -10.00, due 13.82.
    assert_eq!(invoice.subtotal.to_string(), "24.85");
    assert_eq!(invoice.total.to_string(), "13.82");
    for (label, amount) in [
        ("Usage", "24.85"),
        ("Credits", "-5.00"),
        ("Tax (20%)", "3.97"),
        ("Paid from wallet", "-10.00"),
    ] {
        assert!(
            lines
                .iter()
                .any(|row| row.contains(label) && row.trim_end().ends_with(amount)),
            "{label} {amount} missing from:\n{text}"
        );
    }
    assert!(has("Total due (EUR): 13.82"), "{text}");
    // For the README's picture (`pdftoppm -png -r 80` of it), when asked:
    // a one-page invoice of the same shape.
    if let Ok(path) = std::env::var("IDLEMETER_INVOICE_PDF") {
        std::fs::write(path, to_pdf(&invoice_of(12, 150), &parties))?;
    }
    Ok(())
}

#[test]
fn a_short_invoice_fits_one_page_and_odd_characters_do_not_break_it() -> anyhow::Result<()> {
    let mut invoice = invoice(3);
    invoice.customer = "ümlaut-kunde".to_owned();
    let text = pdf_text(&to_pdf(&invoice, &Parties::default()))?;
    assert!(text.contains("Page 1 of 1"), "{text}");
    // Without parties: the issuer sells, the customer id buys.
    assert!(text.contains("acme-cloud"), "{text}");
    assert!(text.contains("ümlaut-kunde"), "{text}");
    assert!(text.contains("Total due (EUR): "), "{text}");
    Ok(())
}
