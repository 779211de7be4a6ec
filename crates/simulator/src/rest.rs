//! The REST server's reply vocabulary: error bodies with their HTTP statuses, the
//! `time` block, and the portal clock (ISO-8601 with the portal's +03:00 offset).

use chrono::{DateTime, FixedOffset, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::time::{SystemTime, UNIX_EPOCH};

/// The offset the simulated portal renders its times in (`date('c')`).
const PORTAL_OFFSET_SECS: i32 = 3 * 3600;

fn portal_offset() -> FixedOffset {
    FixedOffset::east_opt(PORTAL_OFFSET_SECS).expect("constant offset is valid")
}

/// Now on the portal clock, whole seconds (MySQL `TIMESTAMP` precision).
pub fn portal_now() -> DateTime<FixedOffset> {
    let now = Utc::now().with_timezone(&portal_offset());
    portal_time(now.timestamp())
}

/// A unix time on the portal clock.
pub fn portal_time(unix: i64) -> DateTime<FixedOffset> {
    portal_offset()
        .timestamp_opt(unix, 0)
        .single()
        .unwrap_or_else(|| Utc::now().with_timezone(&portal_offset()))
}

/// `date('c', t)`.
pub fn iso(t: &DateTime<FixedOffset>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, false)
}

/// Unix seconds with microseconds, as PHP's `microtime(true)`.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An error as the REST server reports it: `{"error", "error_description"[, "argument"]}`
/// with an HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct RestError {
    pub status: u16,
    pub code: String,
    pub description: String,
    pub argument: Option<String>,
}

impl RestError {
    pub fn new(status: u16, code: &str, description: &str) -> RestError {
        RestError {
            status,
            code: code.to_string(),
            description: description.to_string(),
            argument: None,
        }
    }

    /// `ArgumentException($message, $parameter)`: 400 `ERROR_ARGUMENT` with `argument`.
    pub fn argument(description: &str, argument: &str) -> RestError {
        RestError {
            argument: Some(argument.to_string()),
            ..RestError::new(400, "ERROR_ARGUMENT", description)
        }
    }

    /// `ArgumentNullException($parameter)`.
    pub fn argument_null(argument: &str) -> RestError {
        RestError::argument(&format!("Argument '{argument}' is null or empty"), argument)
    }

    /// `RestException` raised by the service with `ERROR_ARGUMENT` (no `argument` member).
    pub fn bad_argument(description: &str) -> RestError {
        RestError::new(400, "ERROR_ARGUMENT", description)
    }

    /// `AccessException($msg)`: 403 `ACCESS_DENIED` "Access denied!" [+ " " + msg].
    pub fn access_denied(detail: &str) -> RestError {
        let description = if detail.is_empty() {
            "Access denied!".to_string()
        } else {
            format!("Access denied! {detail}")
        };
        RestError::new(403, "ACCESS_DENIED", &description)
    }

    /// `LicenseException($feature)`: 403 `WRONG_LICENSE`.
    pub fn wrong_license(feature: &str) -> RestError {
        RestError::new(
            403,
            "WRONG_LICENSE",
            &format!("This feature is not enabled for the current license: {feature}"),
        )
    }

    /// `AuthTypeException`: an event method called with a webhook.
    pub fn wrong_auth_type() -> RestError {
        RestError::new(
            403,
            "WRONG_AUTH_TYPE",
            "Current authorization type is denied for this method",
        )
    }

    pub fn method_not_found() -> RestError {
        RestError::new(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
    }

    pub fn no_auth() -> RestError {
        RestError::new(401, "NO_AUTH_FOUND", "Wrong authorization data")
    }

    pub fn invalid_token() -> RestError {
        RestError::new(
            401,
            "invalid_token",
            "The access token provided is invalid.",
        )
    }

    pub fn expired_token() -> RestError {
        RestError::new(
            401,
            "expired_token",
            "The access token provided has expired",
        )
    }

    pub fn query_limit() -> RestError {
        RestError::new(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
    }

    pub fn operation_time_limit() -> RestError {
        RestError::new(
            429,
            "OPERATION_TIME_LIMIT",
            "Method is blocked due to operation time limit.",
        )
    }

    pub fn internal() -> RestError {
        RestError::new(500, "INTERNAL_SERVER_ERROR", "Internal server error")
    }

    /// A failed SQL statement (`SqlException` → "SQL query error!").
    pub fn sql() -> RestError {
        RestError::new(500, "ERROR_CORE", "SQL query error!")
    }

    pub fn to_json(&self) -> Value {
        let mut body = Map::new();
        body.insert("error".into(), json!(self.code));
        body.insert("error_description".into(), json!(self.description));
        if let Some(argument) = &self.argument {
            body.insert("argument".into(), json!(argument));
        }
        Value::Object(body)
    }
}

/// The `time` member of a reply (`CRestServer::appendDebugInfo`). `operating*` are present
/// when the limiter reports them.
#[derive(Debug, Clone, Serialize)]
pub struct TimeBlock {
    /// Whole seconds on the current server (an `int` property holding `microtime(true)`), a
    /// float in the legacy model.
    pub start: Value,
    pub finish: f64,
    pub duration: f64,
    /// The difference of two whole-second stamps on the current server (0 or 1 for a fast
    /// call); the call's own time in the legacy model.
    pub processing: Value,
    pub date_start: String,
    pub date_finish: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operating_reset_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operating: Option<f64>,
}

impl TimeBlock {
    /// The current server: `$timeStart`, `$timeProcessStart` and `$timeProcessFinish` are
    /// `protected int` properties of `CRestServer` assigned `microtime(true)`, so `start` and
    /// `processing` come out in whole seconds; `finish` is `microtime(true)` when answering.
    pub fn current(start: f64, process_start: f64, process_finish: f64, finish: f64) -> TimeBlock {
        let start = start.trunc();
        TimeBlock {
            start: json!(start as i64),
            finish,
            duration: finish - start,
            processing: json!(process_finish.trunc() as i64 - process_start.trunc() as i64),
            date_start: iso(&portal_time(start as i64)),
            date_finish: iso(&portal_time(finish.floor() as i64)),
            operating_reset_at: None,
            operating: None,
        }
    }

    /// The model the docs' examples show: float `start`, `processing` the call's own time.
    pub fn legacy(start: f64, finish: f64, processing: f64) -> TimeBlock {
        TimeBlock {
            start: json!(start),
            finish,
            duration: finish - start,
            processing: json!(processing),
            date_start: iso(&portal_time(start.floor() as i64)),
            date_finish: iso(&portal_time(finish.floor() as i64)),
            operating_reset_at: None,
            operating: None,
        }
    }

    /// Adds `operating` and, when known, `operating_reset_at`.
    pub fn with_operating(mut self, operating: f64, reset_at: Option<i64>) -> TimeBlock {
        self.operating = Some(operating);
        self.operating_reset_at = reset_at;
        self
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_has_offset_and_whole_seconds() {
        let t = portal_time(1_721_299_720);
        assert_eq!(iso(&t), "2024-07-18T13:48:40+03:00");
    }

    #[test]
    fn errors_serialize_like_the_portal() {
        let e = RestError::argument("Value must be positive integer", "LIMIT");
        assert_eq!(
            e.to_json(),
            json!({"error": "ERROR_ARGUMENT", "error_description": "Value must be positive integer", "argument": "LIMIT"})
        );
        assert_eq!(RestError::access_denied("").description, "Access denied!");
        assert_eq!(
            RestError::wrong_license("extended offline events handling").description,
            "This feature is not enabled for the current license: extended offline events handling"
        );
    }

    #[test]
    fn time_block_has_operating_only_when_charged() {
        let plain = TimeBlock::legacy(10.0, 10.5, 0.005).to_json();
        assert!(plain.get("operating").is_none());
        let charged = TimeBlock::legacy(10.0, 10.5, 0.005)
            .with_operating(1.5, Some(610))
            .to_json();
        assert_eq!(charged["operating"], json!(1.5));
        assert_eq!(charged["operating_reset_at"], json!(610));
        assert_eq!(charged["duration"], json!(0.5));
        assert_eq!(charged["processing"], json!(0.005));
    }

    #[test]
    fn the_current_server_stamps_whole_seconds() {
        let t = TimeBlock::current(100.7, 100.8, 100.85, 100.9).to_json();
        assert_eq!(t["start"], json!(100));
        assert!(t["start"].is_i64());
        assert_eq!(t["processing"], json!(0));
        assert!((t["duration"].as_f64().unwrap() - 0.9).abs() < 1e-9);
        // A call that crosses a second boundary "took" one second.
        let crossing = TimeBlock::current(100.95, 100.96, 101.01, 101.02).to_json();
        assert_eq!(crossing["processing"], json!(1));
        assert!(t.get("operating_reset_at").is_none());
    }
}
