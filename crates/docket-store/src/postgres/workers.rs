//! [`WorkerStore`] on PostgreSQL.

use super::{db, PgStore};
use crate::workers::{jobs_from_text, jobs_text};
use crate::{Result, WorkerRecord, WorkerSeen, WorkerStore};
use async_trait::async_trait;
use docket_core::Timestamp;
use sqlx::Row;

#[async_trait]
impl WorkerStore for PgStore {
    async fn touch_worker(&self, seen: WorkerSeen) -> Result<()> {
        let jobs = seen.jobs.as_deref().map(jobs_text);
        sqlx::query(
            "INSERT INTO workers (tenant, name, jobs, first_seen_at, last_seen_at)
             VALUES ($1, $2, COALESCE($3, '[]'), $4, $4)
             ON CONFLICT (tenant, name) DO UPDATE SET
                jobs = COALESCE($3, workers.jobs),
                last_seen_at = GREATEST(workers.last_seen_at, $4)",
        )
        .bind(&seen.tenant)
        .bind(&seen.name)
        .bind(jobs)
        .bind(seen.now.0)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn list_workers(&self, tenant: Option<String>) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(
            "SELECT w.tenant, w.name, w.jobs, w.first_seen_at, w.last_seen_at,
                (SELECT COUNT(*) FROM runs r WHERE r.status = 'running'
                    AND r.tenant = w.tenant AND r.worker = w.name) AS running
             FROM workers w WHERE ($1::text IS NULL OR w.tenant = $1)
             ORDER BY w.last_seen_at DESC, w.tenant, w.name",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(WorkerRecord {
                    tenant: r.try_get("tenant").map_err(db)?,
                    name: r.try_get("name").map_err(db)?,
                    jobs: jobs_from_text(&r.try_get::<String, _>("jobs").map_err(db)?),
                    first_seen_at: Timestamp(r.try_get("first_seen_at").map_err(db)?),
                    last_seen_at: Timestamp(r.try_get("last_seen_at").map_err(db)?),
                    running: r.try_get::<i64, _>("running").map_err(db)?.max(0) as u64,
                })
            })
            .collect()
    }

    async fn forget_workers(&self, seen_before: Timestamp) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM workers WHERE last_seen_at < $1
             AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.status = 'running'
                AND r.tenant = workers.tenant AND r.worker = workers.name)",
        )
        .bind(seen_before.0)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(done.rows_affected())
    }
}
