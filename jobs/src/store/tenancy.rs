//! Teams, API keys and templates.

use super::{PgConnection, Principal, StoreResult, Team, Template};
use crate::ids::{CapsuleId, HostId, KeyId, TeamId, TemplateId};

/// The platform team (operators) created by the first migration.
pub const PLATFORM_TEAM: TeamId = TeamId(uuid::uuid!("00000000-0000-7000-8000-000000000001"));

pub async fn create_team(conn: &mut PgConnection, name: &str) -> StoreResult<Option<Team>> {
    let team = sqlx::query_as!(
        Team,
        r#"insert into teams (id, name) values ($1, $2) on conflict (name) do nothing
           returning id as "id: TeamId", name, is_platform, created_at"#,
        TeamId::new().0,
        name,
    )
    .fetch_optional(conn)
    .await?;
    Ok(team)
}

pub async fn get_team(conn: &mut PgConnection, id: TeamId) -> StoreResult<Option<Team>> {
    let team = sqlx::query_as!(
        Team,
        r#"select id as "id: TeamId", name, is_platform, created_at from teams where id = $1"#,
        id.0,
    )
    .fetch_optional(conn)
    .await?;
    Ok(team)
}

pub struct NewKey<'a> {
    pub id: KeyId,
    pub team_id: TeamId,
    pub name: &'a str,
    pub prefix: &'a str,
    pub key_hash: &'a [u8],
    pub is_admin: bool,
}

/// Stores a key's hash. Inserting the same hash again is a no-op (a fixed dev admin key).
pub async fn insert_key(conn: &mut PgConnection, key: NewKey<'_>) -> StoreResult<()> {
    sqlx::query!(
        "insert into api_keys (id, team_id, name, prefix, key_hash, is_admin)
         values ($1, $2, $3, $4, $5, $6) on conflict (key_hash) do nothing",
        key.id.0,
        key.team_id.0,
        key.name,
        key.prefix,
        key.key_hash,
        key.is_admin,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The principal behind a key hash, unless the key is unknown or revoked.
pub async fn principal_by_key_hash(
    conn: &mut PgConnection,
    key_hash: &[u8],
) -> StoreResult<Option<Principal>> {
    let row = sqlx::query!(
        r#"select k.id as "key_id: KeyId", k.team_id as "team_id: TeamId", k.is_admin,
                  t.is_platform
           from api_keys k join teams t on t.id = k.team_id
           where k.key_hash = $1 and k.revoked_at is null"#,
        key_hash,
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| Principal {
        key_id: r.key_id,
        team_id: r.team_id,
        is_admin: r.is_admin,
        is_platform: r.is_platform,
    }))
}

/// A ready template a team may use: its own, or the platform's, by name (its own first).
pub async fn template_for_team(
    conn: &mut PgConnection,
    team: TeamId,
    name: &str,
) -> StoreResult<Option<Template>> {
    let template = sqlx::query_as!(
        Template,
        r#"select id as "id: TemplateId", team_id as "team_id: TeamId", name, status, image,
                  snapshot_host_id as "snapshot_host_id?: HostId",
                  source_capsule_id as "source_capsule_id?: CapsuleId", vcpus, memory_mb,
                  created_at
           from templates
           where name = $2 and status = 'ready' and (team_id = $1 or team_id = $3)
           order by (team_id = $1) desc limit 1"#,
        team.0,
        name,
        PLATFORM_TEAM.0,
    )
    .fetch_optional(conn)
    .await?;
    Ok(template)
}

pub async fn get_template(
    conn: &mut PgConnection,
    id: TemplateId,
) -> StoreResult<Option<Template>> {
    Ok(get_templates(conn, &[id.0]).await?.pop())
}

/// The templates of these ids that exist (any status), in no particular order.
pub async fn get_templates(
    conn: &mut PgConnection,
    ids: &[uuid::Uuid],
) -> StoreResult<Vec<Template>> {
    let templates = sqlx::query_as!(
        Template,
        r#"select id as "id: TemplateId", team_id as "team_id: TeamId", name, status, image,
                  snapshot_host_id as "snapshot_host_id?: HostId",
                  source_capsule_id as "source_capsule_id?: CapsuleId", vcpus, memory_mb,
                  created_at
           from templates where id = any($1)"#,
        ids,
    )
    .fetch_all(conn)
    .await?;
    Ok(templates)
}

/// Ready templates visible to a team (its own and the platform's).
pub async fn list_templates(conn: &mut PgConnection, team: TeamId) -> StoreResult<Vec<Template>> {
    let templates = sqlx::query_as!(
        Template,
        r#"select id as "id: TemplateId", team_id as "team_id: TeamId", name, status, image,
                  snapshot_host_id as "snapshot_host_id?: HostId",
                  source_capsule_id as "source_capsule_id?: CapsuleId", vcpus, memory_mb,
                  created_at
           from templates where status = 'ready' and (team_id = $1 or team_id = $2)
           order by name"#,
        team.0,
        PLATFORM_TEAM.0,
    )
    .fetch_all(conn)
    .await?;
    Ok(templates)
}

pub struct NewSnapshotTemplate<'a> {
    pub id: TemplateId,
    pub team_id: TeamId,
    pub name: &'a str,
    pub host: HostId,
    pub source: CapsuleId,
    pub vcpus: i32,
    pub memory_mb: i32,
}

/// A `pending` template for a snapshot being taken (idempotent by id).
pub async fn insert_pending_template(
    conn: &mut PgConnection,
    t: NewSnapshotTemplate<'_>,
) -> StoreResult<()> {
    sqlx::query!(
        "insert into templates (id, team_id, name, status, snapshot_host_id, source_capsule_id,
                                vcpus, memory_mb)
         values ($1, $2, $3, 'pending', $4, $5, $6, $7) on conflict (id) do nothing",
        t.id.0,
        t.team_id.0,
        t.name,
        t.host.0,
        t.source.0,
        t.vcpus,
        t.memory_mb,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Makes a pending template the ready one of its name, retiring the one it replaces.
/// Runs only after the snapshot exists, so the old template is never lost first.
/// Returns the retired template, whose snapshot may now be deleted.
pub async fn promote_template(
    conn: &mut PgConnection,
    id: TemplateId,
) -> StoreResult<Option<Template>> {
    let retired = sqlx::query_as!(
        Template,
        r#"update templates old set status = 'retired'
           from templates new
           where new.id = $1 and new.status = 'pending'
             and old.team_id = new.team_id and old.name = new.name and old.status = 'ready'
           returning old.id as "id: TemplateId", old.team_id as "team_id: TeamId", old.name,
                     old.status, old.image, old.snapshot_host_id as "snapshot_host_id?: HostId",
                     old.source_capsule_id as "source_capsule_id?: CapsuleId", old.vcpus,
                     old.memory_mb, old.created_at"#,
        id.0,
    )
    .fetch_optional(&mut *conn)
    .await?;
    sqlx::query!(
        "update templates set status = 'ready' where id = $1 and status = 'pending'",
        id.0
    )
    .execute(conn)
    .await?;
    Ok(retired)
}
