//! The portal's OAuth token pair as the client holds it: the access token each call sends,
//! the single-flight refresh (the new pair persisted before it is used), adopting a pair another
//! process stored after `invalid_grant`, and the registration of every pair as rotating secrets.

use super::{PortalClient, lock, normalize_endpoint};
use crate::bitrix::error::{BitrixError, REFRESH_METHOD, codes, sanitize_snippet};
use crate::bitrix::oauth::{self, Tokens};
use std::time::{Duration, Instant};

/// An access token expiring within this margin is refreshed before the call.
const EXPIRY_MARGIN_SECS: i64 = 60;
/// After a rejection-triggered refresh, a second rejection within this time does not refresh
/// again (a fresh token refused means refreshing will not help; it would only hammer the
/// authorization server, which may block the application).
const MIN_REJECTION_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct TokenState {
    tokens: Option<Tokens>,
    /// The in-memory tokens came from a refresh whose save failed: persist before the next call.
    unsaved: bool,
    last_rejection_refresh: Option<Instant>,
}

/// Why a refresh is wanted; decides whether a caller that waited for the lock still needs one.
pub(super) enum RefreshTrigger<'a> {
    /// The access token expires soon.
    Expiring,
    /// The portal refused this access token.
    Rejected(&'a str),
}

impl TokenState {
    pub(super) fn holding(tokens: Option<Tokens>) -> TokenState {
        TokenState {
            tokens,
            ..TokenState::default()
        }
    }
}

impl PortalClient {
    /// Exchanges an authorization code (from the OAuth redirect, valid for 30 seconds) for a
    /// token pair. The pair is returned, not stored or used: the caller persists it first.
    pub(crate) async fn exchange_code(&self, code: &str) -> Result<Tokens, BitrixError> {
        let s = &self.inner.settings;
        oauth::exchange_code(
            &self.inner.http,
            &s.oauth_token_url,
            &s.client_id,
            &s.client_secret,
            code,
            &s.portal,
        )
        .await
    }

    fn no_tokens(&self, method: &str) -> BitrixError {
        BitrixError::new(
            self.portal(),
            method,
            codes::NO_TOKENS,
            no_tokens_message(self.portal(), self.inner.settings.journal.as_deref()),
            None,
        )
    }

    /// The access token to send: persists unsaved tokens first, refreshes one that expires soon.
    pub(super) async fn usable_access_token(&self, method: &str) -> Result<String, BitrixError> {
        let (tokens, unsaved) = {
            let state = lock(&self.inner.tokens);
            (state.tokens.clone(), state.unsaved)
        };
        let Some(tokens) = tokens else {
            return Err(self.no_tokens(method));
        };
        if unsaved {
            self.persist_unsaved().await?;
        }
        let margin = chrono::Duration::seconds(EXPIRY_MARGIN_SECS);
        if tokens.expires_within(margin, chrono::Utc::now())
            && let Err(err) = self.refresh_single_flight(RefreshTrigger::Expiring).await
        {
            let still_valid = !tokens.access_token.is_empty()
                && tokens.expires_at.is_some_and(|at| at > chrono::Utc::now());
            if err.is_retryable() && !err.is_code(codes::JOURNAL_WRITE_FAILED) && still_valid {
                tracing::warn!(
                    portal = self.portal(),
                    method,
                    error = %err,
                    "refreshing the expiring access token failed; using it while it lasts"
                );
            } else {
                return Err(err);
            }
        }
        let state = lock(&self.inner.tokens);
        match &state.tokens {
            Some(t) => Ok(t.access_token.clone()),
            None => Err(self.no_tokens(method)),
        }
    }

    /// Refreshes unless a caller that held the lock before already did what `trigger` needs.
    /// Returns whether new tokens are in place (false: a rejection refresh was suppressed).
    pub(super) async fn refresh_single_flight(
        &self,
        trigger: RefreshTrigger<'_>,
    ) -> Result<bool, BitrixError> {
        let _guard = self.inner.refresh_lock.lock().await;
        let current = {
            let state = lock(&self.inner.tokens);
            match &trigger {
                RefreshTrigger::Expiring => match &state.tokens {
                    Some(t)
                        if !t.expires_within(
                            chrono::Duration::seconds(EXPIRY_MARGIN_SECS),
                            chrono::Utc::now(),
                        ) =>
                    {
                        return Ok(true);
                    }
                    _ => {}
                },
                RefreshTrigger::Rejected(stale) => {
                    if let Some(t) = &state.tokens
                        && t.access_token != *stale
                    {
                        return Ok(true);
                    }
                    if state
                        .last_rejection_refresh
                        .is_some_and(|at| at.elapsed() < MIN_REJECTION_REFRESH_INTERVAL)
                    {
                        tracing::warn!(
                            portal = self.portal(),
                            "the portal refused an access token refreshed moments ago; not refreshing again"
                        );
                        return Ok(false);
                    }
                }
            }
            state.tokens.clone()
        };
        let Some(current) = current else {
            return Err(self.no_tokens(REFRESH_METHOD));
        };
        if current.refresh_token.is_empty() {
            return Err(self.no_tokens(REFRESH_METHOD));
        }
        let settings = &self.inner.settings;
        let refreshed = oauth::refresh(
            &self.inner.http,
            &settings.oauth_token_url,
            &settings.client_id,
            &settings.client_secret,
            &current.refresh_token,
            &settings.portal,
        )
        .await;
        let mut fresh = match refreshed {
            Ok(fresh) => fresh,
            Err(e) if e.is_code("invalid_grant") => {
                return self.adopt_stored_pair(&current).await.map_err(|()| e);
            }
            Err(e) => return Err(e),
        };
        self.stat(|s| s.token_refreshes += 1);
        // Keep what the answer left out (an older server may not repeat member_id or scope).
        fresh.member_id = fresh.member_id.or(current.member_id);
        fresh.scope = fresh.scope.or(current.scope);
        fresh.user_id = fresh.user_id.or(current.user_id);
        fresh.client_endpoint = fresh.client_endpoint.or(current.client_endpoint);
        if let Some(named) = &fresh.client_endpoint {
            let using = self.client_endpoint();
            if normalize_endpoint(named).ok().as_deref() != Some(using.as_str()) {
                tracing::info!(
                    portal = self.portal(),
                    token_endpoint = %named,
                    client_endpoint = %using,
                    "the token answer names another client_endpoint; calls keep going to the configured one"
                );
            }
        }
        let saved = self.inner.store.save(self.portal(), &fresh).await;
        {
            // Swap even when the save failed: the old refresh token is already dead upstream.
            let mut state = lock(&self.inner.tokens);
            state.tokens = Some(fresh.clone());
            state.unsaved = saved.is_err();
            if matches!(trigger, RefreshTrigger::Rejected(_)) {
                state.last_rejection_refresh = Some(Instant::now());
            }
        }
        match saved {
            Ok(()) => {
                tracing::info!(
                    portal = self.portal(),
                    expires_at = ?fresh.expires_at,
                    "access token refreshed and the new pair persisted"
                );
                Ok(true)
            }
            Err(e) => {
                tracing::error!(
                    portal = self.portal(),
                    error = %format!("{e:#}"),
                    "the refreshed token pair could not be persisted; the old refresh token is no \
                     longer valid, so a restart before the journal accepts the new pair needs \
                     `b24eventd auth import`"
                );
                Err(self.journal_failed(&e))
            }
        }
    }

    /// After `invalid_grant`: the refresh token may have been rotated by another process (a
    /// `doctor` or `auth login` beside the daemon) that stored the new pair. If the store holds
    /// another pair than the one refused, use it (`Ok(true)`); otherwise `Err(())`, and the
    /// refusal stands.
    async fn adopt_stored_pair(&self, refused: &Tokens) -> Result<bool, ()> {
        let stored = match self.inner.store.load(self.portal()).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Err(()),
            Err(e) => {
                tracing::warn!(
                    portal = self.portal(),
                    error = %format!("{e:#}"),
                    "the refresh token was refused and the stored pair could not be read"
                );
                return Err(());
            }
        };
        if stored.refresh_token.is_empty() || stored.refresh_token == refused.refresh_token {
            return Err(());
        }
        tracing::warn!(
            portal = self.portal(),
            "the refresh token was refused, but another process stored a newer pair: using that"
        );
        stored.register_secrets(self.portal());
        let mut state = lock(&self.inner.tokens);
        state.tokens = Some(stored);
        state.unsaved = false;
        Ok(true)
    }

    /// Retries persisting tokens whose save failed after a refresh.
    async fn persist_unsaved(&self) -> Result<(), BitrixError> {
        let _guard = self.inner.refresh_lock.lock().await;
        let tokens = {
            let state = lock(&self.inner.tokens);
            if !state.unsaved {
                return Ok(());
            }
            state.tokens.clone()
        };
        let Some(tokens) = tokens else {
            return Ok(());
        };
        match self.inner.store.save(self.portal(), &tokens).await {
            Ok(()) => {
                let mut state = lock(&self.inner.tokens);
                if state.tokens.as_ref() == Some(&tokens) {
                    state.unsaved = false;
                }
                drop(state);
                tracing::info!(
                    portal = self.portal(),
                    "the refreshed token pair is persisted now"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    portal = self.portal(),
                    error = %format!("{e:#}"),
                    "the refreshed token pair still could not be persisted"
                );
                Err(self.journal_failed(&e))
            }
        }
    }

    fn journal_failed(&self, e: &anyhow::Error) -> BitrixError {
        let secrets = self.secrets();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        BitrixError::new(
            self.portal(),
            REFRESH_METHOD,
            codes::JOURNAL_WRITE_FAILED,
            format!(
                "the new refresh token could not be persisted: {}",
                sanitize_snippet(&format!("{e:#}"), &secrets, 300)
            ),
            None,
        )
    }

    /// Strings that must never appear in an error or log line.
    fn secrets(&self) -> Vec<String> {
        let mut out = vec![self.inner.settings.client_secret.clone()];
        if let Some(t) = &lock(&self.inner.tokens).tokens {
            out.push(t.access_token.clone());
            out.push(t.refresh_token.clone());
        }
        out
    }
}

/// The NO_TOKENS text: which journal was looked in, and how to store tokens in that one (the
/// packaged service's journal is reached with `b24eventd-as-service`, which runs as the service).
fn no_tokens_message(portal: &str, journal: Option<&std::path::Path>) -> String {
    let store = format!(
        "`b24eventd auth login --portal {portal}` (or `b24eventd auth import --portal {portal} \
         --refresh-token -`) with the same config and environment; for the packaged systemd \
         service, `b24eventd-as-service auth login --portal {portal}` as root"
    );
    match journal {
        Some(journal) => format!(
            "no OAuth tokens are stored for this portal in the journal {}: store them there with {store}",
            journal.display()
        ),
        None => format!("no OAuth tokens are stored for this portal: store them with {store}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::bitrix::client::GetRequest;
    use crate::bitrix::{ErrorClass, TokenStore};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    fn holds_tokens(client: &PortalClient) -> bool {
        lock(&client.inner.tokens).tokens.is_some()
    }

    #[tokio::test]
    async fn expired_token_is_refreshed_saved_then_the_call_repeated() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                assert_eq!(seen.method, "GET");
                assert_eq!(seen.query["grant_type"], "refresh_token");
                assert_eq!(seen.query["client_id"], "local.app.1");
                assert_eq!(seen.query["client_secret"], "s3cr3t-client-secret");
                return token_reply("a2", "r2");
            }
            match seen.body["auth"].as_str() {
                Some("a2") => ok(json!({"process_id": null, "events": []})),
                _ => api_error(
                    401,
                    "expired_token",
                    "The access token provided has expired.",
                ),
            }
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let batch = client
            .offline_get(&GetRequest {
                limit: 50,
                clear: false,
                process_id: None,
                error_lane: false,
            })
            .await
            .unwrap();
        assert!(batch.events.is_empty());
        assert_eq!(
            log(&srv),
            vec![
                "call /rest/event.offline.get auth=a1",
                "refresh r1",
                "save a2",
                "call /rest/event.offline.get auth=a2",
            ]
        );
        let stats = client.stats();
        assert_eq!(
            (stats.token_refreshes, stats.auth_errors, stats.ok),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn failed_token_save_is_retryable_and_keeps_the_new_tokens() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return token_reply("a2", "r2");
            }
            match seen.body["auth"].as_str() {
                Some("a2") => ok(json!(true)),
                _ => api_error(
                    401,
                    "expired_token",
                    "The access token provided has expired.",
                ),
            }
        })
        .await;
        let (client, store) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        store.fail.store(true, Ordering::SeqCst);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Retryable, "JOURNAL_WRITE_FAILED")
        );
        assert!(err.to_string().contains("could not be persisted"), "{err}");
        // Still failing: nothing is sent with the unpersisted tokens.
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(err.code, "JOURNAL_WRITE_FAILED");
        store.fail.store(false, Ordering::SeqCst);
        client.call("app.info", json!({})).await.unwrap();
        assert_eq!(
            log(&srv),
            vec![
                "call /rest/app.info auth=a1",
                "refresh r1",
                "save a2",
                "save a2",
                "save a2",
                "call /rest/app.info auth=a2",
            ]
        );
        assert_eq!(client.stats().token_refreshes, 1);
    }

    #[tokio::test]
    async fn a_second_auth_failure_is_returned() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return token_reply("a2", "r2");
            }
            api_error(401, "invalid_token", "")
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Auth, "invalid_token")
        );
        assert!(!err.maybe_executed);
        assert_eq!(log(&srv).len(), 4, "{:?}", log(&srv));
        // A refused fresh token is not refreshed again at once.
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Auth);
        assert_eq!(client.stats().token_refreshes, 1);
    }

    #[tokio::test]
    async fn invalid_grant_on_refresh_is_fatal() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return api_error(400, "invalid_grant", "Invalid grant");
            }
            api_error(
                401,
                "expired_token",
                "The access token provided has expired.",
            )
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "invalid_grant")
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("portal main: oauth token refresh failed: invalid_grant"),
            "{msg}"
        );
        assert!(!msg.contains("s3cr3t") && !msg.contains("r1"), "{msg}");
    }

    /// A store another process writes to: `load` answers what it wrote.
    struct SharedStore {
        stored: Mutex<Option<Tokens>>,
    }

    impl TokenStore for SharedStore {
        fn save<'a>(
            &'a self,
            _portal: &'a str,
            tokens: &'a Tokens,
        ) -> crate::BoxFuture<'a, anyhow::Result<()>> {
            Box::pin(async move {
                *lock(&self.stored) = Some(tokens.clone());
                Ok(())
            })
        }

        fn load<'a>(
            &'a self,
            _portal: &'a str,
        ) -> crate::BoxFuture<'a, anyhow::Result<Option<Tokens>>> {
            Box::pin(async move { Ok(lock(&self.stored).clone()) })
        }
    }

    #[tokio::test]
    async fn a_pair_rotated_by_another_process_is_adopted_after_invalid_grant() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return match seen.query["refresh_token"].as_str() {
                    Some("r2") => token_reply("a3", "r3"),
                    _ => api_error(400, "invalid_grant", "Invalid grant"),
                };
            }
            match seen.body["auth"].as_str() {
                Some("a2" | "a3") => ok(json!(true)),
                _ => api_error(
                    401,
                    "expired_token",
                    "The access token provided has expired.",
                ),
            }
        })
        .await;
        // This process holds a1/r1, expiring; another process already rotated r1 into a2/r2.
        let store = Arc::new(SharedStore {
            stored: Mutex::new(Some(tokens("a2", "r2", 3600))),
        });
        let client =
            PortalClient::new(settings(&base), Some(tokens("a1", "r1", 10)), store.clone())
                .unwrap();
        client.call("app.info", json!({})).await.unwrap();
        assert_eq!(
            log(&srv),
            vec![
                "refresh r1".to_string(),
                "call /rest/app.info auth=a2".to_string()
            ]
        );

        // With nothing newer stored, invalid_grant stands.
        *lock(&store.stored) = Some(tokens("a1", "r1", 10));
        let client =
            PortalClient::new(settings(&base), Some(tokens("a1", "r1", 10)), store.clone())
                .unwrap();
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert!(err.is_code("invalid_grant"), "{err}");
    }

    #[tokio::test]
    async fn expiring_token_is_refreshed_once_for_concurrent_calls() {
        let refreshes = Arc::new(AtomicUsize::new(0));
        let counter = refreshes.clone();
        let (base, srv) = serve(move |seen, _| {
            if seen.path == "/oauth/token/" {
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
                return token_reply("a2", "r2");
            }
            assert_eq!(seen.body["auth"], "a2");
            ok(json!(true))
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 10)), &srv);
        let calls: Vec<_> = (0..5)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.call("app.info", json!({})).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(refreshes.load(Ordering::SeqCst), 1);
        assert_eq!(client.stats().token_refreshes, 1);
    }

    #[tokio::test]
    async fn imported_refresh_token_alone_is_enough() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return token_reply("a2", "r2");
            }
            ok(json!(true))
        })
        .await;
        let mut t = tokens("", "r1", 0);
        t.expires_at = None;
        let (client, _) = client_with(settings(&base), Some(t), &srv);
        client.call("app.info", json!({})).await.unwrap();
        assert_eq!(
            log(&srv),
            vec!["refresh r1", "save a2", "call /rest/app.info auth=a2"]
        );
    }

    #[tokio::test]
    async fn a_redirect_from_the_token_server_is_not_followed() {
        let (elsewhere, other) = serve(|_, _| token_reply("a2", "r2")).await;
        let target = elsewhere.clone();
        let (base, srv) = serve(move |seen, _| Reply {
            status: 302,
            headers: vec![("location", format!("{target}{}?client_secret=x", seen.path))],
            body: String::new(),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 0)), &srv);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "REDIRECT_REFUSED")
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("redirected to {elsewhere}/oauth/token/;")),
            "{msg}"
        );
        assert_eq!(log(&srv), vec!["refresh r1"]);
        assert!(log(&other).is_empty(), "{:?}", log(&other));
    }

    #[tokio::test]
    async fn no_tokens_is_fatal_and_says_how_to_import() {
        let (base, srv) = serve(|_, _| ok(json!(true))).await;
        let (client, _) = client_with(settings(&base), None, &srv);
        assert!(!holds_tokens(&client));
        let err = client
            .call("event.offline.get", json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "NO_TOKENS")
        );
        assert!(
            err.to_string()
                .contains("b24eventd auth import --portal main --refresh-token -"),
            "{err}"
        );
        assert!(log(&srv).is_empty());
    }

    #[test]
    fn no_tokens_names_the_journal_it_looked_in() {
        let text = no_tokens_message("main", Some(std::path::Path::new("/srv/b24/journal.db")));
        assert!(
            text.starts_with(
                "no OAuth tokens are stored for this portal in the journal /srv/b24/journal.db: store them there with `b24eventd auth login --portal main`"
            ),
            "{text}"
        );
        assert!(
            text.contains("`b24eventd-as-service auth login --portal main` as root"),
            "{text}"
        );
        let text = no_tokens_message("main", None);
        assert!(!text.contains("journal"), "{text}");
    }

    #[tokio::test]
    async fn exchange_code_returns_the_pair_without_storing_it() {
        let (base, srv) = serve(|seen, _| {
            assert_eq!(seen.query["grant_type"], "authorization_code");
            assert_eq!(seen.query["code"], "c0de");
            token_reply("a9", "r9")
        })
        .await;
        let (client, _) = client_with(settings(&base), None, &srv);
        let tokens = client.exchange_code("c0de").await.unwrap();
        assert_eq!(
            (tokens.access_token.as_str(), tokens.refresh_token.as_str()),
            ("a9", "r9")
        );
        assert!(!holds_tokens(&client), "the caller stores the pair first");
        assert!(
            log(&srv).iter().all(|l| !l.starts_with("save")),
            "{:?}",
            log(&srv)
        );
    }
}
