//! Pruning, pausing and deleting runs on PostgreSQL, mirroring
//! `sqlite/retention.rs` (see `crate::retention`). Each function is one
//! transaction on the pool (never on the hot path's connections).

use super::db;
use super::ops::{run_from_row, RUN_COLS};
use crate::retention::{
    DeleteRequest, JobSelector, Pause, PauseChange, PruneReport, PruneRequest, PrunedJob, ALL_JOBS,
    JOB_PAUSED, JOB_RESUMED, LEDGER_PRUNED, NO_RUN, RUNS_PRUNED, RUN_DELETED,
};
use crate::{Result, Run, StoreError};
use docket_core::{RunId, RunStatus, Timestamp};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Row;
use std::collections::BTreeMap;

#[allow(clippy::too_many_arguments)]
async fn event(
    c: &mut PgConnection,
    run_id: RunId,
    tenant: &str,
    job: &str,
    kind: docket_core::EventKind,
    at: Timestamp,
    actor: Option<&str>,
    comment: Option<&str>,
    data: &Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO events (run_id, tenant, job, kind, at, actor, comment, data)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(run_id.0)
    .bind(tenant)
    .bind(job)
    .bind(kind.as_str())
    .bind(at.0)
    .bind(actor)
    .bind(comment)
    .bind(data)
    .execute(c)
    .await
    .map_err(db)?;
    Ok(())
}

/// Deletes the runs' evidence and the runs that are still final; answers
/// per run id (attempts, events, steps) and the ids of the runs deleted.
async fn delete_runs(
    c: &mut PgConnection,
    ids: &[uuid::Uuid],
) -> Result<(BTreeMap<uuid::Uuid, (u64, u64, u64)>, Vec<uuid::Uuid>)> {
    let mut counts: BTreeMap<uuid::Uuid, (u64, u64, u64)> = BTreeMap::new();
    for (i, table) in ["attempts", "events", "steps"].iter().enumerate() {
        let rows = sqlx::query(&format!(
            "DELETE FROM {table} WHERE run_id = ANY($1) RETURNING run_id"
        ))
        .bind(ids)
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
        for r in rows {
            let id: uuid::Uuid = r.get(0);
            let e = counts.entry(id).or_default();
            match i {
                0 => e.0 += 1,
                1 => e.1 += 1,
                _ => e.2 += 1,
            }
        }
    }
    // A final run's signals and (stale) waits go with it; not counted.
    for table in ["signals", "signal_waits"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE run_id = ANY($1)"))
            .bind(ids)
            .execute(&mut *c)
            .await
            .map_err(db)?;
    }
    let gone: Vec<uuid::Uuid> = sqlx::query_scalar(
        "DELETE FROM runs WHERE id = ANY($1) AND status IN ('completed', 'failed', 'cancelled')
         RETURNING id",
    )
    .bind(ids)
    .fetch_all(&mut *c)
    .await
    .map_err(db)?;
    Ok((counts, gone))
}

pub(super) async fn prune(pool: &PgPool, req: &PruneRequest) -> Result<PruneReport> {
    let mut tx = pool.begin().await.map_err(db)?;
    if let Some((task, token)) = &req.lead {
        // FOR SHARE: a takeover (`try_lead`'s upsert) waits until this
        // batch commits, so no batch runs under a lead already lost.
        let holds: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM leaders WHERE task = $1 AND token = $2 AND expires_at > $3 FOR SHARE",
        )
        .bind(task)
        .bind(token.0)
        .bind(req.now.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        if holds.is_none() {
            return Ok(PruneReport {
                fenced_out: true,
                ..Default::default()
            });
        }
    }
    let mut doomed: Vec<(uuid::Uuid, String, String, RunStatus)> = Vec::new();
    for class in &req.classes {
        let left = req.limit.saturating_sub(doomed.len());
        if left == 0 {
            break;
        }
        if !matches!(
            class.status,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        ) {
            return Err(StoreError::Conflict(format!(
                "cannot prune {} runs: only final runs are pruned",
                class.status
            )));
        }
        let (cond, jobs): (&str, Vec<String>) = match &class.jobs {
            JobSelector::Only(job) => ("job = ANY($4)", vec![job.clone()]),
            JobSelector::AllExcept(except) => ("job <> ALL($4)", except.clone()),
        };
        // SKIP LOCKED: a run an operator or a worker holds right now is
        // left for the next batch instead of waiting for it.
        let rows = sqlx::query(&format!(
            "SELECT id, tenant, job FROM runs
             WHERE status = $1 AND finished_at <= $2 AND {cond}
             ORDER BY finished_at LIMIT $3
             FOR UPDATE SKIP LOCKED"
        ))
        .bind(class.status.as_str())
        .bind(class.finished_before.0)
        .bind(left as i64)
        .bind(&jobs)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        for r in rows {
            doomed.push((r.get(0), r.get(1), r.get(2), class.status));
        }
    }
    let ids: Vec<uuid::Uuid> = doomed.iter().map(|d| d.0).collect();
    let mut per_job: BTreeMap<(String, String), PrunedJob> = BTreeMap::new();
    if !ids.is_empty() {
        let (counts, gone) = delete_runs(&mut tx, &ids).await?;
        for (id, tenant, job, status) in &doomed {
            let p = per_job
                .entry((tenant.clone(), job.clone()))
                .or_insert_with(|| PrunedJob {
                    tenant: tenant.clone(),
                    job: job.clone(),
                    ..Default::default()
                });
            if gone.contains(id) {
                p.count(*status);
            }
            let (a, e, s) = counts.get(id).copied().unwrap_or_default();
            p.attempts += a;
            p.events += e;
            p.steps += s;
        }
    }
    let mut per_tenant: BTreeMap<String, u64> = BTreeMap::new();
    if let Some(before) = req.ledger_before {
        // Only rows whose writing run is gone (runs deleted above are gone
        // for this transaction already).
        let tenants: Vec<String> = sqlx::query_scalar(
            "DELETE FROM ledger WHERE (tenant, idempotency_key) IN (
                 SELECT tenant, idempotency_key FROM ledger l
                 WHERE updated_at <= $1
                   AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.id = l.run_id)
                 ORDER BY updated_at LIMIT $2
                 FOR UPDATE SKIP LOCKED)
             RETURNING tenant",
        )
        .bind(before.0)
        .bind(req.limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        for t in tenants {
            *per_tenant.entry(t).or_default() += 1;
        }
    }
    for p in per_job.values() {
        event(
            &mut tx,
            NO_RUN,
            &p.tenant,
            &p.job,
            RUNS_PRUNED,
            req.now,
            None,
            None,
            &p.event_data(),
        )
        .await?;
    }
    for (tenant, n) in &per_tenant {
        event(
            &mut tx,
            NO_RUN,
            tenant,
            "",
            LEDGER_PRUNED,
            req.now,
            None,
            None,
            &crate::retention::ledger_pruned_data(*n),
        )
        .await?;
    }
    tx.commit().await.map_err(db)?;
    Ok(PruneReport {
        jobs: per_job.into_values().collect(),
        ledger: per_tenant.into_iter().collect(),
        fenced_out: false,
    })
}

pub(super) async fn set_pause(pool: &PgPool, ch: &PauseChange) -> Result<bool> {
    if ch.job.is_empty() {
        return Err(StoreError::Conflict(
            "a job name is required (or `*` for every job)".into(),
        ));
    }
    let mut tx = pool.begin().await.map_err(db)?;
    let changed = if ch.paused {
        sqlx::query(
            "INSERT INTO job_pauses (tenant, job, paused_at, actor, comment) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, job) DO NOTHING",
        )
        .bind(&ch.tenant)
        .bind(&ch.job)
        .bind(ch.now.0)
        .bind(&ch.actor)
        .bind(&ch.comment)
        .execute(&mut *tx)
        .await
    } else {
        sqlx::query("DELETE FROM job_pauses WHERE tenant = $1 AND job = $2")
            .bind(&ch.tenant)
            .bind(&ch.job)
            .execute(&mut *tx)
            .await
    }
    .map_err(db)?
    .rows_affected();
    if changed == 0 {
        return Ok(false);
    }
    event(
        &mut tx,
        NO_RUN,
        &ch.tenant,
        &ch.job,
        if ch.paused { JOB_PAUSED } else { JOB_RESUMED },
        ch.now,
        Some(&ch.actor),
        ch.comment.as_deref(),
        &json!({ "all_jobs": ch.job == ALL_JOBS }),
    )
    .await?;
    if !ch.paused {
        // Resumed runs may be due now: wake every process's workers (at
        // commit); `""` means "check every job".
        let job = if ch.job == ALL_JOBS {
            ""
        } else {
            ch.job.as_str()
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(super::WAKEUP_CHANNEL)
            .bind(job)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    Ok(true)
}

pub(super) async fn pauses(pool: &PgPool, tenant: Option<&str>) -> Result<Vec<Pause>> {
    let rows = sqlx::query(
        "SELECT tenant, job, paused_at, actor, comment FROM job_pauses
         WHERE $1::text IS NULL OR tenant = $1 ORDER BY tenant, job",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| Pause {
            tenant: r.get(0),
            job: r.get(1),
            since: Timestamp(r.get(2)),
            actor: r.get(3),
            comment: r.get(4),
        })
        .collect())
}

pub(super) async fn delete_run(pool: &PgPool, req: &DeleteRequest) -> Result<Run> {
    let mut tx = pool.begin().await.map_err(db)?;
    let row = sqlx::query(&format!(
        "SELECT {RUN_COLS} FROM runs WHERE id = $1 FOR UPDATE"
    ))
    .bind(req.run_id.0)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?
    .ok_or(StoreError::NotFound(req.run_id))?;
    let run = run_from_row(&row)?;
    let audit_data = crate::retention::delete_plan(&run)?;
    delete_runs(&mut tx, &[run.id.0]).await?;
    event(
        &mut tx,
        run.id,
        &run.tenant,
        &run.job,
        RUN_DELETED,
        req.now,
        Some(&req.actor),
        req.comment.as_deref(),
        &audit_data,
    )
    .await?;
    tx.commit().await.map_err(db)?;
    Ok(run)
}

pub(super) async fn queue_health(
    pool: &PgPool,
    q: &crate::retention::HealthQuery,
) -> Result<Vec<crate::retention::JobHealth>> {
    let typed = |t: &str| t.replace("$2 IS NULL", "$2::text IS NULL");
    let rows = sqlx::query(&typed(crate::retention::HEALTH_WAITING_SQL))
        .bind(q.now.0)
        .bind(&q.tenant)
        .fetch_all(pool)
        .await
        .map_err(db)?;
    let waiting = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
            )
        })
        .collect();
    let rows = sqlx::query(&typed(crate::retention::HEALTH_FINISHED_SQL))
        .bind(q.since.0)
        .bind(&q.tenant)
        .fetch_all(pool)
        .await
        .map_err(db)?;
    let finished = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    Ok(crate::retention::merge_health(waiting, finished))
}
