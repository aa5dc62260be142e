//! [`ConnectionStore`] on PostgreSQL.

use super::{db, PgStore};
use crate::{
    ConnectionAudit, ConnectionChange, ConnectionState, ConnectionStatus, ConnectionStore, Result,
    StoreError,
};
use async_trait::async_trait;
use docket_core::Timestamp;
use sqlx::postgres::PgRow;
use sqlx::Row;

const COLS: &str = "tenant, name, status, updated_at, updated_by, comment";
const AUDIT_COLS: &str = "id, tenant, name, from_status, to_status, actor, comment, at";

fn status(r: &PgRow, col: &str) -> Result<ConnectionStatus> {
    let s: String = r.try_get(col).map_err(db)?;
    s.parse().map_err(StoreError::Corrupt)
}

fn from_row(r: &PgRow) -> Result<ConnectionState> {
    Ok(ConnectionState {
        tenant: r.try_get("tenant").map_err(db)?,
        name: r.try_get("name").map_err(db)?,
        status: status(r, "status")?,
        updated_at: Timestamp(r.try_get("updated_at").map_err(db)?),
        updated_by: r.try_get("updated_by").map_err(db)?,
        comment: r.try_get("comment").map_err(db)?,
    })
}

fn audit_from_row(r: &PgRow) -> Result<ConnectionAudit> {
    Ok(ConnectionAudit {
        id: r.try_get("id").map_err(db)?,
        tenant: r.try_get("tenant").map_err(db)?,
        name: r.try_get("name").map_err(db)?,
        from_status: status(r, "from_status")?,
        to_status: status(r, "to_status")?,
        actor: r.try_get("actor").map_err(db)?,
        comment: r.try_get("comment").map_err(db)?,
        at: Timestamp(r.try_get("at").map_err(db)?),
    })
}

#[async_trait]
impl ConnectionStore for PgStore {
    async fn connection_state(
        &self,
        tenant: String,
        name: String,
    ) -> Result<Option<ConnectionState>> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM connection_states WHERE tenant = $1 AND name = $2"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(from_row).transpose()
    }

    async fn list_connection_states(&self, tenant: Option<String>) -> Result<Vec<ConnectionState>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM connection_states WHERE ($1::text IS NULL OR tenant = $1) ORDER BY tenant, name"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(from_row).collect()
    }

    async fn set_connection_status(&self, ch: ConnectionChange) -> Result<ConnectionState> {
        if ch.name.is_empty() || ch.tenant.is_empty() || ch.actor.is_empty() {
            return Err(StoreError::Conflict(
                "a connection change needs a tenant, a connection name and an actor".into(),
            ));
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        // Lock the row (if any) so two concurrent changes audit a correct
        // `from_status`; a first change of a never-changed connection is
        // serialized by the primary key of the upsert below.
        let before: Option<String> = sqlx::query_scalar(
            "SELECT status FROM connection_states WHERE tenant = $1 AND name = $2 FOR UPDATE",
        )
        .bind(&ch.tenant)
        .bind(&ch.name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let before = match before {
            Some(s) => s.parse().map_err(StoreError::Corrupt)?,
            None => ConnectionStatus::Enabled,
        };
        let row = sqlx::query(&format!(
            "INSERT INTO connection_states (tenant, name, status, updated_at, updated_by, comment)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant, name) DO UPDATE SET status = excluded.status,
                updated_at = excluded.updated_at, updated_by = excluded.updated_by,
                comment = excluded.comment
             RETURNING {COLS}"
        ))
        .bind(&ch.tenant)
        .bind(&ch.name)
        .bind(ch.status.as_str())
        .bind(ch.now.0)
        .bind(&ch.actor)
        .bind(&ch.comment)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let state = from_row(&row)?;
        sqlx::query(
            "INSERT INTO connection_audit (tenant, name, from_status, to_status, actor, comment, at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&ch.tenant)
        .bind(&ch.name)
        .bind(before.as_str())
        .bind(ch.status.as_str())
        .bind(&ch.actor)
        .bind(&ch.comment)
        .bind(ch.now.0)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(state)
    }

    async fn connection_audit(&self, tenant: String, name: String) -> Result<Vec<ConnectionAudit>> {
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLS} FROM connection_audit WHERE tenant = $1 AND name = $2 ORDER BY id"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(audit_from_row).collect()
    }
}

/// The runs the breaker `connection` deferred that its close makes due at
/// `now` ([`plan::breaker`](crate::plan::breaker)), each with its
/// `deferral_released` event, and the wake-up of every process's workers
/// (`NOTIFY` per job, delivered at commit), inside the close's transaction
/// (`LimitStore::breaker_change`). The runs are locked in the index's order
/// with `SKIP LOCKED`: one another transaction holds right now (an
/// operator's command) keeps its deferral instead of being waited for
/// under the breaker's lock.
pub(super) async fn release_deferred(
    tx: &mut sqlx::PgConnection,
    connection: &str,
    now: Timestamp,
) -> Result<Vec<crate::ReleasedRun>> {
    use crate::plan::breaker as plan;
    let rows = sqlx::query(&format!(
        "{} FOR UPDATE OF runs SKIP LOCKED",
        plan::deferred_sql("$1", "$2", "$3")
    ))
    .bind(plan::deferral_policy(connection))
    .bind(now.0)
    .bind(plan::RELEASE_LIMIT as i64)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    let mut released = Vec::with_capacity(rows.len());
    for r in &rows {
        released.push(crate::ReleasedRun {
            id: docket_core::RunId(r.try_get(0).map_err(db)?),
            tenant: r.try_get(1).map_err(db)?,
            job: r.try_get(2).map_err(db)?,
            deferred_until: Timestamp(r.try_get(3).map_err(db)?),
        });
    }
    if released.is_empty() {
        return Ok(released);
    }
    let ids: Vec<uuid::Uuid> = released.iter().map(|r| r.id.0).collect();
    sqlx::query("UPDATE runs SET run_after = $2, updated_at = $2 WHERE id = ANY($1)")
        .bind(&ids)
        .bind(now.0)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    for r in &released {
        let e = plan::released_event(connection, r.deferred_until);
        super::durable::event(
            &mut *tx, r.id, &r.tenant, &r.job, &e.kind, now, None, None, None, None, &e.data,
        )
        .await?;
    }
    let mut jobs: Vec<&str> = released.iter().map(|r| r.job.as_str()).collect();
    jobs.sort_unstable();
    jobs.dedup();
    sqlx::query("SELECT pg_notify($1, j) FROM unnest($2::text[]) AS j")
        .bind(super::WAKEUP_CHANNEL)
        .bind(&jobs)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    Ok(released)
}
