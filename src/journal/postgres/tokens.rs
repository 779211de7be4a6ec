//! Portals and their OAuth tokens (`portals`, `tokens`).

use super::Conn;
use crate::bitrix::Tokens;
use crate::journal::types::TokenStatus;

pub(super) async fn load_tokens(conn: &Conn, portal: &str) -> anyhow::Result<Option<Tokens>> {
    todo!()
}

pub(super) async fn save_tokens(
    conn: &mut Conn,
    portal: &str,
    tokens: &Tokens,
) -> anyhow::Result<()> {
    todo!()
}

pub(super) async fn token_status(conn: &Conn, portal: &str) -> anyhow::Result<Option<TokenStatus>> {
    todo!()
}
