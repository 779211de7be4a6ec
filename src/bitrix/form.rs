//! PHP-style bracket form encoding (`a[b][0]=x`), as PHP's `http_build_query` writes it and
//! `parse_str` reads it. Used for `batch` sub-commands, which travel as query strings.

use serde_json::{Map, Value};
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

/// Parses a PHP-style query string into JSON, as PHP's `parse_str` does: `a[b]=1` nests,
/// `a[]=x` appends, numeric-looking keys under a parent that holds only sequential indexes
/// become a JSON array. All leaf values are strings (PHP has no types in a query string).
pub fn decode(query: &str) -> Value {
    let mut root = Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(raw_key);
        let value = Value::String(percent_decode(raw_value));
        let (head, path) = split_key(&key);
        if head.is_empty() {
            continue;
        }
        insert_path(&mut root, head, &path, value);
    }
    // The top level is the map of parameters even when its keys are 0, 1, …: only nested maps
    // become lists (else `encode` of the result would have no parameters to write).
    Value::Object(
        root.into_iter()
            .map(|(k, v)| (k, arrays_from_sequential_maps(v)))
            .collect(),
    )
}

/// Splits `a[b][]` into `("a", ["b", ""])`. A key with an unbalanced bracket is taken whole,
/// as PHP does.
fn split_key(key: &str) -> (&str, Vec<&str>) {
    let Some(open) = key.find('[') else {
        return (key, Vec::new());
    };
    let head = &key[..open];
    let mut path = Vec::new();
    let mut rest = &key[open..];
    while let Some(stripped) = rest.strip_prefix('[') {
        match stripped.find(']') {
            Some(close) => {
                path.push(&stripped[..close]);
                rest = &stripped[close + 1..];
            }
            None => return (key, Vec::new()),
        }
    }
    (head, path)
}

fn insert_path(map: &mut Map<String, Value>, key: &str, path: &[&str], value: Value) {
    if path.is_empty() {
        map.insert(key.to_string(), value);
        return;
    }
    let child = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !child.is_object() {
        *child = Value::Object(Map::new());
    }
    let child_map = child.as_object_mut().expect("just made an object");
    let next_key = if path[0].is_empty() {
        next_index(child_map).to_string()
    } else {
        path[0].to_string()
    };
    insert_path(child_map, &next_key, &path[1..], value);
}

fn next_index(map: &Map<String, Value>) -> u64 {
    map.keys()
        .filter_map(|k| k.parse::<u64>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

/// Whether PHP would store `key` as an integer key: a canonical decimal ("0", "17"; not "00",
/// "+1" or "-0"). Other keys stay strings, so "0" and "00" are two different keys.
fn is_php_int_key(key: &str) -> bool {
    match key.as_bytes() {
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => {
            rest.iter().all(u8::is_ascii_digit) && key.parse::<usize>().is_ok()
        }
        _ => false,
    }
}

fn arrays_from_sequential_maps(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let sequential = !map.is_empty() && map.keys().all(|k| is_php_int_key(k));
            let converted: Map<String, Value> = map
                .into_iter()
                .map(|(k, v)| (k, arrays_from_sequential_maps(v)))
                .collect();
            if sequential {
                let mut indexed: Vec<(usize, Value)> = converted
                    .into_iter()
                    .map(|(k, v)| (k.parse::<usize>().expect("checked numeric"), v))
                    .collect();
                indexed.sort_by_key(|(i, _)| *i);
                if indexed.iter().enumerate().all(|(pos, (i, _))| pos == *i) {
                    return Value::Array(indexed.into_iter().map(|(_, v)| v).collect());
                }
                return Value::Object(
                    indexed
                        .into_iter()
                        .map(|(i, v)| (i.to_string(), v))
                        .collect(),
                );
            }
            Value::Object(converted)
        }
        other => other,
    }
}

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
    fn decodes_like_php_parse_str() {
        let v = decode("filter[%3EID]=10&id[]=5&id[]=6&name=a+b&x[0]=p&x[1]=q");
        assert_eq!(
            v,
            json!({"filter": {">ID": "10"}, "id": ["5", "6"], "name": "a b", "x": ["p", "q"]})
        );
    }

    #[test]
    fn decode_keeps_non_sequential_numeric_keys_as_object() {
        assert_eq!(decode("a[3]=x&a[7]=y"), json!({"a": {"3": "x", "7": "y"}}));
    }

    #[test]
    fn decode_tolerates_garbage() {
        assert_eq!(decode("a[b=1&&=2&%zz=3"), json!({"a[b": "1", "%zz": "3"}));
        assert_eq!(decode(""), json!({}));
    }

    #[test]
    fn round_trip_of_string_leaves() {
        let original = json!({"cmd": {"get": "event.offline.get?clear=0", "x": "a=b&c"}, "list": ["1", "2"], "e": "ü ~"});
        assert_eq!(decode(&encode(&original)), original);
    }

    #[test]
    fn numeric_top_level_keys_stay_parameters() {
        // Found by the form_round_trip fuzz target: "0" decoded to a list, which encodes to "".
        let decoded = decode("0");
        assert_eq!(decoded, serde_json::json!({"0": ""}));
        assert_eq!(decode(&encode(&decoded)), decoded);
        assert_eq!(decode("0=a&1=b"), serde_json::json!({"0": "a", "1": "b"}));
        assert_eq!(
            decode("a[0]=x&a[1]=y"),
            serde_json::json!({"a": ["x", "y"]})
        );
        // Found by the fuzzer too: "00" is a string key in PHP, not a second index 0.
        let decoded = decode("a[]&a[00]");
        assert_eq!(decoded, serde_json::json!({"a": {"0": "", "00": ""}}));
        assert_eq!(decode(&encode(&decoded)), decoded);
    }
}
