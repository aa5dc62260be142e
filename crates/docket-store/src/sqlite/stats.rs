//! [`StatsStore`] on SQLite.
//!
//! The attention queries spell their statuses as literals so that SQLite
//! can use the partial index `runs_attention` (a bound parameter cannot
//! prove a partial index's condition).

use super::ops::{run_from_row, RUN_COLS};
use super::{db_err, SqliteStore};
use crate::stats::{attention_only, page};
use crate::{
    BucketCount, ClassCount, Result, RunScan, ScanPage, StatsStore, StoreError, WindowQuery,
    WindowStats,
};
use async_trait::async_trait;
use docket_core::RunId;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection};

const ATTENTION: &str = "status IN ('failed', 'needs_input')";

/// The text every search looks in.
const HAYSTACK: &str = "lower(id || ' ' || job || ' ' || coalesce(idempotency_key, '') || ' ' || \
    coalesce(correlation_id, '') || ' ' || coalesce(last_error_class, '') || ' ' || \
    coalesce(last_error_message, '') || ' ' || coalesce(terminal_reason, '') || ' ' || input)";

fn corrupt(what: &str, v: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("bad {what}: {v}"))
}

fn scan(c: &Connection, s: &RunScan) -> Result<ScanPage> {
    // The ids examined: the newest `budget` of the tenant (of its runs
    // needing attention when the statuses allow) below the cursor.
    let mut args: Vec<SqlValue> = vec![s.tenant.clone().into()];
    let mut source = String::from("SELECT id FROM runs WHERE tenant = ?1");
    if attention_only(&s.statuses) {
        source.push_str(" AND ");
        source.push_str(ATTENTION);
    }
    if let Some(b) = s.before_id {
        args.push(b.to_string().into());
        source.push_str(&format!(" AND id < ?{}", args.len()));
    }
    let filtered = !s.statuses.is_empty() && !attention_only(&s.statuses)
        || s.statuses.len() == 1
        || s.job.is_some()
        || s.text.is_some();
    // Without further filters every examined run matches: look at one more
    // than a page.
    let budget = if filtered {
        s.budget.max(1)
    } else {
        s.limit + 1
    };
    args.push((budget as i64).into());
    source.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));

    let (examined, floor): (i64, Option<String>) = c
        .prepare_cached(&format!("SELECT COUNT(*), MIN(id) FROM ({source})"))
        .map_err(db_err)?
        .query_row(params_from_iter(args.iter()), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(db_err)?;
    let floor = floor
        .map(|f| f.parse::<RunId>().map_err(|e| corrupt("run id", e)))
        .transpose()?;

    let mut sql = format!("SELECT {RUN_COLS} FROM runs WHERE id IN ({source})");
    if !s.statuses.is_empty() {
        sql.push_str(" AND status IN (");
        for (i, st) in s.statuses.iter().enumerate() {
            args.push(st.as_str().to_string().into());
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("?{}", args.len()));
        }
        sql.push(')');
    }
    if let Some(j) = &s.job {
        args.push(j.clone().into());
        sql.push_str(&format!(" AND job = ?{}", args.len()));
    }
    if let Some(t) = &s.text {
        args.push(t.to_lowercase().into());
        sql.push_str(&format!(" AND instr({HAYSTACK}, ?{}) > 0", args.len()));
    }
    args.push(((s.limit + 1) as i64).into());
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let runs = st
        .query_map(params_from_iter(args.iter()), run_from_row)
        .map_err(db_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db_err)?;
    Ok(page(runs, s.limit, budget, examined as usize, floor))
}

fn window(c: &Connection, q: &WindowQuery) -> Result<WindowStats> {
    let newest =
        "SELECT id, job, status, created_at FROM runs WHERE tenant = ?1 ORDER BY id DESC LIMIT ?2";
    let p = params![q.tenant, q.max_runs as i64, q.since.0, q.bucket_ms.max(1)];
    let (examined, oldest): (i64, Option<i64>) = c
        .prepare_cached(&format!("SELECT COUNT(*), MIN(created_at) FROM ({newest})"))
        .map_err(db_err)?
        .query_row(params![q.tenant, q.max_runs as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(db_err)?;
    let mut st = c
        .prepare_cached(&format!(
            "SELECT (created_at - ?3) / ?4 AS b, job, status, COUNT(*) FROM ({newest})
             WHERE created_at >= ?3 GROUP BY b, job, status ORDER BY b, job, status"
        ))
        .map_err(db_err)?;
    let runs = st
        .query_map(p, |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .map_err(db_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db_err)?
        .into_iter()
        .map(|(bucket, job, status, count)| {
            Ok(BucketCount {
                bucket,
                job,
                status: status.parse().map_err(|e| corrupt("status", e))?,
                count,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut st = c
        .prepare_cached(&format!(
            "SELECT (a.started_at - ?3) / ?4 AS b, a.error_class, COUNT(*),
                    SUM(a.delay_ms IS NOT NULL),
                    SUM(a.outcome = 'failed' AND a.delay_ms IS NULL)
             FROM ({newest}) w JOIN attempts a ON a.run_id = w.id
             WHERE w.created_at >= ?3 AND a.started_at >= ?3 AND a.error_class IS NOT NULL
             GROUP BY b, a.error_class ORDER BY b, a.error_class"
        ))
        .map_err(db_err)?;
    let classes = st
        .query_map(p, |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .map_err(db_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db_err)?
        .into_iter()
        .map(|(bucket, class, failures, retries, terminal)| {
            Ok(ClassCount {
                bucket,
                error_class: class.parse().map_err(|e| corrupt("error class", e))?,
                failures,
                retries,
                terminal,
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

#[async_trait]
impl StatsStore for SqliteStore {
    async fn attention_count(&self, tenant: String) -> Result<i64> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT COUNT(*) FROM runs WHERE tenant = ?1 AND {ATTENTION}"
            ))
            .map_err(db_err)?
            .query_row([tenant], |r| r.get(0))
            .map_err(db_err)
        })
        .await
    }

    async fn scan_runs(&self, s: RunScan) -> Result<ScanPage> {
        self.read(move |c| scan(c, &s)).await
    }

    async fn window_stats(&self, q: WindowQuery) -> Result<WindowStats> {
        self.read(move |c| window(c, &q)).await
    }
}
