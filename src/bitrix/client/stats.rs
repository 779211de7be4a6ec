//! What a client counts since it was built ([`ClientStats`]): answers by outcome in total and
//! per method, the last `time.operating` per method, rate-limit waits and token refreshes. The
//! metrics read these at scrape time, so the client knows nothing of Prometheus.

use super::{PortalClient, lock};
use std::collections::BTreeMap;

/// Counters of one client since it was built.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct ClientStats {
    /// HTTP requests sent to the portal (redirect hops and retries included).
    pub requests: u64,
    pub ok: u64,
    pub rate_limited_503: u64,
    pub operating_429: u64,
    pub auth_errors: u64,
    /// Other error answers, including bodies that were not Bitrix24 JSON.
    pub other_errors: u64,
    /// Requests that did not complete (connect, timeout, reset, cut-off body).
    pub transport_errors: u64,
    /// Answers with a success status whose body could not be parsed (cut off, broken, or JSON
    /// nested deeper than [`crate::json_depth::MAX_DEPTH`] levels); counted in `other_errors`
    /// too.
    pub unparsable: u64,
    pub token_refreshes: u64,
    /// Seconds spent waiting for rate limits: the client-side bucket and 503/429 backoffs.
    pub rate_wait_seconds: f64,
    /// The same answers split by REST method (`batch` for a batch request), with the operating
    /// time the portal reported for each.
    pub methods: BTreeMap<String, MethodStats>,
}

/// Answers to one REST method since the client was built.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub(crate) struct MethodStats {
    pub ok: u64,
    pub rate_limited_503: u64,
    pub operating_429: u64,
    pub auth_errors: u64,
    pub other_errors: u64,
    pub transport_errors: u64,
    /// `time.operating` of the method's last successful answer: seconds of execution the portal
    /// has counted against the method's operating budget in its 10-minute window.
    pub operating_seconds: Option<f64>,
}

/// How one request ended, for [`ClientStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    Ok,
    RateLimited503,
    Operating429,
    Auth,
    Other,
    Transport,
}

impl PortalClient {
    pub(crate) fn stats(&self) -> ClientStats {
        lock(&self.inner.stats).clone()
    }

    pub(super) fn stat(&self, f: impl FnOnce(&mut ClientStats)) {
        f(&mut lock(&self.inner.stats));
    }

    /// Counts how a request to `method` ended, in the totals and per method.
    pub(super) fn count_answer(&self, method: &str, answer: Answer) {
        self.stat(|s| {
            let m = s.methods.entry(method.to_string()).or_default();
            let (total, per_method) = match answer {
                Answer::Ok => (&mut s.ok, &mut m.ok),
                Answer::RateLimited503 => (&mut s.rate_limited_503, &mut m.rate_limited_503),
                Answer::Operating429 => (&mut s.operating_429, &mut m.operating_429),
                Answer::Auth => (&mut s.auth_errors, &mut m.auth_errors),
                Answer::Other => (&mut s.other_errors, &mut m.other_errors),
                Answer::Transport => (&mut s.transport_errors, &mut m.transport_errors),
            };
            *total += 1;
            *per_method += 1;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use serde_json::json;

    #[tokio::test]
    async fn counts_answers_and_operating_time_per_method() {
        let (base, srv) = serve(|_, n| match n {
            0 => json_reply(200, json!({"result": [], "time": {"operating": 1.25}})),
            1 => api_error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests"),
            2 => json_reply(200, json!({"result": true, "time": {"operating": 0.5}})),
            _ => api_error(400, "ERROR_ARGUMENT", "bad argument"),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        client.call("event.offline.get", json!({})).await.unwrap();
        client
            .call("event.offline.clear", json!({"process_id": "p"}))
            .await
            .unwrap();
        client
            .call("event.offline.error", json!({"process_id": "p"}))
            .await
            .unwrap_err();
        let stats = client.stats();
        assert_eq!(
            (
                stats.requests,
                stats.ok,
                stats.rate_limited_503,
                stats.other_errors
            ),
            (4, 2, 1, 1)
        );
        let get = &stats.methods["event.offline.get"];
        assert_eq!((get.ok, get.operating_seconds), (1, Some(1.25)));
        let clear = &stats.methods["event.offline.clear"];
        assert_eq!(
            (clear.ok, clear.rate_limited_503, clear.operating_seconds),
            (1, 1, Some(0.5))
        );
        let error = &stats.methods["event.offline.error"];
        assert_eq!(
            (error.ok, error.other_errors, error.operating_seconds),
            (0, 1, None)
        );
        assert_eq!(stats.methods.len(), 3);
    }
}
