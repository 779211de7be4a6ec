//! The SQL of the `portals` and `tokens` tables: a portal's OAuth pair and what is known about
//! it.

use super::{now, parse_time};
use crate::bitrix::Tokens;
use crate::journal::timestamp;
use crate::journal::types::TokenStatus;
use rusqlite::{Connection, OptionalExtension, params};

pub(super) fn load_tokens(conn: &Connection, portal: &str) -> anyhow::Result<Option<Tokens>> {
    let tokens = conn
        .query_row(
            "SELECT access_token, refresh_token, expires_at, member_id, scope, client_endpoint, user_id
             FROM tokens WHERE portal = ?1",
            [portal],
            |r| {
                Ok(Tokens {
                    access_token: r.get(0)?,
                    refresh_token: r.get(1)?,
                    expires_at: parse_time(r.get(2)?),
                    member_id: r.get(3)?,
                    scope: r.get(4)?,
                    client_endpoint: r.get(5)?,
                    user_id: r.get(6)?,
                })
            },
        )
        .optional()?;
    Ok(tokens)
}

pub(super) fn ensure_portal(conn: &Connection, portal: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO portals (name, first_seen_at) VALUES (?1, ?2)")?
        .execute(params![portal, now()])?;
    Ok(())
}

pub(super) fn save_tokens(conn: &mut Connection, portal: &str, t: &Tokens) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    ensure_portal(&tx, portal)?;
    tx.execute(
        "INSERT INTO tokens (portal, access_token, refresh_token, expires_at, scope, member_id, client_endpoint, user_id, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (portal) DO UPDATE SET access_token = excluded.access_token,
            refresh_token = excluded.refresh_token, expires_at = excluded.expires_at,
            scope = COALESCE(excluded.scope, tokens.scope), member_id = COALESCE(excluded.member_id, tokens.member_id),
            client_endpoint = COALESCE(excluded.client_endpoint, tokens.client_endpoint),
            user_id = COALESCE(excluded.user_id, tokens.user_id), updated_at = excluded.updated_at",
        params![
            portal,
            t.access_token,
            t.refresh_token,
            t.expires_at.map(timestamp),
            t.scope,
            t.member_id,
            t.client_endpoint,
            t.user_id,
            now()
        ],
    )?;
    if let Some(member_id) = &t.member_id {
        tx.execute(
            "UPDATE portals SET member_id = ?2 WHERE name = ?1",
            params![portal, member_id],
        )?;
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn token_status(conn: &Connection, portal: &str) -> anyhow::Result<Option<TokenStatus>> {
    let status = conn
        .query_row(
            "SELECT expires_at, updated_at, member_id, scope, user_id, client_endpoint,
                    refresh_token <> ''
             FROM tokens WHERE portal = ?1",
            [portal],
            |r| {
                Ok(TokenStatus {
                    expires_at: parse_time(r.get(0)?),
                    updated_at: parse_time(r.get(1)?),
                    member_id: r.get(2)?,
                    scope: r.get(3)?,
                    user_id: r.get(4)?,
                    client_endpoint: r.get(5)?,
                    has_refresh_token: r.get(6)?,
                })
            },
        )
        .optional()?;
    Ok(status)
}
