//! [`StatsStore`] on PostgreSQL.

use super::ops::{run_from_row, RUN_COLS};
use super::{db, PgStore};
use crate::stats::{attention_only, page};
use crate::{
    BucketCount, ClassCount, Result, RunScan, ScanPage, StatsStore, StoreError, WindowQuery,
    WindowStats,
};
use async_trait::async_trait;
use docket_core::RunId;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

const ATTENTION: &str = "status IN ('failed', 'needs_input')";

/// The text every search looks in.
const HAYSTACK: &str = "lower(id::text || ' ' || job || ' ' || coalesce(idempotency_key, '') || ' ' || \
    coalesce(correlation_id, '') || ' ' || coalesce(last_error_class, '') || ' ' || \
    coalesce(last_error_message, '') || ' ' || coalesce(terminal_reason, '') || ' ' || input::text)";

fn corrupt(what: &str, v: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("bad {what}: {v}"))
}

/// Appends the examined ids' query to `q`.
fn source(q: &mut QueryBuilder<'_, Postgres>, s: &RunScan, budget: usize) {
    q.push("SELECT id FROM runs WHERE tenant = ")
        .push_bind(s.tenant.clone());
    if attention_only(&s.statuses) {
        q.push(" AND ").push(ATTENTION);
    }
    if let Some(b) = s.before_id {
        q.push(" AND id < ").push_bind(b.0);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(budget as i64);
}

#[async_trait]
impl StatsStore for PgStore {
    async fn attention_count(&self, tenant: String) -> Result<i64> {
        sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM runs WHERE tenant = $1 AND {ATTENTION}"
        ))
        .bind(tenant)
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    async fn scan_runs(&self, s: RunScan) -> Result<ScanPage> {
        let filtered = !s.statuses.is_empty() && !attention_only(&s.statuses)
            || s.statuses.len() == 1
            || s.job.is_some()
            || s.text.is_some();
        let budget = if filtered {
            s.budget.max(1)
        } else {
            s.limit + 1
        };
        let mut q = QueryBuilder::<Postgres>::new(
            r#"SELECT COUNT(*) AS n, MIN(id::text COLLATE "C") AS floor FROM ("#,
        );
        source(&mut q, &s, budget);
        q.push(") w");
        let row = q.build().fetch_one(&self.pool).await.map_err(db)?;
        let examined: i64 = row.try_get("n").map_err(db)?;
        let floor: Option<String> = row.try_get("floor").map_err(db)?;
        let floor = floor
            .map(|f| {
                Uuid::parse_str(&f)
                    .map(RunId)
                    .map_err(|e| corrupt("run id", e))
            })
            .transpose()?;

        let mut q =
            QueryBuilder::<Postgres>::new(format!("SELECT {RUN_COLS} FROM runs WHERE id IN ("));
        source(&mut q, &s, budget);
        q.push(")");
        if !s.statuses.is_empty() {
            let st: Vec<&'static str> = s.statuses.iter().map(|s| s.as_str()).collect();
            q.push(" AND status = ANY(").push_bind(st).push(")");
        }
        if let Some(j) = &s.job {
            q.push(" AND job = ").push_bind(j.clone());
        }
        if let Some(t) = &s.text {
            q.push(format!(" AND strpos({HAYSTACK}, "))
                .push_bind(t.to_lowercase())
                .push(") > 0");
        }
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind((s.limit + 1) as i64);
        let rows = q.build().fetch_all(&self.pool).await.map_err(db)?;
        let runs = rows.iter().map(run_from_row).collect::<Result<Vec<_>>>()?;
        Ok(page(runs, s.limit, budget, examined as usize, floor))
    }

    async fn window_stats(&self, q: WindowQuery) -> Result<WindowStats> {
        let newest = "SELECT id, job, status, created_at FROM runs WHERE tenant = $1 ORDER BY id DESC LIMIT $2";
        let bucket_ms = q.bucket_ms.max(1);
        let row = sqlx::query(&format!(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM ({newest}) w"
        ))
        .bind(&q.tenant)
        .bind(q.max_runs as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let examined: i64 = row.try_get("n").map_err(db)?;
        let oldest: Option<i64> = row.try_get("oldest").map_err(db)?;
        let rows = sqlx::query(&format!(
            "SELECT (created_at - $3) / $4 AS b, job, status, COUNT(*) AS n FROM ({newest}) w
             WHERE created_at >= $3 GROUP BY b, job, status
             ORDER BY b, job COLLATE \"C\", status COLLATE \"C\""
        ))
        .bind(&q.tenant)
        .bind(q.max_runs as i64)
        .bind(q.since.0)
        .bind(bucket_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let runs = rows
            .iter()
            .map(|r| {
                let status: String = r.try_get("status").map_err(db)?;
                Ok(BucketCount {
                    bucket: r.try_get("b").map_err(db)?,
                    job: r.try_get("job").map_err(db)?,
                    status: status.parse().map_err(|e| corrupt("status", e))?,
                    count: r.try_get("n").map_err(db)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = sqlx::query(&format!(
            "SELECT (a.started_at - $3) / $4 AS b, a.error_class, COUNT(*) AS n,
                    COUNT(*) FILTER (WHERE a.delay_ms IS NOT NULL) AS retries,
                    COUNT(*) FILTER (WHERE a.outcome = 'failed' AND a.delay_ms IS NULL) AS terminal
             FROM ({newest}) w JOIN attempts a ON a.run_id = w.id
             WHERE w.created_at >= $3 AND a.started_at >= $3 AND a.error_class IS NOT NULL
             GROUP BY b, a.error_class ORDER BY b, a.error_class COLLATE \"C\""
        ))
        .bind(&q.tenant)
        .bind(q.max_runs as i64)
        .bind(q.since.0)
        .bind(bucket_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let classes = rows
            .iter()
            .map(|r| {
                let class: String = r.try_get("error_class").map_err(db)?;
                Ok(ClassCount {
                    bucket: r.try_get("b").map_err(db)?,
                    error_class: class.parse().map_err(|e| corrupt("error class", e))?,
                    failures: r.try_get("n").map_err(db)?,
                    retries: r.try_get("retries").map_err(db)?,
                    terminal: r.try_get("terminal").map_err(db)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let examined = examined as usize;
        Ok(WindowStats {
            runs,
            classes,
            examined,
            capped: examined >= q.max_runs && oldest.is_some_and(|o| o >= q.since.0),
        })
    }
}
