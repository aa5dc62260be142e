//! [`TokenStore`] on SQLite.

use super::{db_err, SqliteStore};
use crate::{NewToken, Result, StoreError, TokenRecord, TokenScope, TokenStore};
use async_trait::async_trait;
use docket_core::Timestamp;
use rusqlite::{params, Connection, OptionalExtension, Row};

const COLS: &str = "id, tenant, name, created_at, revoked_at, scope";

fn from_row(r: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.get(0)?,
        tenant: r.get(1)?,
        name: r.get(2)?,
        created_at: Timestamp(r.get(3)?),
        revoked_at: r.get::<_, Option<i64>>(4)?.map(Timestamp),
        scope: scope_of(r.get::<_, String>(5)?),
    })
}

/// A stored scope. Anything but `worker` reads as `operator` (the column's
/// default), so an unknown value never widens what a token may do into the
/// worker protocol.
fn scope_of(s: String) -> TokenScope {
    s.parse().unwrap_or(TokenScope::Operator)
}

fn create(c: &Connection, t: &NewToken) -> Result<TokenRecord> {
    let taken: bool = c
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM tokens WHERE tenant = ?1 AND name = ?2 AND revoked_at IS NULL)",
            params![t.tenant, t.name],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if taken {
        return Err(StoreError::Conflict(format!(
            "tenant `{}` already has a live token named `{}`",
            t.tenant, t.name
        )));
    }
    c.execute(
        "INSERT INTO tokens (id, tenant, name, hash, created_at, scope) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![t.id, t.tenant, t.name, t.hash, t.created_at.0, t.scope.as_str()],
    )
    .map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(format!("token id or secret already stored: {e}"))
        }
        e => db_err(e),
    })?;
    Ok(TokenRecord {
        id: t.id.clone(),
        tenant: t.tenant.clone(),
        name: t.name.clone(),
        scope: t.scope,
        created_at: t.created_at,
        revoked_at: None,
    })
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn create_token(&self, token: NewToken) -> Result<TokenRecord> {
        self.call(move |c| create(c, &token)).await
    }

    async fn token_by_hash(&self, hash: String) -> Result<Option<TokenRecord>> {
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {COLS} FROM tokens WHERE hash = ?1"),
                [hash],
                from_row,
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn list_tokens(&self, tenant: Option<String>) -> Result<Vec<TokenRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {COLS} FROM tokens WHERE (?1 IS NULL OR tenant = ?1) ORDER BY created_at, id"
                ))
                .map_err(db_err)?;
            let rows = st.query_map([tenant], from_row).map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        })
        .await
    }

    async fn revoke_token(&self, id: String, now: Timestamp) -> Result<Option<TokenRecord>> {
        self.call(move |c| {
            c.query_row(
                &format!(
                    "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL RETURNING {COLS}"
                ),
                params![id, now.0],
                from_row,
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn last_event_id(&self) -> Result<Option<i64>> {
        self.read(|c| {
            c.query_row("SELECT MAX(id) FROM events", [], |r| r.get(0))
                .map_err(db_err)
        })
        .await
    }
}
