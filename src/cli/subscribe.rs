//! `subscribe` and `unsubscribe`: make a portal's offline event bindings match the config's
//! `events`. "Ours" are the application's offline bindings (`event.get` lists them with
//! `offline: 1`) whose `connector_id` is the portal's `auth_connector` (empty when none): the
//! offline queue is kept per connector, so bindings of another connector feed another queue and
//! are left alone.
//!
//! How the server lists and removes them (bitrix24/b24restdocs api-reference/events/event-get.md
//! and event-unbind.md; the rest module's `modules/rest/lib/api/event.php`, `\Bitrix\Rest\Api\Event`,
//! as in avshatalov48/bitrix-core-business): `Event::eventGet` lists the bindings of the calling
//! application only (`=APP_ID`), an offline one as `{event, connector_id, offline: 1}` (an empty
//! `connector_id` for none); `Event::eventUnbind` with `event_type=offline` deletes the
//! application's offline bindings of `event` whose `CONNECTOR_ID` is the request's
//! `auth_connector` ('' without one) and answers `{count}`.

use super::report::{self, Table};
use crate::bitrix::{BindOutcome, BitrixError, ErrorClass, EventHandler, PortalClient};
use crate::config::{Config, PortalConfig};
use crate::journal::Journal;
use std::collections::BTreeSet;

/// What happened to one event's binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(super) enum Action {
    /// `event.bind` added it.
    #[serde(rename = "bound")]
    Bound,
    /// It was there already; nothing was sent or changed.
    #[serde(rename = "already bound")]
    AlreadyBound,
    /// Bound on the portal but not in `events` (kept; `--prune` removes it).
    #[serde(rename = "extra")]
    Extra,
    /// `event.unbind` removed it.
    #[serde(rename = "unbound")]
    Unbound,
    /// `unsubscribe` found nothing to remove.
    #[serde(rename = "not bound")]
    NotBound,
    /// The portal refused the change (the error is in the row).
    #[serde(rename = "failed")]
    Failed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Bound => "bound",
            Action::AlreadyBound => "already bound",
            Action::Extra => "extra",
            Action::Unbound => "unbound",
            Action::NotBound => "not bound",
            Action::Failed => "failed",
        }
    }
}

/// One line of the `subscribe`/`unsubscribe` table (and of `--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct Row {
    portal: String,
    event: String,
    action: Action,
    /// The connector the binding belongs to (`""` for none).
    connector: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(serde::Serialize)]
struct Output<'a> {
    bindings: &'a [Row],
}

/// The offline bindings that belong to this application and connector, by event name.
pub(super) fn ours(handlers: &[EventHandler], connector: &str) -> BTreeSet<String> {
    handlers
        .iter()
        .filter(|h| h.offline && h.connector_id == connector)
        .map(|h| h.event.to_uppercase())
        .collect()
}

/// Bound events that `events` does not list, sorted.
fn extras(bound: &BTreeSet<String>, events: &[String]) -> Vec<String> {
    bound
        .iter()
        .filter(|e| !events.iter().any(|want| want.eq_ignore_ascii_case(e)))
        .cloned()
        .collect()
}

/// The rows and errors of one portal's run.
struct PortalRun<'a> {
    portal: &'a PortalConfig,
    connector: String,
    rows: &'a mut Vec<Row>,
    errors: Vec<BitrixError>,
}

impl<'a> PortalRun<'a> {
    fn new(portal: &'a PortalConfig, rows: &'a mut Vec<Row>) -> PortalRun<'a> {
        PortalRun {
            portal,
            connector: portal.auth_connector.clone().unwrap_or_default(),
            rows,
            errors: Vec::new(),
        }
    }

    fn push(&mut self, event: &str, action: Action, error: Option<&BitrixError>) {
        self.rows.push(Row {
            portal: self.portal.name.clone(),
            event: event.to_string(),
            action,
            connector: self.connector.clone(),
            error: error.map(BitrixError::failure),
        });
    }

    /// Records the answer to a bind or unbind; false when the error would repeat for every
    /// event (rights, plan, tokens), so the portal's run stops.
    fn record(&mut self, event: &str, answer: Result<Action, BitrixError>) -> bool {
        match answer {
            Ok(action) => {
                self.push(event, action, None);
                true
            }
            Err(e) => {
                self.push(event, Action::Failed, Some(&e));
                let go_on = e.class == ErrorClass::Rejected;
                self.errors.push(e);
                go_on
            }
        }
    }

    /// Our offline bindings on the portal, or `None` (and the error recorded).
    async fn bound(&mut self, client: &PortalClient) -> Option<BTreeSet<String>> {
        match client.event_get().await {
            Ok(handlers) => Some(ours(&handlers, &self.connector)),
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }
}

fn unbind_action(removed: u64) -> Action {
    if removed == 0 {
        Action::NotBound
    } else {
        Action::Unbound
    }
}

/// Makes one portal's offline bindings match its `events`; `prune` also removes extras.
/// Stops at the first error that would repeat for every event (rights, plan, tokens).
async fn subscribe_portal(
    client: &PortalClient,
    portal: &PortalConfig,
    prune: bool,
    rows: &mut Vec<Row>,
) -> Vec<BitrixError> {
    let mut run = PortalRun::new(portal, rows);
    let Some(bound) = run.bound(client).await else {
        return run.errors;
    };
    for event in &portal.events {
        let answer = if bound.contains(&event.to_uppercase()) {
            Ok(Action::AlreadyBound)
        } else {
            client
                .event_bind_offline(event)
                .await
                .map(|outcome| match outcome {
                    BindOutcome::Bound => Action::Bound,
                    BindOutcome::AlreadyBound => Action::AlreadyBound,
                })
        };
        if !run.record(event, answer) {
            return run.errors;
        }
    }
    // With --prune the configured bindings replace the extras: the extras go only once every
    // configured event is bound, so a failed bind never leaves the portal with neither.
    let replaced = run.errors.is_empty();
    for event in extras(&bound, &portal.events) {
        let answer = if prune && replaced {
            client.event_unbind_offline(&event).await.map(unbind_action)
        } else {
            Ok(Action::Extra)
        };
        if !run.record(&event, answer) {
            return run.errors;
        }
    }
    run.errors
}

/// The events `unsubscribe` unbinds, in order: those in `events` (also when not bound, to show
/// them as such), then every other offline binding of ours, unless `only_configured`.
fn to_unbind(bound: &BTreeSet<String>, events: &[String], only_configured: bool) -> Vec<String> {
    let mut list: Vec<String> = events.to_vec();
    if !only_configured {
        list.extend(extras(bound, events));
    }
    list
}

/// Removes one portal's offline bindings of our connector: every one (`event.get` lists them),
/// or with `only_configured` those of its `events` only (the other ones stay).
async fn unsubscribe_portal(
    client: &PortalClient,
    portal: &PortalConfig,
    only_configured: bool,
    rows: &mut Vec<Row>,
) -> Vec<BitrixError> {
    let mut run = PortalRun::new(portal, rows);
    let Some(bound) = run.bound(client).await else {
        return run.errors;
    };
    for event in to_unbind(&bound, &portal.events, only_configured) {
        let answer = if bound.contains(&event.to_uppercase()) {
            client.event_unbind_offline(&event).await.map(unbind_action)
        } else {
            Ok(Action::NotBound)
        };
        if !run.record(&event, answer) {
            return run.errors;
        }
    }
    run.errors
}

/// `subscribe [--portal P] [--prune]`.
pub(super) async fn subscribe(
    config: Config,
    portal: Option<String>,
    prune: bool,
    json: bool,
) -> anyhow::Result<()> {
    let portals = report::portals(&config, portal.as_deref())?;
    let journal = open_journal(&config).await?;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for portal in portals {
        let client = crate::pipeline::operator_client(portal, &journal).await?;
        errors.extend(subscribe_portal(&client, portal, prune, &mut rows).await);
    }
    finish("subscribe", &rows, errors, json)
}

/// `unsubscribe [--portal P] [--only-configured]`.
pub(super) async fn unsubscribe(
    config: Config,
    portal: Option<String>,
    only_configured: bool,
    json: bool,
) -> anyhow::Result<()> {
    let portals = report::portals(&config, portal.as_deref())?;
    let journal = open_journal(&config).await?;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for portal in portals {
        let client = crate::pipeline::operator_client(portal, &journal).await?;
        errors.extend(unsubscribe_portal(&client, portal, only_configured, &mut rows).await);
    }
    finish("unsubscribe", &rows, errors, json)
}

/// The journal, for the stored tokens only: read-only, and it must exist (without one there are
/// no tokens to bind with). A refresh made here is stored all the same (`Journal::save_tokens`).
async fn open_journal(config: &Config) -> anyhow::Result<Journal> {
    Journal::open_configured(&config.journal, crate::journal::Access::Read).await
}

/// Prints what changed, then reports the errors (if any) as the command's failure.
fn finish(command: &str, rows: &[Row], errors: Vec<BitrixError>, json: bool) -> anyhow::Result<()> {
    if json {
        report::print_json(&Output { bindings: rows })?;
    } else if !rows.is_empty() {
        let mut table = Table::new(&["PORTAL", "EVENT", "ACTION"]);
        for r in rows {
            table.row(vec![
                r.portal.clone(),
                r.event.clone(),
                r.action.as_str().to_string(),
            ]);
        }
        out!("{}", table.render())?;
        if rows.iter().any(|r| r.action == Action::Extra) {
            if errors.is_empty() {
                outln!(
                    "\nextra: bound on the portal but not in events; `b24eventd subscribe --prune` removes them"
                )?;
            } else {
                outln!(
                    "\nextra: bound on the portal but not in events; --prune removes them only once every event in events is bound: fix the failure and run it again"
                )?;
            }
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(
            anyhow::Error::from(errors.into_iter().next().expect("one error"))
                .context(format!("{command} failed")),
        ),
        n => {
            let messages: Vec<String> = errors.iter().map(BitrixError::message).collect();
            Err(anyhow::anyhow!(
                "{command} failed {n} times: {}",
                messages.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(event: &str, offline: bool, connector: &str) -> EventHandler {
        EventHandler {
            event: event.into(),
            offline,
            handler: if offline {
                String::new()
            } else {
                "https://h.example/".into()
            },
            connector_id: connector.into(),
        }
    }

    #[test]
    fn ours_are_offline_bindings_of_our_connector() {
        let handlers = [
            handler("ONCRMDEALADD", true, ""),
            handler("ONCRMDEALUPDATE", true, "erp-sync"),
            handler("ONCRMLEADADD", false, ""),
            handler("ONTASKADD", true, ""),
        ];
        assert_eq!(
            ours(&handlers, ""),
            BTreeSet::from(["ONCRMDEALADD".to_string(), "ONTASKADD".to_string()])
        );
        assert_eq!(
            ours(&handlers, "erp-sync"),
            BTreeSet::from(["ONCRMDEALUPDATE".to_string()])
        );
        let bound = ours(&handlers, "");
        assert_eq!(
            extras(&bound, &["ONCRMDEALADD".to_string()]),
            vec!["ONTASKADD".to_string()]
        );
    }

    #[test]
    fn unsubscribe_takes_every_binding_of_ours_unless_only_configured() {
        let handlers = [
            handler("ONCRMDEALADD", true, ""),
            handler("ONTASKADD", true, ""),
            handler("ONCRMLEADADD", true, "erp-sync"),
            handler("ONCRMCONTACTADD", false, ""),
        ];
        let bound = ours(&handlers, "");
        let events = ["ONCRMDEALADD".to_string(), "ONCRMDEALUPDATE".to_string()];
        assert_eq!(
            to_unbind(&bound, &events, false),
            ["ONCRMDEALADD", "ONCRMDEALUPDATE", "ONTASKADD"],
            "the configured ones, then every other offline binding of our connector"
        );
        assert_eq!(
            to_unbind(&bound, &events, true),
            ["ONCRMDEALADD", "ONCRMDEALUPDATE"]
        );
    }

    #[test]
    fn json_rows_use_the_table_words() {
        let row = Row {
            portal: "main".into(),
            event: "ONCRMDEALADD".into(),
            action: Action::AlreadyBound,
            connector: String::new(),
            error: None,
        };
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["action"], Action::AlreadyBound.as_str());
        assert!(json.get("error").is_none());
        for action in [
            Action::Bound,
            Action::AlreadyBound,
            Action::Extra,
            Action::Unbound,
            Action::NotBound,
            Action::Failed,
        ] {
            assert_eq!(
                serde_json::to_value(action).unwrap(),
                serde_json::json!(action.as_str())
            );
        }
    }
}
