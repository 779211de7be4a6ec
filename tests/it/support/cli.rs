//! The binary run as an operator runs it, off the async runtime (the simulator serves on it
//! meanwhile), and the token pair stored in a test's journal.

use b24eventd::bitrix::Tokens;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs the binary off the async runtime (the simulator serves on it meanwhile), with `stdin`
/// piped in when given.
pub async fn b24eventd(args: &[&str], stdin: Option<&str>) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
            .args(&args)
            .env_remove("B24EVENTD_CONFIG")
            .env_remove("B24EVENTD_LOG")
            .env_remove("RUST_LOG")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary runs");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub async fn store_tokens(dir: &Path, tokens: &Tokens) {
    let journal = super::open_journal(dir).await;
    journal.save_tokens("main", tokens).await.unwrap();
}

pub async fn stored_tokens(dir: &Path) -> Option<Tokens> {
    let journal = super::open_journal(dir).await;
    journal.load_tokens("main").await.unwrap()
}
