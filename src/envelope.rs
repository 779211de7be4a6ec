//! The envelope: the one JSON object every sink receives per event, and its `id`, the
//! idempotency key (`<portal>:<offline ID>:<change>`, computed by [`Envelope::make_id`]).

use chrono::DateTime;
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

/// One event as delivered to a sink. `id` is the idempotency key: `<portal>:<offline ID>:<change>`
/// (see [`Envelope::make_id`]), the same on every delivery of one change of one queue record.
/// Rows journaled before keys carried the change keep their `<portal>:<offline ID>`.
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
    /// The idempotency key of one change of an offline queue record: `<portal>:<offline ID>:
    /// <change>`, `<change>` being [`Envelope::change_key`] of its `TIMESTAMP_X`.
    ///
    /// The same for every read of the same row in the same state (redeliveries, a re-read after
    /// a lost answer or a crash: neither the reservation nor `event.offline.error` changes
    /// `TIMESTAMP_X`); different when a later change was merged into the row (a new
    /// `TIMESTAMP_X`) or the `ID` came back for a new event after the table was emptied and
    /// MySQL re-seeded its auto-increment. Two changes merged within the same second share it.
    pub fn make_id(portal: &str, offline_id: i64, timestamp: &str) -> String {
        Envelope::id_of_change(portal, offline_id, &Envelope::change_key(timestamp))
    }

    /// The key for a `<change>` computed before ([`Envelope::change_key`]).
    pub fn id_of_change(portal: &str, offline_id: i64, change: &str) -> String {
        format!("{portal}:{offline_id}:{change}")
    }

    /// The `<change>` part of a key: `TIMESTAMP_X` (ISO-8601 with its offset, whole seconds, as
    /// the portal renders it) as Unix seconds, so the same instant gives the same key whatever
    /// offset it is written with. A `TIMESTAMP_X` that does not parse (absent: empty) gives `h`
    /// and the first 12 hex digits of the md5 of the text as received.
    pub fn change_key(timestamp: &str) -> String {
        let text = timestamp.trim();
        let parsed = DateTime::parse_from_rfc3339(text)
            .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%z"));
        match parsed {
            Ok(t) => t.timestamp().to_string(),
            Err(_) => {
                let digest = format!("{:x}", md5::compute(timestamp.as_bytes()));
                format!("h{}", &digest[..12])
            }
        }
    }

    /// A deal-update envelope for offline ID `n` on portal `main` (tests).
    #[cfg(test)]
    pub(crate) fn sample(n: i64) -> Envelope {
        Envelope {
            id: Envelope::make_id("main", n, "2026-11-22T10:00:00+03:00"),
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
            id: Envelope::make_id("main", 1234, "2026-11-22T10:00:00+03:00"),
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
        assert_eq!(v["id"], "main:1234:1795330800");
        assert_eq!(v["lane"], "normal");
        assert_eq!(v["data"]["FIELDS"]["ID"], "45");
        assert_eq!(v["entity"], Value::Null);
        assert_eq!(v.as_object().unwrap().len(), 11);
    }

    #[test]
    fn the_same_instant_gives_the_same_key_whatever_its_offset() {
        let key = Envelope::make_id("main", 1234, "2024-07-18T12:32:31+02:00");
        assert_eq!(key, "main:1234:1721298751");
        for same in [
            "2024-07-18T10:32:31+00:00",
            "2024-07-18T10:32:31Z",
            "2024-07-18T13:32:31+03:00",
            "2024-07-18T05:32:31-05:00",
            "2024-07-18T12:32:31+0200",
            " 2024-07-18T12:32:31+02:00 ",
        ] {
            assert_eq!(Envelope::make_id("main", 1234, same), key, "{same}");
        }
    }

    #[test]
    fn a_later_second_or_another_id_or_portal_gives_another_key() {
        let key = Envelope::make_id("main", 1234, "2024-07-18T12:32:31+02:00");
        assert_eq!(
            Envelope::make_id("main", 1234, "2024-07-18T12:32:32+02:00"),
            "main:1234:1721298752"
        );
        assert_ne!(
            Envelope::make_id("main", 1235, "2024-07-18T12:32:31+02:00"),
            key
        );
        assert_ne!(
            Envelope::make_id("shop", 1234, "2024-07-18T12:32:31+02:00"),
            key
        );
    }

    #[test]
    fn an_unparsable_timestamp_gives_a_hash_of_its_text() {
        // md5("18.07.2024 12:32:31") = 420e92c55518cb08…: `h` and its first 12 hex digits.
        let text = "18.07.2024 12:32:31";
        let digest = format!("{:x}", md5::compute(text));
        let change = Envelope::change_key(text);
        assert_eq!(change, "h420e92c55518");
        assert_eq!(change, format!("h{}", &digest[..12]));
        assert_eq!(change.len(), 13);
        assert_eq!(Envelope::change_key(""), "hd41d8cd98f00", "md5 of nothing");
        assert_ne!(Envelope::change_key("18.07.2024 12:32:32"), change);
        assert_eq!(
            Envelope::id_of_change("main", 7, &change),
            format!("main:7:{change}")
        );
    }
}
