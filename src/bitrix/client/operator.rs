//! The operator's calls (`doctor`, `subscribe`, `auth`): `event.get/bind/unbind` of offline
//! bindings, `feature.get`, `server.time`, `user.admin` and `app.info`. All but the binding
//! calls go without `auth_connector`, so that they work on plans without `rest_auth_connector`.

use super::PortalClient;
use crate::bitrix::error::BitrixError;
use crate::bitrix::types::{
    AppInfo, EventHandler, FeatureValue, parse_app_info, parse_event_get, parse_feature_get,
    parse_server_time, parse_unbind_count, parse_user_admin,
};
use serde_json::{Value, json};

/// What `event.bind` did with an offline binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BindOutcome {
    /// The binding was added.
    Bound,
    /// The portal already had it ("Handler already binded"): nothing changed.
    AlreadyBound,
}

impl PortalClient {
    /// Sent without `auth_connector` (the server lists all connectors' bindings anyway), so it
    /// also works on plans without `rest_auth_connector`.
    pub(crate) async fn event_get(&self) -> Result<Vec<EventHandler>, BitrixError> {
        const METHOD: &str = "event.get";
        let resp = self.call(METHOD, json!({ "auth_connector": null })).await?;
        parse_event_get(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `event.bind` with `event_type=offline` (no handler URL; the configured `auth_connector`
    /// goes along and becomes the binding's `connector_id`). Binding twice is not an error.
    pub(crate) async fn event_bind_offline(&self, event: &str) -> Result<BindOutcome, BitrixError> {
        const METHOD: &str = "event.bind";
        let params = json!({ "event": event, "event_type": "offline" });
        match self.call(METHOD, params).await {
            Ok(resp) if resp.result == Value::Bool(false) => {
                Err(self.shape_error(METHOD, format!("event.bind of {event} answered false")))
            }
            Ok(_) => Ok(BindOutcome::Bound),
            // `RestException('Unable to set event handler: Handler already binded', ERROR_CORE)`.
            Err(e)
                if e.is_code("ERROR_CORE")
                    && e.description.to_lowercase().contains("already bind") =>
            {
                Ok(BindOutcome::AlreadyBound)
            }
            Err(e) => Err(e),
        }
    }

    /// `event.unbind` with `event_type=offline`: removes this application's offline binding of
    /// `event` made with the configured `auth_connector` (the server matches the connector of
    /// the request). Returns how many bindings were removed.
    pub(crate) async fn event_unbind_offline(&self, event: &str) -> Result<u64, BitrixError> {
        const METHOD: &str = "event.unbind";
        let params = json!({ "event": event, "event_type": "offline" });
        let resp = self.call(METHOD, params).await?;
        parse_unbind_count(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `feature.get` of a plan feature code (`rest_offline_extended`, `rest_auth_connector`).
    pub(crate) async fn feature_get(&self, code: &str) -> Result<FeatureValue, BitrixError> {
        const METHOD: &str = "feature.get";
        let resp = self
            .call(METHOD, json!({ "CODE": code, "auth_connector": null }))
            .await?;
        parse_feature_get(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `server.time`: the portal's clock.
    pub(crate) async fn server_time(
        &self,
    ) -> Result<chrono::DateTime<chrono::FixedOffset>, BitrixError> {
        const METHOD: &str = "server.time";
        let resp = self.call(METHOD, json!({ "auth_connector": null })).await?;
        parse_server_time(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `user.admin`: whether the token's user is a portal administrator (event methods need one).
    pub(crate) async fn user_admin(&self) -> Result<bool, BitrixError> {
        const METHOD: &str = "user.admin";
        let resp = self.call(METHOD, json!({ "auth_connector": null })).await?;
        parse_user_admin(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `app.info`: the application's installation and payment state and the portal's plan.
    pub(crate) async fn app_info(&self) -> Result<AppInfo, BitrixError> {
        const METHOD: &str = "app.info";
        let resp = self.call(METHOD, json!({ "auth_connector": null })).await?;
        parse_app_info(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::bitrix::client::lock;

    #[tokio::test]
    async fn operator_methods_send_the_connector_only_where_it_matters() {
        let (base, srv) = serve(|seen, _| match seen.path.as_str() {
            "/rest/event.get" => ok(json!([
                {"event": "ONCRMDEALADD", "connector_id": "erp-sync", "offline": 1},
                {"event": "ONCRMLEADADD", "handler": "https://h.example/", "auth_type": "0", "offline": 0}
            ])),
            "/rest/event.bind" if seen.body["event"] == "ONCRMDEALADD" => api_error(
                400,
                "ERROR_CORE",
                "Unable to set event handler: Handler already binded",
            ),
            "/rest/event.bind" if seen.body["event"] == "ONNOSUCH" => {
                api_error(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
            }
            "/rest/event.unbind" => ok(json!({"count": 1})),
            "/rest/feature.get" => ok(json!({"value": "N"})),
            "/rest/server.time" => ok(json!("2026-11-23T13:00:00+03:00")),
            "/rest/user.admin" => ok(json!(true)),
            "/rest/app.info" => ok(json!({"CODE": "local.app.1", "STATUS": "L", "INSTALLED": true,
                "PAYMENT_EXPIRED": "N", "DAYS": null, "LICENSE": "en_pro100"})),
            _ => ok(json!(true)),
        })
        .await;
        let mut s = settings(&base);
        s.auth_connector = Some("erp-sync".into());
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let handlers = client.event_get().await.unwrap();
        assert_eq!(handlers.len(), 2);
        assert!(handlers[0].offline && handlers[0].connector_id == "erp-sync");
        assert_eq!(
            client.event_bind_offline("ONCRMDEALADD").await.unwrap(),
            BindOutcome::AlreadyBound
        );
        assert_eq!(
            client.event_bind_offline("ONCRMDEALUPDATE").await.unwrap(),
            BindOutcome::Bound
        );
        let err = client.event_bind_offline("ONNOSUCH").await.unwrap_err();
        assert!(err.to_string().contains("scope"), "{err}");
        assert_eq!(
            client.event_unbind_offline("ONCRMDEALADD").await.unwrap(),
            1
        );
        assert_eq!(
            client.feature_get("rest_offline_extended").await.unwrap(),
            FeatureValue::Disabled
        );
        assert_eq!(
            client.server_time().await.unwrap().timestamp(),
            1_795_428_000
        );
        assert!(client.user_admin().await.unwrap());
        let app = client.app_info().await.unwrap();
        assert_eq!((app.status.as_str(), app.installed), ("L", true));

        let bodies: Vec<(String, Value)> = lock(&srv.seen)
            .iter()
            .map(|s| (s.path.clone(), s.body.clone()))
            .collect();
        let body = |path: &str, n: usize| {
            bodies
                .iter()
                .filter(|(p, _)| p == path)
                .nth(n)
                .map(|(_, b)| b.clone())
                .unwrap()
        };
        assert_eq!(body("/rest/event.get", 0), json!({"auth": "a1"}));
        assert_eq!(
            body("/rest/event.bind", 1),
            json!({"event": "ONCRMDEALUPDATE", "event_type": "offline", "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            body("/rest/event.unbind", 0),
            json!({"event": "ONCRMDEALADD", "event_type": "offline", "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            body("/rest/feature.get", 0),
            json!({"CODE": "rest_offline_extended", "auth": "a1"})
        );
        for path in ["/rest/server.time", "/rest/user.admin", "/rest/app.info"] {
            assert_eq!(body(path, 0), json!({"auth": "a1"}), "{path}");
        }
    }
}
