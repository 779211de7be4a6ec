//! The REST surface: reservation and settlement, request encodings, auth and the auth connector,
//! `batch` and list paging.

use super::*;

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
