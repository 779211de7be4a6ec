//! Fuzz target: any JSON payload renders into an envelope line that parses back to the same
//! envelope (the file sink writes these lines; every sink sends this JSON).
#![no_main]

use b24eventd::envelope::{Envelope, Lane};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(payload) = serde_json::from_str::<serde_json::Value>(&text) else {
        return;
    };
    let envelope = Envelope {
        id: Envelope::make_id("main", 1, "2026-11-22T10:00:00+03:00"),
        portal: "main".into(),
        event: "ONCRMDEALUPDATE".into(),
        offline_id: 1,
        message_id: "0".repeat(32),
        timestamp: "2026-11-22T10:00:00+03:00".into(),
        data: payload.clone(),
        additional: payload,
        lane: Lane::Normal,
        attempt: 1,
        entity: serde_json::Value::Null,
        entity_error: None,
    };
    let line = envelope.to_json_line();
    assert!(!line.contains('\n'), "one envelope per line");
    let back: Envelope = serde_json::from_str(&line).unwrap();
    assert_eq!(back, envelope);
});
