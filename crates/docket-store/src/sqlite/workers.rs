//! [`WorkerStore`] on SQLite.

use super::{db_err, SqliteStore};
use crate::workers::{jobs_from_text, jobs_text};
use crate::{Result, WorkerRecord, WorkerSeen, WorkerStore};
use async_trait::async_trait;
use docket_core::Timestamp;
use rusqlite::params;

#[async_trait]
impl WorkerStore for SqliteStore {
    async fn touch_worker(&self, seen: WorkerSeen) -> Result<()> {
        self.call(move |c| {
            let jobs = seen.jobs.as_deref().map(jobs_text);
            c.prepare_cached(
                "INSERT INTO workers (tenant, name, jobs, first_seen_at, last_seen_at)
                 VALUES (?1, ?2, COALESCE(?3, '[]'), ?4, ?4)
                 ON CONFLICT (tenant, name) DO UPDATE SET
                    jobs = COALESCE(?3, workers.jobs),
                    last_seen_at = MAX(workers.last_seen_at, ?4)",
            )
            .map_err(db_err)?
            .execute(params![seen.tenant, seen.name, jobs, seen.now.0])
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn list_workers(&self, tenant: Option<String>) -> Result<Vec<WorkerRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare(
                    "SELECT w.tenant, w.name, w.jobs, w.first_seen_at, w.last_seen_at,
                        (SELECT COUNT(*) FROM runs r WHERE r.status = 'running'
                            AND r.tenant = w.tenant AND r.worker = w.name)
                     FROM workers w WHERE (?1 IS NULL OR w.tenant = ?1)
                     ORDER BY w.last_seen_at DESC, w.tenant, w.name",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map([tenant], |r| {
                    Ok(WorkerRecord {
                        tenant: r.get(0)?,
                        name: r.get(1)?,
                        jobs: jobs_from_text(&r.get::<_, String>(2)?),
                        first_seen_at: Timestamp(r.get(3)?),
                        last_seen_at: Timestamp(r.get(4)?),
                        running: r.get::<_, i64>(5)?.max(0) as u64,
                    })
                })
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        })
        .await
    }

    async fn forget_workers(&self, seen_before: Timestamp) -> Result<u64> {
        self.call(move |c| {
            let n = c
                .prepare_cached(
                    "DELETE FROM workers WHERE last_seen_at < ?1
                     AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.status = 'running'
                        AND r.tenant = workers.tenant AND r.worker = workers.name)",
                )
                .map_err(db_err)?
                .execute(params![seen_before.0])
                .map_err(db_err)?;
            Ok(n as u64)
        })
        .await
    }
}
