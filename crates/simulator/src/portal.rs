//! The simulated portal's state behind the simulator's lock: the queue, event bindings, the
//! event catalog, CRM entities touched by events, tokens, limits, faults and counters.

use chrono::{DateTime, FixedOffset};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::auth::{Issued, TokenStore};
use super::limits::Limiter;
use super::query_limit::QueryLimit;
use super::queue::Queue;
use super::rest::iso;
use super::{Faults, SimRow, SimStats, SimulatorConfig};

/// Events the portal knows (`events`), by scope.
const EVENT_CATALOG: &[(&str, &str)] = &[
    ("", "ONAPPINSTALL"),
    ("", "ONAPPUNINSTALL"),
    ("", "ONAPPUPDATE"),
    ("", "ONAPPPAYMENT"),
    ("", "ONAPPTEST"),
    ("", "ONAPPMETHODCONFIRM"),
    ("", "ONOFFLINEEVENT"),
    ("crm", "ONCRMLEADADD"),
    ("crm", "ONCRMLEADUPDATE"),
    ("crm", "ONCRMLEADDELETE"),
    ("crm", "ONCRMDEALADD"),
    ("crm", "ONCRMDEALUPDATE"),
    ("crm", "ONCRMDEALDELETE"),
    ("crm", "ONCRMDEALMOVETOCATEGORY"),
    ("crm", "ONCRMCONTACTADD"),
    ("crm", "ONCRMCONTACTUPDATE"),
    ("crm", "ONCRMCONTACTDELETE"),
    ("crm", "ONCRMCOMPANYADD"),
    ("crm", "ONCRMCOMPANYUPDATE"),
    ("crm", "ONCRMCOMPANYDELETE"),
    ("crm", "ONCRMQUOTEADD"),
    ("crm", "ONCRMQUOTEUPDATE"),
    ("crm", "ONCRMQUOTEDELETE"),
    ("crm", "ONCRMACTIVITYADD"),
    ("crm", "ONCRMACTIVITYUPDATE"),
    ("crm", "ONCRMACTIVITYDELETE"),
    ("crm", "ONCRMDYNAMICITEMADD"),
    ("crm", "ONCRMDYNAMICITEMUPDATE"),
    ("crm", "ONCRMDYNAMICITEMDELETE"),
    ("task", "ONTASKADD"),
    ("task", "ONTASKUPDATE"),
    ("task", "ONTASKDELETE"),
    ("task", "ONTASKCOMMENTADD"),
    ("user", "ONUSERADD"),
];

/// CRM entity types whose `crm.<type>.get` the simulator answers.
pub const CRM_TYPES: &[&str] = &["DEAL", "LEAD", "CONTACT", "COMPANY"];

/// An event handler (`b_rest_event`).
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub id: i64,
    pub event: String,
    /// '' for offline handlers.
    pub handler: String,
    pub connector: String,
    pub user_id: i64,
    pub offline: bool,
}

/// A CRM entity as far as events revealed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub created: DateTime<FixedOffset>,
    pub modified: DateTime<FixedOffset>,
    pub modified_by: i64,
}

pub struct State {
    pub queue: Queue,
    pub bindings: Vec<Binding>,
    last_binding_id: i64,
    custom_events: BTreeSet<String>,
    /// (type, id) → entity, for `crm.<type>.get`.
    pub entities: BTreeMap<(String, u64), Entity>,
    /// Next entity id `/_sim/emit` uses when none is given.
    pub next_entity_id: u64,
    pub tokens: TokenStore,
    pub limiter: Limiter,
    pub query_limit: Option<QueryLimit>,
    pub faults: Faults,
    pub rng: fastrand::Rng,
    /// Counters; the queue counts are filled in by [`State::stats`].
    pub counters: SimStats,
    /// `/rest` requests being served now (`SimStats::most_requests_at_once` is its peak).
    pub serving: u64,
}

impl State {
    pub fn new(config: &SimulatorConfig) -> State {
        State {
            queue: Queue::new(),
            bindings: Vec::new(),
            last_binding_id: 0,
            custom_events: BTreeSet::new(),
            entities: BTreeMap::new(),
            next_entity_id: 1,
            tokens: TokenStore::new(config.access_token_ttl.as_secs_f64()),
            limiter: Limiter::new(config.limiter, config.operating_limit),
            query_limit: config
                .rate_limit
                .map(|(burst, per_second)| QueryLimit::new(burst, per_second, Instant::now())),
            faults: Faults::default(),
            rng: fastrand::Rng::with_seed(config.seed),
            counters: SimStats::default(),
            serving: 0,
        }
    }

    pub fn issue_tokens(&mut self, now: f64) -> Issued {
        let State { tokens, rng, .. } = self;
        tokens.issue(rng, now)
    }

    pub fn new_authorization_code(&mut self) -> String {
        let State { tokens, rng, .. } = self;
        tokens.new_code(rng)
    }

    pub fn count_call(&mut self, method: &str) {
        *self
            .counters
            .calls_by_method
            .entry(method.to_string())
            .or_default() += 1;
    }

    /// Whether `event` is in the catalog or was bound programmatically.
    pub fn known_event(&self, event: &str) -> bool {
        let upper = event.to_uppercase();
        EVENT_CATALOG.iter().any(|(_, name)| *name == upper) || self.custom_events.contains(&upper)
    }

    /// `events`: the names of one scope (`Some("")` is the global scope), or all.
    pub fn event_names(&self, scope: Option<&str>) -> Vec<String> {
        let mut names: Vec<String> = EVENT_CATALOG
            .iter()
            .filter(|(s, _)| scope.is_none_or(|wanted| wanted.eq_ignore_ascii_case(s)))
            .map(|(_, name)| (*name).to_string())
            .collect();
        if scope.is_none() {
            names.extend(self.custom_events.iter().cloned());
        }
        names
    }

    pub fn has_binding(&self, event: &str, handler: &str, connector: &str, user_id: i64) -> bool {
        self.bindings.iter().any(|b| {
            b.event.eq_ignore_ascii_case(event)
                && b.handler == handler
                && b.connector == connector
                && b.user_id == user_id
        })
    }

    pub fn add_binding(
        &mut self,
        event: &str,
        handler: &str,
        connector: &str,
        user_id: i64,
        offline: bool,
    ) {
        self.last_binding_id += 1;
        self.bindings.push(Binding {
            id: self.last_binding_id,
            event: event.to_uppercase(),
            handler: handler.to_string(),
            connector: connector.to_string(),
            user_id,
            offline,
        });
    }

    /// The programmatic `event.bind event_type=offline`; an unknown event name joins the
    /// catalog. Returns whether a binding was added.
    pub fn bind_offline(&mut self, event: &str, connector: &str) -> bool {
        if !self.known_event(event) {
            self.custom_events.insert(event.to_uppercase());
        }
        if self.has_binding(event, "", connector, 0) {
            return false;
        }
        self.add_binding(event, "", connector, 0, true);
        true
    }

    /// Distinct connectors of the offline bindings of `event`.
    pub fn offline_connectors(&self, event: &str) -> Vec<String> {
        let mut connectors: Vec<String> = Vec::new();
        for b in &self.bindings {
            if b.offline
                && b.event.eq_ignore_ascii_case(event)
                && !connectors.contains(&b.connector)
            {
                connectors.push(b.connector.clone());
            }
        }
        connectors
    }

    /// Raises an event: one row per connector among `connectors` that has an offline binding
    /// of it. CRM entity changes are remembered for `crm.<type>.get`.
    pub fn raise(
        &mut self,
        event: &str,
        data: Value,
        connectors: &[String],
        user_id: i64,
        now: DateTime<FixedOffset>,
    ) {
        let event = event.to_uppercase();
        self.counters.emitted += 1;
        self.track_entity(&event, &data, user_id, now);
        let bound = self.offline_connectors(&event);
        let mut done: Vec<&String> = Vec::new();
        for connector in connectors {
            if done.contains(&connector) || !bound.contains(connector) {
                continue;
            }
            done.push(connector);
            let pushed = self
                .queue
                .push(&event, data.clone(), user_id, connector, now);
            tracing::trace!(event = %event, connector = %connector, ?pushed, "offline event queued");
        }
    }

    fn track_entity(
        &mut self,
        event: &str,
        data: &Value,
        user_id: i64,
        now: DateTime<FixedOffset>,
    ) {
        let Some(rest) = event.strip_prefix("ONCRM") else {
            return;
        };
        let Some(kind) = CRM_TYPES.iter().find(|t| rest.starts_with(**t)) else {
            return;
        };
        let action = &rest[kind.len()..];
        let id = match data.pointer("/FIELDS/ID") {
            Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
            Some(Value::Number(n)) => n.as_u64(),
            _ => None,
        };
        let Some(id) = id else { return };
        let key = ((*kind).to_string(), id);
        match action {
            "DELETE" => {
                self.entities.remove(&key);
            }
            "ADD" | "UPDATE" => {
                let entity = self.entities.entry(key).or_insert(Entity {
                    created: now,
                    modified: now,
                    modified_by: user_id,
                });
                entity.modified = now;
                entity.modified_by = user_id;
            }
            _ => {}
        }
    }

    pub fn stats(&self) -> SimStats {
        let mut stats = self.counters.clone();
        stats.queued = 0;
        stats.reserved = 0;
        stats.error_lane = 0;
        for row in self.queue.rows() {
            if row.error {
                stats.error_lane += 1;
            }
            if !row.process_id.is_empty() {
                stats.reserved += 1;
            } else if !row.error {
                stats.queued += 1;
            }
        }
        stats
    }

    pub fn sim_rows(&self) -> Vec<SimRow> {
        self.queue
            .rows()
            .map(|r| SimRow {
                id: r.id,
                timestamp_x: iso(&r.timestamp_x),
                event_name: r.event_name.clone(),
                event_data: r.rendered_data(),
                event_additional: r.additional(),
                message_id: r.message_id.clone(),
                process_id: r.process_id.clone(),
                error: r.error,
                connector_id: r.connector_id.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rest::portal_time;
    use serde_json::json;

    fn state() -> State {
        State::new(&SimulatorConfig::default())
    }

    #[test]
    fn raise_queues_only_for_bound_connectors() {
        let mut s = state();
        let now = portal_time(1_800_000_000);
        s.raise(
            "ONCRMDEALUPDATE",
            json!({"FIELDS": {"ID": "1"}}),
            &[String::new()],
            1,
            now,
        );
        assert_eq!(s.queue.rows().count(), 0);
        assert_eq!(s.counters.emitted, 1);
        s.bind_offline("onCrmDealUpdate", "erp");
        s.bind_offline("ONCRMDEALUPDATE", "");
        assert!(!s.bind_offline("ONCRMDEALUPDATE", ""));
        let connectors = s.offline_connectors("ONCRMDEALUPDATE");
        assert_eq!(connectors, ["erp", ""]);
        s.raise(
            "oncrmdealupdate",
            json!({"FIELDS": {"ID": "1"}}),
            &connectors,
            1,
            now,
        );
        let rows: Vec<_> = s
            .queue
            .rows()
            .map(|r| (r.event_name.clone(), r.connector_id.clone()))
            .collect();
        assert_eq!(
            rows,
            [
                ("ONCRMDEALUPDATE".to_string(), "erp".to_string()),
                ("ONCRMDEALUPDATE".to_string(), String::new())
            ]
        );
        let stats = s.stats();
        assert_eq!((stats.queued, stats.reserved, stats.error_lane), (2, 0, 0));
    }

    #[test]
    fn custom_events_join_the_catalog() {
        let mut s = state();
        assert!(!s.known_event("ONMYTHING"));
        s.bind_offline("OnMyThing", "");
        assert!(s.known_event("ONMYTHING"));
        assert!(s.event_names(None).contains(&"ONMYTHING".to_string()));
        assert!(
            !s.event_names(Some("crm"))
                .contains(&"ONMYTHING".to_string())
        );
    }

    #[test]
    fn crm_entities_follow_events() {
        let mut s = state();
        let t0 = portal_time(1_800_000_000);
        let t1 = portal_time(1_800_000_100);
        s.raise("ONCRMDEALADD", json!({"FIELDS": {"ID": "7"}}), &[], 3, t0);
        s.raise("ONCRMDEALUPDATE", json!({"FIELDS": {"ID": 7}}), &[], 4, t1);
        let deal = &s.entities[&("DEAL".to_string(), 7)];
        assert_eq!((deal.created, deal.modified, deal.modified_by), (t0, t1, 4));
        s.raise(
            "ONCRMDEALDELETE",
            json!({"FIELDS": {"ID": "7"}}),
            &[],
            4,
            t1,
        );
        assert!(s.entities.is_empty());
    }
}
