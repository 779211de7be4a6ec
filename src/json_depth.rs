//! Parsing JSON nested up to [`MAX_DEPTH`] levels, where serde_json alone stops at 128: the
//! portal's answers (and the journal's copies of their `EVENT_DATA`) hold whatever the portal's
//! modules put there, and legal JSON must not stop a portal.
//!
//! The bound keeps every later walk of the value (dropping, cloning, comparing, rendering it for
//! a sink) within a thread's stack: a value nested deeper is refused with an error that says so.

use serde::Deserialize;
use serde_json::Value;

/// The deepest nesting of arrays and objects accepted. An answer nested deeper cannot be parsed:
/// the poller treats it as an unreadable answer (logged, counted, its reservations stay
/// upstream for the orphan sweep).
pub const MAX_DEPTH: usize = 1000;

/// The deepest nesting of arrays and objects in `text` (brackets inside strings do not count).
/// Stops counting once past `limit`.
pub fn nesting(text: &[u8], limit: usize) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > deepest {
                    deepest = depth;
                    if deepest > limit {
                        break;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// `serde_json::from_str` for values nested up to [`MAX_DEPTH`] levels.
pub fn from_str(text: &str) -> serde_json::Result<Value> {
    let depth = nesting(text.as_bytes(), MAX_DEPTH);
    if depth > MAX_DEPTH {
        return Err(serde::de::Error::custom(format_args!(
            "JSON nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    // The scan above bounds the recursion the limit would have.
    deserializer.disable_recursion_limit();
    let value = Value::deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `depth` levels of `{"a": …}` around `1`.
    pub(crate) fn nested(depth: usize) -> String {
        format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
    }

    #[test]
    fn nesting_ignores_brackets_in_strings() {
        assert_eq!(nesting(br#"{"a":[1,{"b":"[[[{"}]}"#, 100), 3);
        assert_eq!(nesting(br#"["\"[", ["\\", [] ]]"#, 100), 3);
        assert_eq!(nesting(b"1", 100), 0);
        assert_eq!(
            nesting(nested(5000).as_bytes(), 10),
            11,
            "stops past the limit"
        );
    }

    #[test]
    fn deep_json_parses_up_to_the_bound_and_survives_every_walk() {
        assert!(
            serde_json::from_str::<Value>(&nested(150)).is_err(),
            "serde_json's own limit"
        );
        // On a thread with the stack of a tokio worker or a test thread (2 MiB).
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(|| {
                let text = nested(MAX_DEPTH);
                let value = from_str(&text).expect("parses");
                let copy = value.clone();
                assert!(copy == value);
                assert_eq!(serde_json::to_string(&copy).unwrap(), text);
                let mut inner = &value;
                let mut depth = 0;
                while let Some(next) = inner.get("a") {
                    inner = next;
                    depth += 1;
                }
                assert_eq!((depth, inner), (MAX_DEPTH, &Value::from(1)));
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    #[test]
    fn deeper_than_the_bound_or_broken_is_an_error() {
        let err = from_str(&nested(MAX_DEPTH + 1)).unwrap_err();
        assert!(
            err.to_string().contains("nested deeper than 1000 levels"),
            "{err}"
        );
        let deep_array = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
        assert!(from_str(&deep_array).is_err());
        assert!(from_str(r#"{"a": [1, 2}"#).is_err());
        assert!(from_str(r#"{"a": 1} x"#).is_err(), "trailing characters");
        assert_eq!(from_str(r#" {"a": [1, "]"]} "#).unwrap()["a"][1], "]");
    }
}
