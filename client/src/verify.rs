//! Verify through the admin RPC: the node reads every chunk, walks every snapshot, and
//! (unless a dry run) marks the snapshots that reference bad or missing chunks damaged.

use hashgrid_proto::pb::{VerifyProgress, VerifyRequest};

use crate::connection::Connection;
use crate::error::{ClientError, Result};

/// Runs a verify on the node `conn` talks to, calling `progress` with each progress report,
/// and returns the final report.
pub async fn verify(
    conn: &Connection,
    dry_run: bool,
    mut progress: impl FnMut(&VerifyProgress),
) -> Result<VerifyProgress> {
    let mut stream = conn
        .admin
        .clone()
        .verify(VerifyRequest { dry_run })
        .await
        .map_err(|s| ClientError::rpc("starting verify", s))?
        .into_inner();
    while let Some(p) = stream
        .message()
        .await
        .map_err(|s| ClientError::rpc("verifying", s))?
    {
        if p.done {
            return Ok(p);
        }
        progress(&p);
    }
    Err(ClientError::Internal(
        "the node ended verify without a report".into(),
    ))
}

/// Whether a report found anything wrong.
pub fn found_damage(report: &VerifyProgress) -> bool {
    report.bad_chunks > 0 || report.missing_chunks > 0 || !report.damaged.is_empty()
}
