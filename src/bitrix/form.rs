//! PHP-style bracket form encoding (`a[b][0]=x`), as PHP's `http_build_query` writes it and
//! `parse_str` reads it. Used for `batch` sub-commands, which travel as query strings. The
//! tests read what it writes with the portal simulator's own `parse_str`, written from PHP's
//! rules, so an encoding bug cannot hide behind its own inverse.

use serde_json::Value;
use std::fmt::Write;

/// Encodes a JSON object as a PHP-style query string: nested objects become `key[sub]`, arrays
/// `key[0]`, `key[1]`; `true`/`false` become `1`/`0` (as `http_build_query` does); `null` is
/// left out. Keys and values are percent-encoded except for the brackets of the key path.
/// A non-object top level encodes as an empty string.
pub fn encode(params: &Value) -> String {
    let mut out = String::new();
    if let Value::Object(map) = params {
        for (key, value) in map {
            encode_value(&mut out, &percent_encode(key), value);
        }
    }
    out
}

fn encode_value(out: &mut String, prefix: &str, value: &Value) {
    match value {
        Value::Null => {}
        Value::Bool(b) => push_pair(out, prefix, if *b { "1" } else { "0" }),
        Value::Number(n) => push_pair(out, prefix, &n.to_string()),
        Value::String(s) => push_pair(out, prefix, &percent_encode(s)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                encode_value(out, &format!("{prefix}[{i}]"), item);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                encode_value(out, &format!("{prefix}[{}]", percent_encode(k)), item);
            }
        }
    }
}

fn push_pair(out: &mut String, key: &str, value: &str) {
    if !out.is_empty() {
        out.push('&');
    }
    out.push_str(key);
    out.push('=');
    out.push_str(value);
}

/// Percent-encodes everything but RFC 3986 unreserved characters (as PHP's `rawurlencode`).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Decodes `%XX` escapes and `+` (as a space). Invalid escapes are kept literally; invalid UTF-8
/// is replaced, as PHP would pass the bytes through and JSON could not carry them anyway.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the portal's PHP makes of a query string (the simulator's `parse_str`), for the tests
/// of what the client sends.
#[cfg(test)]
pub(crate) use b24eventd_simulator::php_request::parse_str as decode;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_nested_objects_and_arrays_with_brackets() {
        let q = encode(
            &json!({"process_id": "abc", "message_id": ["m1", "m2"], "filter": {">ID": 10}}),
        );
        assert_eq!(
            q,
            "filter[%3EID]=10&message_id[0]=m1&message_id[1]=m2&process_id=abc"
        );
    }

    #[test]
    fn encodes_booleans_as_php_does_and_skips_null() {
        assert_eq!(
            encode(&json!({"clear": false, "error": true, "x": null})),
            "clear=0&error=1"
        );
    }

    #[test]
    fn percent_encodes_reserved_characters_in_values() {
        assert_eq!(encode(&json!({"t": "a&b [x]=y"})), "t=a%26b%20%5Bx%5D%3Dy");
        assert_eq!(encode(&json!({"t": "ü"})), "t=%C3%BC");
    }

    #[test]
    fn php_reads_back_string_leaves() {
        let original = json!({"cmd": {"get": "event.offline.get?clear=0", "x": "a=b&c"}, "list": ["1", "2"], "e": "ü ~"});
        assert_eq!(decode(&encode(&original)), original);
    }

    #[test]
    fn php_reads_back_the_offline_calls() {
        let sent = json!({
            "process_id": "ab12", "message_id": ["m1", "m2"], "filter": {">ID": 10, "EVENT_NAME": "ONCRMDEALUPDATE"},
            "clear": false, "error": true, "limit": 50, "skip": null, "order": {"TIMESTAMP_X": "ASC"},
        });
        assert_eq!(
            decode(&encode(&sent)),
            json!({
                "process_id": "ab12", "message_id": ["m1", "m2"], "filter": {">ID": "10", "EVENT_NAME": "ONCRMDEALUPDATE"},
                "clear": "0", "error": "1", "limit": "50", "order": {"TIMESTAMP_X": "ASC"},
            })
        );
    }

    #[test]
    fn numeric_keys_survive_the_trip() {
        // Found by the form_round_trip fuzz target: a top-level "0" must stay a parameter.
        let params = json!({"0": "", "1": "b"});
        assert_eq!(decode(&encode(&params)), params);
        assert_eq!(
            decode(&encode(&json!({"a": ["x", "y"]}))),
            json!({"a": ["x", "y"]})
        );
        // Found by the fuzzer too: "00" is a string key in PHP, not a second index 0.
        let params = json!({"a": {"0": "", "00": ""}});
        assert_eq!(decode(&encode(&params)), params);
        let sparse = json!({"a": {"3": "x", "7": "y"}});
        assert_eq!(decode(&encode(&sparse)), sparse);
    }

    #[test]
    fn reserved_characters_in_keys_and_values_survive_the_trip() {
        let params = json!({"t": "a&b [x]=y+z%", "f": {"a b.c": "1", ">=ID": "2"}});
        assert_eq!(decode(&encode(&params)), params);
    }
}
