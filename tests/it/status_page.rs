//! The status page in a real headless Chromium: served by the running pipeline, loaded by the
//! browser, its numbers checked against the journal, and a screenshot saved to
//! `docs/status-page.png`.
//!
//! It needs Chromium, so it is ignored unless asked for (`--include-ignored`; `.ci/run`
//! does, after installing Debian's `chromium` if missing); asked for, a missing browser is a failure.

use crate::support::*;
use b24eventd_simulator::SimulatorConfig;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// Runs headless Chromium on `url` with `args`; returns stdout.
fn chromium(profile: &Path, url: &str, args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("the browser test was asked for, but `chromium` does not run: install Debian's chromium package");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the first `<td class="...{class}...">` in the row whose attribute is `row`.
fn cell(dom: &str, row: &str, class: &str) -> String {
    let start = dom
        .find(row)
        .unwrap_or_else(|| panic!("no row {row} in {dom}"));
    let rest = &dom[start..];
    let end = rest.find("</tr>").unwrap();
    let row = &rest[..end];
    let at = row
        .find(&format!("{class}\">"))
        .unwrap_or_else(|| panic!("no cell {class} in {row}"));
    let text = &row[at + class.len() + 2..];
    text[..text.find('<').unwrap()].to_string()
}

#[ignore = "needs chromium: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_journal_in_a_real_browser() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // Deal 3 is refused (422): one dead event for the page's list.
    let endpoint = Endpoint::start(Arc::new(|v| {
        if v["data"]["FIELDS"]["ID"] == "3" {
            422
        } else {
            200
        }
    }))
    .await;
    let sinks = format!("{}\n{}", file_sink(dir.path()), http_sink(&endpoint.url));
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("listen = \"\"", "listen = \"127.0.0.1:0\"");
    std::fs::write(&config, text).unwrap();
    let running = Running::start(&config, &tokens).await;
    let addr = running.admin.expect("the admin endpoint is on");
    emit_deals(&sim, 1, 40);
    let journal = running.journal.clone();
    wait_for("everything final", Duration::from_secs(30), || {
        let c = journal.counts_blocking().unwrap();
        upstream_empty(&sim) && c.pending == 0 && c.events >= 40
    })
    .await;

    let url = format!("http://{addr}/");
    let profile = dir.path().join("chromium");
    let dom = tokio::task::spawn_blocking({
        let (profile, url) = (profile.clone(), url.clone());
        move || chromium(&profile, &url, &["--dump-dom"])
    })
    .await
    .unwrap();
    let counts = running.journal.counts().await.unwrap();
    let stats = running
        .journal
        .stats(&b24eventd::journal::EventFilter::default())
        .unwrap();
    let erp = stats[0].sinks.iter().find(|s| s.sink == "erp").unwrap();

    assert!(dom.contains("<title>b24eventd status</title>"), "{dom}");
    assert_eq!(
        cell(&dom, "data-portal=\"main\"", "fetched"),
        counts.events.to_string()
    );
    assert_eq!(cell(&dom, "data-portal=\"main\"", "unsettled"), "0");
    assert_eq!(cell(&dom, "data-portal=\"main\"", "pending"), "0");
    assert_eq!(
        cell(&dom, "data-sink=\"erp\"", "delivered"),
        erp.delivered.to_string()
    );
    assert_eq!(
        cell(&dom, "data-sink=\"erp\"", "dead bad"),
        erp.dead.to_string()
    );
    assert!(erp.dead >= 1);
    assert!(dom.contains("http 422"), "the dead event's error is listed");
    assert!(
        dom.matches("<svg class=\"chart").count() >= 2,
        "charts are drawn"
    );

    let screenshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
    tokio::task::spawn_blocking({
        let screenshot = screenshot.clone();
        move || {
            chromium(
                &profile,
                &url,
                &[
                    &format!("--screenshot={}", screenshot.display()),
                    "--window-size=1100,700",
                ],
            )
        }
    })
    .await
    .unwrap();
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    running.stop().await;
}
