//! `doctor` and `validate --online`: a preflight of every portal (reachable, token, administrator
//! rights, clock skew, the application, the plan features the configured mode and connector
//! need, bindings against `events`, the upstream backlog) and of every sink (a healthcheck that
//! mimics a delivery without delivering). Each finding is ok, warn or fail with one line on how
//! to fix it; any fail makes the command exit 1.
//!
//! Doctor never forces a token refresh: the refresh token rotates on every use, and a running
//! daemon holds the current pair in memory. The client refreshes only a stored access token
//! that has expired (as the daemon would), and persists the new pair first.

use super::report;
use super::subscribe::ours;
use crate::bitrix::error::codes;
use crate::bitrix::{AppInfo, BitrixError, ErrorClass, EventHandler, FeatureValue, PortalClient};
use crate::config::{Config, Mode, PortalConfig, SinkConfig};
use crate::journal::{Journal, TokenStatus};
use crate::sinks::HealthLevel;
use chrono::{DateTime, FixedOffset, Utc};
use serde_json::json;
use std::time::{Duration, Instant};

/// Clock skew above this warns: journal and log times stop lining up with the portal's
/// `TIMESTAMP_X`, which makes an incident hard to reconstruct.
const CLOCK_WARN_SECS: f64 = 30.0;
/// Above this it fails: the host clock is plainly wrong. Receivers commonly reject requests
/// stamped more than 5 minutes off (the Standard Webhooks tolerance), and token expiry times
/// written by this host no longer mean what they say.
const CLOCK_FAIL_SECS: f64 = 300.0;
/// A refresh token lives 180 days from its issue; every refresh issues a new one.
const REFRESH_TOKEN_DAYS: i64 = 180;
/// A refresh token this old warns: nothing has renewed it for months (the daemon renews the
/// pair every hour while it runs).
const REFRESH_TOKEN_WARN_DAYS: i64 = 150;
/// The fetch-delete loss window, in the words the issue and the docs use.
const FETCH_DELETE_LOSS: &str = "a get response lost in transit loses that batch: the portal deleted the events when it answered";

/// How one check came out; the order is severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's result. `fix` is one line on what to do, present for warn and fail.
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct Finding {
    check: String,
    status: Status,
    detail: String,
    fix: Option<String>,
}

impl Finding {
    fn ok(check: &str, detail: impl Into<String>) -> Finding {
        Finding {
            check: check.to_string(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check: check.to_string(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            check: check.to_string(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct PortalReport {
    portal: String,
    checks: Vec<Finding>,
}

#[derive(Debug, serde::Serialize)]
struct SinkReport {
    sink: String,
    #[serde(rename = "type")]
    kind: String,
    checks: Vec<Finding>,
}

#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    ok: usize,
    warn: usize,
    fail: usize,
}

/// The whole report, as `--json` prints it.
#[derive(Debug, serde::Serialize)]
pub(super) struct Report {
    /// The config file checked.
    config: String,
    /// The worst status of all checks.
    status: Status,
    portals: Vec<PortalReport>,
    sinks: Vec<SinkReport>,
    summary: Summary,
}

/// Runs every check and prints the report (a table, or JSON); fails when any check failed.
/// `command` names the command in that failure (`doctor`, `validate --online`).
pub(super) async fn run(config: &Config, json: bool, command: &str) -> anyhow::Result<()> {
    let report = examine(config).await?;
    if json {
        report::print_json(&report)?;
    } else {
        out!("{}", render(&report))?;
    }
    match report.summary.fail {
        0 => Ok(()),
        n => Err(anyhow::anyhow!(
            "{command}: {n} check{} failed",
            if n == 1 { "" } else { "s" }
        )),
    }
}

async fn examine(config: &Config) -> anyhow::Result<Report> {
    // Looking must not create a journal: without one there are no tokens to check.
    let journal = Journal::open_existing(&config.journal).await?;
    let mut portals = Vec::new();
    for portal in config.portals.values() {
        portals.push(PortalReport {
            portal: portal.name.clone(),
            checks: check_portal(portal, journal.as_ref(), &config.journal.location()).await?,
        });
    }
    let mut sinks = Vec::new();
    for sink in config.sinks.values() {
        sinks.push(SinkReport {
            sink: sink.name.clone(),
            kind: sink.kind.type_name().to_string(),
            checks: vec![check_sink(sink).await],
        });
    }
    let mut summary = Summary::default();
    let all = portals
        .iter()
        .flat_map(|p| &p.checks)
        .chain(sinks.iter().flat_map(|s| &s.checks));
    let mut status = Status::Ok;
    for finding in all {
        status = status.max(finding.status);
        match finding.status {
            Status::Ok => summary.ok += 1,
            Status::Warn => summary.warn += 1,
            Status::Fail => summary.fail += 1,
        }
    }
    Ok(Report {
        config: config.source.display().to_string(),
        status,
        portals,
        sinks,
        summary,
    })
}

async fn check_portal(
    portal: &PortalConfig,
    journal: Option<&Journal>,
    journal_location: &str,
) -> anyhow::Result<Vec<Finding>> {
    let name = &portal.name;
    let mut out = Vec::new();
    let stored = match journal {
        Some(journal) => journal
            .token_status(name)
            .await?
            .map(|status| (journal, status)),
        None => None,
    };
    let Some((journal, status)) = stored else {
        out.push(Finding::fail(
            "token",
            format!(
                "no OAuth tokens are stored for this portal in the journal {journal_location}, so nothing else could be checked"
            ),
            format!(
                "run `b24eventd auth login --portal {name}` (or `b24eventd auth import`) with this \
                 config; for the packaged service, `b24eventd-as-service auth login --portal {name}`"
            ),
        ));
        return Ok(out);
    };
    let client = crate::pipeline::operator_client(portal, journal).await?;

    // The first call proves reachability and the token (refreshed here if it had expired) and
    // answers the administrator question.
    let refreshes_before = client.stats().token_refreshes;
    let started = Instant::now();
    let first = client.user_admin().await;
    let refreshed = client.stats().token_refreshes > refreshes_before;
    let admin = match first {
        Ok(admin) => admin,
        Err(e) if is_token_error(&e) => {
            out.push(Finding::fail(
                "token",
                e.failure(),
                e.hint().unwrap_or_else(|| {
                    format!("authorize again: `b24eventd auth login --portal {name}`")
                }),
            ));
            return Ok(out);
        }
        Err(e) if e.class == ErrorClass::Retryable => {
            out.push(Finding::fail(
                "reachable",
                e.failure(),
                format!(
                    "check client_endpoint ({}), DNS, proxy and firewall between this host and the \
                     portal; a 5xx or limit answer is usually transient: run doctor again",
                    portal.client_endpoint
                ),
            ));
            out.push(token_finding(name, &status, Utc::now(), false));
            return Ok(out);
        }
        Err(e) => {
            out.push(call_failure("access", &e));
            return Ok(out);
        }
    };
    out.push(Finding::ok(
        "reachable",
        format!(
            "{} answered user.admin in {} ms",
            client.client_endpoint(),
            started.elapsed().as_millis()
        ),
    ));
    out.push(token_finding(name, &status, Utc::now(), refreshed));
    out.push(admin_finding(name, admin));

    let sent = Utc::now();
    match client.server_time().await {
        Ok(server) => {
            let received = Utc::now();
            let local = sent + (received - sent) / 2;
            let skew = (server.with_timezone(&Utc) - local).num_milliseconds() as f64 / 1000.0;
            out.push(clock_finding(skew, server));
        }
        Err(e) => out.push(call_failure("clock", &e)),
    }
    match client.app_info().await {
        Ok(info) => out.push(app_finding(&info)),
        Err(e) => out.push(call_failure("application", &e)),
    }
    match client.feature_get("rest_offline_extended").await {
        Ok(value) => out.push(offline_extended_finding(portal, &value)),
        Err(e) => out.push(call_failure("rest_offline_extended", &e)),
    }
    let mut connector_usable = true;
    if let Some(connector) = &portal.auth_connector {
        match client.feature_get("rest_auth_connector").await {
            Ok(value) => {
                let finding = connector_finding(name, connector, &value);
                connector_usable = finding.status != Status::Fail;
                out.push(finding);
            }
            Err(e) => out.push(call_failure("rest_auth_connector", &e)),
        }
    }
    if !admin || !connector_usable {
        // Every event.* call would fail the same way; the failing finding says so.
        return Ok(out);
    }
    match client.event_get().await {
        Ok(handlers) => out.push(bindings_finding(portal, &handlers)),
        Err(e) => out.push(call_failure("bindings", &e)),
    }
    out.push(backlog(&client, portal, journal).await?);
    Ok(out)
}

/// Errors that mean the stored tokens cannot be used (as opposed to the portal being away).
fn is_token_error(e: &BitrixError) -> bool {
    e.class == ErrorClass::Auth
        || [
            "invalid_grant",
            "invalid_client",
            codes::NO_TOKENS,
            codes::JOURNAL_WRITE_FAILED,
        ]
        .iter()
        .any(|code| e.is_code(code))
}

/// A check whose call failed: the failure, and the error's own hint as the fix.
fn call_failure(check: &str, e: &BitrixError) -> Finding {
    let fix = e.hint().unwrap_or_else(|| match e.class {
        ErrorClass::Retryable => {
            "a transient error (network, portal load or limits): run doctor again".to_string()
        }
        _ => "the portal refused the call: fix what the error names, then run doctor again"
            .to_string(),
    });
    Finding::fail(check, e.failure(), fix)
}

fn token_finding(
    portal: &str,
    status: &TokenStatus,
    now: DateTime<Utc>,
    refreshed: bool,
) -> Finding {
    let login = format!("authorize again: `b24eventd auth login --portal {portal}`");
    if !status.has_refresh_token {
        return Finding::fail(
            "token",
            "only an access token is stored: it lasts an hour and nothing can renew it",
            login,
        );
    }
    let access = if refreshed {
        "the stored access token had expired; refreshing it worked and the new pair is stored"
            .to_string()
    } else {
        match status.expires_at {
            Some(at) if at > now => format!(
                "access token valid until {} ({} min left)",
                report::time(at),
                (at - now).num_minutes()
            ),
            Some(at) => format!(
                "access token expired at {} and is renewed on the next call",
                report::time(at)
            ),
            None => "access token expiry unknown".to_string(),
        }
    };
    let age = status.updated_at.map(|at| (now - at).num_days());
    let renewed = status
        .updated_at
        .map(|at| crate::age::ago_at(at, now))
        .unwrap_or_default();
    match age {
        Some(days) if !refreshed && days >= REFRESH_TOKEN_DAYS => Finding::fail(
            "token",
            format!(
                "{access}; the refresh token was last renewed {renewed} and refresh tokens expire after {REFRESH_TOKEN_DAYS} days"
            ),
            login,
        ),
        Some(days) if !refreshed && days >= REFRESH_TOKEN_WARN_DAYS => Finding::warn(
            "token",
            format!(
                "{access}; the refresh token was last renewed {renewed} and expires {REFRESH_TOKEN_DAYS} days after that"
            ),
            format!(
                "start the daemon (it renews the pair every hour while it runs), or `b24eventd auth login --portal {portal}`"
            ),
        ),
        Some(days) if !refreshed => Finding::ok(
            "token",
            format!(
                "{access}; refresh token last renewed {}",
                match days {
                    0 => "today".to_string(),
                    _ => renewed,
                }
            ),
        ),
        _ => Finding::ok("token", access),
    }
}

fn admin_finding(portal: &str, admin: bool) -> Finding {
    if admin {
        Finding::ok("admin", "the token's user is a portal administrator")
    } else {
        Finding::fail(
            "admin",
            "the token's user is not a portal administrator: event.offline.* and offline \
             event.bind refuse it (bindings and backlog were not checked)",
            format!(
                "run `b24eventd auth login --portal {portal}` while logged in to the portal as an administrator"
            ),
        )
    }
}

/// `skew` is the portal's clock minus this host's, in seconds.
fn clock_finding(skew: f64, server: DateTime<FixedOffset>) -> Finding {
    let off = skew.abs();
    let direction = if skew > 0.0 { "behind" } else { "ahead of" };
    let detail = format!(
        "this host's clock is {off:.1} s {direction} the portal's (server.time {})",
        server.to_rfc3339()
    );
    let fix = "synchronise this host's clock (NTP: systemd-timesyncd, chrony)";
    if off > CLOCK_FAIL_SECS {
        Finding::fail("clock", detail, fix)
    } else if off > CLOCK_WARN_SECS {
        Finding::warn("clock", detail, fix)
    } else {
        Finding::ok(
            "clock",
            format!(
                "this host's clock is within {off:.1} s of the portal's (server.time counts whole seconds)"
            ),
        )
    }
}

fn app_finding(info: &AppInfo) -> Finding {
    let kind = match info.status.as_str() {
        "F" => "free",
        "D" => "demo",
        "T" => "trial",
        "P" => "paid",
        "L" => "local",
        other => other,
    };
    let plan = if info.license.is_empty() {
        String::new()
    } else {
        format!(", plan {}", info.license)
    };
    if !info.installed {
        return Finding::fail(
            "application",
            format!(
                "application {} is not installed (INSTALLED = false): Bitrix24 delivers no events to it",
                info.code
            ),
            "finish the installation: open the application in Bitrix24 as an administrator",
        );
    }
    if info.payment_expired {
        return Finding::fail(
            "application",
            format!(
                "application {}: its {kind} period has expired (PAYMENT_EXPIRED = Y)",
                info.code
            ),
            "renew the application's subscription in Bitrix24",
        );
    }
    match info.days {
        Some(days) if days <= 7 && matches!(info.status.as_str(), "D" | "T" | "P") => {
            Finding::warn(
                "application",
                format!(
                    "application {} ({kind}{plan}): its period ends in {days} days",
                    info.code
                ),
                "renew the application's subscription in Bitrix24 before it ends",
            )
        }
        _ => Finding::ok(
            "application",
            format!("application {} installed ({kind}{plan})", info.code),
        ),
    }
}

/// `rest_offline_extended` against the configured mode.
fn offline_extended_finding(portal: &PortalConfig, value: &FeatureValue) -> Finding {
    const CHECK: &str = "rest_offline_extended";
    let name = &portal.name;
    let available = match value {
        FeatureValue::Enabled => "the plan has it".to_string(),
        FeatureValue::SelfHosted(v) => {
            format!("on-premise portal ({v}): plan features do not apply")
        }
        FeatureValue::Disabled => String::new(),
    };
    match (portal.mode, value) {
        (Mode::Reserve, FeatureValue::Disabled) => Finding::fail(
            CHECK,
            "the plan lacks rest_offline_extended: reserve mode (event.offline.get with clear=0) \
             is refused with WRONG_LICENSE, so the daemon cannot fetch",
            format!(
                "set mode = \"fetch-delete\" in [portals.{name}] (clear=1; {FETCH_DELETE_LOSS}), or move the portal to a plan with rest_offline_extended"
            ),
        ),
        (Mode::Reserve, _) => Finding::ok(
            CHECK,
            format!(
                "{available}: reserve mode works (events are settled with clear/error after delivery)"
            ),
        ),
        (Mode::FetchDelete, FeatureValue::Disabled) => Finding::warn(
            CHECK,
            format!(
                "mode = \"fetch-delete\" on a plan without rest_offline_extended: {FETCH_DELETE_LOSS}"
            ),
            format!(
                "move the portal to a plan with rest_offline_extended and set mode = \"reserve\" in [portals.{name}]"
            ),
        ),
        (Mode::FetchDelete, _) => Finding::warn(
            CHECK,
            format!("mode = \"fetch-delete\" although {available}: {FETCH_DELETE_LOSS}"),
            format!("set mode = \"reserve\" in [portals.{name}]: nothing is lost in transit then"),
        ),
    }
}

fn connector_finding(portal: &str, connector: &str, value: &FeatureValue) -> Finding {
    const CHECK: &str = "rest_auth_connector";
    match value {
        FeatureValue::Disabled => Finding::fail(
            CHECK,
            format!(
                "the plan lacks rest_auth_connector: every call with auth_connector \"{connector}\" \
                 is refused with WRONG_LICENSE (bindings and backlog were not checked)"
            ),
            format!(
                "remove auth_connector from [portals.{portal}], or move the portal to a plan with rest_auth_connector (Professional and above)"
            ),
        ),
        FeatureValue::Enabled | FeatureValue::SelfHosted(_) => Finding::ok(
            CHECK,
            format!(
                "auth_connector \"{connector}\" is available: the application's own writes with it \
                 do not come back as events"
            ),
        ),
    }
}

fn bindings_finding(portal: &PortalConfig, handlers: &[EventHandler]) -> Finding {
    const CHECK: &str = "bindings";
    let name = &portal.name;
    let connector = portal.auth_connector.as_deref().unwrap_or("");
    let bound = ours(handlers, connector);
    let whose = if connector.is_empty() {
        "without a connector".to_string()
    } else {
        format!("for connector \"{connector}\"")
    };
    let missing: Vec<&str> = portal
        .events
        .iter()
        .filter(|e| !bound.contains(&e.to_uppercase()))
        .map(String::as_str)
        .collect();
    let extra: Vec<&str> = bound
        .iter()
        .filter(|b| !portal.events.iter().any(|e| e.eq_ignore_ascii_case(b)))
        .map(String::as_str)
        .collect();
    let others = handlers
        .iter()
        .filter(|h| h.offline && h.connector_id != connector)
        .count();
    let others = match others {
        0 => String::new(),
        n => format!(
            " ({n} offline binding{} of other connectors left aside)",
            if n == 1 { "" } else { "s" }
        ),
    };
    let total = portal.events.len();
    if !missing.is_empty() {
        return Finding::fail(
            CHECK,
            format!(
                "{} of {total} events have no offline binding {whose}: {}; their changes never reach the queue{others}",
                missing.len(),
                missing.join(", ")
            ),
            format!("run `b24eventd subscribe --portal {name}`"),
        );
    }
    if !extra.is_empty() {
        return Finding::warn(
            CHECK,
            format!(
                "all {total} events are bound {whose}; also bound but not in events: {} (fetched and settled like the others){others}",
                extra.join(", ")
            ),
            format!(
                "`b24eventd subscribe --portal {name} --prune` removes them, or add them to events"
            ),
        );
    }
    Finding::ok(
        CHECK,
        format!("all {total} events have an offline binding {whose}{others}"),
    )
}

/// The upstream queue: what waits, what is reserved, what sits in the error lane.
async fn backlog(
    client: &PortalClient,
    portal: &PortalConfig,
    journal: &Journal,
) -> anyhow::Result<Finding> {
    const CHECK: &str = "backlog";
    let waiting = match client
        .offline_list(json!({"=PROCESS_ID": "", "=ERROR": 0}), 0)
        .await
    {
        Ok(page) => page,
        Err(e) => return Ok(call_failure(CHECK, &e)),
    };
    let reserved = match client.offline_list(json!({">PROCESS_ID": ""}), 0).await {
        Ok(page) => page.total,
        Err(e) => return Ok(call_failure(CHECK, &e)),
    };
    let error_lane = match client.offline_list(json!({"=ERROR": 1}), 0).await {
        Ok(page) => page.total,
        Err(e) => return Ok(call_failure(CHECK, &e)),
    };
    let oldest = waiting.items.first().map(|e| e.event.timestamp.clone());
    let unsettled = journal.unsettled_count(&portal.name).await?;
    Ok(backlog_finding(
        waiting.total,
        oldest.as_deref(),
        reserved,
        error_lane,
        unsettled,
    ))
}

fn backlog_finding(
    waiting: u64,
    oldest: Option<&str>,
    reserved: u64,
    error_lane: u64,
    unsettled: u64,
) -> Finding {
    const CHECK: &str = "backlog";
    let oldest = match oldest {
        Some(t) if waiting > 0 && !t.is_empty() => format!(" (oldest changed {t})"),
        _ => String::new(),
    };
    let detail = format!(
        "{waiting} waiting{oldest}, {reserved} reserved, {error_lane} in the error lane upstream; {unsettled} unsettled in the journal"
    );
    if reserved > unsettled {
        return Finding::warn(
            CHECK,
            format!(
                "{detail}: {} reservations the journal does not know (a response lost in transit, \
                 a crash, or another worker on the same application and connector)",
                reserved - unsettled
            ),
            "keep the daemon running: its orphan sweep (at start and on orphan_sweep_schedule) \
             adopts them; make sure no other program reads this application's queue",
        );
    }
    Finding::ok(CHECK, detail)
}

async fn check_sink(sink: &SinkConfig) -> Finding {
    let built = match crate::sinks::build(sink) {
        Ok(built) => built,
        Err(e) => {
            return Finding::fail(
                "build",
                format!("{e:#}"),
                format!(
                    "fix [sinks.{}] in the config, or create what the error names",
                    sink.name
                ),
            );
        }
    };
    let limit = sink.timeout + Duration::from_secs(5);
    match tokio::time::timeout(limit, built.health()).await {
        Ok(health) => {
            let status = match health.level {
                HealthLevel::Ok => Status::Ok,
                HealthLevel::Warn => Status::Warn,
                HealthLevel::Fail => Status::Fail,
            };
            let fix = match (status, health.fix) {
                (Status::Ok, _) => None,
                (_, Some(fix)) => Some(fix),
                (_, None) => Some("see the detail".to_string()),
            };
            Finding {
                check: "healthcheck".to_string(),
                status,
                detail: health.detail,
                fix,
            }
        }
        Err(_) => Finding::fail(
            "healthcheck",
            format!(
                "the healthcheck did not finish within {}",
                humantime::format_duration(limit)
            ),
            "check the sink's destination: a delivery would time out too",
        ),
    }
}

/// The report as a human reads it: one block per portal and sink, one line per check, the fix
/// under a warn or fail, a summary at the end.
fn render(report: &Report) -> String {
    let width = report
        .portals
        .iter()
        .flat_map(|p| &p.checks)
        .chain(report.sinks.iter().flat_map(|s| &s.checks))
        .map(|f| f.check.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let mut block = |title: String, checks: &[Finding]| {
        out.push_str(&title);
        out.push('\n');
        for f in checks {
            out.push_str(&format!(
                "  {:<4}  {:<width$}  {}\n",
                f.status.as_str(),
                f.check,
                f.detail
            ));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("  {:<4}  {:<width$}  fix: {fix}\n", "", ""));
            }
        }
    };
    for p in &report.portals {
        block(format!("portal {}", p.portal), &p.checks);
    }
    for s in &report.sinks {
        block(format!("sink {} ({})", s.sink, s.kind), &s.checks);
    }
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    out.push_str(&format!(
        "\n{} ok, {}, {}\n",
        report.summary.ok,
        plural(report.summary.warn, "warning"),
        plural(report.summary.fail, "failure")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn portal(mode: Mode, connector: Option<&str>, events: &[&str]) -> PortalConfig {
        let text = format!(
            "[portals.main]\nclient_endpoint = \"https://example.bitrix24.com/rest/\"\n\
             client_id = \"local.1\"\nclient_secret = \"s\"\nmode = \"{}\"\n{}events = [{}]\n\
             [sinks.a]\ntype = \"file\"\npath = \"/tmp/x.jsonl\"\n",
            mode.as_str(),
            connector
                .map(|c| format!("auth_connector = \"{c}\"\n"))
                .unwrap_or_default(),
            events
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let config = crate::config::load_with_env(&path, &[]).unwrap();
        config.portals["main"].clone()
    }

    fn handler(event: &str, connector: &str) -> EventHandler {
        EventHandler {
            event: event.into(),
            offline: true,
            handler: String::new(),
            connector_id: connector.into(),
        }
    }

    #[test]
    fn reserve_mode_without_the_feature_fails_and_names_fetch_delete() {
        let p = portal(Mode::Reserve, None, &["ONCRMDEALADD"]);
        let f = offline_extended_finding(&p, &FeatureValue::Disabled);
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.fix
                .as_deref()
                .unwrap()
                .contains("mode = \"fetch-delete\""),
            "{f:?}"
        );
        let f = offline_extended_finding(&p, &FeatureValue::Enabled);
        assert_eq!(f.status, Status::Ok);
        let f = offline_extended_finding(&p, &FeatureValue::SelfHosted("en_selfhosted".into()));
        assert_eq!(f.status, Status::Ok);
        assert!(f.detail.contains("on-premise"), "{f:?}");
    }

    #[test]
    fn fetch_delete_mode_warns_about_its_loss_window() {
        let p = portal(Mode::FetchDelete, None, &["ONCRMDEALADD"]);
        for value in [FeatureValue::Disabled, FeatureValue::Enabled] {
            let f = offline_extended_finding(&p, &value);
            assert_eq!(f.status, Status::Warn, "{f:?}");
            assert!(f.detail.contains(FETCH_DELETE_LOSS), "{f:?}");
        }
        let f = offline_extended_finding(&p, &FeatureValue::Enabled);
        assert!(f.fix.unwrap().contains("mode = \"reserve\""));
    }

    #[test]
    fn connector_feature() {
        let f = connector_finding("main", "erp", &FeatureValue::Disabled);
        assert_eq!(f.status, Status::Fail);
        assert!(f.fix.unwrap().contains("remove auth_connector"));
        assert_eq!(
            connector_finding("main", "erp", &FeatureValue::Enabled).status,
            Status::Ok
        );
    }

    #[test]
    fn clock_thresholds() {
        let server = DateTime::parse_from_rfc3339("2026-11-23T13:00:00+03:00").unwrap();
        assert_eq!(clock_finding(0.4, server).status, Status::Ok);
        assert_eq!(clock_finding(-30.0, server).status, Status::Ok);
        let f = clock_finding(45.0, server);
        assert_eq!(f.status, Status::Warn);
        assert!(f.detail.contains("45.0 s behind"), "{f:?}");
        let f = clock_finding(-301.0, server);
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains("ahead of"), "{f:?}");
        assert!(f.fix.unwrap().contains("NTP"));
    }

    #[test]
    fn bindings_missing_extra_and_foreign() {
        let p = portal(
            Mode::Reserve,
            Some("erp"),
            &["ONCRMDEALADD", "ONCRMDEALUPDATE"],
        );
        let f = bindings_finding(
            &p,
            &[
                handler("ONCRMDEALADD", "erp"),
                handler("ONCRMDEALUPDATE", ""),
            ],
        );
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.detail.contains("1 of 2") && f.detail.contains("ONCRMDEALUPDATE"),
            "{f:?}"
        );
        assert!(
            f.detail.contains("1 offline binding of other connectors"),
            "{f:?}"
        );
        assert!(f.fix.unwrap().contains("subscribe --portal main"));
        let f = bindings_finding(
            &p,
            &[
                handler("ONCRMDEALADD", "erp"),
                handler("ONCRMDEALUPDATE", "erp"),
                handler("ONTASKADD", "erp"),
            ],
        );
        assert_eq!(f.status, Status::Warn);
        assert!(f.detail.contains("ONTASKADD"), "{f:?}");
        assert!(f.fix.unwrap().contains("--prune"));
        let f = bindings_finding(
            &p,
            &[
                handler("ONCRMDEALADD", "erp"),
                handler("ONCRMDEALUPDATE", "erp"),
            ],
        );
        assert_eq!(f.status, Status::Ok, "{f:?}");
    }

    #[test]
    fn token_ages() {
        let now = Utc::now();
        let status = |age_days: i64, expires_in_min: i64, refresh: bool| TokenStatus {
            expires_at: Some(now + chrono::Duration::minutes(expires_in_min)),
            updated_at: Some(now - chrono::Duration::days(age_days)),
            member_id: None,
            scope: None,
            user_id: None,
            client_endpoint: None,
            has_refresh_token: refresh,
        };
        let f = token_finding("main", &status(0, 42, true), now, false);
        assert_eq!(f.status, Status::Ok);
        assert!(f.detail.contains("min left"), "{f:?}");
        assert_eq!(
            token_finding("main", &status(160, 42, true), now, false).status,
            Status::Warn
        );
        assert_eq!(
            token_finding("main", &status(181, -5, true), now, false).status,
            Status::Fail
        );
        let f = token_finding("main", &status(181, -5, true), now, true);
        assert_eq!(f.status, Status::Ok, "a refresh that just worked wins");
        assert!(f.detail.contains("refreshing it worked"));
        let f = token_finding("main", &status(0, 42, false), now, false);
        assert_eq!(f.status, Status::Fail);
        assert!(f.fix.unwrap().contains("auth login --portal main"));
    }

    #[test]
    fn application_state() {
        let app = |installed: bool, expired: bool, status: &str, days: Option<i64>| AppInfo {
            code: "local.1".into(),
            status: status.into(),
            installed,
            payment_expired: expired,
            days,
            license: "en_pro100".into(),
        };
        let f = app_finding(&app(true, false, "L", None));
        assert_eq!(f.status, Status::Ok);
        assert!(
            f.detail.contains("local") && f.detail.contains("en_pro100"),
            "{f:?}"
        );
        assert_eq!(
            app_finding(&app(false, false, "L", None)).status,
            Status::Fail
        );
        assert_eq!(
            app_finding(&app(true, true, "P", Some(-2))).status,
            Status::Fail
        );
        assert_eq!(
            app_finding(&app(true, false, "T", Some(3))).status,
            Status::Warn
        );
    }

    #[test]
    fn backlog_warns_about_reservations_the_journal_does_not_know() {
        let f = backlog_finding(12, Some("2026-11-23T13:00:00+03:00"), 0, 2, 0);
        assert_eq!(f.status, Status::Ok);
        assert!(
            f.detail
                .contains("12 waiting (oldest changed 2026-11-23T13:00:00+03:00)"),
            "{f:?}"
        );
        assert!(f.detail.contains("2 in the error lane"), "{f:?}");
        let f = backlog_finding(0, None, 50, 0, 20);
        assert_eq!(f.status, Status::Warn);
        assert!(f.detail.contains("30 reservations"), "{f:?}");
        assert_eq!(backlog_finding(0, None, 20, 0, 50).status, Status::Ok);
    }

    #[test]
    fn rendering_puts_fixes_under_their_checks() {
        let report = Report {
            config: "c.toml".into(),
            status: Status::Fail,
            portals: vec![PortalReport {
                portal: "main".into(),
                checks: vec![
                    Finding::ok("token", "fine"),
                    Finding::fail("bindings", "missing", "run subscribe"),
                ],
            }],
            sinks: vec![SinkReport {
                sink: "archive".into(),
                kind: "file".into(),
                checks: vec![Finding::warn("healthcheck", "slow", "look")],
            }],
            summary: Summary {
                ok: 1,
                warn: 1,
                fail: 1,
            },
        };
        let text = render(&report);
        assert_eq!(
            text,
            "portal main\n\
             \x20 ok    token        fine\n\
             \x20 fail  bindings     missing\n\
             \x20                    fix: run subscribe\n\
             sink archive (file)\n\
             \x20 warn  healthcheck  slow\n\
             \x20                    fix: look\n\
             \n1 ok, 1 warning, 1 failure\n"
        );
    }
}
