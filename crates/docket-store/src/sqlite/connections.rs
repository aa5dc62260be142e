//! [`ConnectionStore`] on SQLite.

use super::{db_err, SqliteStore};
use crate::{
    ConnectionAudit, ConnectionChange, ConnectionState, ConnectionStatus, ConnectionStore, Result,
    StoreError,
};
use async_trait::async_trait;
use docket_core::Timestamp;
use rusqlite::{params, Connection, OptionalExtension, Row};

const COLS: &str = "tenant, name, status, updated_at, updated_by, comment";
const AUDIT_COLS: &str = "id, tenant, name, from_status, to_status, actor, comment, at";

fn status(s: String) -> rusqlite::Result<ConnectionStatus> {
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<ConnectionState> {
    Ok(ConnectionState {
        tenant: r.get(0)?,
        name: r.get(1)?,
        status: status(r.get(2)?)?,
        updated_at: Timestamp(r.get(3)?),
        updated_by: r.get(4)?,
        comment: r.get(5)?,
    })
}

fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<ConnectionAudit> {
    Ok(ConnectionAudit {
        id: r.get(0)?,
        tenant: r.get(1)?,
        name: r.get(2)?,
        from_status: status(r.get(3)?)?,
        to_status: status(r.get(4)?)?,
        actor: r.get(5)?,
        comment: r.get(6)?,
        at: Timestamp(r.get(7)?),
    })
}

fn get(c: &Connection, tenant: &str, name: &str) -> Result<Option<ConnectionState>> {
    c.query_row(
        &format!("SELECT {COLS} FROM connection_states WHERE tenant = ?1 AND name = ?2"),
        params![tenant, name],
        from_row,
    )
    .optional()
    .map_err(db_err)
}

/// Runs under the writer thread's per-request savepoint: the state and its
/// audit row are written together or not at all.
fn set(c: &Connection, ch: &ConnectionChange) -> Result<ConnectionState> {
    if ch.name.is_empty() || ch.tenant.is_empty() || ch.actor.is_empty() {
        return Err(StoreError::Conflict(
            "a connection change needs a tenant, a connection name and an actor".into(),
        ));
    }
    let before = get(c, &ch.tenant, &ch.name)?
        .map(|s| s.status)
        .unwrap_or(ConnectionStatus::Enabled);
    let state = c
        .query_row(
            &format!(
                "INSERT INTO connection_states (tenant, name, status, updated_at, updated_by, comment)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (tenant, name) DO UPDATE SET status = excluded.status,
                    updated_at = excluded.updated_at, updated_by = excluded.updated_by,
                    comment = excluded.comment
                 RETURNING {COLS}"
            ),
            params![
                ch.tenant,
                ch.name,
                ch.status.as_str(),
                ch.now.0,
                ch.actor,
                ch.comment
            ],
            from_row,
        )
        .map_err(db_err)?;
    c.execute(
        "INSERT INTO connection_audit (tenant, name, from_status, to_status, actor, comment, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            ch.tenant,
            ch.name,
            before.as_str(),
            ch.status.as_str(),
            ch.actor,
            ch.comment,
            ch.now.0
        ],
    )
    .map_err(db_err)?;
    Ok(state)
}

#[async_trait]
impl ConnectionStore for SqliteStore {
    async fn connection_state(
        &self,
        tenant: String,
        name: String,
    ) -> Result<Option<ConnectionState>> {
        self.read(move |c| get(c, &tenant, &name)).await
    }

    async fn list_connection_states(&self, tenant: Option<String>) -> Result<Vec<ConnectionState>> {
        self.read(move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {COLS} FROM connection_states WHERE (?1 IS NULL OR tenant = ?1) ORDER BY tenant, name"
                ))
                .map_err(db_err)?;
            let rows = st.query_map([tenant], from_row).map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        })
        .await
    }

    async fn set_connection_status(&self, change: ConnectionChange) -> Result<ConnectionState> {
        self.call(move |c| set(c, &change)).await
    }

    async fn connection_audit(&self, tenant: String, name: String) -> Result<Vec<ConnectionAudit>> {
        self.read(move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {AUDIT_COLS} FROM connection_audit WHERE tenant = ?1 AND name = ?2 ORDER BY id"
                ))
                .map_err(db_err)?;
            let rows = st
                .query_map(params![tenant, name], audit_from_row)
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        })
        .await
    }
}

/// The runs the breaker `connection` deferred that its close makes due at
/// `now` ([`plan::breaker`](crate::plan::breaker)), each with its
/// `deferral_released` event; on the writer thread, inside the close's
/// transaction (`LimitStore::breaker_change`).
pub(super) fn release_deferred(
    c: &Connection,
    connection: &str,
    now: Timestamp,
) -> Result<Vec<crate::ReleasedRun>> {
    use crate::plan::breaker as plan;
    let picked: Vec<crate::ReleasedRun> = c
        .prepare_cached(&plan::deferred_sql("?1", "?2", "?3"))
        .map_err(db_err)?
        .query_map(
            params![
                plan::deferral_policy(connection),
                now.0,
                plan::RELEASE_LIMIT as i64
            ],
            |r| {
                Ok(crate::ReleasedRun {
                    id: super::ops::parse("run id", r.get(0)?)?,
                    tenant: r.get(1)?,
                    job: r.get(2)?,
                    deferred_until: Timestamp(r.get(3)?),
                })
            },
        )
        .map_err(db_err)?
        .collect::<rusqlite::Result<_>>()
        .map_err(db_err)?;
    for r in &picked {
        c.prepare_cached("UPDATE runs SET run_after = ?2, updated_at = ?2 WHERE id = ?1")
            .map_err(db_err)?
            .execute(params![r.id.to_string(), now.0])
            .map_err(db_err)?;
        let e = plan::released_event(connection, r.deferred_until);
        super::ops::insert_event(
            c, r.id, &r.tenant, &r.job, &e.kind, now, None, None, None, None, &e.data,
        )?;
    }
    Ok(picked)
}
