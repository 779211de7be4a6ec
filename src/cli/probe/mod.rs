//! `doctor --conformance --portal P`: the live conformance probe. On the operator's real portal
//! it checks every upstream assumption the daemon rests on (`crate::conformance::Check`), under
//! a connector of its own (`b24eventd-probe-<8 hex>`) so that it never touches the daemon's
//! queue, prints what holds and what does not, stores the findings in the journal for the
//! daemon to act on at start, and always cleans up after itself.
//!
//! How it makes rows without touching CRM data: it binds `ONAPPTEST` offline under its own
//! connector and calls `event.test` *without* `auth_connector`. `Event::eventTest`
//! (avshatalov48/bitrix-core-business modules/rest/lib/api/event.php) fires `OnRestAppTest`;
//! `CRestProvider::OnAppEvent` (modules/rest/classes/general/rest_provider.php) hands it only
//! to the calling application's handlers; `ProviderOffline::finalize`
//! (modules/rest/lib/event/provideroffline.php) writes no row for the handler whose
//! `CONNECTOR_ID` equals the request's `auth_connector` (''), so the rows land under the
//! probe's connector only, with `EVENT_DATA` `{"QUERY": {...}, "LANGUAGE_ID": "en"}`.

mod checks;
mod document;

use super::report;
use crate::bitrix::client::{ClearTarget, GetRequest};
use crate::bitrix::types::parse_offline_get;
use crate::bitrix::{BitrixError, ErrorClass, FeatureValue, ListedEvent, PortalClient};
use crate::config::{Config, PortalConfig};
use crate::conformance::{
    Check, ClearBy, Finding, LIST_LIMIT, OnFail, PortalConformance, ReservedListing, Status,
};
use crate::journal::Access;
use crate::journal::Journal;
use chrono::{DateTime, SecondsFormat, Utc};
use document::{Document, render};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long rows written by `event.test` may take to show (they may be written at the end of
/// the request, or later).
const ROWS_APPEAR_WITHIN: Duration = Duration::from_secs(10);
/// Rows the probe makes for the checks of one reservation.
const SMALL: u32 = 3;
/// Rows for the `limit` check: more than `LIST_LIMIT`.
const LIMIT_ROWS: u32 = 60;
/// `TIMESTAMP_X` has whole seconds: an event this long after another gets a later one.
const NEXT_SECOND: Duration = Duration::from_millis(1100);
/// The event `event.test` fires.
const EVENT: &str = "ONAPPTEST";

/// Runs the probe on `portal_name` and prints the report; fails when a check failed or the
/// probe could not finish.
pub(super) async fn run(config: &Config, portal_name: &str, json: bool) -> anyhow::Result<()> {
    let portal = report::portal(config, portal_name)?;
    let location = config.journal.location();
    if config.journal.postgres.is_none() && !config.journal.path.exists() {
        anyhow::bail!(
            "no journal at {location}: no tokens are stored for portal {portal_name}; run `b24eventd auth login --portal {portal_name}` first"
        );
    }
    // Nothing (not even the lock file) is made beside a file that is not the daemon's journal;
    // a running daemon's lock refuses the probe.
    let (journal, _lock) = Journal::open_alone(&config.journal, Access::Write)
        .await
        .map_err(|e| e.context("conformance probe refused"))?;
    if journal.token_status(portal_name).await?.is_none() {
        anyhow::bail!(
            "no OAuth tokens are stored for portal {portal_name} in the journal {location}: run `b24eventd auth login --portal {portal_name}` with this config first (the packaged service: `b24eventd-as-service auth login --portal {portal_name}`)"
        );
    }
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signals(shutdown.clone())
        .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
    let run_id = format!("{:08x}", fastrand::u32(..));
    let connector = format!("b24eventd-probe-{run_id}");
    let started_at = Utc::now();
    let mut probe = Probe {
        plain: client_for(portal, None, &journal).await?,
        probe: client_for(portal, Some(connector.clone()), &journal).await?,
        connector: connector.clone(),
        run_id: run_id.clone(),
        findings: Vec::new(),
        process_ids: Vec::new(),
        touched: false,
        shutdown,
    };
    tracing::info!(portal = portal_name, %connector, "conformance probe started");
    let stopped = probe.checks().await.err();
    let cleanup = probe.cleanup().await;
    probe.findings.push(cleanup);
    let why_skipped = match &stopped {
        Some(Stop::Interrupted) => "not run: the probe was interrupted".to_string(),
        Some(Stop::Precondition) => "not run: a precondition failed".to_string(),
        Some(Stop::Failed(why)) => format!("not run: the probe stopped early ({why})"),
        None => "not run".to_string(),
    };
    for check in Check::ALL {
        if !probe.findings.iter().any(|f| f.check == check) {
            probe
                .findings
                .push(Finding::skipped(check, why_skipped.clone()));
        }
    }
    probe.findings.sort_by_key(|f| f.check);
    let finished_at = Utc::now();
    journal
        .replace_conformance(
            portal_name,
            probe
                .findings
                .iter()
                .map(|f| f.to_stored(&run_id, finished_at))
                .collect(),
        )
        .await?;
    let daemon =
        PortalConformance::from_findings(portal_name, &probe.findings, finished_at, &run_id);
    let doc = Document::new(
        portal,
        &connector,
        &run_id,
        started_at,
        finished_at,
        &probe.findings,
        &daemon,
        stopped.as_ref(),
    );
    if json {
        report::print_json(&doc)?;
    } else {
        out!("{}", render(&doc))?;
    }
    if let Some(Stop::Interrupted) = stopped {
        anyhow::bail!(
            "conformance probe interrupted: the findings it made are stored, the rest are skipped"
        );
    }
    if let Some(Stop::Failed(why)) = &stopped {
        anyhow::bail!("conformance probe stopped early: {why}");
    }
    match doc.summary.fail {
        0 => Ok(()),
        n => Err(anyhow::anyhow!(
            "conformance probe: {n} check{} failed",
            if n == 1 { "" } else { "s" }
        )),
    }
}

/// The portal's client with the given `auth_connector` (none for `event.test`).
async fn client_for(
    portal: &PortalConfig,
    connector: Option<String>,
    journal: &Journal,
) -> anyhow::Result<PortalClient> {
    let mut portal = portal.clone();
    portal.auth_connector = connector;
    crate::pipeline::operator_client(&portal, journal).await
}

/// Why the checks stopped before the end.
#[derive(Debug)]
enum Stop {
    /// Ctrl-C or SIGTERM.
    Interrupted,
    /// A precondition failed (its finding says which): nothing else can be checked.
    Precondition,
    /// A call failed for a reason that says nothing about the server's semantics (network,
    /// limits, auth), or a step found the portal in a state it cannot go on from.
    Failed(String),
}

type Step<T> = Result<T, Stop>;

/// An error that is not a finding about the semantics: the probe stops.
fn stop(e: &BitrixError) -> Stop {
    Stop::Failed(e.failure())
}

/// A row the probe made, as listed.
#[derive(Debug, Clone)]
struct Row {
    id: i64,
    timestamp: String,
    message_id: String,
    process_id: String,
    error: bool,
    data: Value,
}

impl Row {
    fn of(item: &ListedEvent) -> Row {
        Row {
            id: item.event.id,
            timestamp: item.event.timestamp.clone(),
            message_id: item.event.message_id.clone(),
            process_id: item.process_id.clone(),
            error: item.error,
            data: item.event.data.clone(),
        }
    }

    /// The `n` of the `event.test` call that made it (a string when sent in a batch).
    fn n(&self) -> Option<u32> {
        match self.data.pointer("/QUERY/n")? {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            _ => None,
        }
    }
}

fn ids(rows: &[Row]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

struct Probe {
    /// Without `auth_connector`: `event.test`, plan features, `event.get`.
    plain: PortalClient,
    /// With the probe's connector: every `event.offline.*` call, bind and unbind.
    probe: PortalClient,
    connector: String,
    run_id: String,
    findings: Vec<Finding>,
    /// Every reservation the probe made, for the cleanup.
    process_ids: Vec<String>,
    /// Whether the probe bound or created anything (else there is nothing to clean up).
    touched: bool,
    shutdown: CancellationToken,
}

impl Probe {
    fn found(&mut self, finding: Finding) {
        tracing::info!(
            check = finding.check.name(),
            status = finding.status.as_str(),
            observed = %finding.observed,
            "conformance finding"
        );
        self.findings.push(finding);
    }

    fn go_on(&self) -> Step<()> {
        if self.shutdown.is_cancelled() {
            Err(Stop::Interrupted)
        } else {
            Ok(())
        }
    }

    fn remember(&mut self, process_id: Option<&String>) {
        if let Some(pid) = process_id.filter(|p| !p.is_empty())
            && !self.process_ids.contains(pid)
        {
            self.process_ids.push(pid.clone());
        }
    }

    /// Every check, in order. Returns early (the rest skipped) when a step cannot go on.
    async fn checks(&mut self) -> Step<()> {
        self.preconditions().await?;
        self.go_on()?;
        match self.probe.event_bind_offline(EVENT).await {
            Ok(_) => self.touched = true,
            Err(e) => return Err(stop(&e)),
        }
        // Three rows for the checks of one reservation.
        self.create_rows(1..=SMALL).await?;
        // Their TIMESTAMP_X is no later than this.
        let made_at = Instant::now();
        let mut rows = self
            .wait_rows(json!({"=EVENT_NAME": EVENT}), SMALL as u64)
            .await?;
        rows.sort_by_key(|r| r.id);
        if rows.len() < SMALL as usize {
            self.found(Finding::fail(
                Check::EventTestRows,
                format!(
                    "{} event.test calls without auth_connector made {} {EVENT} row(s) for connector {} within {} s",
                    SMALL,
                    rows.len(),
                    self.connector,
                    ROWS_APPEAR_WITHIN.as_secs()
                ),
            ));
            return Err(Stop::Failed("event.test made no rows to check with".into()));
        }
        let expected_shape = rows.iter().all(|r| {
            r.data
                .pointer("/QUERY/b24eventd_probe")
                .and_then(Value::as_str)
                == Some(&self.run_id)
                && r.data.get("LANGUAGE_ID").is_some()
        });
        self.found(Finding::ok(
            Check::EventTestRows,
            format!(
                "{SMALL} event.test calls without auth_connector made {} {EVENT} rows for connector {} in {:.1} s; EVENT_DATA {}",
                rows.len(),
                self.connector,
                made_at.elapsed().as_secs_f64(),
                if expected_shape {
                    "is {\"QUERY\": {...the call's parameters}, \"LANGUAGE_ID\": ...} as expected".to_string()
                } else {
                    format!("differs from the expected {{QUERY, LANGUAGE_ID}}: {}", rows[0].data)
                }
            ),
        ));
        self.go_on()?;
        let listed = rows.clone();
        let p1 = self.reserve(&listed).await?;
        self.go_on()?;
        self.reservation_hides(&p1).await?;
        self.go_on()?;
        self.list_reserved(&p1, &listed).await?;
        self.go_on()?;
        self.reread(&p1, &listed).await?;
        self.go_on()?;
        let a = listed[0].clone();
        self.error_lane(&p1, &a, made_at).await?;
        self.go_on()?;
        self.clears(&p1, &listed[1], &listed[2]).await?;
        self.go_on()?;
        self.limit_above_50().await?;
        Ok(())
    }

    /// Administrator, plan features, and no other connector listening to `ONAPPTEST`.
    async fn preconditions(&mut self) -> Step<()> {
        match self.plain.user_admin().await {
            Ok(true) => self.found(Finding::ok(Check::Admin, "user.admin: true")),
            Ok(false) => {
                self.found(Finding::fail(
                    Check::Admin,
                    "user.admin: false; every event.offline.* call needs an administrator's token",
                ));
                return Err(Stop::Precondition);
            }
            Err(e) => return Err(stop(&e)),
        }
        for (check, code) in [
            (Check::PlanOfflineExtended, "rest_offline_extended"),
            (Check::PlanAuthConnector, "rest_auth_connector"),
        ] {
            match self.plain.feature_get(code).await {
                Ok(FeatureValue::Enabled) => {
                    self.found(Finding::ok(check, format!("feature.get {code}: Y")))
                }
                Ok(FeatureValue::SelfHosted(value)) => self.found(Finding::ok(
                    check,
                    format!("feature.get {code}: {value} (on-premise: plan features do not apply)"),
                )),
                Ok(FeatureValue::Disabled) => {
                    let why = match check {
                        Check::PlanOfflineExtended => {
                            "the checks need get with clear=0 (reserve mode); the daemon can only run this portal in mode = \"fetch-delete\""
                        }
                        _ => {
                            "the probe works under a connector of its own so as never to touch the daemon's queue, and cannot without it; nothing was checked or touched"
                        }
                    };
                    self.found(Finding::fail(
                        check,
                        format!("feature.get {code}: N: {why}"),
                    ));
                    return Err(Stop::Precondition);
                }
                Err(e) => return Err(stop(&e)),
            }
        }
        let handlers = self.plain.event_get().await.map_err(|e| stop(&e))?;
        let others: BTreeSet<String> = handlers
            .iter()
            .filter(|h| h.offline && h.event.eq_ignore_ascii_case(EVENT))
            .map(|h| format!("'{}'", h.connector_id))
            .collect();
        if !others.is_empty() {
            self.found(Finding::fail(
                Check::ProbeIsolation,
                format!(
                    "{EVENT} is bound offline for connector(s) {}: event.test would write test rows into their queues; remove those bindings (event.unbind) and run the probe again",
                    others.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
            return Err(Stop::Precondition);
        }
        self.found(Finding::ok(
            Check::ProbeIsolation,
            format!("no offline {EVENT} binding of this application: only the probe's connector will get test rows"),
        ));
        Ok(())
    }

    /// `event.test` with `{"b24eventd_probe": run, "n": k}` for each `k`, 50 to a `batch`
    /// request, sent without `auth_connector`.
    async fn create_rows(&mut self, ns: std::ops::RangeInclusive<u32>) -> Step<()> {
        let ns: Vec<u32> = ns.collect();
        for chunk in ns.chunks(crate::bitrix::client::MAX_BATCH) {
            let commands: Vec<(String, String, Value)> = chunk
                .iter()
                .map(|n| {
                    (
                        format!("t{n:04}"),
                        "event.test".to_string(),
                        json!({"b24eventd_probe": self.run_id, "n": n}),
                    )
                })
                .collect();
            let answer = self
                .plain
                .batch(&commands, false)
                .await
                .map_err(|e| stop(&e))?;
            if let Some((key, (code, description))) = answer.errors.iter().next() {
                return Err(Stop::Failed(format!(
                    "event.test ({key}) failed: {code} ({description})"
                )));
            }
        }
        Ok(())
    }

    /// Every row of the probe's connector matching `filter`, all pages.
    async fn list(&self, filter: Value) -> Step<(Vec<Row>, u64)> {
        let mut page = self
            .probe
            .offline_list(filter.clone(), 0)
            .await
            .map_err(|e| stop(&e))?;
        let total = page.total;
        let mut rows: Vec<Row> = page.items.iter().map(Row::of).collect();
        while let Some(next) = page.next {
            page = self
                .probe
                .offline_list(filter.clone(), next)
                .await
                .map_err(|e| stop(&e))?;
            rows.extend(page.items.iter().map(Row::of));
        }
        Ok((rows, total))
    }

    /// Every row of the probe's connector.
    async fn all_rows(&self) -> Step<Vec<Row>> {
        Ok(self.list(json!({})).await?.0)
    }

    /// Lists `filter` until `want` rows show, for up to [`ROWS_APPEAR_WITHIN`].
    async fn wait_rows(&self, filter: Value, want: u64) -> Step<Vec<Row>> {
        let started = Instant::now();
        loop {
            let (rows, _) = self.list(filter.clone()).await?;
            if rows.len() as u64 >= want || started.elapsed() >= ROWS_APPEAR_WITHIN {
                return Ok(rows);
            }
            self.go_on()?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A plain reservation (`get` with `clear=0`), sent through `call` to see its `time` block.
    async fn reserve(&mut self, listed: &[Row]) -> Step<String> {
        let resp = self
            .probe
            .call(
                "event.offline.get",
                json!({"limit": 10, "clear": 0, "error": 0}),
            )
            .await
            .map_err(|e| stop(&e))?;
        self.time_block(&resp.time).await;
        let batch = parse_offline_get(&resp.result)
            .map_err(|e| Stop::Failed(format!("event.offline.get answered {e}")))?;
        self.remember(batch.process_id.as_ref());
        let got: Vec<i64> = batch.events.iter().map(|e| e.id).collect();
        let Some(p1) = batch.process_id.clone().filter(|p| !p.is_empty()) else {
            self.found(Finding::fail(
                Check::Reserve,
                format!(
                    "get with clear=0 returned {} rows and no process_id",
                    got.len()
                ),
            ));
            return Err(Stop::Failed("no reservation to go on with".into()));
        };
        if got != ids(listed) {
            self.found(Finding::fail(
                Check::Reserve,
                format!(
                    "get with clear=0 (process_id {p1}) returned rows {got:?}; the queue held {:?}",
                    ids(listed)
                ),
            ));
            return Err(Stop::Failed(
                "the reservation did not hold the probe's rows".into(),
            ));
        }
        self.found(Finding::ok(
            Check::Reserve,
            format!(
                "get with clear=0 returned process_id {p1} and the {} rows",
                got.len()
            ),
        ));
        // TIMESTAMP_X after the reservation, as the get showed it.
        let changed: Vec<String> = batch
            .events
            .iter()
            .zip(listed)
            .filter(|(e, r)| e.timestamp != r.timestamp)
            .map(|(e, r)| format!("ID {}: {} -> {}", r.id, r.timestamp, e.timestamp))
            .collect();
        if !changed.is_empty() {
            self.found(Finding::fail(
                Check::TimestampStable,
                format!(
                    "the reservation changed TIMESTAMP_X: {}",
                    changed.join(", ")
                ),
            ));
        }
        Ok(p1)
    }

    /// Unbinds `ONAPPTEST` for the probe's connector, then reserves and clears every row of
    /// both lanes under it, and checks that nothing is left. Runs after a failed check and after
    /// an interruption too; touches no other connector.
    async fn cleanup(&mut self) -> Finding {
        if !self.touched {
            return Finding::ok(
                Check::Cleanup,
                "nothing to clean up: the probe bound nothing and made no row",
            );
        }
        let mut problems = Vec::new();
        if let Err(e) = self.probe.event_unbind_offline(EVENT).await {
            problems.push(format!("unbind: {}", e.failure()));
        }
        for pid in self.process_ids.clone() {
            if let Err(e) = self.probe.offline_clear(&pid, &ClearTarget::All).await {
                problems.push(format!("clear {pid}: {}", e.failure()));
            }
        }
        for _ in 0..5 {
            for error_lane in [false, true] {
                for _ in 0..10 {
                    let got = self
                        .probe
                        .offline_get(&GetRequest {
                            limit: LIST_LIMIT,
                            clear: false,
                            process_id: None,
                            error_lane,
                        })
                        .await;
                    let batch = match got {
                        Ok(batch) => batch,
                        Err(e) => {
                            problems.push(format!("get: {}", e.failure()));
                            break;
                        }
                    };
                    let Some(pid) = batch.process_id.filter(|p| !p.is_empty()) else {
                        break;
                    };
                    if batch.events.is_empty() {
                        break;
                    }
                    if let Err(e) = self.probe.offline_clear(&pid, &ClearTarget::All).await {
                        problems.push(format!("clear {pid}: {}", e.failure()));
                        break;
                    }
                }
            }
            // Rows reserved under a process id the probe never saw (a lost answer).
            let left = match self.list(json!({})).await {
                Ok((rows, _)) => rows,
                Err(_) => break,
            };
            let orphans: BTreeSet<String> = left
                .iter()
                .filter(|r| !r.process_id.is_empty())
                .map(|r| r.process_id.clone())
                .collect();
            if left.is_empty() {
                break;
            }
            for pid in orphans {
                let _ = self.probe.offline_clear(&pid, &ClearTarget::All).await;
            }
        }
        let left = match self.list(json!({})).await {
            Ok((rows, _)) => rows,
            Err(Stop::Failed(why)) => {
                problems.push(format!("final list: {why}"));
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        if !left.is_empty() {
            problems.push(format!(
                "{} row(s) left under connector {}: IDs {:?}",
                left.len(),
                self.connector,
                ids(&left)
            ));
        }
        match self.plain.event_get().await {
            Ok(handlers) => {
                if handlers
                    .iter()
                    .any(|h| h.offline && h.connector_id == self.connector)
                {
                    problems.push(format!("a binding of connector {} is left", self.connector));
                }
            }
            Err(e) => problems.push(format!("event.get: {}", e.failure())),
        }
        if problems.is_empty() {
            Finding::ok(
                Check::Cleanup,
                format!(
                    "{EVENT} unbound and every row of connector {} cleared ({} reservation(s)); no other connector was touched",
                    self.connector,
                    self.process_ids.len()
                ),
            )
        } else {
            Finding::fail(
                Check::Cleanup,
                format!(
                    "{}; nothing else is affected (the rows are the probe's own, under its connector)",
                    problems.join("; ")
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_know_their_n_as_string_or_number() {
        let row = |data: Value| Row {
            id: 1,
            timestamp: String::new(),
            message_id: String::new(),
            process_id: String::new(),
            error: false,
            data,
        };
        assert_eq!(row(json!({"QUERY": {"n": "7"}})).n(), Some(7));
        assert_eq!(row(json!({"QUERY": {"n": 8}})).n(), Some(8));
        assert_eq!(row(json!({"QUERY": {}})).n(), None);
    }
}
