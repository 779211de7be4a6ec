//! PHP-side request parameters as the Bitrix24 REST server sees them: ordered parameter maps
//! parsed from JSON or PHP form bodies (read as [`php_request`] says), and the coercions it
//! applies (`intval`, `(bool)`, `strval`, `is_array`, `isset`).

use serde_json::{Map, Value};
use std::collections::HashMap;

use super::php_request::{self, PhpValue};

/// Request parameters with lower-cased top-level names (the server runs
/// `array_change_key_case`), plus the order in which the client sent the keys of each
/// top-level object (`cmd`, `order`): `serde_json::Map` sorts keys, PHP arrays keep them in
/// insertion order, and batch commands run in that order.
#[derive(Debug, Clone, Default)]
pub struct Params {
    map: Map<String, Value>,
    key_orders: HashMap<String, Vec<String>>,
}

impl Params {
    /// Parses a PHP query string or form body (`parse_str`).
    pub fn from_form(query: &str) -> Params {
        let mut params = Params::default();
        for (key, value) in php_request::parse_str_ordered(query).entries() {
            let key = key.to_lowercase();
            if let PhpValue::Array(array) = value {
                let order = params.key_orders.entry(key.clone()).or_default();
                for (sub, _) in array.entries() {
                    if !order.iter().any(|k| k == sub) {
                        order.push(sub.to_string());
                    }
                }
            }
            params.map.insert(key, value.to_json());
        }
        params
    }

    /// Parses a JSON body; anything but a JSON object is an empty parameter set, as the real
    /// server silently drops a body `Json::decode` cannot read.
    pub fn from_json(body: &[u8]) -> Params {
        let Some((map, orders)) = php_request::json_body(body) else {
            return Params::default();
        };
        let mut params = Params::from_value(Value::Object(map));
        for (key, order) in orders {
            params.key_orders.insert(key.to_lowercase(), order);
        }
        params
    }

    /// Wraps an already parsed object (key order is then the map's own).
    pub fn from_value(value: Value) -> Params {
        let mut map = Map::new();
        if let Value::Object(object) = value {
            for (key, value) in object {
                map.insert(key.to_lowercase(), value);
            }
        }
        Params {
            map,
            key_orders: HashMap::new(),
        }
    }

    /// Body parameters override query parameters of the same name.
    pub fn merge_over(self, mut base: Params) -> Params {
        for (key, value) in self.map {
            base.key_orders.remove(&key);
            base.map.insert(key, value);
        }
        base.key_orders.extend(self.key_orders);
        base
    }

    /// `isset($query[name])`: present and not null.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// Removes a parameter (the server lifts `auth`, `auth_connector`, `start` out of the query).
    pub fn take(&mut self, name: &str) -> Option<Value> {
        self.key_orders.remove(name);
        self.map.remove(name)
    }

    /// The entries of an object parameter in the order the client sent them.
    pub fn entries_in_order(&self, name: &str) -> Vec<(String, Value)> {
        let Some(value) = self.get(name) else {
            return Vec::new();
        };
        ordered_entries(value, self.key_orders.get(name).map(Vec::as_slice))
    }

    /// The key order the client used inside an object parameter, if known.
    pub fn key_order(&self, name: &str) -> Option<&[String]> {
        self.key_orders.get(name).map(Vec::as_slice)
    }

    /// The whole parameter set as one object (what a method receives as `$query`).
    pub fn to_value(&self) -> Value {
        Value::Object(self.map.clone())
    }
}

/// Entries of a PHP array (JSON object or list), `order` first, the remaining keys after.
pub fn ordered_entries(value: &Value, order: Option<&[String]>) -> Vec<(String, Value)> {
    match value {
        Value::Object(map) => {
            let mut out: Vec<(String, Value)> = Vec::with_capacity(map.len());
            for key in order.unwrap_or(&[]) {
                if let Some(v) = map.get(key)
                    && !out.iter().any(|(k, _)| k == key)
                {
                    out.push((key.clone(), v.clone()));
                }
            }
            for (key, v) in map {
                if !out.iter().any(|(k, _)| k == key) {
                    out.push((key.clone(), v.clone()));
                }
            }
            out
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

/// PHP `intval`: leading numeric prefix of a string, floats truncated, booleans 0/1, arrays
/// 0 when empty and 1 otherwise.
pub fn intval(value: &Value) -> i64 {
    match value {
        Value::Null => 0,
        Value::Bool(b) => i64::from(*b),
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().map(float_to_int))
            .unwrap_or(0),
        Value::String(s) => string_intval(s),
        Value::Array(items) => i64::from(!items.is_empty()),
        Value::Object(map) => i64::from(!map.is_empty()),
    }
}

fn float_to_int(f: f64) -> i64 {
    if f.is_nan() { 0 } else { f.trunc() as i64 }
}

fn string_intval(s: &str) -> i64 {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let bytes = t.as_bytes();
    let mut end = 0;
    if end < bytes.len() && (bytes[end] == b'+' || bytes[end] == b'-') {
        end += 1;
    }
    let digits_start = end;
    while end < bytes.len() && bytes[end].is_ascii_digit() {
        end += 1;
    }
    if end == digits_start {
        return 0;
    }
    // A numeric string with a fraction or an exponent is converted as a float ("1e3" is 1000).
    if end < bytes.len() && matches!(bytes[end], b'.' | b'e' | b'E') {
        let mut fend = end;
        if bytes[fend] == b'.' {
            fend += 1;
            while fend < bytes.len() && bytes[fend].is_ascii_digit() {
                fend += 1;
            }
        }
        if fend < bytes.len() && matches!(bytes[fend], b'e' | b'E') {
            let mut e = fend + 1;
            if e < bytes.len() && (bytes[e] == b'+' || bytes[e] == b'-') {
                e += 1;
            }
            let exp_digits = e;
            while e < bytes.len() && bytes[e].is_ascii_digit() {
                e += 1;
            }
            if e > exp_digits {
                fend = e;
            }
        }
        if let Ok(f) = t[..fend].parse::<f64>() {
            return float_to_int(f);
        }
    }
    t[..end].parse::<i64>().unwrap_or_else(|_| {
        if t.starts_with('-') {
            i64::MIN
        } else {
            i64::MAX
        }
    })
}

/// PHP `(bool)`: `""`, `"0"`, `0`, `null` and empty arrays are false.
pub fn boolval(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !(s.is_empty() || s == "0"),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

/// PHP string conversion of a scalar (`true` is "1", `false` and `null` are ""); `None` for
/// arrays, which PHP cannot turn into a string.
pub fn strval(value: &Value) -> Option<String> {
    match value {
        Value::Null => Some(String::new()),
        Value::Bool(b) => Some(if *b { "1".into() } else { String::new() }),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// The values of a PHP array (a JSON list or object), or `None` when it is not an array.
pub fn array_values(value: &Value) -> Option<Vec<&Value>> {
    match value {
        Value::Array(items) => Some(items.iter().collect()),
        Value::Object(map) => Some(map.values().collect()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn intval_follows_php() {
        assert_eq!(intval(&json!("12abc")), 12);
        assert_eq!(intval(&json!("  -7")), -7);
        assert_eq!(intval(&json!("abc")), 0);
        assert_eq!(intval(&json!("1e3")), 1000);
        assert_eq!(intval(&json!("2.9")), 2);
        assert_eq!(intval(&json!(3.7)), 3);
        assert_eq!(intval(&json!(true)), 1);
        assert_eq!(intval(&json!(null)), 0);
        assert_eq!(intval(&json!([])), 0);
        assert_eq!(intval(&json!(["x"])), 1);
    }

    #[test]
    fn boolval_follows_php() {
        assert!(!boolval(&json!("0")));
        assert!(!boolval(&json!("")));
        assert!(boolval(&json!("false")));
        assert!(!boolval(&json!(0)));
        assert!(boolval(&json!(1)));
        assert!(!boolval(&json!({})));
    }

    #[test]
    fn strval_of_scalars() {
        assert_eq!(strval(&json!(true)).as_deref(), Some("1"));
        assert_eq!(strval(&json!(false)).as_deref(), Some(""));
        assert_eq!(strval(&json!(12)).as_deref(), Some("12"));
        assert_eq!(strval(&json!([1])), None);
    }

    #[test]
    fn form_params_lower_case_names_and_keep_key_order() {
        let p = Params::from_form("Cmd[zeta]=a&Cmd[alpha]=b&ORDER[TIMESTAMP_X]=ASC&ORDER[ID]=DESC");
        let keys: Vec<String> = p
            .entries_in_order("cmd")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["zeta", "alpha"]);
        let keys: Vec<String> = p
            .entries_in_order("order")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["TIMESTAMP_X", "ID"]);
    }

    #[test]
    fn json_params_keep_key_order_and_bad_json_is_empty() {
        let p = Params::from_json(br#"{"Cmd": {"z": "x", "a": "y"}, "halt": 1}"#);
        let keys: Vec<String> = p
            .entries_in_order("cmd")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["z", "a"]);
        assert_eq!(p.get("halt"), Some(&json!(1)));
        let bad = Params::from_json(b"{not json");
        assert!(bad.get("halt").is_none());
        let list = Params::from_json(b"[1,2]");
        assert!(list.entries_in_order("cmd").is_empty());
    }

    #[test]
    fn body_overrides_query() {
        let query = Params::from_form("limit=5&clear=1");
        let body = Params::from_json(br#"{"clear": 0}"#);
        let merged = body.merge_over(query);
        assert_eq!(merged.get("limit"), Some(&json!("5")));
        assert_eq!(merged.get("clear"), Some(&json!(0)));
    }
}
