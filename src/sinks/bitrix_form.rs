//! The `bitrix-form` body of an http sink: the form-encoded POST a Bitrix24 outbound webhook
//! would have sent for an event, so a handler written for Bitrix24 (`$_POST['data']['FIELDS']
//! ['ID']`, `$_POST['auth']['application_token']`) works unchanged behind the firewall.
//!
//! Keys in the order Bitrix24 sends them: `event`, `event_handler_id`, `data[...]` (the event's
//! `EVENT_DATA` tree), `ts`, then `auth[domain]`, `auth[client_endpoint]`,
//! `auth[server_endpoint]`, `auth[member_id]`, `auth[application_token]` (what an outbound
//! webhook receives: no OAuth tokens). Encoded as PHP's `http_build_query` does: brackets and
//! reserved characters percent-encoded, spaces as `+`, `true`/`false` as `1`/`0`, `null` and
//! empty arrays left out.

use crate::envelope::Envelope;
use crate::options::SecretSource;
use serde_json::Value;
use std::fmt::Write;

/// `format = "bitrix-form"`: what goes into the body besides the event (the `auth[]` of one
/// portal and the handler id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitrixFormConfig {
    /// `auth[domain]`: `bitrix_domain`, default the host of the routed portal's client_endpoint.
    pub domain: String,
    /// `auth[client_endpoint]`: `https://<bitrix_domain>/rest/` when `bitrix_domain` is set,
    /// else the routed portal's client_endpoint.
    pub client_endpoint: String,
    /// `auth[server_endpoint]`: the origin of the portal's oauth_token_url + `/rest/`.
    pub server_endpoint: String,
    /// `auth[member_id]`: `bitrix_member_id`.
    pub member_id: String,
    /// `auth[application_token]`: `application_token`, `application_token_file`, or the
    /// systemd credential `<sink>.application_token`; read with
    /// [`super::http::resolve_http_secrets`].
    pub application_token: SecretSource,
    /// `event_handler_id`, default 0.
    pub event_handler_id: u64,
}

/// The body for one envelope; `ts` is the event's time (or `now` when the envelope's timestamp
/// cannot be read) and `application_token` the resolved secret.
pub fn body(
    envelope: &Envelope,
    form: &BitrixFormConfig,
    application_token: &str,
    now: i64,
) -> String {
    let ts = event_unix_seconds(&envelope.timestamp).unwrap_or(now);
    let mut out = String::new();
    push_pair(&mut out, "event", &php_urlencode(&envelope.event));
    push_pair(
        &mut out,
        "event_handler_id",
        &php_urlencode(&form.event_handler_id.to_string()),
    );
    encode_value(&mut out, "data", &envelope.data);
    push_pair(&mut out, "ts", &ts.to_string());
    let auth = [
        ("domain", form.domain.as_str()),
        ("client_endpoint", form.client_endpoint.as_str()),
        ("server_endpoint", form.server_endpoint.as_str()),
        ("member_id", form.member_id.as_str()),
        ("application_token", application_token),
    ];
    for (key, value) in auth {
        push_pair(&mut out, &nested_key("auth", key), &php_urlencode(value));
    }
    out
}

/// The envelope's timestamp (RFC 3339, as the journal keeps `TIMESTAMP_X`) in unix seconds.
pub(crate) fn event_unix_seconds(timestamp: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(timestamp)
        .ok()
        .map(|t| t.timestamp())
}

/// Encodes `value` under the (already encoded) key `prefix`, as `http_build_query` does.
pub fn encode_value(out: &mut String, prefix: &str, value: &Value) {
    match value {
        Value::Null => {}
        Value::Bool(b) => push_pair(out, prefix, if *b { "1" } else { "0" }),
        Value::Number(n) => push_pair(out, prefix, &php_urlencode(&n.to_string())),
        Value::String(s) => push_pair(out, prefix, &php_urlencode(s)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                encode_value(out, &nested_key(prefix, &i.to_string()), item);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                encode_value(out, &nested_key(prefix, key), item);
            }
        }
    }
}

/// `prefix[key]` with the brackets and the key percent-encoded (`prefix` is encoded already).
fn nested_key(prefix: &str, key: &str) -> String {
    format!("{prefix}%5B{}%5D", php_urlencode(key))
}

fn push_pair(out: &mut String, key: &str, value: &str) {
    if !out.is_empty() {
        out.push('&');
    }
    out.push_str(key);
    out.push('=');
    out.push_str(value);
}

/// PHP's `urlencode`: letters, digits and `-_.` stay, a space becomes `+`, every other byte
/// of the UTF-8 text becomes `%XX` (upper-case hex).
pub(crate) fn php_urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => out.push(b as char),
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::envelope::Lane;
    use serde_json::json;

    fn form() -> BitrixFormConfig {
        BitrixFormConfig {
            domain: "some-domain.bitrix24.com".into(),
            client_endpoint: "https://some-domain.bitrix24.com/rest/".into(),
            server_endpoint: "https://oauth.bitrix.info/rest/".into(),
            member_id: "d897063e1ce7c5eb9f04b9751eef5915".into(),
            application_token: SecretSource::Credential("erp.application_token".into()),
            event_handler_id: 975,
        }
    }

    fn envelope(data: Value) -> Envelope {
        Envelope {
            id: "main:7405".into(),
            portal: "main".into(),
            event: "ONCRMDEALADD".into(),
            offline_id: 7405,
            message_id: "m".into(),
            timestamp: "2025-12-18T11:38:44+03:00".into(),
            data,
            additional: json!({"user_id": 1}),
            lane: Lane::Normal,
            attempt: 1,
            entity: Value::Null,
            entity_error: None,
        }
    }

    fn encoded(value: Value) -> String {
        let mut out = String::new();
        encode_value(&mut out, "data", &value);
        out
    }

    /// The documented outbound-webhook example (api-reference/events/index.md), byte for byte
    /// in the layout of a captured request (bitrix24/b24phpsdk RemoteEventsFabricTest).
    #[test]
    fn the_documented_example() {
        let body = body(
            &envelope(json!({"FIELDS": {"ID": "7405"}})),
            &form(),
            "jvh9y1ulvt2m6k5or90v9mg8nn32ozas",
            0,
        );
        assert_eq!(
            body,
            "event=ONCRMDEALADD&event_handler_id=975&data%5BFIELDS%5D%5BID%5D=7405\
             &ts=1766047124\
             &auth%5Bdomain%5D=some-domain.bitrix24.com\
             &auth%5Bclient_endpoint%5D=https%3A%2F%2Fsome-domain.bitrix24.com%2Frest%2F\
             &auth%5Bserver_endpoint%5D=https%3A%2F%2Foauth.bitrix.info%2Frest%2F\
             &auth%5Bmember_id%5D=d897063e1ce7c5eb9f04b9751eef5915\
             &auth%5Bapplication_token%5D=jvh9y1ulvt2m6k5or90v9mg8nn32ozas"
        );
    }

    #[test]
    fn nested_objects_and_lists() {
        assert_eq!(
            encoded(json!({"FIELDS": {"ID": 45, "PHONE": [{"VALUE": "1"}, {"VALUE": "2"}]}})),
            "data%5BFIELDS%5D%5BID%5D=45\
             &data%5BFIELDS%5D%5BPHONE%5D%5B0%5D%5BVALUE%5D=1\
             &data%5BFIELDS%5D%5BPHONE%5D%5B1%5D%5BVALUE%5D=2"
        );
    }

    #[test]
    fn null_false_true_and_empty_containers_as_php_does() {
        assert_eq!(
            encoded(json!({"a": null, "b": false, "c": true, "d": [], "e": {}, "f": 1.5})),
            "data%5Bb%5D=0&data%5Bc%5D=1&data%5Bf%5D=1.5"
        );
        // EVENT_DATA false arrives as null: no data[] keys at all.
        assert_eq!(encoded(Value::Null), "");
        assert_eq!(encoded(json!("x")), "data=x");
    }

    #[test]
    fn reserved_characters_and_utf8_in_keys_and_values() {
        assert_eq!(
            encoded(json!({"a&b=c": "x&y=z", "k[1]": "[v]", "тема": "Сделка №1 ü"})),
            "data%5Ba%26b%3Dc%5D=x%26y%3Dz\
             &data%5Bk%5B1%5D%5D=%5Bv%5D\
             &data%5B%D1%82%D0%B5%D0%BC%D0%B0%5D=%D0%A1%D0%B4%D0%B5%D0%BB%D0%BA%D0%B0+%E2%84%961+%C3%BC"
        );
        assert_eq!(php_urlencode("a b+c~*'()!"), "a+b%2Bc%7E%2A%27%28%29%21");
        assert_eq!(php_urlencode("-_.AZaz09"), "-_.AZaz09");
    }

    #[test]
    fn ts_is_the_event_time_or_now_when_unreadable() {
        assert_eq!(
            event_unix_seconds("2025-12-18T11:38:44+03:00"),
            Some(1766047124)
        );
        let mut odd = envelope(Value::Null);
        odd.timestamp = "yesterday".into();
        let body = body(&odd, &form(), "t", 42);
        assert!(body.contains("&ts=42&"), "{body}");
        assert!(!body.contains("data"), "{body}");
    }
}
