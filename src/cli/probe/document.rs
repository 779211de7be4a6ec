//! The probe's report: the document `--json` prints and the table rendered from it.

use super::*;

/// The report, as `--json` prints it (and the table shows).
#[derive(Debug, serde::Serialize)]
pub(super) struct Document {
    portal: String,
    connector: String,
    run_id: String,
    version: &'static str,
    started_at: String,
    finished_at: String,
    /// `ok` when every check held (or was skipped), `fail` otherwise.
    status: Status,
    /// Why checks were skipped, when the probe stopped before the end.
    stopped_early: Option<String>,
    findings: Vec<DocFinding>,
    daemon: DaemonView,
    pub(super) summary: Summary,
}

#[derive(Debug, serde::Serialize)]
struct DocFinding {
    check: &'static str,
    status: Status,
    observed: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<i64>,
    assumption: &'static str,
    source: &'static str,
    /// What the daemon does when this check fails: inform, adapt, refuse.
    on_fail: &'static str,
}

/// What the daemon will do with these findings at its next start.
#[derive(Debug, serde::Serialize)]
struct DaemonView {
    configured_batch_size: u32,
    effective_batch_size: u32,
    clear_by: &'static str,
    reserved_listing: &'static str,
    refuses: Option<String>,
}

#[derive(Debug, Default, serde::Serialize)]
pub(super) struct Summary {
    ok: usize,
    pub(super) fail: usize,
    skipped: usize,
}

impl Document {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        portal: &PortalConfig,
        connector: &str,
        run_id: &str,
        started_at: DateTime<Utc>,
        finished_at: DateTime<Utc>,
        findings: &[Finding],
        daemon: &PortalConformance,
        stopped: Option<&Stop>,
    ) -> Document {
        let mut summary = Summary::default();
        for f in findings {
            match f.status {
                Status::Ok => summary.ok += 1,
                Status::Fail => summary.fail += 1,
                Status::Skipped => summary.skipped += 1,
            }
        }
        let time = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
        Document {
            portal: portal.name.clone(),
            connector: connector.to_string(),
            run_id: run_id.to_string(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: time(started_at),
            finished_at: time(finished_at),
            status: if summary.fail > 0 {
                Status::Fail
            } else {
                Status::Ok
            },
            stopped_early: stopped.map(|s| match s {
                Stop::Interrupted => "interrupted".to_string(),
                Stop::Precondition => "a precondition failed".to_string(),
                Stop::Failed(why) => why.clone(),
            }),
            findings: findings
                .iter()
                .map(|f| DocFinding {
                    check: f.check.name(),
                    status: f.status,
                    observed: f.observed.clone(),
                    value: f.value,
                    assumption: f.check.assumption(),
                    source: f.check.source(),
                    on_fail: match f.check.on_fail() {
                        OnFail::Inform => "inform",
                        OnFail::Adapt => "adapt",
                        OnFail::Refuse => "refuse",
                    },
                })
                .collect(),
            daemon: DaemonView {
                configured_batch_size: portal.batch_size,
                effective_batch_size: daemon.batch_size(portal.batch_size),
                clear_by: match daemon.clear_by() {
                    ClearBy::MessageId => "message_id",
                    ClearBy::Id => "id",
                },
                reserved_listing: match daemon.reserved_listing() {
                    ReservedListing::Unknown => "unknown",
                    ReservedListing::Works => "works",
                    ReservedListing::Broken => "broken",
                },
                refuses: daemon.refusal().map(|r| r.message()),
            },
            summary,
        }
    }
}

/// The report as a person reads it: one line per check, what the daemon will do, a summary.
pub(super) fn render(doc: &Document) -> String {
    let width = doc
        .findings
        .iter()
        .map(|f| f.check.len())
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "conformance probe of portal {} (connector {}, b24eventd {})\n",
        doc.portal, doc.connector, doc.version
    );
    for f in &doc.findings {
        out.push_str(&format!(
            "  {:<7}  {:<width$}  {}\n",
            f.status_str(),
            f.check,
            f.observed
        ));
        if f.status == Status::Fail {
            let effect = match f.on_fail {
                "refuse" => "the daemon refuses to run this portal (exit 78)",
                "adapt" => "the daemon adapts (below)",
                _ => "the daemon does not depend on it",
            };
            out.push_str(&format!("  {:<7}  {:<width$}  {effect}\n", "", ""));
        }
    }
    let d = &doc.daemon;
    out.push_str("\nwhat `b24eventd run` does with these findings (stored in the journal):\n");
    match &d.refuses {
        Some(message) => out.push_str(&format!("  refuses this portal: {message}\n")),
        None => {
            out.push_str(&format!(
                "  batch_size {}{}\n",
                d.effective_batch_size,
                if d.effective_batch_size < d.configured_batch_size {
                    format!(
                        " (configured {}, capped at what one get returned)",
                        d.configured_batch_size
                    )
                } else {
                    " (as configured)".to_string()
                }
            ));
            out.push_str(&format!("  clears by {}\n", d.clear_by));
            out.push_str(&format!(
                "  orphan sweep's >PROCESS_ID listing: {}\n",
                d.reserved_listing
            ));
        }
    }
    if let Some(why) = &doc.stopped_early {
        out.push_str(&format!("\nstopped early: {why}\n"));
    }
    out.push_str(&format!(
        "\n{} ok, {} failed, {} skipped\n",
        doc.summary.ok, doc.summary.fail, doc.summary.skipped
    ));
    out
}

impl DocFinding {
    fn status_str(&self) -> &'static str {
        self.status.as_str()
    }
}
