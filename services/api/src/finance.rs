//! Finance dashboards: the panels of `dashboards/panels.toml` (the one place
//! their SQL lives), run for a time range; the Grafana dashboard generated
//! from them; and the built-in `/finance` page, rendered on the server as
//! HTML with inline SVG charts (no CDN, no JavaScript).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use idlemeter_store::Store;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

const PANELS_TOML: &str = include_str!("../../../dashboards/panels.toml");
const REVENUE_LINES_SQL: &str = include_str!("../../../dashboards/queries/revenue_lines.sql");
const SANDBOX_COSTS_SQL: &str = include_str!("../../../dashboards/queries/sandbox_costs.sql");
/// Margin per sandbox and per customer (the admin route's query and the
/// margin panel's fragment).
pub const SANDBOX_MARGIN_SQL: &str = include_str!("../../../dashboards/queries/sandbox_margin.sql");

/// How a panel is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Chart {
    /// Vertical bars over time (one group per row, one bar per numeric column).
    Bars,
    /// Horizontal bars, one per row (label, value).
    Hbars,
    /// Numbers.
    Stat,
}

/// One panel: its title, chart and SQL with placeholders.
#[derive(Debug, Clone, Deserialize)]
pub struct Panel {
    pub id: String,
    pub title: String,
    pub chart: Chart,
    pub sql: String,
}

#[derive(Debug, Deserialize)]
struct PanelsFile {
    panels: Vec<Panel>,
}

/// Every panel, in page order.
pub fn panels() -> Vec<Panel> {
    toml::from_str::<PanelsFile>(PANELS_TOML)
        .expect("dashboards/panels.toml is valid (checked by a test)")
        .panels
}

fn without_comments(sql: &str) -> String {
    sql.lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The panel's SQL with its placeholders filled: `from`/`to` and the
/// interval as given (numbers, or Grafana macros).
pub(crate) fn fill(sql: &str, from: &str, to: &str, interval_s: &str) -> String {
    sql.replace("{sandbox_margin}", &without_comments(SANDBOX_MARGIN_SQL))
        .replace("{sandbox_costs}", &without_comments(SANDBOX_COSTS_SQL))
        .replace("{revenue_lines}", &without_comments(REVENUE_LINES_SQL))
        .replace("{from}", from)
        .replace("{to}", to)
        .replace("{interval_s}", interval_s)
        .trim()
        .to_owned()
}

impl Panel {
    /// The SQL to run for `[from, to)` (Unix seconds).
    pub fn sql_for(&self, from: u32, to: u32, interval_s: u32) -> String {
        fill(
            &self.sql,
            &from.to_string(),
            &to.to_string(),
            &interval_s.to_string(),
        )
    }
}

/// A panel's answer: column names and rows, as text.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PanelData {
    pub id: String,
    pub title: String,
    pub chart: Chart,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// Runs one panel.
pub async fn run(
    store: &Store,
    panel: &Panel,
    from: u32,
    to: u32,
    interval_s: u32,
) -> Result<PanelData, idlemeter_store::Error> {
    let mut rows = store
        .query_rows(&panel.sql_for(from, to, interval_s))
        .await?;
    let columns = if rows.is_empty() {
        Vec::new()
    } else {
        rows.remove(0)
    };
    Ok(PanelData {
        id: panel.id.clone(),
        title: panel.title.clone(),
        chart: panel.chart,
        columns,
        rows,
    })
}

/// The Grafana dashboard (grafana-clickhouse-datasource) for the panels:
/// `dashboards/finance.json` is this, written by a test when it differs.
pub fn grafana_dashboard() -> serde_json::Value {
    let panels: Vec<serde_json::Value> = panels()
        .iter()
        .enumerate()
        .map(|(index, panel)| {
            let sql = fill(&panel.sql, "toUInt32($__fromTime)", "toUInt32($__toTime)", "$interval_s");
            let kind = match panel.chart {
                Chart::Bars if sql.contains(" AS time") => "timeseries",
                Chart::Bars | Chart::Hbars => "barchart",
                Chart::Stat => "stat",
            };
            let table = !sql.contains(" AS time");
            json!({
                "id": index + 1,
                "title": panel.title,
                "type": kind,
                "datasource": {"type": "grafana-clickhouse-datasource", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index / 2) * 8},
                "fieldConfig": {"defaults": {}, "overrides": []},
                "options": if kind == "barchart" { json!({"orientation": "horizontal", "xField": null}) } else { json!({}) },
                "targets": [{
                    "refId": "A",
                    "datasource": {"type": "grafana-clickhouse-datasource", "uid": "${datasource}"},
                    "editorType": "sql",
                    "format": if table { 1 } else { 0 },
                    "queryType": if table { "table" } else { "timeseries" },
                    "rawSql": sql,
                }],
            })
        })
        .collect();
    json!({
        "title": "idlemeter finance",
        "uid": "idlemeter-finance",
        "description": "Generated from dashboards/panels.toml by idlemeter (do not edit by hand).",
        "schemaVersion": 39,
        "tags": ["idlemeter", "finance"],
        "time": {"from": "now-30d", "to": "now"},
        "timezone": "utc",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "grafana-clickhouse-datasource", "label": "ClickHouse"},
            {"name": "interval_s", "type": "constant", "query": "1", "hide": 2,
             "description": "the collectors' sampling interval in seconds"},
        ]},
        "panels": panels,
    })
}

/// Short-lived links to the page: a browser cannot send a bearer key, so an
/// admin key asks for a link (`POST /v1/finance/link`) that works for
/// [`LINK_TTL`] on the replica that made it.
#[derive(Debug, Default)]
pub struct PageLinks {
    /// Token → (expiry, the admin key that made it).
    tokens: Mutex<HashMap<String, (Instant, String)>>,
}

pub const LINK_TTL: Duration = Duration::from_secs(15 * 60);

impl PageLinks {
    /// A new link token made by the admin key `key_id`: the page it opens
    /// works only while that key does, and counts against its limits.
    pub fn issue(&self, key_id: &str) -> String {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        let token = hex::encode(bytes);
        let mut tokens = self.tokens.lock().expect("not poisoned");
        let now = Instant::now();
        tokens.retain(|_, (expires, _)| *expires > now);
        tokens.insert(token.clone(), (now + LINK_TTL, key_id.to_owned()));
        token
    }

    /// The key that made `token`, while the token has not expired.
    pub fn key_of(&self, token: &str) -> Option<String> {
        let tokens = self.tokens.lock().expect("not poisoned");
        tokens
            .get(token)
            .filter(|(expires, _)| *expires > Instant::now())
            .map(|(_, key_id)| key_id.clone())
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A row's label: its first column, dates without their midnight time.
fn label(value: &str) -> String {
    value.strip_suffix(" 00:00:00").unwrap_or(value).to_owned()
}

fn number(value: &str) -> Option<f64> {
    value.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Display form of a cell: numbers rounded for reading (the table keeps them).
fn short(value: &str) -> String {
    match number(value) {
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) if v.abs() >= 0.01 => format!("{v:.2}"),
        Some(v) => {
            let text = format!("{v:.6}");
            text.trim_end_matches('0').to_owned()
        }
        None => label(value),
    }
}

const COLORS: [&str; 4] = ["#3b6fd8", "#e0892b", "#2f9e6a", "#b04a9a"];

fn bars_svg(data: &PanelData) -> String {
    // Numeric columns after the label column are the series.
    let series: Vec<usize> = (1..data.columns.len())
        .filter(|&c| {
            data.rows
                .iter()
                .all(|row| row.get(c).and_then(|v| number(v)).is_some())
        })
        .collect();
    let (width, height, left, bottom) = (640.0, 220.0, 56.0, 36.0);
    let max = data
        .rows
        .iter()
        .flat_map(|row| series.iter().filter_map(|&c| number(&row[c])))
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let groups = data.rows.len().max(1) as f64;
    let group_w = (width - left - 8.0) / groups;
    let bar_w = (group_w * 0.8 / series.len().max(1) as f64).max(1.0);
    let mut svg = format!(
        "<svg class=\"chart\" data-panel=\"{}\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" role=\"img\">",
        escape(&data.id)
    );
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{y}\" x2=\"{width}\" y2=\"{y}\" stroke=\"#999\"/>",
        y = height - bottom
    );
    let _ = write!(
        svg,
        "<text x=\"4\" y=\"14\" font-size=\"11\">{}</text>",
        short(&max.to_string())
    );
    for (g, row) in data.rows.iter().enumerate() {
        let x0 = left + g as f64 * group_w + group_w * 0.1;
        for (s, &column) in series.iter().enumerate() {
            let value = number(&row[column]).unwrap_or(0.0);
            let h = (value / max * (height - bottom - 20.0)).max(0.0);
            let _ = write!(
                svg,
                "<rect class=\"bar\" data-value=\"{}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {} {}</title></rect>",
                escape(&row[column]),
                x0 + s as f64 * bar_w,
                height - bottom - h,
                bar_w,
                h,
                COLORS[s % COLORS.len()],
                escape(&label(&row[0])),
                escape(&data.columns[column]),
                escape(&row[column])
            );
        }
        if groups <= 16.0 || g % (groups as usize / 8).max(1) == 0 {
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\">{}</text>",
                x0,
                height - bottom + 14.0,
                escape(&label(&row[0]))
            );
        }
    }
    for (s, &column) in series.iter().enumerate() {
        let _ = write!(
            svg,
            "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"11\">{}</text>",
            left + s as f64 * 150.0,
            height - 12.0,
            COLORS[s % COLORS.len()],
            left + s as f64 * 150.0 + 14.0,
            height - 3.0,
            escape(&data.columns[column])
        );
    }
    svg + "</svg>"
}

fn hbars_svg(data: &PanelData) -> String {
    let value_col = data.columns.len().saturating_sub(1);
    let row_h = 22.0;
    let (width, left) = (640.0, 150.0);
    let height = row_h * data.rows.len().max(1) as f64 + 8.0;
    let max = data
        .rows
        .iter()
        .filter_map(|row| number(&row[value_col]))
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let mut svg = format!(
        "<svg class=\"chart\" data-panel=\"{}\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" role=\"img\">",
        escape(&data.id)
    );
    for (i, row) in data.rows.iter().enumerate() {
        let value = number(&row[value_col]).unwrap_or(0.0);
        let w = (value / max * (width - left - 90.0)).max(0.0);
        let y = 4.0 + i as f64 * row_h;
        let _ = write!(
            svg,
            "<text x=\"4\" y=\"{:.1}\" font-size=\"12\">{}</text><rect class=\"bar\" data-value=\"{}\" x=\"{left}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text>",
            y + 14.0,
            escape(&label(&row[0])),
            escape(&row[value_col]),
            row_h - 6.0,
            COLORS[0],
            left + w + 6.0,
            y + 14.0,
            escape(&short(&row[value_col]))
        );
    }
    svg + "</svg>"
}

fn table(data: &PanelData) -> String {
    let mut html = String::from("<details><summary>numbers</summary><table><tr>");
    for column in &data.columns {
        let _ = write!(html, "<th>{}</th>", escape(column));
    }
    html += "</tr>";
    for row in &data.rows {
        html += "<tr>";
        for cell in row {
            let _ = write!(html, "<td>{}</td>", escape(cell));
        }
        html += "</tr>";
    }
    html + "</table></details>"
}

/// The built-in finance page for `[from, to)`.
pub fn page(panels: &[PanelData], from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>idlemeter finance</title><style>\
         body{{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}}\
         .grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(660px,1fr));gap:1rem}}\
         .panel{{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6rem .8rem}}\
         h2{{font-size:15px;margin:.2rem 0 .5rem}}.stat{{font-size:26px;font-weight:600;margin-right:1.5rem}}\
         .empty{{color:#999}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #eee;padding:1px 6px}}\
         </style></head><body><h1>idlemeter finance</h1><p>{} to {} (UTC). Revenue is what the online rater rated \
         (its hourly snapshots); invoices are issued invoices.</p><div class=\"grid\">",
        from.format("%Y-%m-%d %H:%M"),
        to.format("%Y-%m-%d %H:%M")
    );
    for data in panels {
        let _ = write!(
            html,
            "<section class=\"panel\" id=\"{}\"><h2>{}</h2>",
            escape(&data.id),
            escape(&data.title)
        );
        if data.rows.is_empty() {
            html += "<p class=\"empty\">no data in this range</p>";
        } else {
            match data.chart {
                Chart::Bars => html += &bars_svg(data),
                Chart::Hbars => html += &hbars_svg(data),
                Chart::Stat => {
                    for (column, value) in data.columns.iter().zip(&data.rows[0]) {
                        let _ = write!(
                            html,
                            "<span class=\"stat\" data-value=\"{}\">{}</span><small>{}</small><br>",
                            escape(value),
                            escape(&short(value)),
                            escape(column)
                        );
                    }
                }
            }
            html += &table(data);
        }
        html += "</section>";
    }
    html + "</div></body></html>"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_panel_parses_and_fills_every_placeholder() {
        let panels = panels();
        assert!(panels.len() >= 8);
        for panel in &panels {
            let sql = panel.sql_for(100, 200, 1);
            assert!(
                !sql.contains('{') && !sql.contains('?'),
                "{}: {sql}",
                panel.id
            );
            assert!(sql.to_uppercase().starts_with("SELECT"), "{}", panel.id);
        }
        let grafana = grafana_dashboard().to_string();
        assert!(grafana.contains("toUInt32($__fromTime)"));
        assert!(!grafana.contains("{from}"));
    }

    #[test]
    fn charts_draw_one_bar_per_value_and_say_when_empty() {
        let data = PanelData {
            id: "p".to_owned(),
            title: "P".to_owned(),
            chart: Chart::Bars,
            columns: vec!["time".to_owned(), "a".to_owned(), "b".to_owned()],
            rows: vec![
                vec![
                    "2026-10-01 00:00:00".to_owned(),
                    "1".to_owned(),
                    "2".to_owned(),
                ],
                vec![
                    "2026-10-02 00:00:00".to_owned(),
                    "3".to_owned(),
                    "4".to_owned(),
                ],
            ],
        };
        let svg = bars_svg(&data);
        assert_eq!(svg.matches("class=\"bar\"").count(), 4);
        assert!(svg.contains("2026-10-02"));
        let empty = PanelData {
            rows: Vec::new(),
            ..data
        };
        let html = page(&[empty], DateTime::default(), DateTime::default());
        assert!(html.contains("no data in this range"));
    }
}
