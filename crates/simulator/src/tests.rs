//! End-to-end tests of the simulator over HTTP: REST shapes, auth, batch, OAuth rotation,
//! limits, faults and the control API.

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

#[tokio::test]
async fn reserve_then_clear_by_message_id() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    seeded(&sim, "ONCRMDEALUPDATE", "", 1..4);
    let (status, body) = call(
        &http,
        &sim,
        "event.offline.get",
        json!({"auth": auth, "clear": 0, "limit": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let pid = body["result"]["process_id"]
        .as_str()
        .expect("process id")
        .to_string();
    assert_eq!(pid.len(), 32);
    let events = body["result"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["ID"], json!("1"));
    assert_eq!(events[0]["EVENT_NAME"], json!("ONCRMDEALUPDATE"));
    assert_eq!(events[0]["EVENT_DATA"], json!({"FIELDS": {"ID": "1"}}));
    assert_eq!(events[0]["EVENT_ADDITIONAL"], json!({"user_id": 1}));
    let time = &body["time"];
    for field in [
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
        "operating_reset_at",
        "operating",
    ] {
        assert!(time.get(field).is_some(), "time.{field} missing: {time}");
    }
    assert_eq!(sim.stats().reserved, 2);

    let mid = events[1]["MESSAGE_ID"].as_str().unwrap();
    let (status, body) = call(
        &http,
        &sim,
        "event.offline.clear",
        json!({"auth": auth, "process_id": pid, "message_id": [mid]}),
    )
    .await;
    assert_eq!((status, &body["result"]), (200, &json!(true)));
    let stats = sim.stats();
    assert_eq!((stats.queued, stats.reserved, stats.cleared), (1, 1, 1));
    assert_eq!(stats.calls_by_method["event.offline.get"], 1);
    sim.shutdown();
}

#[tokio::test]
async fn form_bodies_query_auth_and_bearer_are_accepted() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    seeded(&sim, "ONCRMLEADADD", "", 1..4);
    let resp = http
        .post(format!("{}event.offline.get.json", sim.client_endpoint()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("auth={auth}&clear=0&limit=1&order%5BID%5D=DESC"))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["result"]["events"][0]["ID"], json!("3"));

    let resp = http
        .get(format!(
            "{}event.offline.list?auth={auth}",
            sim.client_endpoint()
        ))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["total"], json!(3));
    assert_eq!(body["result"][0]["PROCESS_ID"], json!(""));
    assert_eq!(body["result"][2]["PROCESS_ID"].as_str().unwrap().len(), 32);

    let resp = http
        .post(format!("{}user.admin", sim.client_endpoint()))
        .bearer_auth(&auth)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    // Invalid JSON is an empty parameter set; the query string still counts.
    let resp = http
        .post(format!(
            "{}event.offline.get?auth={auth}",
            sim.client_endpoint()
        ))
        .header("Content-Type", "application/json")
        .body("{limit: 0")
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["result"]["events"].as_array().unwrap().len(), 2);
    assert_eq!(body["result"]["process_id"], Value::Null);
    sim.shutdown();
}

#[tokio::test]
async fn fetch_delete_mode_without_the_extended_feature() {
    let config = SimulatorConfig {
        rest_offline_extended: false,
        ..SimulatorConfig::default()
    };
    let (sim, http, auth) = start(config).await;
    seeded(&sim, "ONCRMDEALADD", "", 1..3);
    let (status, body) = call(
        &http,
        &sim,
        "event.offline.get",
        json!({"auth": auth, "clear": 0}),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], json!("WRONG_LICENSE"));
    let (_, feature) = call(
        &http,
        &sim,
        "feature.get",
        json!({"auth": auth, "code": "rest_offline_extended"}),
    )
    .await;
    assert_eq!(feature["result"], json!({"value": "N"}));
    let (status, body) = call(&http, &sim, "event.offline.get", json!({"auth": auth})).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["process_id"], Value::Null);
    assert_eq!(body["result"]["events"].as_array().unwrap().len(), 2);
    assert!(sim.rows().is_empty());
    assert_eq!(sim.stats().cleared, 2);
    sim.shutdown();
}

#[tokio::test]
async fn authentication_and_access_errors() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    let (status, body) = call(&http, &sim, "event.offline.get", json!({})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("NO_AUTH_FOUND"))
    );
    let (status, body) = call(&http, &sim, "event.offline.get", json!({"auth": "bogus"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    let (status, body) = call(&http, &sim, "no.such.method", json!({"auth": auth})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("ERROR_METHOD_NOT_FOUND"))
    );
    let (status, body) = call(&http, &sim, "1/abcdef/event.offline.get.json", json!({})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("WRONG_AUTH_TYPE"))
    );
    assert_eq!(
        body["error_description"],
        json!("Current authorization type is denied for this method")
    );
    let (status, body) = call(
        &http,
        &sim,
        "event.offline.get",
        json!({"auth": auth, "limit": -1}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str(), body["argument"].as_str()),
        (400, Some("ERROR_ARGUMENT"), Some("LIMIT"))
    );
    sim.expire_access_tokens();
    let (status, body) = call(&http, &sim, "event.offline.get", json!({"auth": auth})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("expired_token"))
    );
    assert_eq!(
        body["error_description"],
        json!("The access token provided has expired")
    );
    sim.shutdown();

    let config = SimulatorConfig {
        user_is_admin: false,
        ..SimulatorConfig::default()
    };
    let (sim, http, auth) = start(config).await;
    let (status, body) = call(&http, &sim, "event.offline.list", json!({"auth": auth})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("ACCESS_DENIED"))
    );
    let (_, body) = call(&http, &sim, "user.admin", json!({"auth": auth})).await;
    assert_eq!(body["result"], json!(false));
    sim.shutdown();
}

#[tokio::test]
async fn auth_connector_scopes_the_queue_and_needs_the_feature() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    seeded(&sim, "ONCRMDEALUPDATE", "erp", 1..3);
    let (_, plain) = call(&http, &sim, "event.offline.get", json!({"auth": auth})).await;
    assert!(plain["result"]["events"].as_array().unwrap().is_empty());
    let (_, scoped) = call(
        &http,
        &sim,
        "event.offline.get",
        json!({"auth": auth, "auth_connector": "erp", "clear": 0}),
    )
    .await;
    assert_eq!(scoped["result"]["events"].as_array().unwrap().len(), 2);
    let pid = scoped["result"]["process_id"].as_str().unwrap();
    // clear without the connector deletes nothing; with it, everything of the process.
    call(
        &http,
        &sim,
        "event.offline.clear",
        json!({"auth": auth, "process_id": pid}),
    )
    .await;
    assert_eq!(sim.rows().len(), 2);
    call(
        &http,
        &sim,
        "event.offline.clear",
        json!({"auth": auth, "process_id": pid, "auth_connector": "erp"}),
    )
    .await;
    assert!(sim.rows().is_empty());
    sim.shutdown();

    let config = SimulatorConfig {
        rest_auth_connector: false,
        ..SimulatorConfig::default()
    };
    let (sim, http, auth) = start(config).await;
    let (status, body) = call(
        &http,
        &sim,
        "server.time",
        json!({"auth": auth, "auth_connector": "erp"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("WRONG_LICENSE"))
    );
    assert_eq!(
        body["error_description"],
        json!("This feature is not enabled for the current license: auth_connector")
    );
    sim.shutdown();
}

#[tokio::test]
async fn batch_runs_commands_in_order_with_php_shapes() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    seeded(&sim, "ONCRMDEALUPDATE", "", 1..4);
    let (_, first) = call(
        &http,
        &sim,
        "event.offline.get",
        json!({"auth": auth, "clear": 0, "limit": 1}),
    )
    .await;
    let pid = first["result"]["process_id"].as_str().unwrap().to_string();
    // "z_settle" sorts after "a_fetch" but is sent first, so it must run first.
    let body = format!(
        r#"{{"auth": "{auth}", "halt": 0, "cmd": {{
            "z_settle": "event.offline.clear?process_id={pid}",
            "a_fetch": "event.offline.get?clear=0&limit=50",
            "list": "event.offline.list?filter[>PROCESS_ID]=",
            "nested": "batch?cmd[x]=server.time",
            "missing": "no.such.method"
        }}}}"#
    );
    let resp = http
        .post(format!("{}batch", sim.client_endpoint()))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    let result = &body["result"];
    assert_eq!(result["result"]["z_settle"], json!(true));
    assert_eq!(
        result["result"]["a_fetch"]["events"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(result["result"]["list"].as_array().unwrap().len(), 2);
    assert_eq!(result["result_total"], json!({"list": 2}));
    assert_eq!(result["result_next"], json!([]));
    assert_eq!(
        result["result_error"]["nested"]["error"],
        json!("ERROR_BATCH_METHOD_NOT_ALLOWED")
    );
    assert_eq!(
        result["result_error"]["missing"]["error"],
        json!("ERROR_METHOD_NOT_FOUND")
    );
    assert!(result["result_time"]["a_fetch"].get("operating").is_some());
    // The current limiter charges and reports the batch request itself.
    assert!(body["time"].get("operating").is_some());
    assert!(body["time"]["start"].is_i64(), "{}", body["time"]);
    let stats = sim.stats();
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.calls_by_method["batch"], 2);
    assert_eq!(stats.calls_by_method["event.offline.get"], 2);

    // All commands fail and halt stops at the first: empty members are JSON arrays.
    let (_, body) = call(
        &http,
        &sim,
        "batch",
        json!({"auth": auth, "halt": 1, "cmd": {"a": "event.offline.get?limit=0", "b": "server.time"}}),
    )
    .await;
    let result = &body["result"];
    assert_eq!(result["result"], json!([]));
    assert_eq!(result["result_time"], json!([]));
    assert_eq!(
        result["result_error"]["a"]["error"],
        json!("ERROR_ARGUMENT")
    );
    assert!(result["result_error"].get("b").is_none());

    // The top-level auth_connector applies to every command.
    seeded(&sim, "ONCRMLEADADD", "erp", 1..2);
    let (_, body) = call(
        &http,
        &sim,
        "batch",
        json!({"auth": auth, "auth_connector": "erp", "cmd": {"g": "event.offline.get?auth_connector=other"}}),
    )
    .await;
    assert_eq!(
        body["result"]["result"]["g"]["events"][0]["EVENT_NAME"],
        json!("ONCRMLEADADD")
    );
    sim.shutdown();
}

#[tokio::test]
async fn batch_commands_sent_as_a_list_answer_lists() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    let (_, body) = call(
        &http,
        &sim,
        "batch",
        json!({"auth": auth, "cmd": ["server.time", "user.admin"]}),
    )
    .await;
    assert_eq!(body["result"]["result"].as_array().unwrap().len(), 2);
    assert_eq!(body["result"]["result"][1], json!(true));
    assert_eq!(body["result"]["result_time"].as_array().unwrap().len(), 2);
    let form = format!("auth={auth}&cmd[0]=server.time&cmd[1]=no.such&cmd[2]=user.admin");
    let resp = http
        .post(format!("{}batch", sim.client_endpoint()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["result"]["result"]["2"], json!(true));
    assert_eq!(
        body["result"]["result_error"]["1"]["error"],
        json!("ERROR_METHOD_NOT_FOUND")
    );
    sim.shutdown();
}

#[tokio::test]
async fn batch_commands_past_fifty_fail() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    let cmd: serde_json::Map<String, Value> = (0..52)
        .map(|i| (format!("c{i:02}"), json!("server.time")))
        .collect();
    let (status, body) = call(&http, &sim, "batch", json!({"auth": auth, "cmd": cmd})).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["result"].as_object().unwrap().len(), 50);
    assert_eq!(
        body["result"]["result_error"]["c50"]["error"],
        json!("ERROR_BATCH_LENGTH_EXCEEDED")
    );
    assert_eq!(
        body["result"]["result_error"]["c51"]["error"],
        json!("ERROR_BATCH_LENGTH_EXCEEDED")
    );
    sim.shutdown();
}

#[tokio::test]
async fn list_pages_by_fifty() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    seeded(&sim, "ONCRMCONTACTUPDATE", "", 1..61);
    let (_, first) = call(&http, &sim, "event.offline.list", json!({"auth": auth})).await;
    assert_eq!(first["result"].as_array().unwrap().len(), 50);
    assert_eq!(
        (first["total"].clone(), first["next"].clone()),
        (json!(60), json!(50))
    );
    assert_eq!(first["result"][0]["ERROR"], json!("0"));
    let (_, last) = call(
        &http,
        &sim,
        "event.offline.list",
        json!({"auth": auth, "start": 50}),
    )
    .await;
    assert_eq!(last["result"].as_array().unwrap().len(), 10);
    assert!(last.get("next").is_none());
    sim.shutdown();
}

#[tokio::test]
async fn oauth_rotates_refresh_tokens_strictly() {
    let (sim, http, _) = start(SimulatorConfig::default()).await;
    let (_, refresh) = sim.issue_tokens();
    let url = sim.oauth_token_url();
    fn form<'a>(token: &'a str, secret: &'a str) -> [(&'a str, &'a str); 4] {
        [
            ("grant_type", "refresh_token"),
            ("client_id", "local.sim.0001"),
            ("client_secret", secret),
            ("refresh_token", token),
        ]
    }
    let resp = post_form(&http, &url, &form(&refresh, "sim-secret")).await;
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    for field in [
        "access_token",
        "client_endpoint",
        "domain",
        "expires",
        "expires_in",
        "member_id",
        "refresh_token",
        "scope",
        "server_endpoint",
        "status",
        "user_id",
    ] {
        assert!(body.get(field).is_some(), "{field} missing: {body}");
    }
    assert_eq!(body["client_endpoint"], json!(sim.client_endpoint()));
    assert_eq!(body["expires_in"], json!(3600));
    let new_access = body["access_token"].as_str().unwrap().to_string();
    let new_refresh = body["refresh_token"].as_str().unwrap().to_string();

    let resp = post_form(&http, &url, &form(&refresh, "sim-secret")).await;
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], json!("invalid_grant"));
    let resp = post_form(&http, &url, &form(&new_refresh, "wrong")).await;
    assert_eq!(resp.status().as_u16(), 401);
    // GET with a query string works too.
    let query_url = format!(
        "{url}?grant_type=refresh_token&client_id=local.sim.0001&client_secret=sim-secret&refresh_token={new_refresh}"
    );
    assert_eq!(
        http.get(query_url).send().await.unwrap().status().as_u16(),
        200
    );

    let (status, _) = call(&http, &sim, "server.time", json!({"auth": new_access})).await;
    assert_eq!(status, 200);

    let code = sim.authorization_code();
    let params = [
        ("grant_type", "authorization_code"),
        ("client_id", "local.sim.0001"),
        ("client_secret", "sim-secret"),
        ("code", code.as_str()),
    ];
    assert_eq!(post_form(&http, &url, &params).await.status().as_u16(), 200);
    assert_eq!(post_form(&http, &url, &params).await.status().as_u16(), 400);
    let stats = sim.stats();
    assert_eq!((stats.token_refreshes, stats.rejected_refresh), (2, 2));
    sim.shutdown();
}

#[tokio::test]
async fn leaky_bucket_answers_503_and_counts_a_batch_once() {
    let config = SimulatorConfig {
        rate_limit: Some((2, 0.01)),
        ..SimulatorConfig::default()
    };
    let (sim, http, auth) = start(config).await;
    let cmd = json!({"a": "server.time", "b": "server.time", "c": "server.time"});
    let (status, _) = call(&http, &sim, "batch", json!({"auth": auth, "cmd": cmd})).await;
    assert_eq!(status, 200);
    let (status, _) = call(&http, &sim, "server.time", json!({"auth": auth})).await;
    assert_eq!(status, 200);
    let (status, body) = call(&http, &sim, "server.time", json!({"auth": auth})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("QUERY_LIMIT_EXCEEDED"))
    );
    assert_eq!(body["error_description"], json!("Too many requests"));
    let stats = sim.stats();
    assert_eq!((stats.requests, stats.rejected_503), (3, 1));
    sim.shutdown();
}

#[tokio::test]
async fn the_current_limiter_bans_a_method_past_its_limit_and_reports_whole_seconds() {
    let config = SimulatorConfig {
        operating_limit: Some(OperatingLimit {
            budget: Duration::from_millis(200),
            window: Duration::from_secs(600),
            ban: Duration::from_secs(300),
        }),
        operating_cost: Duration::from_millis(150),
        ..SimulatorConfig::default()
    };
    let (sim, http, auth) = start(config).await;
    let asked = std::time::Instant::now();
    let (status, first) = call(&http, &sim, "event.offline.list", json!({"auth": auth})).await;
    assert_eq!(status, 200);
    assert!(
        asked.elapsed() >= Duration::from_millis(150),
        "the answer waits for the call's server time"
    );
    let time = &first["time"];
    assert!(time["start"].is_i64(), "{time}");
    assert!(time["processing"].is_i64(), "{time}");
    assert!(time["processing"].as_i64().unwrap() <= 1);
    // The call itself took over 0.1 s, so its own answer counts it.
    assert!(
        (time["operating"].as_f64().unwrap() - 0.15).abs() < 1e-6,
        "{time}"
    );
    let reset_at = time["operating_reset_at"].as_i64().unwrap();
    assert!(reset_at >= time["start"].as_i64().unwrap() + 599);
    // 0.15 s stored ≤ 0.2: runs; then 0.30 > 0.2: banned, the stored time forgotten.
    let (status, second) = call(&http, &sim, "event.offline.list", json!({"auth": auth})).await;
    assert_eq!(status, 200);
    assert!((second["time"]["operating"].as_f64().unwrap() - 0.30).abs() < 1e-6);
    let (status, body) = call(&http, &sim, "event.offline.list", json!({"auth": auth})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("OPERATION_TIME_LIMIT"))
    );
    assert!(body.get("time").is_none(), "an error carries no time block");
    // Still banned although nothing is stored any more.
    assert_eq!(
        call(&http, &sim, "event.offline.list", json!({"auth": auth}))
            .await
            .0,
        429
    );
    // Other methods keep working; inside a batch the banned method fails alone.
    assert_eq!(
        call(&http, &sim, "server.time", json!({"auth": auth}))
            .await
            .0,
        200
    );
    let (status, body) = call(
        &http,
        &sim,
        "batch",
        json!({"auth": auth, "cmd": {"l": "event.offline.list", "t": "server.time"}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["result"]["result_error"]["l"]["error"],
        json!("OPERATION_TIME_LIMIT")
    );
    assert!(body["result"]["result"].get("t").is_some());
    assert_eq!(sim.stats().rejected_429, 3);
    sim.shutdown();
}

#[tokio::test]
async fn the_current_limiter_sums_a_methods_calls_in_one_request() {
    let config = SimulatorConfig {
        operating_limit: Some(OperatingLimit::default()),
        operating_cost: Duration::from_millis(30),
        ..SimulatorConfig::default()
    };
    let (sim, http, auth) = start(config).await;
    // Alone, a 30 ms call is not stored.
    for _ in 0..3 {
        let (_, body) = call(&http, &sim, "server.time", json!({"auth": auth})).await;
        assert_eq!(body["time"]["operating"], json!(0.0));
    }
    // Four in one batch: 120 ms stored for server.time.
    let cmd =
        json!({"a": "server.time", "b": "server.time", "c": "server.time", "d": "server.time"});
    let (_, body) = call(&http, &sim, "batch", json!({"auth": auth, "cmd": cmd})).await;
    // The answer counts only calls above 0.1 s each: none yet.
    assert_eq!(body["result"]["result_time"]["d"]["operating"], json!(0.0));
    let (_, body) = call(&http, &sim, "server.time", json!({"auth": auth})).await;
    assert!((body["time"]["operating"].as_f64().unwrap() - 0.12).abs() < 1e-6);
    let (_, body) = call(
        &http,
        &sim,
        "batch",
        json!({"auth": auth, "cmd": {"x": "server.time"}}),
    )
    .await;
    // The first batch took 30 ms + 4 x 30 ms: 75 ms at half weight, not stored.
    assert_eq!(body["time"]["operating"], json!(0.0));
    sim.shutdown();
}

#[tokio::test]
async fn the_legacy_limiter_charges_each_call_and_refuses_until_the_window_moves() {
    let config = SimulatorConfig {
        operating_limit: Some(OperatingLimit::scaled(
            Duration::from_millis(10),
            Duration::from_secs(600),
        )),
        limiter: LimiterModel::Legacy,
        operating_cost: Duration::from_millis(6),
        ..SimulatorConfig::default()
    };
    let (sim, http, auth) = start(config).await;
    let (status, first) = call(&http, &sim, "event.offline.list", json!({"auth": auth})).await;
    assert_eq!(status, 200);
    assert!((first["time"]["operating"].as_f64().unwrap() - 0.006).abs() < 1e-6);
    assert!((first["time"]["processing"].as_f64().unwrap() - 0.006).abs() < 1e-6);
    let reset_at = first["time"]["operating_reset_at"].as_i64().unwrap();
    assert!(reset_at > first["time"]["start"].as_f64().unwrap() as i64 + 590);
    assert_eq!(
        call(&http, &sim, "event.offline.list", json!({"auth": auth}))
            .await
            .0,
        200
    );
    let (status, body) = call(&http, &sim, "event.offline.list", json!({"auth": auth})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("OPERATION_TIME_LIMIT"))
    );
    let (status, body) = call(
        &http,
        &sim,
        "batch",
        json!({"auth": auth, "cmd": {"l": "event.offline.list", "t": "server.time"}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["result"]["result_error"]["l"]["error"],
        json!("OPERATION_TIME_LIMIT")
    );
    assert!(
        body["time"].get("operating").is_none(),
        "batch is not charged"
    );
    assert_eq!(sim.stats().rejected_429, 2);
    sim.shutdown();
}

#[tokio::test]
async fn dropped_get_has_committed_but_the_client_sees_an_error() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    seeded(&sim, "ONCRMDEALUPDATE", "", 1..3);
    sim.set_faults(Faults {
        drop_next_gets: 1,
        ..Faults::default()
    });
    // Calls that do not run event.offline.get are not dropped.
    assert_eq!(
        call(&http, &sim, "server.time", json!({"auth": auth}))
            .await
            .0,
        200
    );
    let outcome = http
        .post(format!("{}event.offline.get", sim.client_endpoint()))
        .json(&json!({"auth": auth, "clear": 0}))
        .send()
        .await;
    let failed = match outcome {
        Err(_) => true,
        Ok(resp) => resp.bytes().await.is_err(),
    };
    assert!(failed, "the response must not arrive intact");
    // The reservation happened: both rows are reserved, and the next get finds nothing.
    assert_eq!(sim.stats().reserved, 2);
    assert_eq!(sim.stats().dropped_after_commit, 1);
    let (status, body) = call(
        &http,
        &sim,
        "event.offline.get",
        json!({"auth": auth, "clear": 0}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body["result"]["events"].as_array().unwrap().is_empty());
    // The orphaned reservation is visible through list.
    let (_, listed) = call(
        &http,
        &sim,
        "event.offline.list",
        json!({"auth": auth, "filter": {">PROCESS_ID": ""}}),
    )
    .await;
    assert_eq!(listed["total"], json!(2));
    sim.shutdown();
}

#[tokio::test]
async fn truncation_500_and_slow_faults() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    sim.set_faults(Faults {
        truncate: 1.0,
        ..Faults::default()
    });
    let resp = http
        .post(format!("{}server.time", sim.client_endpoint()))
        .json(&json!({"auth": auth}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err());
    sim.set_faults(Faults {
        fail_500: 1.0,
        ..Faults::default()
    });
    let (status, body) = call(&http, &sim, "server.time", json!({"auth": auth})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("INTERNAL_SERVER_ERROR"))
    );
    sim.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(200),
        ..Faults::default()
    });
    let before = std::time::Instant::now();
    assert_eq!(
        call(&http, &sim, "server.time", json!({"auth": auth}))
            .await
            .0,
        200
    );
    assert!(before.elapsed() >= Duration::from_millis(200));
    // OAuth is never faulted.
    sim.set_faults(Faults {
        fail_500: 1.0,
        ..Faults::default()
    });
    let code = sim.authorization_code();
    let params = [
        ("grant_type", "authorization_code"),
        ("client_id", "local.sim.0001"),
        ("client_secret", "sim-secret"),
        ("code", code.as_str()),
    ];
    assert_eq!(
        post_form(&http, &sim.oauth_token_url(), &params)
            .await
            .status()
            .as_u16(),
        200
    );
    let stats = sim.stats();
    assert_eq!((stats.truncated, stats.faults_500), (1, 1));
    sim.shutdown();
}

#[tokio::test]
async fn moved_portal_redirects_to_the_same_method() {
    let (sim, http, _) = start(SimulatorConfig::default()).await;
    let resp = http
        .post(format!(
            "{}event.offline.get.json?x=1",
            sim.moved_endpoint()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    let location = resp.headers()["location"].to_str().unwrap();
    assert_eq!(
        location,
        format!("{}event.offline.get.json?x=1", sim.client_endpoint())
    );
    sim.shutdown();
}

#[tokio::test]
async fn event_bindings_over_rest() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    let bind = json!({"auth": auth, "event": "onCrmDealAdd", "event_type": "offline", "auth_connector": "erp"});
    assert_eq!(
        call(&http, &sim, "event.bind", bind.clone()).await.1["result"],
        json!(true)
    );
    let (status, body) = call(&http, &sim, "event.bind", bind).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("ERROR_CORE")));
    assert_eq!(
        body["error_description"],
        json!("Unable to set event handler: Handler already binded")
    );
    let (status, body) = call(
        &http,
        &sim,
        "event.bind",
        json!({"auth": auth, "event": "ONNOTHING", "event_type": "offline"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("ERROR_EVENT_NOT_FOUND"))
    );
    let (_, body) = call(&http, &sim, "event.get", json!({"auth": auth})).await;
    assert_eq!(
        body["result"],
        json!([{"event": "ONCRMDEALADD", "connector_id": "erp", "offline": 1}])
    );
    let (_, events) = call(&http, &sim, "events", json!({"auth": auth})).await;
    assert!(
        events["result"]
            .as_array()
            .unwrap()
            .contains(&json!("ONCRMDEALADD"))
    );

    sim.emit_change("ONCRMDEALADD", 45);
    let (_, got) = call(
        &http,
        &sim,
        "event.offline.get",
        json!({"auth": auth, "auth_connector": "erp"}),
    )
    .await;
    assert_eq!(
        got["result"]["events"][0]["EVENT_DATA"],
        json!({"FIELDS": {"ID": "45"}})
    );
    let (_, deal) = call(&http, &sim, "crm.deal.get", json!({"auth": auth, "id": 45})).await;
    assert_eq!(deal["result"]["ID"], json!("45"));
    let (status, _) = call(&http, &sim, "crm.deal.get", json!({"auth": auth, "id": 46})).await;
    assert_eq!(status, 400);

    let (_, body) = call(
        &http,
        &sim,
        "event.unbind",
        json!({"auth": auth, "event": "ONCRMDEALADD", "event_type": "offline"}),
    )
    .await;
    assert_eq!(body["result"], json!({"count": 0}));
    let (_, body) = call(
        &http,
        &sim,
        "event.unbind",
        json!({"auth": auth, "event": "ONCRMDEALADD", "event_type": "offline", "auth_connector": "erp"}),
    )
    .await;
    assert_eq!(body["result"], json!({"count": 1}));
    sim.shutdown();
}

#[tokio::test]
async fn control_api_drives_a_served_simulator() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        SimulatorConfig::default(),
        listener,
        shutdown.clone(),
    ));
    let http = client();
    let post = |path: &str, body: Value| http.post(format!("{base}{path}")).json(&body).send();

    assert_eq!(
        post("/_sim/bind", json!({"event": "ONCRMDEALUPDATE"}))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    let emitted: Value = post(
        "/_sim/emit",
        json!({"event": "ONCRMDEALUPDATE", "count": 3}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(emitted, json!({"emitted": 3, "queued": 3}));
    let emitted: Value = post(
        "/_sim/emit",
        json!({"event": "ONCRMDEALUPDATE", "entity_id": 2}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(emitted["queued"], json!(3));
    let tokens: Value = post("/_sim/tokens", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let auth = tokens["access_token"].as_str().unwrap();
    let got: Value = post("/rest/event.offline.get", json!({"auth": auth, "clear": 0}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["result"]["events"].as_array().unwrap().len(), 3);
    let faults = post(
        "/_sim/faults",
        json!({"fail_500": 1.0, "slow_delay": "10ms"}),
    )
    .await
    .unwrap();
    assert_eq!(faults.status().as_u16(), 200);
    let failed = post("/rest/server.time", json!({"auth": auth}))
        .await
        .unwrap();
    assert_eq!(failed.status().as_u16(), 500);
    let bad = post("/_sim/faults", json!({"nonsense": 1})).await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let stats: Value = http
        .get(format!("{base}/_sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            stats["emitted"].clone(),
            stats["reserved"].clone(),
            stats["faults_500"].clone()
        ),
        (json!(4), json!(3), json!(1))
    );
    let rows: Value = http
        .get(format!("{base}/_sim/rows"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3);
    let reseeded: Value = post("/_sim/reseed", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reseeded, json!({"result": true, "next_id": 4}));

    shutdown.cancel();
    drop(http);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve stops on cancel")
        .expect("serve task")
        .expect("serve ok");
}

#[tokio::test]
async fn event_test_writes_onapptest_for_the_other_connectors_of_the_app() {
    let (sim, http, auth) = start(SimulatorConfig::default()).await;
    sim.bind_offline("ONAPPTEST", "probe");
    sim.bind_offline("ONAPPTEST", "");
    let (status, events) = call(&http, &sim, "events", json!({"auth": auth})).await;
    assert_eq!(status, 200);
    assert!(
        events["result"]
            .as_array()
            .unwrap()
            .contains(&json!("ONAPPTEST"))
    );
    // Without auth_connector: the '' handler is the caller's own and gets nothing.
    let (status, body) = call(
        &http,
        &sim,
        "event.test",
        json!({"auth": auth, "b24eventd_probe": "r1", "n": 1}),
    )
    .await;
    assert_eq!((status, &body["result"]), (200, &json!(1)), "{body}");
    let rows = sim.rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].connector_id, "probe");
    assert_eq!(rows[0].event_name, "ONAPPTEST");
    assert_eq!(
        rows[0].event_data,
        json!({"QUERY": {"b24eventd_probe": "r1", "n": 1}, "LANGUAGE_ID": "en"})
    );
    // With auth_connector=probe: only the '' handler gets a row.
    let (status, _) = call(
        &http,
        &sim,
        "event.test",
        json!({"auth": auth, "auth_connector": "probe", "n": 2}),
    )
    .await;
    assert_eq!(status, 200);
    let connectors: Vec<String> = sim.rows().into_iter().map(|r| r.connector_id).collect();
    assert_eq!(connectors, ["probe", ""]);
    // The same parameters again merge into the unreserved row (same MESSAGE_ID).
    call(
        &http,
        &sim,
        "event.test",
        json!({"auth": auth, "b24eventd_probe": "r1", "n": 1}),
    )
    .await;
    assert_eq!(sim.rows().len(), 2);
    assert_eq!(sim.stats().event_tests, 3);
    // OAuth only.
    let resp = http
        .post(format!("{}/rest/1/abc/event.test", sim.base_url()))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], json!("WRONG_AUTH_TYPE"));
}

#[tokio::test]
async fn deviation_switches_clamp_get_and_ignore_clear_by_message_id() {
    let (sim, http, auth) = start(SimulatorConfig {
        get_limit_clamp: Some(50),
        clear_ignores_message_id: true,
        ..SimulatorConfig::default()
    })
    .await;
    seeded(&sim, "ONCRMDEALUPDATE", "", 1..61);
    let (_, body) = call(
        &http,
        &sim,
        "event.offline.get",
        json!({"auth": auth, "clear": 0, "limit": 60}),
    )
    .await;
    let events = body["result"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 50);
    assert_eq!(
        sim.stats().reserved,
        50,
        "the clamp reserves no more either"
    );
    assert_eq!(sim.stats().largest_get_limit, 60);
    let pid = body["result"]["process_id"].as_str().unwrap().to_string();
    let mid = events[0]["MESSAGE_ID"].as_str().unwrap().to_string();
    let (status, body) = call(
        &http,
        &sim,
        "event.offline.clear",
        json!({"auth": auth, "process_id": pid, "message_id": [mid]}),
    )
    .await;
    assert_eq!((status, &body["result"]), (200, &json!(true)));
    assert_eq!(sim.rows().len(), 60, "nothing deleted");
    assert_eq!(sim.stats().ignored_message_id_clears, 1);
    let first_id = events[0]["ID"].as_str().unwrap().parse::<i64>().unwrap();
    call(
        &http,
        &sim,
        "event.offline.clear",
        json!({"auth": auth, "process_id": pid, "id": [first_id]}),
    )
    .await;
    assert_eq!(sim.rows().len(), 59, "clear by id still works");
}
