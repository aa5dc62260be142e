//! [`TokenStore`] on PostgreSQL.

use super::{db, PgStore};
use crate::{NewToken, Result, StoreError, TokenRecord, TokenScope, TokenStore};
use async_trait::async_trait;
use docket_core::Timestamp;
use sqlx::postgres::PgRow;
use sqlx::Row;

const COLS: &str = "id, tenant, name, created_at, revoked_at, scope";

fn from_row(r: &PgRow) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.try_get("id").map_err(db)?,
        tenant: r.try_get("tenant").map_err(db)?,
        name: r.try_get("name").map_err(db)?,
        created_at: Timestamp(r.try_get("created_at").map_err(db)?),
        revoked_at: r
            .try_get::<Option<i64>, _>("revoked_at")
            .map_err(db)?
            .map(Timestamp),
        // Anything but `worker` reads as `operator` (the column's default):
        // an unknown value never widens a token into the worker protocol.
        scope: r
            .try_get::<String, _>("scope")
            .map_err(db)?
            .parse()
            .unwrap_or(TokenScope::Operator),
    })
}

#[async_trait]
impl TokenStore for PgStore {
    async fn create_token(&self, t: NewToken) -> Result<TokenRecord> {
        // The partial unique index `tokens_live_name` decides races between
        // two creators of the same name.
        let res = sqlx::query(&format!(
            "INSERT INTO tokens (id, tenant, name, hash, created_at, scope) VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING {COLS}"
        ))
        .bind(&t.id)
        .bind(&t.tenant)
        .bind(&t.name)
        .bind(&t.hash)
        .bind(t.created_at.0)
        .bind(t.scope.as_str())
        .fetch_one(&self.pool)
        .await;
        match res {
            Ok(row) => from_row(&row),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict(
                if e.constraint() == Some("tokens_live_name") {
                    format!(
                        "tenant `{}` already has a live token named `{}`",
                        t.tenant, t.name
                    )
                } else {
                    format!("token id or secret already stored: {e}")
                },
            )),
            Err(e) => Err(db(e)),
        }
    }

    async fn token_by_hash(&self, hash: String) -> Result<Option<TokenRecord>> {
        let row = sqlx::query(&format!("SELECT {COLS} FROM tokens WHERE hash = $1"))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(from_row).transpose()
    }

    async fn list_tokens(&self, tenant: Option<String>) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM tokens WHERE ($1::text IS NULL OR tenant = $1) ORDER BY created_at, id"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(from_row).collect()
    }

    async fn revoke_token(&self, id: String, now: Timestamp) -> Result<Option<TokenRecord>> {
        let row = sqlx::query(&format!(
            "UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING {COLS}"
        ))
        .bind(id)
        .bind(now.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(from_row).transpose()
    }

    async fn last_event_id(&self) -> Result<Option<i64>> {
        sqlx::query_scalar("SELECT MAX(id) FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }
}
