//! Fuzz target: the PHP bracket form decoder takes any query string, and what it decodes
//! survives an encode/decode round trip unchanged.
#![no_main]

use b24eventd::bitrix::form::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    let decoded = decode(&query);
    let again = decode(&encode(&decoded));
    assert_eq!(again, decoded, "round trip of {query:?}");
});
