//! Portals and their OAuth tokens (`portals`, `tokens`).

use super::fence::{Fence, check};
use super::{Conn, millis, now};
use crate::bitrix::Tokens;
use crate::journal::types::TokenStatus;
use deadpool_postgres::Transaction;

pub(super) async fn load_tokens(conn: &Conn, portal: &str) -> anyhow::Result<Option<Tokens>> {
    let stmt = conn
        .prepare_cached(
            "SELECT access_token, refresh_token, expires_at, member_id, scope, client_endpoint, user_id
             FROM tokens WHERE portal = $1",
        )
        .await?;
    let row = conn.query_opt(&stmt, &[&portal]).await?;
    Ok(row.map(|r| Tokens {
        access_token: r.get(0),
        refresh_token: r.get(1),
        expires_at: r.get(2),
        member_id: r.get(3),
        scope: r.get(4),
        client_endpoint: r.get(5),
        user_id: r.get(6),
    }))
}

/// Adds `portal` to `portals` if it is new; never locks an existing portal's row.
pub(super) async fn ensure_portal(client: &Transaction<'_>, portal: &str) -> anyhow::Result<()> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO portals (name, first_seen_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .await?;
    client.execute(&stmt, &[&portal, &now()]).await?;
    Ok(())
}

/// Fenced: in a cluster only the portal's owner stores its tokens.
pub(super) async fn save_tokens(
    conn: &mut Conn,
    fence: Option<&Fence>,
    portal: &str,
    t: &Tokens,
) -> anyhow::Result<()> {
    let tx = conn.transaction().await?;
    check(&tx, fence, &[portal.to_string()]).await?;
    ensure_portal(&tx, portal).await?;
    let upsert = tx
        .prepare_cached(
            "INSERT INTO tokens (portal, access_token, refresh_token, expires_at, scope, member_id, client_endpoint, user_id, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (portal) DO UPDATE SET access_token = excluded.access_token,
                refresh_token = excluded.refresh_token, expires_at = excluded.expires_at,
                scope = COALESCE(excluded.scope, tokens.scope), member_id = COALESCE(excluded.member_id, tokens.member_id),
                client_endpoint = COALESCE(excluded.client_endpoint, tokens.client_endpoint),
                user_id = COALESCE(excluded.user_id, tokens.user_id), updated_at = excluded.updated_at",
        )
        .await?;
    tx.execute(
        &upsert,
        &[
            &portal,
            &t.access_token,
            &t.refresh_token,
            &t.expires_at.map(millis),
            &t.scope,
            &t.member_id,
            &t.client_endpoint,
            &t.user_id,
            &now(),
        ],
    )
    .await?;
    if let Some(member_id) = &t.member_id {
        tx.execute(
            "UPDATE portals SET member_id = $2 WHERE name = $1",
            &[&portal, member_id],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn token_status(conn: &Conn, portal: &str) -> anyhow::Result<Option<TokenStatus>> {
    let stmt = conn
        .prepare_cached(
            "SELECT expires_at, updated_at, member_id, scope, user_id, client_endpoint,
                    refresh_token <> ''
             FROM tokens WHERE portal = $1",
        )
        .await?;
    let row = conn.query_opt(&stmt, &[&portal]).await?;
    Ok(row.map(|r| TokenStatus {
        expires_at: r.get(0),
        updated_at: r.get(1),
        member_id: r.get(2),
        scope: r.get(3),
        user_id: r.get(4),
        client_endpoint: r.get(5),
        has_refresh_token: r.get(6),
    }))
}
