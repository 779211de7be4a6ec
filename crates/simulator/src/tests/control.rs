//! Event bindings over REST, the control API, `event.test` and the deviation switches.

use super::*;

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
