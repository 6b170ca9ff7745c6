//! Audit rows, written in the request's transaction.

use std::fmt::Display;

use hangar_jobs::TeamId;
use hangar_jobs::store::records::{self, AuditEntry};
use hangar_jobs::store::{PgConnection, Principal};

use crate::error::ApiError;

/// Records that `actor` did `action` (e.g. `capsule.create`) on `resource`; accepted.
pub(crate) async fn accepted(
    conn: &mut PgConnection,
    actor: Option<&Principal>,
    team: Option<TeamId>,
    action: &str,
    resource: impl Display,
    detail: serde_json::Value,
) -> Result<(), ApiError> {
    records::audit(
        conn,
        AuditEntry {
            actor_key_id: actor.map(|a| a.key_id),
            team_id: team,
            action,
            resource: &resource.to_string(),
            outcome: "accepted",
            detail,
        },
    )
    .await?;
    Ok(())
}
