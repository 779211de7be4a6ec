//! OAuth rotation, the leaky bucket, the operating-time limiters, injected faults and the moved
//! portal.

use super::*;

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
