//! What the Bitrix24 REST server makes of a request's parameters, written from PHP's rules and
//! not from b24eventd's encoder, so that a bug in the client's encoding cannot round-trip
//! through its own inverse.
//!
//! The server reads parameters with `CRestUtil::getRequestData`
//! (`modules/rest/classes/general/rest_util.php`): PHP's `$_GET` and `$_POST`, and for a POST
//! whose body PHP did not take as a form, the raw body, decoded by its content type:
//! `application/json` with `Json::decode` (a body it cannot read is no parameters), anything
//! else with `parse_str`. The body's parameters replace the query's (`array_replace`). `batch`
//! reads each command's query string with `parse_str` too (`CRestUtil::ParseBatchQuery`).
//!
//! [`parse_str`] follows PHP's (`php_default_treat_data` and `php_register_variable_ex` in
//! php-src `main/php_variables.c`; <https://www.php.net/manual/en/function.parse-str.php>):
//! - pairs are split on `&` (empty ones skipped), name from value at the first `=`; a pair
//!   without `=` has the value "";
//! - name and value are URL-decoded: `+` is a space, `%XX` a byte, any other `%` stays; a
//!   decoded NUL ends the name;
//! - leading spaces of the name are dropped; before its first `[`, spaces and dots become `_`;
//!   a name with nothing left is dropped;
//! - each `[key]` after it descends a level, `[]` (or `[` and one whitespace `]`) appends;
//!   anything after a `]` that does not open another `[` is ignored; a `[` without a `]` is no
//!   index: on the first level it and every space, dot and `[` after it become `_` (`a[b` is
//!   `a_b`), deeper the unclosed rest is dropped (`a[b][c` sets `a[b]`);
//! - a later value of the same path replaces an earlier one in place; a scalar in the way of a
//!   deeper path is replaced by an array;
//! - a key that is a canonical decimal integer (`0`, `17`, `-3`; not `07`, `+1` or `-0`) is an
//!   integer key, so `a[1]` and `a[01]` are two keys; `[]` appends at one past the largest
//!   integer key, or 0 (PHP 8.3; before it, an array with only negative keys appended at 0);
//! - more than 64 levels of brackets (the default `max_input_nesting_level`) drop the whole
//!   top-level variable, and a name that mangling made start with `__Host-` or `__Secure-` is
//!   dropped.
//!
//! `max_input_vars` (a php.ini setting of the portal's server) is not modelled.

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;

/// PHP's default `max_input_nesting_level`.
const MAX_NESTING: usize = 64;

/// A PHP value as `parse_str` makes it: a string or an array.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PhpValue {
    String(String),
    Array(PhpArray),
}

/// A PHP array: entries in insertion order, integer keys kept as their decimal text.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PhpArray {
    entries: Vec<(String, PhpValue)>,
    positions: HashMap<String, usize>,
    /// The key `[]` appends at (`nNextFreeElement`); `None` before any integer key.
    next_free: Option<i64>,
}

impl PhpArray {
    /// The entries in insertion order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &PhpValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut PhpValue> {
        let position = *self.positions.get(key)?;
        Some(&mut self.entries[position].1)
    }

    /// Sets `key`, keeping its place when it exists (`zend_hash_update`).
    fn set(&mut self, key: String, value: PhpValue) -> &mut PhpValue {
        if let Some(index) = integer_key(&key) {
            self.next_free = Some(match self.next_free {
                Some(next) if next > index => next,
                _ => index.saturating_add(1),
            });
        }
        let position = match self.positions.get(&key) {
            Some(&position) => {
                self.entries[position].1 = value;
                position
            }
            None => {
                self.positions.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
                self.entries.len() - 1
            }
        };
        &mut self.entries[position].1
    }

    /// Appends at the next free integer key (`zend_hash_next_index_insert`); `None` when the
    /// largest key is already `i64::MAX`.
    fn append(&mut self, value: PhpValue) -> Option<&mut PhpValue> {
        let index = self.next_free.unwrap_or(0);
        if self.next_free.is_some() && self.positions.contains_key(&index.to_string()) {
            return None;
        }
        Some(self.set(index.to_string(), value))
    }

    fn remove(&mut self, key: &str) {
        if self.positions.remove(key).is_some() {
            self.entries.retain(|(k, _)| k != key);
            self.positions = (self.entries.iter().enumerate())
                .map(|(position, (k, _))| (k.clone(), position))
                .collect();
        }
    }

    /// The array as `json_encode` shows it: a list when its keys are 0, 1, … in order, else an
    /// object.
    pub fn to_json(&self) -> Value {
        let is_list = (self.entries.iter().enumerate()).all(|(i, (k, _))| *k == i.to_string());
        if is_list {
            Value::Array(self.entries.iter().map(|(_, v)| v.to_json()).collect())
        } else {
            Value::Object(self.to_object())
        }
    }

    /// The array as a JSON object, whatever its keys (the top level of a request's parameters).
    pub fn to_object(&self) -> Map<String, Value> {
        (self.entries.iter())
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect()
    }
}

impl PhpValue {
    pub fn to_json(&self) -> Value {
        match self {
            PhpValue::String(s) => Value::String(s.clone()),
            PhpValue::Array(array) => array.to_json(),
        }
    }
}

/// PHP's `parse_str` of `query`, as a JSON object whose leaves are strings (nested arrays as
/// `json_encode` shows them).
pub fn parse_str(query: &str) -> Value {
    Value::Object(parse_str_ordered(query).to_object())
}

/// PHP's `parse_str` of `query`, key order kept.
pub(crate) fn parse_str_ordered(query: &str) -> PhpArray {
    let mut root = PhpArray::default();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let mut name = url_decode(name);
        if let Some(nul) = name.find('\0') {
            name.truncate(nul);
        }
        register(&mut root, &name, url_decode(value));
    }
    root
}

/// `urldecode`: `+` is a space, `%XX` the byte it names, any other `%` stays. Bytes that are
/// not UTF-8 are replaced (JSON cannot carry them).
pub(crate) fn url_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = match bytes[i] {
            b'+' => b' ',
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    i += 2;
                    (high * 16 + low) as u8
                }
                _ => b'%',
            },
            other => other,
        };
        out.push(byte);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `php_register_variable_ex`: stores `value` under the bracketed path `name`.
fn register(root: &mut PhpArray, name: &str, value: String) {
    let name = name.trim_start_matches(' ');
    let (base, mut rest) = name.split_at(name.find('[').unwrap_or(name.len()));
    let mut var: String = base
        .chars()
        .map(|c| if c == ' ' || c == '.' { '_' } else { c })
        .collect();
    let refused_prefix = ["__Host-", "__Secure-"]
        .iter()
        .any(|prefix| var.starts_with(prefix) && !name.starts_with(prefix));
    if var.is_empty() || refused_prefix {
        return;
    }
    // The indexes of the path; `None` appends.
    let mut path: Vec<Option<String>> = Vec::new();
    // `rest` starts at a `[` on every turn.
    while !rest.is_empty() {
        if path.len() == MAX_NESTING {
            root.remove(&var);
            return;
        }
        let inside = &rest[1..];
        let space = inside.starts_with([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
        if inside[usize::from(space)..].starts_with(']') {
            path.push(None);
            rest = &inside[usize::from(space) + 1..];
        } else if let Some(close) = inside.find(']') {
            path.push(Some(inside[..close].to_string()));
            rest = &inside[close + 1..];
        } else if path.is_empty() {
            // Not an index: the name goes on, with `_` for the bracket.
            var.push('_');
            var.extend(inside.chars().map(|c| match c {
                ' ' | '.' | '[' => '_',
                c => c,
            }));
            break;
        } else {
            break;
        }
        if !rest.starts_with('[') {
            break;
        }
    }
    let value = PhpValue::String(value);
    let Some(leaf) = path.pop() else {
        root.set(var, value);
        return;
    };
    let mut array = descend(root, Some(var));
    for key in path {
        array = array.and_then(|a| descend(a, key));
    }
    match (array, leaf) {
        (Some(array), Some(key)) => {
            array.set(key, value);
        }
        (Some(array), None) => {
            array.append(value);
        }
        (None, _) => {}
    }
}

/// The integer a PHP array key is stored as, when it is a canonical decimal integer.
fn integer_key(key: &str) -> Option<i64> {
    key.parse::<i64>().ok().filter(|n| n.to_string() == key)
}

/// The array under `key` (appended when `None`), made an array when it holds a string.
fn descend(array: &mut PhpArray, key: Option<String>) -> Option<&mut PhpArray> {
    let slot = match key {
        None => array.append(PhpValue::Array(PhpArray::default()))?,
        Some(key) => {
            if !matches!(array.get_mut(&key), Some(PhpValue::Array(_))) {
                array.set(key.clone(), PhpValue::Array(PhpArray::default()));
            }
            array.get_mut(&key).expect("just set")
        }
    };
    match slot {
        PhpValue::Array(inner) => Some(inner),
        PhpValue::String(_) => None,
    }
}

/// Object-valued members of a JSON object and their keys in document order.
pub(crate) type KeyOrders = Vec<(String, Vec<String>)>;

/// A JSON body as `Json::decode` reads it, when it is an object: its members, and for each
/// member that is an object, that object's keys in document order (`serde_json::Map` sorts
/// keys; PHP arrays keep them in order, and `batch` runs its commands in that order). `None`
/// for anything else: the real server drops a body it cannot read.
pub(crate) fn json_body(body: &[u8]) -> Option<(Map<String, Value>, KeyOrders)> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let orders =
        serde_json::from_slice::<TopLevelKeyOrders>(body).map_or_else(|_| Vec::new(), |o| o.0);
    Some((map, orders))
}

/// For each top-level key of a JSON object whose value is an object: its keys in document
/// order.
struct TopLevelKeyOrders(Vec<(String, Vec<String>)>);

impl<'de> Deserialize<'de> for TopLevelKeyOrders {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TopVisitor;
        impl<'de> Visitor<'de> for TopVisitor {
            type Value = TopLevelKeyOrders;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = access.next_key::<String>()? {
                    let keys: KeysOnly = access.next_value()?;
                    if !keys.0.is_empty() {
                        out.push((key, keys.0));
                    }
                }
                Ok(TopLevelKeyOrders(out))
            }
        }
        deserializer.deserialize_map(TopVisitor)
    }
}

/// The keys of a JSON object in document order; empty for any other JSON value.
struct KeysOnly(Vec<String>);

impl<'de> Deserialize<'de> for KeysOnly {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeysVisitor;
        impl<'de> Visitor<'de> for KeysVisitor {
            type Value = KeysOnly;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<KeysOnly, E> {
                Ok(KeysOnly(Vec::new()))
            }
            fn visit_i64<E>(self, _: i64) -> Result<KeysOnly, E> {
                Ok(KeysOnly(Vec::new()))
            }
            fn visit_u64<E>(self, _: u64) -> Result<KeysOnly, E> {
                Ok(KeysOnly(Vec::new()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<KeysOnly, E> {
                Ok(KeysOnly(Vec::new()))
            }
            fn visit_str<E>(self, _: &str) -> Result<KeysOnly, E> {
                Ok(KeysOnly(Vec::new()))
            }
            fn visit_unit<E>(self) -> Result<KeysOnly, E> {
                Ok(KeysOnly(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<KeysOnly, A::Error> {
                while access.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeysOnly(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<KeysOnly, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = access.next_key::<String>()? {
                    access.next_value::<IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(KeysOnly(keys))
            }
        }
        deserializer.deserialize_any(KeysVisitor)
    }
}

#[cfg(test)]
mod tests {
    //! Inputs written as a PHP client would send them; the expected values are what PHP's
    //! `parse_str` makes of them by its documented rules (the module's notes), not what any
    //! encoder writes.
    use super::*;
    use serde_json::json;

    #[test]
    fn the_manual_example() {
        // php.net's parse_str example: `$output['arr'][0]` is "foo bar".
        assert_eq!(
            parse_str("first=value&arr[]=foo+bar&arr[]=baz"),
            json!({"first": "value", "arr": ["foo bar", "baz"]})
        );
    }

    #[test]
    fn brackets_nest_and_empty_brackets_append() {
        assert_eq!(parse_str("a[b][0]=x"), json!({"a": {"b": ["x"]}}));
        assert_eq!(parse_str("a[]=1&a[]=2"), json!({"a": ["1", "2"]}));
        assert_eq!(parse_str("a[ ]=1&a[ ]=2"), json!({"a": ["1", "2"]}));
        assert_eq!(parse_str("a[ b]=1"), json!({"a": {" b": "1"}}));
        assert_eq!(
            parse_str("a[][x]=1&a[][x]=2"),
            json!({"a": [{"x": "1"}, {"x": "2"}]})
        );
        assert_eq!(
            parse_str("filter[%3EID]=10&id[]=5&id[]=6&name=a+b&x[0]=p&x[1]=q"),
            json!({"filter": {">ID": "10"}, "id": ["5", "6"], "name": "a b", "x": ["p", "q"]})
        );
        // Text after a closing bracket that opens no other one is ignored.
        assert_eq!(parse_str("a[b]x=1"), json!({"a": {"b": "1"}}));
    }

    #[test]
    fn later_values_override_and_a_scalar_gives_way_to_an_array() {
        assert_eq!(parse_str("a=1&a=2"), json!({"a": "2"}));
        assert_eq!(
            parse_str("a[b]=1&a[b][c]=2"),
            json!({"a": {"b": {"c": "2"}}})
        );
        assert_eq!(parse_str("a[b][c]=2&a[b]=1"), json!({"a": {"b": "1"}}));
        assert_eq!(parse_str("a=x&a[]=1"), json!({"a": ["1"]}));
        // An overridden key keeps its place.
        let parsed = parse_str_ordered("z=1&a=2&z=3");
        let order: Vec<&str> = parsed.entries().map(|(k, _)| k).collect();
        assert_eq!(order, ["z", "a"]);
    }

    #[test]
    fn names_and_values_are_url_decoded() {
        assert_eq!(parse_str("q=a+b%2Bc"), json!({"q": "a b+c"}));
        assert_eq!(parse_str("t=%C3%BC%7e"), json!({"t": "ü~"}));
        assert_eq!(
            parse_str("x=100%25&y=%zz&z=%4&w=%"),
            json!({"x": "100%", "y": "%zz", "z": "%4", "w": "%"})
        );
        // Encoded brackets are brackets: the name is decoded before it is split.
        assert_eq!(parse_str("fil%5Bter%5D=1"), json!({"fil": {"ter": "1"}}));
        assert_eq!(parse_str("a=b=c&flag"), json!({"a": "b=c", "flag": ""}));
        assert_eq!(
            parse_str("a%00b=1"),
            json!({"a": "1"}),
            "a NUL ends the name"
        );
        assert_eq!(parse_str("&&a=1&"), json!({"a": "1"}));
        assert_eq!(parse_str(""), json!({}));
    }

    #[test]
    fn top_level_names_are_mangled_nested_keys_are_not() {
        // php.net: "My Value=Something" is $output['My_Value'].
        assert_eq!(
            parse_str("My+Value=Something&a.b=1&+lead=2"),
            json!({"My_Value": "Something", "a_b": "1", "lead": "2"})
        );
        assert_eq!(
            parse_str("a[b.c]=1&a[d e]=2"),
            json!({"a": {"b.c": "1", "d e": "2"}})
        );
        assert_eq!(parse_str("=1&[x]=2&+=3"), json!({}), "no name left");
        assert_eq!(parse_str("__Host-x=1&..Host-y=2"), json!({"__Host-x": "1"}));
    }

    #[test]
    fn an_unclosed_bracket_is_no_index() {
        assert_eq!(parse_str("a[b=1"), json!({"a_b": "1"}));
        assert_eq!(parse_str("a[b.c d[e=1"), json!({"a_b_c_d_e": "1"}));
        assert_eq!(parse_str("a[=1"), json!({"a_": "1"}));
        assert_eq!(
            parse_str("a[b][c=1"),
            json!({"a": {"b": "1"}}),
            "deeper: dropped"
        );
        assert_eq!(
            parse_str("a[b=1&&=2&%zz=3"),
            json!({"a_b": "1", "%zz": "3"})
        );
    }

    #[test]
    fn canonical_decimal_keys_are_integers() {
        assert_eq!(
            parse_str("a[1]=x&a[01]=y"),
            json!({"a": {"1": "x", "01": "y"}})
        );
        assert_eq!(
            parse_str("a[5]=x&a[]=y"),
            json!({"a": {"5": "x", "6": "y"}})
        );
        assert_eq!(
            parse_str("a[x]=1&a[]=2"),
            json!({"a": {"x": "1", "0": "2"}})
        );
        assert_eq!(
            parse_str("a[-3]=x&a[]=y"),
            json!({"a": {"-3": "x", "-2": "y"}})
        );
        assert_eq!(
            parse_str("a[-0]=x&a[]=y"),
            json!({"a": {"-0": "x", "0": "y"}})
        );
        assert_eq!(
            parse_str("a[3]=x&a[7]=y"),
            json!({"a": {"3": "x", "7": "y"}})
        );
        // A list only when the keys are 0, 1, … in that order, as json_encode decides.
        assert_eq!(parse_str("a[0]=x&a[1]=y"), json!({"a": ["x", "y"]}));
        assert_eq!(
            parse_str("a[1]=x&a[0]=y"),
            json!({"a": {"0": "y", "1": "x"}})
        );
        // The top level is the parameters, whatever their names.
        assert_eq!(parse_str("0=a&1=b"), json!({"0": "a", "1": "b"}));
        assert_eq!(
            parse_str("a[9223372036854775807]=x&a[]=y"),
            json!({"a": {"9223372036854775807": "x"}}),
            "no free index left"
        );
    }

    #[test]
    fn more_than_64_levels_drop_the_whole_variable() {
        let path = |levels: usize| "[k]".repeat(levels);
        let at_64 = parse_str(&format!("a{}=x", path(64)));
        let mut leaf = &at_64["a"];
        for _ in 1..64 {
            leaf = &leaf["k"];
        }
        assert_eq!(leaf["k"], "x");
        assert_eq!(
            parse_str(&format!("a[b]=1&a{}=x&c=2", path(65))),
            json!({"c": "2"})
        );
    }

    #[test]
    fn json_bodies_keep_the_key_order_of_their_objects() {
        let (map, orders) = json_body(br#"{"cmd": {"z": 1, "a": 2}, "halt": 0}"#).unwrap();
        assert_eq!(map["halt"], 0);
        assert_eq!(
            orders,
            [("cmd".to_string(), vec!["z".to_string(), "a".to_string()])]
        );
        assert!(json_body(b"[1, 2]").is_none());
        assert!(json_body(b"{broken").is_none());
    }
}
