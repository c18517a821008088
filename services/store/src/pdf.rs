//! Invoices as PDF, written in pure Rust (pdf-writer): no browser, no
//! external service, the same bytes for the same invoice.
//!
//! The page uses the PDF standard fonts (Helvetica for headings, Courier
//! for the lines, so columns align by character count) with WinAnsi
//! encoding; a character outside it prints as `?`. Every figure is the
//! invoice's exact decimal text, never reformatted through a float.
//! Long invoices continue on further A4 pages, each numbered "page n of m".

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str};

use crate::document::Invoice;

/// Who sells and who buys, as printed in the header: one string per line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parties {
    pub seller: Vec<String>,
    pub buyer: Vec<String>,
}

impl Parties {
    /// `seller` (`[billing] seller`) and the invoice's buyer as it was
    /// issued (its customer id when it has no buyer details).
    pub fn of(invoice: &crate::Invoice, seller: &[String]) -> Self {
        Self {
            seller: seller.to_vec(),
            buyer: if invoice.buyer.is_empty() {
                vec![invoice.customer.clone()]
            } else {
                invoice.buyer.clone()
            },
        }
    }
}

const PAGE_WIDTH: f32 = 595.0;
const PAGE_HEIGHT: f32 = 842.0;
const MARGIN: f32 = 50.0;
const LINE_SIZE: f32 = 8.0;
const LINE_STEP: f32 = 11.0;
/// Invoice lines on the first page (below the header) and on the others.
const FIRST_PAGE_LINES: usize = 46;
const NEXT_PAGE_LINES: usize = 60;

/// Column widths of the line table, in characters of Courier.
const COLUMNS: [(&str, usize, bool); 6] = [
    ("kind", 11, false),
    ("resource", 24, false),
    ("quantity", 18, true),
    ("unit", 16, false),
    ("unit price", 14, true),
    ("amount", 12, true),
];

/// The invoice as a PDF document.
pub fn to_pdf(invoice: &Invoice, parties: &Parties) -> Vec<u8> {
    let table: Vec<String> = invoice
        .lines
        .iter()
        .map(|line| {
            let resource = if line.note.is_empty() {
                line.resource.clone()
            } else {
                format!("{} ({})", line.resource, line.note)
            };
            row(&[
                line.kind.clone(),
                resource,
                line.quantity.normalize().to_string(),
                line.unit.clone(),
                line.unit_price.normalize().to_string(),
                line.amount.to_string(),
            ])
        })
        .collect();
    let mut pages: Vec<&[String]> = Vec::new();
    let (first, mut rest) = table.split_at(table.len().min(FIRST_PAGE_LINES));
    pages.push(first);
    while !rest.is_empty() {
        let (page, more) = rest.split_at(rest.len().min(NEXT_PAGE_LINES));
        pages.push(page);
        rest = more;
    }

    let mut pdf = Pdf::new();
    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let (regular, bold, mono) = (Ref::new(3), Ref::new(4), Ref::new(5));
    let page_ids: Vec<Ref> = (0..pages.len())
        .map(|index| Ref::new(10 + 2 * index as i32))
        .collect();
    pdf.catalog(catalog).pages(tree);
    pdf.pages(tree)
        .kids(page_ids.iter().copied())
        .count(pages.len() as i32);
    for (id, base) in [
        (regular, "Helvetica"),
        (bold, "Helvetica-Bold"),
        (mono, "Courier"),
    ] {
        pdf.type1_font(id)
            .base_font(Name(base.as_bytes()))
            .encoding_predefined(Name(b"WinAnsiEncoding"));
    }
    let total_pages = pages.len();
    for (index, lines) in pages.into_iter().enumerate() {
        let page_id = page_ids[index];
        let content_id = Ref::new(11 + 2 * index as i32);
        let mut page = pdf.page(page_id);
        page.media_box(Rect::new(0.0, 0.0, PAGE_WIDTH, PAGE_HEIGHT));
        page.parent(tree);
        page.contents(content_id);
        {
            let mut resources = page.resources();
            let mut fonts = resources.fonts();
            fonts.pair(Name(b"F1"), regular);
            fonts.pair(Name(b"F2"), bold);
            fonts.pair(Name(b"F3"), mono);
        }
        page.finish();
        let mut writer = PageWriter::new();
        let mut y = PAGE_HEIGHT - MARGIN;
        if index == 0 {
            y = writer.header(invoice, parties, y);
        } else {
            writer.title(invoice, " (continued)", 11.0, y);
            y -= 24.0;
        }
        writer.text("F3", LINE_SIZE, MARGIN, y, &row_headings());
        y -= 4.0;
        writer.rule(y);
        y -= LINE_STEP;
        for line in lines {
            writer.text("F3", LINE_SIZE, MARGIN, y, line);
            y -= LINE_STEP;
        }
        if index + 1 == total_pages {
            writer.rule(y + LINE_STEP - 4.0);
            writer.totals(invoice, y - 4.0);
        }
        writer.text(
            "F1",
            7.0,
            MARGIN,
            MARGIN - 20.0,
            &format!(
                "Rated with price sheet {} ({}). Page {} of {}.",
                invoice.sheet,
                &invoice.sheet_checksum[..invoice.sheet_checksum.len().min(12)],
                index + 1,
                total_pages
            ),
        );
        pdf.stream(content_id, &writer.content.finish());
    }
    pdf.finish()
}

/// One page's content stream.
struct PageWriter {
    content: Content,
}

impl PageWriter {
    fn new() -> Self {
        Self {
            content: Content::new(),
        }
    }

    fn text(&mut self, font: &str, size: f32, x: f32, y: f32, text: &str) {
        let encoded = win_ansi(text);
        self.content.begin_text();
        self.content.set_font(Name(font.as_bytes()), size);
        self.content.next_line(x, y);
        self.content.show(Str(&encoded));
        self.content.end_text();
    }

    fn rule(&mut self, y: f32) {
        self.content.set_line_width(0.5);
        self.content.move_to(MARGIN, y);
        self.content.line_to(PAGE_WIDTH - MARGIN, y);
        self.content.stroke();
    }

    /// "Invoice <issuer>-<number>" and `suffix` in bold at the margin.
    fn title(&mut self, invoice: &Invoice, suffix: &str, size: f32, y: f32) {
        let title = format!("Invoice {}-{}{suffix}", invoice.issuer, invoice.number);
        self.text("F2", size, MARGIN, y, &title);
    }

    /// Title, dates and the two parties; returns where the table starts.
    fn header(&mut self, invoice: &Invoice, parties: &Parties, top: f32) -> f32 {
        let mut y = top;
        self.title(invoice, "", 18.0, y);
        y -= 20.0;
        let facts = [
            format!("Status: {}", invoice.status),
            format!(
                "Period: {} to {} (UTC)",
                invoice.period_start.format("%Y-%m-%d %H:%M"),
                invoice.period_end.format("%Y-%m-%d %H:%M")
            ),
            format!("Currency: {}", invoice.currency),
            format!(
                "Plan: {}",
                if invoice.plan.is_empty() {
                    "-"
                } else {
                    invoice.plan.as_str()
                }
            ),
        ];
        for fact in facts {
            self.text("F1", 9.0, MARGIN, y, &fact);
            y -= 12.0;
        }
        y -= 10.0;
        let column = PAGE_WIDTH / 2.0;
        self.text("F2", 9.0, MARGIN, y, "From");
        self.text("F2", 9.0, column, y, "Bill to");
        let seller: Vec<&str> = if parties.seller.is_empty() {
            vec![invoice.issuer.as_str()]
        } else {
            parties.seller.iter().map(String::as_str).collect()
        };
        let buyer: Vec<&str> = if parties.buyer.is_empty() {
            vec![invoice.customer.as_str()]
        } else {
            parties.buyer.iter().map(String::as_str).collect()
        };
        let rows = seller.len().max(buyer.len());
        for index in 0..rows {
            y -= 12.0;
            if let Some(line) = seller.get(index) {
                self.text("F1", 9.0, MARGIN, y, line);
            }
            if let Some(line) = buyer.get(index) {
                self.text("F1", 9.0, column, y, line);
            }
        }
        y - 28.0
    }

    /// The sums under the table, right-aligned with the amount column.
    fn totals(&mut self, invoice: &Invoice, top: f32) {
        let mut y = top;
        let mut figures = vec![
            ("Usage", invoice.subtotal.to_string()),
            ("Fees", invoice.fees.to_string()),
        ];
        if !invoice.adjustments.is_zero() {
            figures.push(("Adjustments", invoice.adjustments.to_string()));
        }
        if !invoice.credits.is_zero() {
            figures.push(("Credits", invoice.credits.to_string()));
        }
        let tax_label = format!(
            "Tax ({}%)",
            (invoice.tax_rate * rust_decimal::Decimal::ONE_HUNDRED).normalize()
        );
        figures.push((tax_label.as_str(), invoice.tax.to_string()));
        if !invoice.wallet_applied.is_zero() {
            figures.push(("Paid from wallet", (-invoice.wallet_applied).to_string()));
        }
        let width: usize = COLUMNS.iter().map(|(_, width, _)| width + 1).sum();
        for (label, amount) in figures {
            let text = format!("{label:>w$} {amount:>12}", w = width - 14);
            self.text("F3", LINE_SIZE, MARGIN, y, &text);
            y -= LINE_STEP;
        }
        y -= 4.0;
        let due = format!("Total due ({}): {}", invoice.currency, invoice.total);
        self.text("F2", 11.0, MARGIN, y, &due);
    }
}

fn row_headings() -> String {
    row(&COLUMNS.map(|(name, _, _)| name.to_owned()))
}

/// Cells padded (or cut, marked `~`) to the column widths.
fn row(cells: &[String]) -> String {
    let mut text = String::new();
    for ((_, width, right), cell) in COLUMNS.iter().zip(cells) {
        let fitted: String = if cell.chars().count() > *width {
            let mut cut: String = cell.chars().take(width - 1).collect();
            cut.push('~');
            cut
        } else {
            cell.clone()
        };
        if *right {
            text.push_str(&format!("{fitted:>width$} "));
        } else {
            text.push_str(&format!("{fitted:<width$} "));
        }
    }
    text.trim_end().to_owned()
}

/// `text` in WinAnsi (Latin-1 for the printable range); other characters
/// become `?`.
fn win_ansi(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| match u32::from(c) {
            0x20..=0x7e | 0xa0..=0xff => c as u8,
            0x20ac => 0x80, // euro sign
            _ => b'?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_align_and_cut_what_does_not_fit() {
        let line = row(&[
            "usage".to_owned(),
            "gpu.H100-with-a-very-long-model-name".to_owned(),
            "1.5".to_owned(),
            "gpu-hour".to_owned(),
            "2.5".to_owned(),
            "3.75".to_owned(),
        ]);
        assert!(line.starts_with("usage       gpu.H100-with-a-very-lo~ "));
        assert!(line.ends_with("        3.75"));
        assert_eq!(win_ansi("5 € – ok"), b"5 \x80 ? ok".to_vec());
    }
}
