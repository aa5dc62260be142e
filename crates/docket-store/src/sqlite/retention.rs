//! Pruning, pausing and deleting runs on SQLite (see `crate::retention`).
//! Each function runs in the writer thread inside one transaction.
//!
//! Event ids are plain rowids (max + 1), so deleting the newest event would
//! let its id be used again. Every function here therefore writes its own
//! event(s) BEFORE it deletes anything: the newest event is then one that
//! is never deleted with a run.

use super::db_err;
use super::ops::get_run;
use crate::retention::{
    DeleteRequest, JobSelector, Pause, PauseChange, PruneReport, PruneRequest, PrunedJob, ALL_JOBS,
    JOB_PAUSED, JOB_RESUMED, LEDGER_PRUNED, NO_RUN, RUNS_PRUNED, RUN_DELETED,
};
use crate::{Result, Run, StoreError};
use docket_core::{RunId, RunStatus, Timestamp};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection};
use serde_json::json;
use serde_json::Value;
use std::collections::BTreeMap;

/// Appends an event that belongs to no attempt; answers its id.
#[allow(clippy::too_many_arguments)]
fn insert_event(
    c: &Connection,
    run_id: RunId,
    tenant: &str,
    job: &str,
    kind: docket_core::EventKind,
    at: Timestamp,
    actor: Option<&str>,
    comment: Option<&str>,
    data: &Value,
) -> Result<i64> {
    c.prepare_cached(
        "INSERT INTO events (run_id, tenant, job, kind, at, actor, comment, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(db_err)?
    .execute(params![
        run_id.to_string(),
        tenant,
        job,
        kind.as_str(),
        at.0,
        actor,
        comment,
        data.to_string()
    ])
    .map_err(db_err)?;
    Ok(c.last_insert_rowid())
}

fn lead_holds(c: &Connection, task: &str, token: i64, now: Timestamp) -> Result<bool> {
    c.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM leaders WHERE task = ?1 AND token = ?2 AND expires_at > ?3)",
    )
    .map_err(db_err)?
    .query_row(params![task, token, now.0], |r| r.get(0))
    .map_err(db_err)
}

fn exec(c: &Connection, sql: &str, p: &[&dyn rusqlite::ToSql]) -> Result<u64> {
    Ok(c.prepare_cached(sql)
        .map_err(db_err)?
        .execute(p)
        .map_err(db_err)? as u64)
}

/// Deletes one run's evidence (events below `keep_from` only) and the run
/// itself if it is still final. Answers (attempts, events, steps, run).
fn delete_one(c: &Connection, id: &str, keep_from: i64) -> Result<(u64, u64, u64, bool)> {
    let attempts = exec(c, "DELETE FROM attempts WHERE run_id = ?1", &[&id])?;
    let events = exec(
        c,
        "DELETE FROM events WHERE run_id = ?1 AND id < ?2",
        &[&id, &keep_from],
    )?;
    let steps = exec(c, "DELETE FROM steps WHERE run_id = ?1", &[&id])?;
    // A final run's signals and (stale) waits go with it; not counted.
    exec(c, "DELETE FROM signals WHERE run_id = ?1", &[&id])?;
    exec(c, "DELETE FROM signal_waits WHERE run_id = ?1", &[&id])?;
    let run = exec(
        c,
        "DELETE FROM runs WHERE id = ?1 AND status IN ('completed', 'failed', 'cancelled')",
        &[&id],
    )?;
    Ok((attempts, events, steps, run == 1))
}

pub(super) fn prune(c: &Connection, req: &PruneRequest) -> Result<PruneReport> {
    if let Some((task, token)) = &req.lead {
        if !lead_holds(c, task, token.0, req.now)? {
            return Ok(PruneReport {
                fenced_out: true,
                ..Default::default()
            });
        }
    }
    // The runs: (id, tenant, job, status), class by class, up to the limit.
    let mut doomed: Vec<(String, String, String, RunStatus)> = Vec::new();
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
        let mut args: Vec<SqlValue> = vec![
            class.status.as_str().to_string().into(),
            class.finished_before.0.into(),
            (left as i64).into(),
        ];
        let jobs = match &class.jobs {
            JobSelector::Only(job) => {
                args.push(job.clone().into());
                "AND job = ?4".to_string()
            }
            JobSelector::AllExcept(except) if except.is_empty() => String::new(),
            JobSelector::AllExcept(except) => {
                let marks: Vec<String> = (0..except.len()).map(|i| format!("?{}", i + 4)).collect();
                args.extend(except.iter().map(|j| SqlValue::from(j.clone())));
                format!("AND job NOT IN ({})", marks.join(", "))
            }
        };
        let sql = format!(
            "SELECT id, tenant, job FROM runs INDEXED BY runs_finished
             WHERE status = ?1 AND finished_at <= ?2 {jobs}
             ORDER BY finished_at LIMIT ?3"
        );
        let mut st = c.prepare_cached(&sql).map_err(db_err)?;
        let rows = st
            .query_map(params_from_iter(args), |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, class.status))
            })
            .map_err(db_err)?;
        for row in rows {
            doomed.push(row.map_err(db_err)?);
        }
    }
    if doomed.is_empty() && req.ledger_before.is_none() {
        return Ok(PruneReport::default());
    }
    // The events first (see the module's note), their counts filled in last.
    let mut per_job: BTreeMap<(String, String), PrunedJob> = BTreeMap::new();
    for (_, tenant, job, _) in &doomed {
        per_job
            .entry((tenant.clone(), job.clone()))
            .or_insert_with(|| PrunedJob {
                tenant: tenant.clone(),
                job: job.clone(),
                ..Default::default()
            });
    }
    let mut event_ids: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (tenant, job) in per_job.keys().cloned().collect::<Vec<_>>() {
        let id = insert_event(
            c,
            NO_RUN,
            &tenant,
            &job,
            RUNS_PRUNED,
            req.now,
            None,
            None,
            &json!({}),
        )?;
        event_ids.insert((tenant, job), id);
    }
    let first_new = event_ids.values().copied().min().unwrap_or(i64::MAX);
    for (id, tenant, job, status) in &doomed {
        let (attempts, events, steps, gone) = delete_one(c, id, first_new)?;
        let p = per_job
            .get_mut(&(tenant.clone(), job.clone()))
            .expect("grouped above");
        if gone {
            p.count(*status);
        }
        p.attempts += attempts;
        p.events += events;
        p.steps += steps;
    }
    for ((tenant, job), id) in &event_ids {
        let p = &per_job[&(tenant.clone(), job.clone())];
        exec(
            c,
            "UPDATE events SET data = ?2 WHERE id = ?1",
            &[id, &p.event_data().to_string()],
        )?;
    }
    // The ledger rows: old enough, and the run that wrote them is gone
    // (the runs deleted above are gone already in this transaction). Rows
    // whose run is kept are skipped by the query itself, so they never
    // stall the batches behind them.
    let mut ledger: Vec<(String, String)> = Vec::new();
    if let Some(before) = req.ledger_before {
        let mut st = c
            .prepare_cached(
                "SELECT tenant, idempotency_key FROM ledger INDEXED BY ledger_updated
                 WHERE updated_at <= ?1
                   AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.id = ledger.run_id)
                 ORDER BY updated_at LIMIT ?2",
            )
            .map_err(db_err)?;
        let rows = st
            .query_map(params![before.0, req.limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(db_err)?;
        for row in rows {
            ledger.push(row.map_err(db_err)?);
        }
    }
    let mut per_tenant: BTreeMap<String, u64> = BTreeMap::new();
    for (tenant, _) in &ledger {
        *per_tenant.entry(tenant.clone()).or_default() += 1;
    }
    for (tenant, key) in &ledger {
        exec(
            c,
            "DELETE FROM ledger WHERE tenant = ?1 AND idempotency_key = ?2",
            &[tenant, key],
        )?;
    }
    for (tenant, n) in &per_tenant {
        insert_event(
            c,
            NO_RUN,
            tenant,
            "",
            LEDGER_PRUNED,
            req.now,
            None,
            None,
            &crate::retention::ledger_pruned_data(*n),
        )?;
    }
    Ok(PruneReport {
        jobs: per_job.into_values().collect(),
        ledger: per_tenant.into_iter().collect(),
        fenced_out: false,
    })
}

pub(super) fn set_pause(c: &Connection, ch: &PauseChange) -> Result<bool> {
    if ch.job.is_empty() {
        return Err(StoreError::Conflict(
            "a job name is required (or `*` for every job)".into(),
        ));
    }
    let changed = if ch.paused {
        exec(
            c,
            "INSERT INTO job_pauses (tenant, job, paused_at, actor, comment) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (tenant, job) DO NOTHING",
            &[&ch.tenant, &ch.job, &ch.now.0, &ch.actor, &ch.comment],
        )?
    } else {
        exec(
            c,
            "DELETE FROM job_pauses WHERE tenant = ?1 AND job = ?2",
            &[&ch.tenant, &ch.job],
        )?
    };
    if changed == 0 {
        return Ok(false);
    }
    insert_event(
        c,
        NO_RUN,
        &ch.tenant,
        &ch.job,
        if ch.paused { JOB_PAUSED } else { JOB_RESUMED },
        ch.now,
        Some(&ch.actor),
        ch.comment.as_deref(),
        &json!({ "all_jobs": ch.job == ALL_JOBS }),
    )?;
    Ok(true)
}

pub(super) fn pauses(c: &Connection, tenant: Option<&str>) -> Result<Vec<Pause>> {
    let mut st = c
        .prepare_cached(
            "SELECT tenant, job, paused_at, actor, comment FROM job_pauses
             WHERE ?1 IS NULL OR tenant = ?1 ORDER BY tenant, job",
        )
        .map_err(db_err)?;
    let rows = st
        .query_map([tenant], |r| {
            Ok(Pause {
                tenant: r.get(0)?,
                job: r.get(1)?,
                since: Timestamp(r.get(2)?),
                actor: r.get(3)?,
                comment: r.get(4)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

pub(super) fn delete_run(c: &Connection, req: &DeleteRequest) -> Result<Run> {
    let run = get_run(c, req.run_id)?.ok_or(StoreError::NotFound(req.run_id))?;
    let audit_data = crate::retention::delete_plan(&run)?;
    let audit = insert_event(
        c,
        run.id,
        &run.tenant,
        &run.job,
        RUN_DELETED,
        req.now,
        Some(&req.actor),
        req.comment.as_deref(),
        &audit_data,
    )?;
    delete_one(c, &run.id.to_string(), audit)?;
    Ok(run)
}

pub(super) fn queue_health(
    c: &Connection,
    q: &crate::retention::HealthQuery,
) -> Result<Vec<crate::retention::JobHealth>> {
    let sql = |t: &str| t.replace('$', "?");
    let mut st = c
        .prepare_cached(&sql(crate::retention::HEALTH_WAITING_SQL))
        .map_err(db_err)?;
    let waiting = st
        .query_map(params![q.now.0, q.tenant], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })
        .map_err(db_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db_err)?;
    let mut st = c
        .prepare_cached(&sql(crate::retention::HEALTH_FINISHED_SQL))
        .map_err(db_err)?;
    let finished = st
        .query_map(params![q.since.0, q.tenant], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .map_err(db_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(db_err)?;
    Ok(crate::retention::merge_health(waiting, finished))
}
