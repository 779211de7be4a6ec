//! Upstream settlement: events waiting for `event.offline.clear` / `event.offline.error`, and
//! marking them settled.

use super::Conn;
use crate::journal::types::{PendingSettlement, SettleAction};

pub(super) async fn pending_settlements(
    conn: &Conn,
    portal: &str,
) -> anyhow::Result<Vec<PendingSettlement>> {
    todo!()
}

pub(super) async fn mark_settled(
    conn: &mut Conn,
    groups: &[(Vec<i64>, SettleAction)],
) -> anyhow::Result<()> {
    todo!()
}
