//! Fuzz target: what the client's PHP form encoder writes, PHP's `parse_str` (the portal
//! simulator's, written from PHP's rules) reads back as the same parameters: strings as they
//! were, numbers in their JSON text, booleans as "1"/"0", nulls and arrays with nothing in them
//! left out. The decoder also takes any bytes without a panic.
#![no_main]

use b24eventd::bitrix::form::encode;
use b24eventd_simulator::php_request::parse_str;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// PHP's default `max_input_nesting_level`: deeper brackets drop the variable.
const MAX_BRACKETS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let _ = parse_str(&String::from_utf8_lossy(data));
    let Ok(Value::Object(params)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Some(expected) = read_back_params(&params) else {
        return;
    };
    let params = Value::Object(params);
    assert_eq!(parse_str(&encode(&params)), expected, "parameters {params}");
});

/// The parameters as PHP reads them back; `None` when a name is one a bracket form cannot
/// carry (PHP mangles spaces, dots and brackets in a top-level name, and a nested key that is
/// empty, one whitespace character or holds `]` is no key of its own).
fn read_back_params(params: &Map<String, Value>) -> Option<Value> {
    let mut out = Map::new();
    for (name, value) in params {
        if name.is_empty() || name.contains([' ', '.', '[', '\0']) {
            return None;
        }
        if let Some(value) = read_back(value, 0)? {
            out.insert(name.clone(), value);
        }
    }
    Some(Value::Object(out))
}

/// A value `brackets` levels deep as PHP reads it back: `Some(None)` when the form leaves it out.
fn read_back(value: &Value, brackets: usize) -> Option<Option<Value>> {
    let entries: Vec<(String, &Value)> = match value {
        Value::Null => return Some(None),
        Value::Bool(b) => return Some(Some(Value::from(if *b { "1" } else { "0" }))),
        Value::Number(n) => return Some(Some(Value::from(n.to_string()))),
        Value::String(s) => return Some(Some(Value::from(s.as_str()))),
        Value::Array(items) => (items.iter().enumerate())
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v)).collect(),
    };
    if brackets == MAX_BRACKETS {
        return None;
    }
    let mut kept = Vec::new();
    for (key, value) in entries {
        let one_space = key.len() == 1 && key.starts_with([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
        if key.is_empty() || one_space || key.contains([']', '\0']) {
            return None;
        }
        if let Some(value) = read_back(value, brackets + 1)? {
            kept.push((key, value));
        }
    }
    if kept.is_empty() {
        return Some(None);
    }
    // A PHP array is a JSON list when its keys are 0, 1, … in order.
    let is_list = (kept.iter().enumerate()).all(|(i, (key, _))| *key == i.to_string());
    Some(Some(if is_list {
        Value::Array(kept.into_iter().map(|(_, v)| v).collect())
    } else {
        Value::Object(kept.into_iter().collect())
    }))
}
