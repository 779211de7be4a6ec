//! End-to-end tests of the simulator over HTTP, a module per area (`rest`, `limits`, `control`),
//! and the helpers they share.

mod control;
mod limits;
mod many;
mod rest;

use super::*;
use serde_json::{Value, json};
use std::time::Duration;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

async fn start(config: SimulatorConfig) -> (Simulator, reqwest::Client, String) {
    let sim = Simulator::start(config).await.expect("simulator starts");
    let (access, _) = sim.issue_tokens();
    (sim, client(), access)
}

/// POSTs a JSON body to `/rest/<method>`; answers (status, JSON or Null).
async fn call(http: &reqwest::Client, sim: &Simulator, method: &str, body: Value) -> (u16, Value) {
    let resp = http
        .post(format!("{}{method}", sim.client_endpoint()))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body read");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// POSTs `application/x-www-form-urlencoded` pairs.
async fn post_form(http: &reqwest::Client, url: &str, pairs: &[(&str, &str)]) -> reqwest::Response {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    http.post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("request sent")
}

fn seeded(sim: &Simulator, event: &str, connector: &str, ids: std::ops::Range<u64>) {
    sim.bind_offline(event, connector);
    for id in ids {
        sim.emit_change(event, id);
    }
}
