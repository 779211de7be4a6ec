//! Fuzz target: any bytes a portal could answer go through the response parsers without a panic.
#![no_main]

use b24eventd::bitrix::types::{
    ApiResponse, parse_batch, parse_error, parse_event_get, parse_offline_get, parse_offline_list,
    parse_time,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(body) = serde_json::from_str::<serde_json::Value>(&text) else {
        return;
    };
    let _ = parse_error(&body);
    if let Some(time) = body.get("time") {
        let _ = parse_time(time);
    }
    if let Ok(resp) = ApiResponse::from_body(body) {
        let _ = parse_offline_get(&resp.result);
        let _ = parse_batch(&resp.result);
        let _ = parse_event_get(&resp.result);
        let _ = parse_offline_list(&resp);
    }
});
