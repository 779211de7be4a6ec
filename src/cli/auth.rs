//! `auth import`, `auth login` and `auth status`: getting a portal's OAuth tokens into the
//! journal and showing what is stored (expiry, last refresh, member_id, scope), never the tokens.
//! A new pair replaces the stored one only once it has answered a call on the portal; a pair
//! that fails leaves the stored one in place.

use super::report::{self, Table};
use crate::bitrix::{TokenStore, Tokens, oauth};
use crate::config::{Config, PortalConfig};
use crate::journal::{Access, Journal, TokenStatus};
use anyhow::Context;
use chrono::Utc;
use std::io::Read;
use std::sync::Arc;

/// `auth import`: stores a refresh token (and an access token, when given), once it worked:
/// the pair is tried on the portal first ([`try_pair`]), and only a pair that answered replaces
/// the stored one. Without an access token that try refreshes, which also rotates the pair.
pub(super) async fn import(
    config: Config,
    portal: String,
    refresh_token: String,
    access_token: Option<String>,
) -> anyhow::Result<()> {
    let portal_config = report::portal(&config, &portal)?;
    let refresh_token = if refresh_token == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the refresh token from stdin")?;
        s.trim().to_string()
    } else {
        refresh_token
    };
    if refresh_token.is_empty() {
        anyhow::bail!("the refresh token is empty");
    }
    // The first tokens of a new installation make the journal.
    let journal = Journal::open_configured(&config.journal, Access::Create).await?;
    let candidate = Tokens::from_pair(access_token.unwrap_or_default(), refresh_token);
    let command = format!("auth import --portal {portal}");
    let (tokens, rotated) = try_pair(portal_config, &journal, candidate, &command).await?;
    store(&journal, &portal, &tokens, &command).await?;
    outln!(
        "stored tokens for portal {portal} in {}{}",
        journal.location(),
        if rotated {
            " (refresh token checked and rotated)"
        } else {
            " (checked with user.admin)"
        }
    )?;
    Ok(())
}

/// Keeps the pair a refresh made while a new pair is tried, instead of the journal: nothing is
/// stored before the new pair has answered. It never reads the journal back, so a refused
/// refresh token is not mistaken for the stored pair of another process.
#[derive(Default)]
struct Candidate(std::sync::Mutex<Option<Tokens>>);

impl TokenStore for Candidate {
    fn save<'a>(
        &'a self,
        _portal: &'a str,
        tokens: &'a Tokens,
    ) -> crate::BoxFuture<'a, anyhow::Result<()>> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokens.clone());
        Box::pin(async { Ok(()) })
    }
}

/// Tries a new token pair on the portal before it may replace the stored one: `user.admin`
/// (scope `basic`, any user may call it: bitrix24/b24restdocs
/// api-reference/common/users/user-admin.md), refreshing first when the pair has no access
/// token, or when the portal refuses it. Returns the pair as it stands after the call (a
/// refresh rotates it) and whether it was rotated. On failure the stored tokens are untouched
/// and the error says so.
async fn try_pair(
    portal: &PortalConfig,
    journal: &Journal,
    candidate: Tokens,
    command: &str,
) -> anyhow::Result<(Tokens, bool)> {
    let kept = Arc::new(Candidate::default());
    let client = crate::pipeline::candidate_client(portal, Some(candidate.clone()), kept.clone())?;
    if let Err(e) = client.user_admin().await {
        let left = match journal.token_status(&portal.name).await {
            Ok(Some(_)) => "the stored tokens were left unchanged",
            _ => "nothing was stored",
        };
        return Err(anyhow::Error::from(e)
            .context(format!("{command}: the new tokens did not work, so {left}")));
    }
    let rotated = kept.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(match rotated {
        Some(tokens) => (tokens, true),
        None => (candidate, false),
    })
}

/// Stores a pair that worked, replacing the stored one.
async fn store(
    journal: &Journal,
    portal: &str,
    tokens: &Tokens,
    command: &str,
) -> anyhow::Result<()> {
    journal.save_tokens(portal, tokens).await.with_context(|| {
        format!(
            "{command}: the new tokens worked but could not be stored in {} (the stored tokens were left unchanged)",
            journal.location()
        )
    })
}

/// `auth login`: prints the portal's authorization page for the configured application, reads
/// the address the browser was sent to afterwards (or only its `code`) from stdin, exchanges the
/// code for tokens and stores them.
pub(super) async fn login(config: Config, portal: String) -> anyhow::Result<()> {
    let portal_config = report::portal(&config, &portal)?;
    // Everything that can fail without the operator is checked before the browser round trip:
    // the code it yields lives 30 seconds.
    let journal = Journal::open_configured(&config.journal, Access::Create).await?;
    let client = crate::pipeline::operator_client(portal_config, &journal).await?;
    let state = random_state();
    let url = oauth::authorize_url(
        &portal_config.client_endpoint,
        &portal_config.client_id,
        &state,
    )
    .map_err(|e| anyhow::anyhow!("portal {portal}: {e}"))?;
    eprintln!(
        "1. Open this address in a browser where you are logged in to the portal as an administrator:\n\n   {url}\n\n\
         2. Allow access. The browser then goes to the application's redirect address; that page\n   \
         may fail to load (it does not need to), but its address holds the code.\n\
         3. Paste that whole address (or only the value of its code parameter) here and press Enter.\n   \
         The code is valid for 30 seconds."
    );
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|n| (n, line))
    })
    .await
    .context("the stdin reader failed")?
    .context("cannot read the answer from stdin")?;
    let (read, line) = line;
    if read == 0 {
        anyhow::bail!(
            "auth login --portal {portal}: stdin ended before an answer: paste the address the browser was redirected to, or its code"
        );
    }
    let answer = oauth::parse_login_answer(&line)
        .map_err(|e| anyhow::anyhow!("auth login --portal {portal}: {e}"))?;
    if let Some(echoed) = &answer.state
        && echoed != &state
    {
        anyhow::bail!(
            "auth login --portal {portal}: the pasted address belongs to another authorization (its state does not match): open the address printed above and paste what it redirects to"
        );
    }
    if let Some(domain) = &answer.domain
        && !oauth::domain_matches(&portal_config.client_endpoint, domain)
    {
        anyhow::bail!(
            "auth login --portal {portal}: the authorization is for {domain}, but the portal's client_endpoint is {}: log in to the right portal, or fix client_endpoint",
            portal_config.client_endpoint
        );
    }
    let tokens = client
        .exchange_code(&answer.code)
        .await
        .map_err(anyhow::Error::from)?;
    if let (Some(expected), Some(got)) = (&answer.member_id, &tokens.member_id)
        && expected != got
    {
        anyhow::bail!(
            "auth login --portal {portal}: the tokens are for member_id {got}, but the redirect named member_id {expected}: nothing was stored; run auth login again"
        );
    }
    if let Some(named) = &tokens.client_endpoint
        && !oauth::domain_matches(
            &portal_config.client_endpoint,
            crate::options::host_of(named).as_deref().unwrap_or(named),
        )
    {
        tracing::warn!(
            portal = %portal,
            token_endpoint = %named,
            client_endpoint = %portal_config.client_endpoint,
            "the tokens name another client_endpoint than the config: if the portal moved, update client_endpoint"
        );
    }
    // The new pair replaces the stored one only once it has answered a call.
    let command = format!("auth login --portal {portal}");
    let (tokens, _) = try_pair(portal_config, &journal, tokens, &command).await?;
    store(&journal, &portal, &tokens, &command).await?;
    outln!(
        "stored tokens for portal {portal} in {} (member_id {}, scope {}, access token expires {})",
        journal.location(),
        tokens.member_id.as_deref().unwrap_or("unknown"),
        tokens.scope.as_deref().unwrap_or("unknown"),
        tokens
            .expires_at
            .map(report::time)
            .unwrap_or_else(|| "at an unknown time".to_string()),
    )?;
    Ok(())
}

/// An unguessable `state` for the authorization request, so a stale or foreign redirect is
/// recognised.
fn random_state() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..24)
        .map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())]))
        .collect()
}

/// One portal in `auth status`.
#[derive(Debug, serde::Serialize)]
struct PortalTokens {
    portal: String,
    /// Whether tokens are stored at all.
    tokens: bool,
    /// Whether a refresh token is stored (without one, nothing renews the access token).
    has_refresh_token: bool,
    access_expires_at: Option<String>,
    /// The access token is past its expiry (normal while the daemon is stopped: it lives one
    /// hour, and the refresh token renews it).
    access_expired: Option<bool>,
    /// When the pair was last written: refresh, login or import.
    last_refresh_at: Option<String>,
    member_id: Option<String>,
    scope: Option<String>,
    user_id: Option<i64>,
}

#[derive(Debug, serde::Serialize)]
struct StatusReport {
    journal: String,
    portals: Vec<PortalTokens>,
}

/// `auth status`: per configured portal, what the journal holds about its tokens.
pub(super) async fn status(config: Config, json: bool) -> anyhow::Result<()> {
    // A command that only looks must not create the journal.
    let journal = Journal::open_existing(&config.journal).await?;
    let now = Utc::now();
    let mut portals = Vec::new();
    for name in config.portals.keys() {
        let status = match &journal {
            Some(journal) => journal.token_status(name).await?,
            None => None,
        };
        portals.push(portal_tokens(name, status, now));
    }
    let report = StatusReport {
        journal: config.journal.location(),
        portals,
    };
    if json {
        return report::print_json(&report);
    }
    let mut table = Table::new(&[
        "PORTAL",
        "TOKENS",
        "ACCESS TOKEN EXPIRES",
        "LAST REFRESH",
        "MEMBER_ID",
        "SCOPE",
    ]);
    for p in &report.portals {
        let tokens = match (p.tokens, p.has_refresh_token) {
            (false, _) => "no",
            (true, true) => "yes",
            (true, false) => "no refresh token",
        };
        let expires = match (&p.access_expires_at, p.access_expired) {
            (Some(at), Some(true)) => format!("{at} (expired)"),
            (Some(at), _) => at.clone(),
            (None, _) if p.tokens => "unknown".to_string(),
            (None, _) => "-".to_string(),
        };
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_string());
        table.row(vec![
            p.portal.clone(),
            tokens.to_string(),
            expires,
            dash(&p.last_refresh_at),
            dash(&p.member_id),
            dash(&p.scope),
        ]);
    }
    outln!("{}", journal_line(&report.journal, journal.is_some()))?;
    out!("{}", table.render())?;
    if report.portals.iter().any(|p| !p.tokens) {
        outln!(
            "\nportals without tokens: run `b24eventd auth login --portal NAME` (or `auth import`) \
             with this config, so they land in this journal (the packaged service: \
             `b24eventd-as-service auth login --portal NAME` as root)"
        )?;
    }
    Ok(())
}

/// The first line of `auth status`: which journal it read.
fn journal_line(path: &str, exists: bool) -> String {
    if exists {
        format!("journal {path}")
    } else {
        format!("journal {path} (not created yet: no tokens stored)")
    }
}

fn portal_tokens(
    name: &str,
    status: Option<TokenStatus>,
    now: chrono::DateTime<Utc>,
) -> PortalTokens {
    match status {
        None => PortalTokens {
            portal: name.to_string(),
            tokens: false,
            has_refresh_token: false,
            access_expires_at: None,
            access_expired: None,
            last_refresh_at: None,
            member_id: None,
            scope: None,
            user_id: None,
        },
        Some(s) => PortalTokens {
            portal: name.to_string(),
            tokens: true,
            has_refresh_token: s.has_refresh_token,
            access_expires_at: s.expires_at.map(report::time),
            access_expired: s.expires_at.map(|at| at <= now),
            last_refresh_at: s.updated_at.map(report::time),
            member_id: s.member_id,
            scope: s.scope,
            user_id: s.user_id,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_journal_it_read() {
        assert_eq!(
            journal_line("/var/lib/b24eventd/journal.db", true),
            "journal /var/lib/b24eventd/journal.db"
        );
        assert_eq!(
            journal_line("./b24eventd.db", false),
            "journal ./b24eventd.db (not created yet: no tokens stored)"
        );
    }

    #[test]
    fn states_are_random_and_url_safe() {
        let a = random_state();
        assert_eq!(a.len(), 24);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, random_state());
    }

    #[test]
    fn status_rows_say_expired_without_tokens() {
        let now = Utc::now();
        let none = portal_tokens("a", None, now);
        assert!(!none.tokens && none.access_expired.is_none());
        let stored = portal_tokens(
            "b",
            Some(TokenStatus {
                expires_at: Some(now - chrono::Duration::minutes(5)),
                updated_at: Some(now - chrono::Duration::minutes(65)),
                member_id: Some("m".into()),
                scope: Some("crm".into()),
                user_id: Some(1),
                client_endpoint: None,
                has_refresh_token: true,
            }),
            now,
        );
        assert!(stored.tokens && stored.has_refresh_token);
        assert_eq!(stored.access_expired, Some(true));
        assert_eq!(stored.member_id.as_deref(), Some("m"));
        let json = serde_json::to_value(&stored).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(
            keys.iter()
                .all(|k| !k.contains("token") || *k == "tokens" || *k == "has_refresh_token"),
            "no token values in the output: {keys:?}"
        );
    }
}
