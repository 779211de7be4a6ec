//! Many portals on one listener (`Simulator::start_many`): each its own queue and tokens under
//! its own prefix, answers naming that prefix, an unknown portal a 404.

use super::*;

#[tokio::test]
async fn portals_on_one_listener_keep_their_own_queues_tokens_and_prefix() {
    let names = vec!["a".to_string(), "b-2".to_string()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sims = Simulator::start_many(SimulatorConfig::default(), &names, listener)
        .await
        .unwrap();
    let http = client();
    let (a, b) = (&sims[0], &sims[1]);
    assert!(a.client_endpoint().ends_with("/p/a/rest/"));
    assert_eq!(
        a.base_url().rsplit_once("/p/").map(|(host, _)| host),
        b.base_url().rsplit_once("/p/").map(|(host, _)| host),
        "one listener"
    );
    seeded(a, "ONCRMDEALADD", "", 1..4);
    b.bind_offline("ONCRMDEALADD", "");
    let (access_a, refresh_a) = a.issue_tokens();
    let (status, body) = call(
        &http,
        a,
        "event.offline.get",
        json!({"auth": access_a, "clear": 0, "limit": 50}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["events"].as_array().map(Vec::len), Some(3));
    // a's token is not b's; b's queue is empty.
    let (status, _) = call(&http, b, "event.offline.get", json!({"auth": access_a})).await;
    assert_eq!(status, 401);
    let (access_b, _) = b.issue_tokens();
    let (status, body) = call(&http, b, "event.offline.get", json!({"auth": access_b})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["events"].as_array().map(Vec::len), Some(0));
    // Each counted its own calls: a one, b two (the refused one too).
    assert_eq!(a.stats().calls_by_method["event.offline.get"], 1);
    assert_eq!(b.stats().calls_by_method["event.offline.get"], 2);

    let resp = post_form(
        &http,
        &a.oauth_token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "local.sim.0001"),
            ("client_secret", "sim-secret"),
            ("refresh_token", &refresh_a),
        ],
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["client_endpoint"]
            .as_str()
            .is_some_and(|e| e.ends_with("/p/a/rest/")),
        "{body}"
    );

    let unknown = a.base_url().replace("/p/a", "/p/zzz");
    let resp = http
        .post(format!("{unknown}/rest/event.offline.get"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    a.shutdown();
}
