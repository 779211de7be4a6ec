//! The envelope: the one JSON object every sink receives per event.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which upstream queue an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// The ordinary queue (`event.offline.get` with `error=0`).
    Normal,
    /// Bitrix24's error lane (`error=1`): events once reported with `event.offline.error`.
    Error,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Normal => "normal",
            Lane::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Lane> {
        match s {
            "normal" => Some(Lane::Normal),
            "error" => Some(Lane::Error),
            _ => None,
        }
    }
}

/// One event as delivered to a sink. `id` (`<portal>:<offline ID>`) is the idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    pub portal: String,
    pub event: String,
    pub offline_id: i64,
    pub message_id: String,
    pub timestamp: String,
    pub data: Value,
    pub additional: Value,
    pub lane: Lane,
    pub attempt: u32,
    /// The entity the event is about, read when `[portals.NAME.enrich]` asks for it; `null`
    /// otherwise, and when it could not be read (then `entity_error` says why).
    pub entity: Value,
    /// Why `entity` is `null` although enrichment was asked for (e.g. the entity was deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_error: Option<String>,
}

impl Envelope {
    /// The idempotency key of an event: stable across redeliveries and restarts.
    pub fn make_id(portal: &str, offline_id: i64) -> String {
        format!("{portal}:{offline_id}")
    }

    /// A deal-update envelope for offline ID `n` on portal `main` (tests).
    #[cfg(test)]
    pub(crate) fn sample(n: i64) -> Envelope {
        Envelope {
            id: Envelope::make_id("main", n),
            portal: "main".into(),
            event: "ONCRMDEALUPDATE".into(),
            offline_id: n,
            message_id: format!("{n:032x}"),
            timestamp: "2026-11-22T10:00:00+03:00".into(),
            data: serde_json::json!({"FIELDS": {"ID": n.to_string()}}),
            additional: serde_json::json!({"user_id": 1}),
            lane: Lane::Normal,
            attempt: 1,
            entity: Value::Null,
            entity_error: None,
        }
    }

    /// The envelope as one line of JSON (no trailing newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("an envelope always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_serializes_with_spec_field_names() {
        let env = Envelope {
            id: Envelope::make_id("main", 1234),
            portal: "main".into(),
            event: "ONCRMDEALUPDATE".into(),
            offline_id: 1234,
            message_id: "4f2a9c1e7b3d5a6f8e0c2b4d6a8f1e3c".into(),
            timestamp: "2026-11-22T10:00:00+03:00".into(),
            data: serde_json::json!({"FIELDS": {"ID": "45"}}),
            additional: serde_json::json!({"user_id": 1}),
            lane: Lane::Normal,
            attempt: 1,
            entity: Value::Null,
            entity_error: None,
        };
        let v: Value = serde_json::from_str(&env.to_json_line()).unwrap();
        assert_eq!(v["id"], "main:1234");
        assert_eq!(v["lane"], "normal");
        assert_eq!(v["data"]["FIELDS"]["ID"], "45");
        assert_eq!(v["entity"], Value::Null);
        assert_eq!(v.as_object().unwrap().len(), 11);
    }
}
