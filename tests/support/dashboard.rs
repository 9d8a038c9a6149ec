//! A preview of the chart's Grafana dashboard, drawn from a real Prometheus: every panel of
//! `charts/loopguard/dashboards/loopguard.json` at its grid position, its queries run as Grafana
//! would run them (instant for stat and table panels, a range for time series), as one HTML page
//! with inline SVG. There is no Grafana on these machines; this shows what the dashboard's queries
//! return, which is what the test checks, and it is what the README's picture is.

#![allow(dead_code)]

use super::prometheus::Prometheus;
use serde_json::Value;
use std::fmt::Write as _;

/// What one panel showed: its title and how many series (rows, for a table) its queries returned.
pub struct Panel {
    pub title: String,
    pub series: usize,
}

pub struct Preview {
    pub html: String,
    pub panels: Vec<Panel>,
}

const COLORS: [&str; 8] = [
    "#73bf69", "#f2495c", "#5794f2", "#ff9830", "#b877d9", "#fade2a", "#8ab8ff", "#96d98d",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `{{label}}` in a legend format, filled from a series' labels.
fn legend(format: &str, metric: &Value) -> String {
    let mut out = format.to_string();
    if let Some(labels) = metric.as_object() {
        for (k, v) in labels {
            out = out.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or_default());
        }
    }
    if out.is_empty() || out.contains("{{") {
        let labels: Vec<String> = metric
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| *k != "__name__")
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        out = labels.join(", ");
    }
    out
}

fn number(value: &Value) -> Option<f64> {
    value.as_str()?.parse().ok()
}

/// A value as Grafana shows it: `decimals` when the panel sets it, else as few as make sense.
fn format_value(v: f64, unit: &str, decimals: Option<usize>) -> String {
    let text = if v.is_nan() {
        "NaN".to_string()
    } else if let Some(d) = decimals {
        format!("{v:.d$}")
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    };
    if unit == "s" {
        format!("{text} s")
    } else {
        text
    }
}

/// Draws `dashboard` from `prometheus` over `[start, end]` (Unix seconds).
pub fn preview(dashboard: &Value, prometheus: &Prometheus, start: f64, end: f64) -> Preview {
    let mut html = String::new();
    let mut panels = Vec::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ background: #111217; color: #ccccdc; font: 13px system-ui, sans-serif; margin: 0; padding: 12px; }}
h1 {{ font-size: 17px; font-weight: 500; margin: 4px 4px 12px; }} .note {{ color: #8e8e9e; font-size: 12px; }}
.grid {{ display: grid; grid-template-columns: repeat(24, 1fr); grid-auto-rows: 30px; gap: 8px; }}
.panel {{ background: #181b1f; border: 1px solid #2c3235; border-radius: 3px; padding: 8px 10px; overflow: hidden; display: flex; flex-direction: column; }}
.panel h2 {{ font-size: 13px; font-weight: 500; margin: 0 0 6px; }}
.stat {{ flex: 1; display: flex; align-items: center; justify-content: center; font-size: 42px; font-weight: 600; border-radius: 3px; }}
table {{ border-collapse: collapse; width: 100%; font-size: 12px; }} th, td {{ text-align: left; padding: 3px 6px; border-bottom: 1px solid #2c3235; }}
th {{ color: #6e9fff; font-weight: 500; }} svg {{ flex: 1; width: 100%; }} .legend span {{ margin-right: 12px; white-space: nowrap; }}
.empty {{ color: #f2495c; }}
</style></head><body><h1>{title} <span class="note">preview drawn from a real Prometheus by tests/agent_e2e.rs; not Grafana</span></h1><div class="grid">
"#,
        title = escape(dashboard["title"].as_str().unwrap_or("dashboard"))
    );
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        let grid = &panel["gridPos"];
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or_default();
        let decimals = panel["fieldConfig"]["defaults"]["decimals"]
            .as_u64()
            .map(|d| d as usize);
        let targets: Vec<&Value> = panel["targets"].as_array().into_iter().flatten().collect();
        let _ = write!(
            html,
            r#"<div class="panel" data-title="{t}" style="grid-column: {x} / span {w}; grid-row: {y} / span {h};"><h2>{t}</h2>"#,
            t = escape(&title),
            x = grid["x"].as_u64().unwrap_or(0) + 1,
            y = grid["y"].as_u64().unwrap_or(0) + 1,
            w = grid["w"].as_u64().unwrap_or(6),
            h = grid["h"].as_u64().unwrap_or(4),
        );
        let series = match panel["type"].as_str() {
            Some("stat") => stat(&mut html, prometheus, &targets, unit, decimals),
            Some("table") => table(&mut html, prometheus, panel, &targets, unit, decimals),
            _ => timeseries(&mut html, prometheus, &targets, unit, start, end),
        };
        if series == 0 {
            html.push_str(r#"<div class="empty">no data</div>"#);
        }
        html.push_str("</div>\n");
        panels.push(Panel { title, series });
    }
    html.push_str("</div></body></html>\n");
    Preview { html, panels }
}

fn stat(
    html: &mut String,
    prometheus: &Prometheus,
    targets: &[&Value],
    unit: &str,
    decimals: Option<usize>,
) -> usize {
    let result = prometheus.query(targets[0]["expr"].as_str().unwrap_or_default());
    if let Some(v) = result.first().and_then(|s| number(&s["value"][1])) {
        let _ = write!(
            html,
            r#"<div class="stat" style="background: {}">{}</div>"#,
            if v > 0.0 { "#1f60c4" } else { "#37872d" },
            format_value(v, unit, decimals)
        );
    }
    result.len()
}

/// Instant queries, one column each, merged on the labels they share (Grafana's merge), their
/// columns named, hidden and renamed as the panel's organize transformation says.
fn table(
    html: &mut String,
    prometheus: &Prometheus,
    panel: &Value,
    targets: &[&Value],
    unit: &str,
    decimals: Option<usize>,
) -> usize {
    let results: Vec<Vec<Value>> = targets
        .iter()
        .map(|t| prometheus.query(t["expr"].as_str().unwrap_or_default()))
        .collect();
    let label_names = |series: &Value| -> Vec<String> {
        series["metric"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .filter(|k| k != "__name__")
            .collect()
    };
    let Some(first) = results.first().and_then(|r| r.first()) else {
        return 0;
    };
    let organize = panel["transformations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["id"] == "organize")
        .map(|t| t["options"].clone())
        .unwrap_or(Value::Null);
    let hidden = |name: &str| organize["excludeByName"][name] == true;
    let title = |name: &str| {
        organize["renameByName"][name]
            .as_str()
            .unwrap_or(name)
            .to_string()
    };
    let keys: Vec<String> = label_names(first)
        .into_iter()
        .filter(|k| !hidden(k))
        .collect();
    // Grafana names a single query's column "Value", several "Value #<refId>".
    let columns: Vec<(usize, String)> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let name = if targets.len() == 1 {
                "Value".to_string()
            } else {
                format!("Value #{}", t["refId"].as_str().unwrap_or_default())
            };
            (i, name)
        })
        .filter(|(_, name)| !hidden(name))
        .collect();
    let _ = write!(html, "<table><tr>");
    for k in &keys {
        let _ = write!(html, "<th>{}</th>", escape(&title(k)));
    }
    for (_, name) in &columns {
        let _ = write!(html, "<th>{}</th>", escape(&title(name)));
    }
    html.push_str("</tr>");
    let mut rows: Vec<&Value> = results[0].iter().collect();
    rows.sort_by_key(|row| {
        keys.iter()
            .map(|k| row["metric"][k].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    });
    for row in rows {
        let _ = write!(html, "<tr>");
        for k in &keys {
            let _ = write!(
                html,
                "<td>{}</td>",
                escape(row["metric"][k].as_str().unwrap_or_default())
            );
        }
        for (i, _) in &columns {
            // The series of this query whose shared labels equal the row's.
            let cell = results[*i].iter().find(|s| {
                label_names(s)
                    .iter()
                    .all(|k| !keys.contains(k) || s["metric"][k] == row["metric"][k])
            });
            let text = cell
                .and_then(|s| number(&s["value"][1]))
                .map(|v| format_value(v, unit, decimals))
                .unwrap_or_default();
            let _ = write!(html, "<td>{}</td>", escape(&text));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    results[0].len()
}

fn timeseries(
    html: &mut String,
    prometheus: &Prometheus,
    targets: &[&Value],
    unit: &str,
    start: f64,
    end: f64,
) -> usize {
    let step = ((end - start) / 200.0).max(1.0);
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for target in targets {
        let format = target["legendFormat"].as_str().unwrap_or_default();
        for series in prometheus.query_range(
            target["expr"].as_str().unwrap_or_default(),
            start,
            end,
            step,
        ) {
            let points: Vec<(f64, f64)> = series["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p[0].as_f64()?, number(&p[1])?)))
                .filter(|(_, v)| v.is_finite())
                .collect();
            lines.push((legend(format, &series["metric"]), points));
        }
    }
    let max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, v)| *v))
        .fold(0.0_f64, f64::max);
    let top = if max <= 0.0 {
        1.0
    } else if max >= 1.0 {
        (max * 1.1).ceil()
    } else {
        max * 1.1
    };
    let (w, h) = (1000.0, 260.0);
    let x = |t: f64| 40.0 + (t - start) / (end - start).max(1.0) * (w - 50.0);
    let y = |v: f64| 10.0 + (1.0 - v / top) * (h - 30.0);
    let _ = write!(
        html,
        r##"<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none"><line x1="40" y1="{b}" x2="{w}" y2="{b}" stroke="#2c3235"/><text x="0" y="16" fill="#8e8e9e" font-size="12">{top}</text><text x="0" y="{b}" fill="#8e8e9e" font-size="12">0</text>"##,
        b = y(0.0),
        top = escape(&format_value(top, unit, None)),
    );
    for (i, (_, points)) in lines.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = write!(
            html,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            COLORS[i % COLORS.len()],
            path.join(" ")
        );
    }
    html.push_str("</svg><div class=\"legend\">");
    for (i, (name, _)) in lines.iter().enumerate() {
        let _ = write!(
            html,
            r#"<span><b style="color: {}">&#9644;</b> {}</span>"#,
            COLORS[i % COLORS.len()],
            escape(name)
        );
    }
    html.push_str("</div>");
    lines.len()
}
