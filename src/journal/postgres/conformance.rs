//! The last conformance probe's findings per portal (`conformance`).

use super::Conn;
use crate::journal::types::StoredFinding;

pub(super) async fn replace_conformance(
    conn: &mut Conn,
    portal: &str,
    findings: &[StoredFinding],
) -> anyhow::Result<()> {
    todo!()
}

pub(super) async fn conformance(conn: &Conn, portal: &str) -> anyhow::Result<Vec<StoredFinding>> {
    todo!()
}
