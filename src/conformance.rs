//! The upstream assumptions the conformance probe (`doctor --conformance`) checks on a live
//! portal, the typed findings it stores in the journal, and what the daemon makes of them at
//! start ([`PortalConformance`]): adapt where it can (cap `batch_size`, settle by `id`, tell the
//! poller whether `event.offline.list` filters reserved rows), refuse where it cannot. The one
//! place both the probe and the daemon read; a portal never probed runs as if every check held.

use crate::config::{Config, ConfigError, Mode};
use crate::journal::{Journal, StoredFinding};
use chrono::{DateTime, SecondsFormat, Utc};
use std::collections::BTreeMap;

/// `IRestService::LIST_LIMIT`: `event.offline.get`'s default `limit`; the probe asks for more.
pub const LIST_LIMIT: u32 = 50;

/// One upstream assumption the probe checks. The names are stable: they are stored in the
/// journal and printed in the `--json` document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    /// The plan has `rest_offline_extended` (`get` with `clear=0`).
    PlanOfflineExtended,
    /// The plan has `rest_auth_connector` (the probe works under a connector of its own).
    PlanAuthConnector,
    /// The token's user is an administrator (every `event.offline.*` call needs one).
    Admin,
    /// No other connector has `ONAPPTEST` bound offline (the probe's test events would land in
    /// its queue).
    ProbeIsolation,
    /// The `time` block: `operating` and `operating_reset_at` present; `processing` whole.
    TimeBlock,
    /// `event.test` writes an `ONAPPTEST` row for another connector of the same application.
    EventTestRows,
    /// `get` with `clear=0` returns a `process_id` and the rows.
    Reserve,
    /// A later plain `get` does not return reserved rows.
    ReservationHides,
    /// `event.offline.list` with `{">PROCESS_ID": ""}` returns the reserved rows and their
    /// `PROCESS_ID`, with `total` equal to their number.
    ListReservedFilter,
    /// `get` with `process_id` and `clear=0` returns the same rows and leaves them reserved.
    RereadByProcessId,
    /// `TIMESTAMP_X` is not changed by a reservation or by `event.offline.error`.
    TimestampStable,
    /// `event.offline.error` moves the row to the error lane: `ERROR=1`, `PROCESS_ID` '', same
    /// `ID`; a plain `get` no longer sees it, `get error=1` does.
    ErrorLaneMove,
    /// An identical event after the move merges into the error-lane row (same `ID`, later
    /// `TIMESTAMP_X`, still `ERROR=1`, no new normal-lane row).
    ErrorLaneMerge,
    /// `clear` refuses a `message_id` that is not exactly 32 characters.
    ClearMessageId32,
    /// `clear` with `message_id` deletes exactly those rows of the reservation.
    ClearByMessageId,
    /// `clear` with `id` deletes exactly those rows of the reservation.
    ClearById,
    /// `get` honours a `limit` above 50.
    GetLimitAbove50,
    /// The probe left no row and no binding behind.
    Cleanup,
}

/// What the daemon does when a check fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFail {
    /// Nothing: the daemon does not depend on it (or it is about the probe itself).
    Inform,
    /// The daemon works around it (see [`PortalConformance`]).
    Adapt,
    /// The daemon refuses to start (exit 78).
    Refuse,
}

impl Check {
    /// Every check, in the order the probe runs them.
    pub const ALL: [Check; 18] = [
        Check::PlanOfflineExtended,
        Check::PlanAuthConnector,
        Check::Admin,
        Check::ProbeIsolation,
        Check::TimeBlock,
        Check::EventTestRows,
        Check::Reserve,
        Check::ReservationHides,
        Check::ListReservedFilter,
        Check::RereadByProcessId,
        Check::TimestampStable,
        Check::ErrorLaneMove,
        Check::ErrorLaneMerge,
        Check::ClearMessageId32,
        Check::ClearByMessageId,
        Check::ClearById,
        Check::GetLimitAbove50,
        Check::Cleanup,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Check::PlanOfflineExtended => "plan_offline_extended",
            Check::PlanAuthConnector => "plan_auth_connector",
            Check::Admin => "admin",
            Check::ProbeIsolation => "probe_isolation",
            Check::TimeBlock => "time_block",
            Check::EventTestRows => "event_test_rows",
            Check::Reserve => "reserve",
            Check::ReservationHides => "reservation_hides",
            Check::ListReservedFilter => "list_reserved_filter",
            Check::RereadByProcessId => "reread_by_process_id",
            Check::TimestampStable => "timestamp_stable",
            Check::ErrorLaneMove => "error_lane_move",
            Check::ErrorLaneMerge => "error_lane_merge",
            Check::ClearMessageId32 => "clear_message_id_32_chars",
            Check::ClearByMessageId => "clear_by_message_id",
            Check::ClearById => "clear_by_id",
            Check::GetLimitAbove50 => "get_limit_above_50",
            Check::Cleanup => "cleanup",
        }
    }

    pub fn parse(name: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.name() == name)
    }

    /// What the daemon assumes, in one line.
    pub fn assumption(self) -> &'static str {
        match self {
            Check::PlanOfflineExtended => {
                "the plan has rest_offline_extended: event.offline.get with clear=0 reserves"
            }
            Check::PlanAuthConnector => {
                "the plan has rest_auth_connector: calls may carry auth_connector"
            }
            Check::Admin => "the token's user is an administrator",
            Check::ProbeIsolation => {
                "no other connector of this application has ONAPPTEST bound offline"
            }
            Check::TimeBlock => {
                "answers carry time.operating and time.operating_reset_at while the limiter is on"
            }
            Check::EventTestRows => {
                "event.test writes an ONAPPTEST row for the application's other connectors"
            }
            Check::Reserve => "get with clear=0 returns a process_id with the rows it reserved",
            Check::ReservationHides => "a later plain get does not return reserved rows",
            Check::ListReservedFilter => {
                "event.offline.list filter {\">PROCESS_ID\": \"\"} returns the reserved rows with their PROCESS_ID and total, and not the unreserved ones"
            }
            Check::RereadByProcessId => {
                "get with process_id and clear=0 returns the same rows and leaves them reserved"
            }
            Check::TimestampStable => {
                "TIMESTAMP_X is not changed by a reservation or by event.offline.error"
            }
            Check::ErrorLaneMove => {
                "event.offline.error moves the row to the error lane (ERROR=1, PROCESS_ID '', same ID), where only get error=1 sees it"
            }
            Check::ErrorLaneMerge => {
                "a later identical event merges into the error-lane row (same ID, later TIMESTAMP_X, still ERROR=1)"
            }
            Check::ClearMessageId32 => {
                "clear refuses a message_id that is not exactly 32 characters"
            }
            Check::ClearByMessageId => {
                "clear with message_id deletes exactly those rows of the reservation"
            }
            Check::ClearById => "clear with id deletes exactly those rows of the reservation",
            Check::GetLimitAbove50 => "get honours a limit above 50 (no server-side clamp)",
            Check::Cleanup => "the probe left no row and no binding behind",
        }
    }

    /// The public source of the assumption: repository + path + function, or a docs page.
    pub fn source(self) -> &'static str {
        match self {
            Check::PlanOfflineExtended => {
                "avshatalov48/bitrix-core-business modules/rest/lib/api/event.php Event::eventOfflineGet (LicenseException without FEATURE_EXTENDED_MODE)"
            }
            Check::PlanAuthConnector => {
                "avshatalov48/bitrix-core-business modules/rest/classes/general/rest.php CRestServer::canUseConnectors"
            }
            Check::Admin => {
                "avshatalov48/bitrix-core-business modules/rest/lib/api/event.php Event::eventOfflineGet (CRestUtil::isAdmin)"
            }
            Check::ProbeIsolation | Check::EventTestRows => {
                "avshatalov48/bitrix-core-business modules/rest/lib/api/event.php Event::eventTest; modules/rest/classes/general/rest_provider.php CRestProvider::OnAppEvent; modules/rest/lib/event/provideroffline.php ProviderOffline::finalize"
            }
            Check::TimeBlock => {
                "avshatalov48/bitrix-core-business modules/rest/classes/general/rest.php CRestServer::appendDebugInfo; Bitrix\\Rest\\Engine\\Access\\LoadLimiter"
            }
            Check::Reserve | Check::ReservationHides | Check::RereadByProcessId => {
                "avshatalov48/bitrix-core-business modules/rest/lib/api/event.php Event::eventOfflineGet; modules/rest/lib/eventoffline.php EventOfflineTable::markEvents"
            }
            Check::ListReservedFilter => {
                "avshatalov48/bitrix-core-business modules/rest/lib/api/event.php Event::eventOfflineList"
            }
            Check::TimestampStable | Check::ErrorLaneMove | Check::ErrorLaneMerge => {
                "avshatalov48/bitrix-core-business modules/rest/lib/eventoffline.php EventOfflineTable::markError, EventOfflineTable::callEvent"
            }
            Check::ClearMessageId32 | Check::ClearByMessageId | Check::ClearById => {
                "avshatalov48/bitrix-core-business modules/rest/lib/api/event.php Event::eventOfflineClear"
            }
            Check::GetLimitAbove50 => {
                "avshatalov48/bitrix-core-business modules/rest/lib/api/event.php Event::eventOfflineGet (limit = intval(query.limit), no upper bound)"
            }
            Check::Cleanup => "b24eventd's own probe",
        }
    }

    /// What the daemon does when this check fails.
    pub fn on_fail(self) -> OnFail {
        match self {
            Check::Reserve
            | Check::ReservationHides
            | Check::RereadByProcessId
            | Check::ErrorLaneMove => OnFail::Refuse,
            Check::ListReservedFilter | Check::ClearByMessageId | Check::GetLimitAbove50 => {
                OnFail::Adapt
            }
            // Both ways of clearing failing refuses (see `PortalConformance::from_findings`).
            Check::ClearById => OnFail::Adapt,
            _ => OnFail::Inform,
        }
    }
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Fail,
    /// Not run: an earlier step failed, the probe was interrupted, or it does not apply.
    Skipped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Fail => "fail",
            Status::Skipped => "skipped",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        match text {
            "ok" => Some(Status::Ok),
            "fail" => Some(Status::Fail),
            "skipped" => Some(Status::Skipped),
            _ => None,
        }
    }
}

/// One finding: a check, how it came out, what was observed, and a number where the daemon
/// acts on one (the rows a `get` with a limit above 50 returned).
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub check: Check,
    pub status: Status,
    pub observed: String,
    pub value: Option<i64>,
}

impl Finding {
    pub fn ok(check: Check, observed: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Status::Ok,
            observed: observed.into(),
            value: None,
        }
    }

    pub fn fail(check: Check, observed: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Status::Fail,
            observed: observed.into(),
            value: None,
        }
    }

    pub fn skipped(check: Check, why: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Status::Skipped,
            observed: why.into(),
            value: None,
        }
    }

    pub fn with_value(mut self, value: i64) -> Finding {
        self.value = Some(value);
        self
    }

    pub fn to_stored(&self, run_id: &str, at: DateTime<Utc>) -> StoredFinding {
        StoredFinding {
            check: self.check.name().to_string(),
            status: self.status.as_str().to_string(),
            observed: self.observed.clone(),
            value: self.value,
            run_id: run_id.to_string(),
            checked_at: at,
        }
    }
}

/// How `event.offline.clear` is addressed when the daemon settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearBy {
    /// `message_id` (the default; `id` for rows whose `MESSAGE_ID` is not 32 characters).
    MessageId,
    /// `id` for every clear: the probe found `message_id` ignored.
    Id,
}

/// Whether `event.offline.list` with `{">PROCESS_ID": ""}` finds reserved rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservedListing {
    /// Never probed (or the check was skipped): assumed to work.
    Unknown,
    Works,
    /// The probe found it does not: the orphan sweep cannot rely on the filter.
    Broken,
}

/// A check that makes the daemon refuse a portal, as found.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub portal: String,
    pub check: Check,
    pub observed: String,
    pub checked_at: DateTime<Utc>,
    pub run_id: String,
}

impl Refusal {
    /// One message naming the finding, when it was found and what to do.
    pub fn message(&self) -> String {
        format!(
            "the conformance probe of {at} (run {run}) found that {assumption} does not hold on this portal \
             ({check}: {observed}); b24eventd cannot run safely against it. Send the output of \
             `b24eventd doctor --conformance --portal {portal} --json` to the b24eventd maintainers; \
             after a Bitrix24 update run that probe again (a passing run lifts this refusal)",
            at = self.checked_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            run = self.run_id,
            assumption = self.check.assumption(),
            check = self.check.name(),
            observed = self.observed,
            portal = self.portal,
        )
    }
}

/// What the daemon makes of a portal's stored findings. The default (a portal never probed)
/// changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct PortalConformance {
    /// When the findings were made and by which run; `None` when never probed.
    pub probed: Option<(DateTime<Utc>, String)>,
    /// The most rows one `get` returned when asked for more than 50 (a server-side clamp).
    get_limit_cap: Option<u32>,
    clear_by: ClearBy,
    reserved_listing: ReservedListing,
    refusal: Option<Refusal>,
}

impl Default for PortalConformance {
    fn default() -> PortalConformance {
        PortalConformance {
            probed: None,
            get_limit_cap: None,
            clear_by: ClearBy::MessageId,
            reserved_listing: ReservedListing::Unknown,
            refusal: None,
        }
    }
}

impl PortalConformance {
    /// Reads `portal`'s stored findings.
    pub async fn load(journal: &Journal, portal: &str) -> anyhow::Result<PortalConformance> {
        let stored = journal.conformance(portal).await?;
        Ok(PortalConformance::from_stored(portal, &stored))
    }

    /// Findings the daemon does not know (from a newer build) or with an unknown status are
    /// ignored.
    pub fn from_stored(portal: &str, stored: &[StoredFinding]) -> PortalConformance {
        let Some(first) = stored.first() else {
            return PortalConformance::default();
        };
        let findings: Vec<Finding> = stored
            .iter()
            .filter_map(|s| {
                Some(Finding {
                    check: Check::parse(&s.check)?,
                    status: Status::parse(&s.status)?,
                    observed: s.observed.clone(),
                    value: s.value,
                })
            })
            .collect();
        let at = stored
            .iter()
            .map(|s| s.checked_at)
            .max()
            .unwrap_or(first.checked_at);
        PortalConformance::from_findings(portal, &findings, at, &first.run_id)
    }

    /// The daemon's view of one probe run's findings.
    pub fn from_findings(
        portal: &str,
        findings: &[Finding],
        checked_at: DateTime<Utc>,
        run_id: &str,
    ) -> PortalConformance {
        let failed = |check: Check| {
            findings
                .iter()
                .find(|f| f.check == check && f.status == Status::Fail)
        };
        let status = |check: Check| findings.iter().find(|f| f.check == check).map(|f| f.status);
        let refusal_of = |f: &Finding| Refusal {
            portal: portal.to_string(),
            check: f.check,
            observed: f.observed.clone(),
            checked_at,
            run_id: run_id.to_string(),
        };
        let mut refusal = Check::ALL
            .into_iter()
            .filter(|c| c.on_fail() == OnFail::Refuse)
            .find_map(|c| failed(c).map(refusal_of));
        let clear_by = match (failed(Check::ClearByMessageId), failed(Check::ClearById)) {
            (Some(by_message_id), Some(_)) => {
                refusal.get_or_insert_with(|| refusal_of(by_message_id));
                ClearBy::MessageId
            }
            (Some(_), None) => ClearBy::Id,
            _ => ClearBy::MessageId,
        };
        let get_limit_cap = failed(Check::GetLimitAbove50)
            .and_then(|f| f.value)
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| v > 0);
        let reserved_listing = match status(Check::ListReservedFilter) {
            Some(Status::Ok) => ReservedListing::Works,
            Some(Status::Fail) => ReservedListing::Broken,
            _ => ReservedListing::Unknown,
        };
        PortalConformance {
            probed: Some((checked_at, run_id.to_string())),
            get_limit_cap,
            clear_by,
            reserved_listing,
            refusal,
        }
    }

    /// The check that makes the daemon refuse this portal, if any.
    pub fn refusal(&self) -> Option<&Refusal> {
        self.refusal.as_ref()
    }

    /// The `batch_size` to use: the configured one, capped at what one `get` returned when the
    /// probe found the portal clamping `limit`.
    pub fn batch_size(&self, configured: u32) -> u32 {
        match self.get_limit_cap {
            Some(cap) => configured.min(cap),
            None => configured,
        }
    }

    /// The server-side clamp of `get`'s `limit` the probe found, if any.
    pub fn get_limit_cap(&self) -> Option<u32> {
        self.get_limit_cap
    }

    /// How settle calls address `event.offline.clear`.
    pub fn clear_by(&self) -> ClearBy {
        self.clear_by
    }

    /// Whether `event.offline.list` with `{">PROCESS_ID": ""}` finds reserved rows on this
    /// portal. The orphan sweep rests on it: when it is [`ReservedListing::Broken`] the sweep
    /// must find orphaned reservations another way (a client-side filter of the unfiltered
    /// listing by `PROCESS_ID`); `Unknown` means the portal was never probed.
    pub fn reserved_listing(&self) -> ReservedListing {
        self.reserved_listing
    }

    /// One line per adaptation, for the start-up log.
    pub fn adaptations(&self, configured_batch_size: u32) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(cap) = self.get_limit_cap
            && cap < configured_batch_size
        {
            out.push(format!(
                "event.offline.get returned at most {cap} rows when asked for more: batch_size {configured_batch_size} is capped at {cap}"
            ));
        }
        if self.clear_by == ClearBy::Id {
            out.push(
                "event.offline.clear ignored message_id: reservations are cleared by id".into(),
            );
        }
        if self.reserved_listing == ReservedListing::Broken {
            out.push(
                "event.offline.list does not filter reserved rows with >PROCESS_ID: the orphan sweep reads the whole queue by ID instead".into(),
            );
        }
        out
    }
}

/// At the daemon's start: every portal's findings, logged with what the daemon adapts, or a
/// configuration error (exit 78) naming the first finding that makes a reserve-mode portal
/// unsafe to run. Fetch-delete mode reserves nothing, so no finding refuses it.
pub async fn for_daemon(
    config: &Config,
    journal: &Journal,
) -> anyhow::Result<BTreeMap<String, PortalConformance>> {
    let mut out = BTreeMap::new();
    for portal in config.portals.values() {
        let found = PortalConformance::load(journal, &portal.name).await?;
        if let Some(refusal) = found.refusal()
            && portal.mode == Mode::Reserve
        {
            return Err(ConfigError::new(
                config.source.display().to_string(),
                format!("portals.{}", portal.name),
                refusal.message(),
            )
            .into());
        }
        if let Some((at, run)) = &found.probed {
            tracing::info!(
                portal = %portal.name,
                probed_at = %at.to_rfc3339_opts(SecondsFormat::Secs, true),
                run = %run,
                "conformance findings of the last probe apply"
            );
        }
        for adaptation in found.adaptations(portal.batch_size) {
            tracing::warn!(portal = %portal.name, adaptation = %adaptation, "adapting to this portal's conformance findings");
        }
        out.insert(portal.name.clone(), found);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn all_ok() -> Vec<Finding> {
        Check::ALL
            .into_iter()
            .map(|c| Finding::ok(c, "fine"))
            .collect()
    }

    fn with(mut findings: Vec<Finding>, f: Finding) -> Vec<Finding> {
        findings.retain(|x| x.check != f.check);
        findings.push(f);
        findings
    }

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut names = std::collections::BTreeSet::new();
        for c in Check::ALL {
            assert_eq!(Check::parse(c.name()), Some(c));
            assert!(names.insert(c.name()), "{} twice", c.name());
            assert!(!c.source().is_empty() && !c.assumption().is_empty());
        }
        assert_eq!(Check::parse("nope"), None);
    }

    #[test]
    fn never_probed_changes_nothing() {
        let c = PortalConformance::from_stored("main", &[]);
        assert_eq!(c, PortalConformance::default());
        assert_eq!(c.batch_size(100), 100);
        assert_eq!(c.clear_by(), ClearBy::MessageId);
        assert_eq!(c.reserved_listing(), ReservedListing::Unknown);
        assert!(c.refusal().is_none() && c.adaptations(100).is_empty());
    }

    #[test]
    fn all_ok_changes_nothing_but_says_the_listing_works() {
        let c = PortalConformance::from_findings("main", &all_ok(), at(), "r1");
        assert_eq!(c.batch_size(1000), 1000);
        assert_eq!(c.clear_by(), ClearBy::MessageId);
        assert_eq!(c.reserved_listing(), ReservedListing::Works);
        assert!(c.refusal().is_none());
    }

    #[test]
    fn a_limit_clamp_caps_batch_size() {
        let findings = with(
            all_ok(),
            Finding::fail(Check::GetLimitAbove50, "asked for 60, got 50").with_value(50),
        );
        let c = PortalConformance::from_findings("main", &findings, at(), "r1");
        assert_eq!(c.batch_size(100), 50);
        assert_eq!(c.batch_size(20), 20);
        assert_eq!(c.get_limit_cap(), Some(50));
        assert!(c.adaptations(100)[0].contains("capped at 50"));
        assert!(c.adaptations(20).is_empty());
        let zero = with(
            all_ok(),
            Finding::fail(Check::GetLimitAbove50, "none").with_value(0),
        );
        let c = PortalConformance::from_findings("main", &zero, at(), "r1");
        assert_eq!(c.batch_size(100), 100, "a zero says nothing about a clamp");
    }

    #[test]
    fn ignored_message_ids_settle_by_id_unless_id_fails_too() {
        let findings = with(all_ok(), Finding::fail(Check::ClearByMessageId, "ignored"));
        let c = PortalConformance::from_findings("main", &findings, at(), "r1");
        assert_eq!(c.clear_by(), ClearBy::Id);
        assert!(c.refusal().is_none());
        let both = with(findings, Finding::fail(Check::ClearById, "ignored too"));
        let c = PortalConformance::from_findings("main", &both, at(), "r1");
        let refusal = c.refusal().expect("nothing can clear");
        assert_eq!(refusal.check, Check::ClearByMessageId);
    }

    #[test]
    fn refusing_checks_refuse_and_the_message_names_the_finding_the_time_and_the_fix() {
        for check in [
            Check::Reserve,
            Check::ReservationHides,
            Check::RereadByProcessId,
            Check::ErrorLaneMove,
        ] {
            let findings = with(all_ok(), Finding::fail(check, "saw something else"));
            let c = PortalConformance::from_findings("main", &findings, at(), "1a2b3c4d");
            let message = c.refusal().expect("refused").message();
            assert!(message.contains(check.name()), "{message}");
            assert!(message.contains("saw something else"), "{message}");
            assert!(message.contains("2026-11-23T10:00:00Z"), "{message}");
            assert!(message.contains("run 1a2b3c4d"), "{message}");
            assert!(
                message.contains("doctor --conformance --portal main --json"),
                "{message}"
            );
        }
        let skipped = with(
            all_ok(),
            Finding::skipped(Check::ReservationHides, "interrupted"),
        );
        let c = PortalConformance::from_findings("main", &skipped, at(), "r1");
        assert!(c.refusal().is_none(), "skipped is unknown, not failed");
        let broken = with(
            all_ok(),
            Finding::fail(Check::ListReservedFilter, "total 0"),
        );
        let c = PortalConformance::from_findings("main", &broken, at(), "r1");
        assert_eq!(c.reserved_listing(), ReservedListing::Broken);
        assert!(c.refusal().is_none());
    }

    #[test]
    fn stored_findings_of_unknown_checks_are_ignored() {
        let stored = vec![
            Finding::fail(Check::GetLimitAbove50, "50")
                .with_value(50)
                .to_stored("r1", at()),
            StoredFinding {
                check: "from_a_newer_build".into(),
                status: "fail".into(),
                observed: String::new(),
                value: None,
                run_id: "r1".into(),
                checked_at: at(),
            },
        ];
        let c = PortalConformance::from_stored("main", &stored);
        assert_eq!(c.batch_size(100), 50);
        assert_eq!(c.probed, Some((at(), "r1".to_string())));
    }
}
