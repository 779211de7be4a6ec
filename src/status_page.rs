//! The status page served at the admin endpoint's `/`: one self-contained HTML document (inline
//! CSS and SVG, no scripts, no external assets) rendered on the server from the journal's
//! [`StatusData`], reloading itself every few seconds.

use crate::journal::{HISTORY_MINUTES, StatusData};
use std::fmt::Write;

/// Seconds between the page's own reloads.
pub const REFRESH_SECONDS: u32 = 10;

/// Escapes text for HTML element content and attribute values (the scrubber's escaper, so a
/// secret is recognised in the form the page shows it).
fn esc(text: &str) -> String {
    crate::redact::html_escape(text)
}

/// A bar chart of per-minute counts as inline SVG, oldest minute on the left.
fn chart(values: &[u64], label: &str, class: &str) -> String {
    const W: usize = 240;
    const H: usize = 40;
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    let bar = W as f64 / values.len().max(1) as f64;
    let mut svg = format!(
        r#"<svg class="chart {class}" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{}"><title>{}</title>"#,
        esc(label),
        esc(label)
    );
    for (i, &v) in values.iter().enumerate() {
        if v == 0 {
            continue;
        }
        let h = (v as f64 / max as f64 * (H - 2) as f64).max(1.0);
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}"><title>{v}</title></rect>"#,
            i as f64 * bar,
            H as f64 - h,
            (bar - 1.0).max(1.0),
            h
        );
    }
    let _ = write!(svg, r#"<path d="M0 {}.5H{W}"/></svg>"#, H - 1);
    svg
}

/// The page.
pub fn render(data: &StatusData) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>b24eventd status</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; margin: 0 0 .2em; }} h2 {{ font-size: 1.1em; margin: 1.4em 0 .4em; }}
table {{ border-collapse: collapse; }} th, td {{ padding: .25em .8em .25em 0; text-align: left; vertical-align: middle; }}
th {{ font-weight: 600; border-bottom: 1px solid #ccc; }} td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.chart {{ background: #f1f4f8; }} .chart rect {{ fill: #3b7dd8; }} .chart.delivered rect {{ fill: #2e9d5b; }}
.chart path {{ stroke: #9aa5b1; stroke-width: 1; }}
.muted {{ color: #777; }} .bad {{ color: #b3261e; font-weight: 600; }} code {{ font-size: .95em; }}
</style></head><body>
<h1>b24eventd</h1>
<p class="muted">as of <span id="generated-at">{}</span> UTC; reloads every {REFRESH_SECONDS} s; charts: the last {HISTORY_MINUTES} minutes, one bar per minute</p>
"#,
        esc(&data.generated_at)
    );

    html.push_str("<h2>Portals</h2>\n<table id=\"portals\"><tr><th>portal</th><th>unsettled</th><th>to deliver</th><th>fetched (last hour)</th><th>fetched per minute</th><th>delivered per minute</th></tr>\n");
    for p in &data.portals {
        let fetched: u64 = p.fetched_per_minute.iter().sum();
        let _ = writeln!(
            html,
            r#"<tr data-portal="{portal}"><td>{portal}</td><td class="n unsettled">{}</td><td class="n pending">{}</td><td class="n fetched">{fetched}</td><td>{}</td><td>{}</td></tr>"#,
            p.unsettled,
            p.pending,
            chart(
                &p.fetched_per_minute,
                &format!("{} fetched per minute", p.portal),
                "fetched"
            ),
            chart(
                &p.delivered_per_minute,
                &format!("{} delivered per minute", p.portal),
                "delivered"
            ),
            portal = esc(&p.portal),
        );
    }
    html.push_str("</table>\n");

    html.push_str("<h2>Sinks</h2>\n<table id=\"sinks\"><tr><th>sink</th><th>delivered</th><th>retried</th><th>dead</th><th>waiting now</th></tr>\n");
    if data.sinks.is_empty() {
        html.push_str("<tr><td colspan=\"5\" class=\"muted\">no delivery attempts in the last hour</td></tr>\n");
    }
    for s in &data.sinks {
        let _ = writeln!(
            html,
            r#"<tr data-sink="{sink}"><td>{sink}</td><td class="n delivered">{}</td><td class="n retried">{}</td><td class="n dead{}">{}</td><td class="n pending">{}</td></tr>"#,
            s.delivered,
            s.retried,
            if s.dead > 0 { " bad" } else { "" },
            s.dead,
            s.pending,
            sink = esc(&s.sink),
        );
    }
    html.push_str("</table>\n<p class=\"muted\">attempts in the last hour by outcome</p>\n");

    html.push_str("<h2>Last dead events</h2>\n");
    if data.last_dead.is_empty() {
        html.push_str("<p id=\"dead-none\" class=\"muted\">none</p>\n");
    } else {
        html.push_str("<table id=\"dead\"><tr><th>at (UTC)</th><th>event</th><th>id</th><th>sink</th><th>error</th></tr>\n");
        for d in &data.last_dead {
            let _ = writeln!(
                html,
                r#"<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td class="bad">{}</td></tr>"#,
                esc(&d.at),
                esc(&d.event),
                esc(&d.id),
                esc(&d.sink),
                esc(d.error.as_deref().unwrap_or(""))
            );
        }
        html.push_str("</table>\n<p class=\"muted\"><code>b24eventd dead retry</code> after fixing the sink; <code>b24eventd journal show ID</code> for every attempt</p>\n");
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{DeadAttempt, PortalStatus, SinkStatus};

    #[test]
    fn the_page_is_self_contained_and_escapes_what_it_shows() {
        let mut fetched = vec![0; HISTORY_MINUTES];
        fetched[59] = 12;
        fetched[58] = 3;
        let data = StatusData {
            generated_at: "2026-11-23T10:00:00.000Z".into(),
            portals: vec![PortalStatus {
                portal: "main".into(),
                unsettled: 4,
                pending: 2,
                fetched_per_minute: fetched,
                delivered_per_minute: vec![0; HISTORY_MINUTES],
            }],
            sinks: vec![SinkStatus {
                sink: "erp".into(),
                delivered: 10,
                retried: 3,
                dead: 1,
                pending: 2,
            }],
            last_dead: vec![DeadAttempt {
                at: "2026-11-23T09:59:00.000Z".into(),
                id: "main:7".into(),
                portal: "main".into(),
                event: "ONCRMDEALADD".into(),
                sink: "erp".into(),
                error: Some("http 422: <b>bad</b> & worse".into()),
            }],
        };
        let html = render(&data);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains(r#"<meta http-equiv="refresh" content="10">"#));
        assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="));
        assert!(html.contains(r#"<td class="n fetched">15</td>"#), "{html}");
        assert!(html.contains(r#"<td class="n dead bad">1</td>"#));
        assert!(html.contains("http 422: &lt;b&gt;bad&lt;/b&gt; &amp; worse"));
        assert_eq!(
            html.matches("<rect ").count(),
            2,
            "one bar per non-empty minute"
        );
    }
}
