//! The SQL of each store operation. Every function runs inside the writer
//! thread's transaction, under the caller's savepoint.

use crate::{
    AttemptEnd, AttemptRecord, ClaimRequest, EventFilter, EventRecord, LeaseRef, LeaseState,
    LedgerEntry, LedgerWrite, NewRun, OperatorCommand, OperatorRequest, Outcome, Result, Run,
    RunFilter, StatusCount, StepRecord, StoreError, Triggered,
};
use docket_core::{ErrorClass, LeaseId, RunId, RunStatus, Timestamp, Transition};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use serde_json::{json, Value};

use super::db_err;
use crate::plan::{self, BeginPlan, Holder};
use crate::{LedgerBegin, LedgerState};

pub(super) const RUN_COLS: &str = "id, tenant, job, status, priority, input, variables, output, attempt, \
    attempts_forgiven, run_after, lease_id, lease_expires_at, worker, idempotency_key, correlation_id, \
    created_at, updated_at, finished_at, terminal_reason, last_error_class, last_error_message, \
    cancel_requested, retriggered_from, input_request";

fn corrupt(what: &str, v: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("bad {what}: {v}").into(),
    )
}

fn parse<T: std::str::FromStr>(what: &str, s: String) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| corrupt(what, e))
}

fn parse_opt<T: std::str::FromStr>(what: &str, s: Option<String>) -> rusqlite::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    s.map(|s| parse(what, s)).transpose()
}

/// A JSON column: what cannot be decoded is read as the
/// `{"docket_undecodable": …}` marker, so one bad row never fails a list.
fn json_col(s: String) -> rusqlite::Result<Value> {
    Ok(crate::json::decode_text(&s))
}

fn json_opt(s: Option<String>) -> rusqlite::Result<Option<Value>> {
    s.map(json_col).transpose()
}

pub(super) fn run_from_row(r: &Row<'_>) -> rusqlite::Result<Run> {
    Ok(Run {
        id: parse("run id", r.get(0)?)?,
        tenant: r.get(1)?,
        job: r.get(2)?,
        status: parse("status", r.get(3)?)?,
        priority: r.get(4)?,
        input: json_col(r.get(5)?)?,
        variables: json_col(r.get(6)?)?,
        output: json_opt(r.get(7)?)?,
        attempt: r.get(8)?,
        attempts_forgiven: r.get(9)?,
        run_after: Timestamp(r.get(10)?),
        lease_id: parse_opt("lease id", r.get(11)?)?,
        lease_expires_at: r.get::<_, Option<i64>>(12)?.map(Timestamp),
        worker: r.get(13)?,
        idempotency_key: r.get(14)?,
        correlation_id: r.get(15)?,
        created_at: Timestamp(r.get(16)?),
        updated_at: Timestamp(r.get(17)?),
        finished_at: r.get::<_, Option<i64>>(18)?.map(Timestamp),
        terminal_reason: parse_opt("terminal reason", r.get(19)?)?,
        last_error_class: parse_opt("error class", r.get(20)?)?,
        last_error_message: r.get(21)?,
        cancel_requested: r.get::<_, i64>(22)? != 0,
        retriggered_from: parse_opt("run id", r.get(23)?)?,
        input_request: json_opt(r.get(24)?)?,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn insert_event(
    c: &Connection,
    run_id: RunId,
    tenant: &str,
    job: &str,
    kind: &str,
    at: Timestamp,
    attempt: Option<u32>,
    lease_id: Option<LeaseId>,
    actor: Option<&str>,
    comment: Option<&str>,
    data: &Value,
) -> Result<()> {
    let mut st = c
        .prepare_cached(
            "INSERT INTO events (run_id, tenant, job, kind, at, attempt, lease_id, actor, comment, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(db_err)?;
    st.execute(params![
        run_id.to_string(),
        tenant,
        job,
        kind,
        at.0,
        attempt,
        lease_id.map(|l| l.to_string()),
        actor,
        comment,
        data.to_string()
    ])
    .map_err(db_err)?;
    Ok(())
}

pub(super) fn get_run(c: &Connection, id: RunId) -> Result<Option<Run>> {
    let mut st = c
        .prepare_cached(&format!("SELECT {RUN_COLS} FROM runs WHERE id = ?1"))
        .map_err(db_err)?;
    st.query_row([id.to_string()], run_from_row)
        .optional()
        .map_err(db_err)
}

pub(super) fn trigger(c: &Connection, runs: Vec<NewRun>, now: Timestamp) -> Result<Vec<Triggered>> {
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        if let Some(key) = &r.idempotency_key {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {RUN_COLS} FROM runs WHERE tenant = ?1 AND job = ?2 AND idempotency_key = ?3"
                ))
                .map_err(db_err)?;
            if let Some(run) = st
                .query_row(params![r.tenant, r.job, key], run_from_row)
                .optional()
                .map_err(db_err)?
            {
                out.push(Triggered {
                    run,
                    existing: true,
                });
                continue;
            }
        }
        let run_after = r.run_after.unwrap_or(now);
        let mut st = c
            .prepare_cached(&format!(
                "INSERT INTO runs (id, tenant, job, status, priority, input, variables, run_after,
                    idempotency_key, correlation_id, created_at, updated_at, retriggered_from)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5, '{{}}', ?6, ?7, ?8, ?9, ?9, ?10)
                 RETURNING {RUN_COLS}"
            ))
            .map_err(db_err)?;
        let run = st
            .query_row(
                params![
                    r.id.to_string(),
                    r.tenant,
                    r.job,
                    r.priority,
                    r.input.to_string(),
                    run_after.0,
                    r.idempotency_key,
                    r.correlation_id,
                    now.0,
                    r.retriggered_from.map(|i| i.to_string()),
                ],
                run_from_row,
            )
            .map_err(db_err)?;
        let mut data = json!({ "priority": r.priority, "run_after": run_after });
        if let Some(from) = r.retriggered_from {
            data["retriggered_from"] = json!(from);
        }
        insert_event(
            c,
            run.id,
            &run.tenant,
            &run.job,
            "run_triggered",
            now,
            None,
            None,
            r.actor.as_deref(),
            None,
            &data,
        )?;
        out.push(Triggered {
            run,
            existing: false,
        });
    }
    Ok(out)
}

fn placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn claim(c: &Connection, req: &ClaimRequest) -> Result<Vec<Run>> {
    if req.jobs.is_empty() || req.limit == 0 {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT id FROM runs INDEXED BY runs_claim
         WHERE status IN ('pending', 'postponed') AND run_after <= ?1 AND job IN ({})
           AND {}
         ORDER BY priority DESC, run_after, id LIMIT ?2",
        placeholders(3, req.jobs.len()),
        crate::retention::NOT_PAUSED
    );
    let mut args: Vec<SqlValue> = vec![req.now.0.into(), (req.limit as i64).into()];
    args.extend(req.jobs.iter().map(|j| SqlValue::from(j.clone())));
    let ids: Vec<String> = {
        let mut st = c.prepare_cached(&sql).map_err(db_err)?;
        let rows = st
            .query_map(params_from_iter(args), |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)?
    };
    let expires = req.now.plus_millis(req.lease_ms);
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let lease = LeaseId::new();
        let mut st = c
            .prepare_cached(&format!(
                "UPDATE runs SET status = 'running', attempt = attempt + 1, lease_id = ?2,
                    lease_expires_at = ?3, worker = ?4, updated_at = ?5
                 WHERE id = ?1 RETURNING {RUN_COLS}"
            ))
            .map_err(db_err)?;
        let run = st
            .query_row(
                params![id, lease.to_string(), expires.0, req.worker, req.now.0],
                run_from_row,
            )
            .map_err(db_err)?;
        let mut st = c
            .prepare_cached(
                "INSERT INTO attempts (run_id, attempt, lease_id, worker, started_at, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
            )
            .map_err(db_err)?;
        st.execute(params![
            id,
            run.attempt,
            lease.to_string(),
            req.worker,
            req.now.0
        ])
        .map_err(db_err)?;
        insert_event(
            c,
            run.id,
            &run.tenant,
            &run.job,
            "attempt_started",
            req.now,
            Some(run.attempt),
            Some(lease),
            None,
            None,
            &json!({ "worker": req.worker, "lease_expires_at": expires }),
        )?;
        out.push(run);
    }
    Ok(out)
}

/// The columns a fenced write needs (cheaper than decoding the whole run).
struct Fence {
    id: RunId,
    tenant: String,
    job: String,
    status: RunStatus,
    attempt: u32,
    lease_id: Option<LeaseId>,
    lease_expires_at: Option<Timestamp>,
}

fn fence_row(c: &Connection, id: RunId) -> Result<Option<Fence>> {
    let mut st = c
        .prepare_cached("SELECT tenant, job, status, attempt, lease_id, lease_expires_at FROM runs WHERE id = ?1")
        .map_err(db_err)?;
    st.query_row([id.to_string()], |r| {
        Ok(Fence {
            id,
            tenant: r.get(0)?,
            job: r.get(1)?,
            status: parse("status", r.get(2)?)?,
            attempt: r.get(3)?,
            lease_id: parse_opt("lease id", r.get(4)?)?,
            lease_expires_at: r.get::<_, Option<i64>>(5)?.map(Timestamp),
        })
    })
    .optional()
    .map_err(db_err)
}

/// What a refused attempt end said: kept as evidence (a late report), so the
/// forensic view can see an attempt that went on after its lease was gone.
pub(crate) fn stale_data(
    end: &AttemptEnd,
    status: RunStatus,
    lease: Option<LeaseId>,
    attempt: u32,
) -> Value {
    let mut data = end.refused_data();
    data["current_status"] = json!(status);
    data["current_lease_id"] = json!(lease);
    data["current_attempt"] = json!(attempt);
    data
}

/// Ends attempts. A stale lease is an `Err` in that end's slot (its
/// `stale_write_refused` event is kept). A database error fails the whole
/// call, and the caller's savepoint rolls every end of it back: ends need no
/// savepoint of their own, since each checks its fence before it writes.
pub(super) fn finish_all(c: &Connection, ends: Vec<AttemptEnd>) -> Result<Vec<Result<RunStatus>>> {
    ends.into_iter().map(|e| finish_inner(c, e)).collect()
}

/// Reaps expired leases (see `Store::reap`): an end is applied only while
/// its run is running under its lease and that lease expired by its `now`;
/// any other end writes nothing (not even `stale_write_refused`). One
/// writer thread, so the fence read and the write cannot interleave with
/// another reaper's.
pub(super) fn reap_all(
    c: &Connection,
    ends: Vec<AttemptEnd>,
) -> Result<Vec<Result<Option<RunStatus>>>> {
    ends.into_iter()
        .map(|end| {
            let expired = fence_row(c, end.run_id)?.is_some_and(|f| {
                f.status == RunStatus::Running
                    && f.lease_id == Some(end.lease_id)
                    && f.lease_expires_at.is_some_and(|t| t <= end.now)
            });
            if !expired {
                return Ok(Ok(None));
            }
            Ok(finish_inner(c, end)?.map(Some))
        })
        .collect()
}

fn finish_inner(c: &Connection, end: AttemptEnd) -> Result<Result<RunStatus>> {
    // Nothing is written for an end before its fence passes, so a missing
    // run fails in its own slot (as on PostgreSQL), not the whole batch.
    let Some(run) = fence_row(c, end.run_id)? else {
        return Ok(Err(StoreError::NotFound(end.run_id)));
    };
    let now = end.now;
    if run.status != RunStatus::Running || run.lease_id != Some(end.lease_id) {
        insert_event(
            c,
            run.id,
            &run.tenant,
            &run.job,
            "stale_write_refused",
            now,
            None,
            Some(end.lease_id),
            None,
            None,
            &stale_data(&end, run.status, run.lease_id, run.attempt),
        )?;
        return Ok(Err(StoreError::StaleLease {
            run_id: run.id,
            lease_id: end.lease_id,
            status: run.status,
        }));
    }
    let attempt = run.attempt;
    let lease = Some(end.lease_id);
    let ev = |kind: &str, data: Value| {
        insert_event(
            c,
            run.id,
            &run.tenant,
            &run.job,
            kind,
            now,
            Some(attempt),
            lease,
            None,
            None,
            &data,
        )
    };
    let transition = match &end.outcome {
        Outcome::Completed { .. } => Transition::Complete,
        Outcome::Retry { .. } => Transition::ScheduleRetry,
        Outcome::Failed { .. } => Transition::Fail,
        Outcome::Postponed { .. } => Transition::Postpone,
        Outcome::NeedsInput { .. } => Transition::RequestInput,
        Outcome::Cancelled => Transition::Cancel,
        Outcome::Released => Transition::Release,
    };
    let to = run
        .status
        .apply(transition)
        .map_err(|e| StoreError::WrongState {
            run_id: run.id,
            current: run.status,
            message: e.to_string(),
        })?;
    let id = run.id.to_string();
    let exec = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<()> {
        c.prepare_cached(sql)
            .map_err(db_err)?
            .execute(p)
            .map_err(db_err)?;
        Ok(())
    };
    const CLEAR_LEASE: &str = "lease_id = NULL, lease_expires_at = NULL, worker = NULL";
    match &end.outcome {
        Outcome::Completed { output } => {
            exec(
                &format!("UPDATE runs SET status = 'completed', output = ?2, {CLEAR_LEASE}, updated_at = ?3, finished_at = ?3, cancel_requested = 0 WHERE id = ?1"),
                &[&id, &output.to_string(), &now.0],
            )?;
            exec(
                "UPDATE attempts SET finished_at = ?3, outcome = 'completed' WHERE run_id = ?1 AND attempt = ?2",
                &[&id, &attempt, &now.0],
            )?;
            ev("run_completed", json!({}))?;
        }
        Outcome::Retry { error, retry } => {
            exec(
                &format!("UPDATE runs SET status = 'pending', run_after = ?2, {CLEAR_LEASE}, updated_at = ?3,
                    last_error_class = ?4, last_error_message = ?5, attempts_forgiven = attempts_forgiven + ?6
                 WHERE id = ?1"),
                // A circuit breaker's deferral consumes no attempt budget.
                &[&id, &retry.eligible_at.0, &now.0, &error.class.as_str(), &error.message, &i64::from(docket_core::policy::RetryReason::is_deferral(&retry.reason))],
            )?;
            // A deferral (an open breaker, an action in flight elsewhere) sent
            // nothing: not a failure.
            let deferred = docket_core::policy::RetryReason::is_deferral(&retry.reason);
            let outcome = if error.class == ErrorClass::LeaseExpired {
                "lease_expired"
            } else if deferred {
                "deferred"
            } else {
                "failed"
            };
            exec(
                "UPDATE attempts SET finished_at = ?3, outcome = ?4, error_class = ?5, error_message = ?6,
                    fingerprint = ?7, failure_key = ?8, action = ?9, retry_policy = ?10, delay_ms = ?11,
                    eligible_at = ?12, retry_reason = ?13
                 WHERE run_id = ?1 AND attempt = ?2",
                &[&id, &attempt, &now.0, &outcome, &error.class.as_str(), &error.message, &error.fingerprint,
                  &error.failure_key, &error.action, &retry.policy, &retry.delay_ms, &retry.eligible_at.0, &retry.reason],
            )?;
            if error.class == ErrorClass::LeaseExpired {
                ev(
                    "lease_expired",
                    json!({ "lease_expires_at": run.lease_expires_at }),
                )?;
            }
            if deferred {
                ev(
                    "attempt_deferred",
                    json!({ "message": error.message, "action": error.action }),
                )?;
            } else {
                ev(
                    "attempt_failed",
                    json!({ "error_class": error.class, "message": error.message, "fingerprint": error.fingerprint, "action": error.action }),
                )?;
            }
            ev(
                "retry_scheduled",
                json!({ "retry_policy": retry.policy, "delay_ms": retry.delay_ms, "eligible_at": retry.eligible_at, "reason": retry.reason, "next_attempt": attempt + 1 }),
            )?;
        }
        Outcome::Failed {
            error,
            reason,
            detail,
        } => {
            let (class, msg) = match error {
                Some(e) => (Some(e.class.as_str()), Some(e.message.clone())),
                None => (None, Some(detail.clone())),
            };
            exec(
                &format!("UPDATE runs SET status = 'failed', {CLEAR_LEASE}, updated_at = ?2, finished_at = ?2,
                    terminal_reason = ?3, last_error_class = COALESCE(?4, last_error_class), last_error_message = ?5,
                    cancel_requested = 0 WHERE id = ?1"),
                &[&id, &now.0, &reason.as_str(), &class, &msg],
            )?;
            let outcome = match error {
                Some(e) if e.class == ErrorClass::LeaseExpired => "lease_expired",
                Some(_) => "failed",
                None => "unresolved",
            };
            exec(
                "UPDATE attempts SET finished_at = ?3, outcome = ?4, error_class = ?5, error_message = ?6,
                    fingerprint = ?7, failure_key = ?8, action = ?9
                 WHERE run_id = ?1 AND attempt = ?2",
                &[&id, &attempt, &now.0, &outcome, &class, &msg,
                  &error.as_ref().map(|e| e.fingerprint.clone()), &error.as_ref().map(|e| e.failure_key.clone()),
                  &error.as_ref().and_then(|e| e.action.clone())],
            )?;
            if let Some(e) = error {
                if e.class == ErrorClass::LeaseExpired {
                    ev(
                        "lease_expired",
                        json!({ "lease_expires_at": run.lease_expires_at }),
                    )?;
                }
                ev(
                    "attempt_failed",
                    json!({ "error_class": e.class, "message": e.message, "fingerprint": e.fingerprint, "action": e.action }),
                )?;
            }
            ev(
                "run_failed",
                json!({ "reason": reason, "detail": detail, "advice": reason.advice() }),
            )?;
        }
        Outcome::Postponed { until } => {
            exec(
                &format!("UPDATE runs SET status = 'postponed', run_after = ?2, {CLEAR_LEASE}, updated_at = ?3,
                    attempts_forgiven = attempts_forgiven + 1 WHERE id = ?1"),
                &[&id, &until.0, &now.0],
            )?;
            exec(
                "UPDATE attempts SET finished_at = ?3, outcome = 'postponed', eligible_at = ?4 WHERE run_id = ?1 AND attempt = ?2",
                &[&id, &attempt, &now.0, &until.0],
            )?;
            ev("run_postponed", json!({ "until": until, "by": "handler" }))?;
        }
        Outcome::NeedsInput { name, request } => {
            let req = json!({ "name": name, "request": request });
            exec(
                &format!("UPDATE runs SET status = 'needs_input', input_request = ?2, {CLEAR_LEASE}, updated_at = ?3,
                    attempts_forgiven = attempts_forgiven + 1 WHERE id = ?1"),
                &[&id, &req.to_string(), &now.0],
            )?;
            exec(
                "UPDATE attempts SET finished_at = ?3, outcome = 'needs_input' WHERE run_id = ?1 AND attempt = ?2",
                &[&id, &attempt, &now.0],
            )?;
            ev("input_requested", req)?;
        }
        Outcome::Cancelled => {
            exec(
                &format!("UPDATE runs SET status = 'cancelled', {CLEAR_LEASE}, updated_at = ?2, finished_at = ?2 WHERE id = ?1"),
                &[&id, &now.0],
            )?;
            exec(
                "UPDATE attempts SET finished_at = ?3, outcome = 'cancelled' WHERE run_id = ?1 AND attempt = ?2",
                &[&id, &attempt, &now.0],
            )?;
            ev("run_cancelled", json!({ "at_step_boundary": true }))?;
        }
        Outcome::Released => {
            exec(
                &format!("UPDATE runs SET status = 'pending', run_after = ?2, {CLEAR_LEASE}, updated_at = ?2,
                    attempts_forgiven = attempts_forgiven + 1 WHERE id = ?1"),
                &[&id, &now.0],
            )?;
            exec(
                "UPDATE attempts SET finished_at = ?3, outcome = 'released' WHERE run_id = ?1 AND attempt = ?2",
                &[&id, &attempt, &now.0],
            )?;
            ev("attempt_released", json!({ "reason": "worker shutdown" }))?;
        }
    }
    Ok(Ok(to))
}

pub(super) fn heartbeat(
    c: &Connection,
    leases: &[LeaseRef],
    expires_at: Timestamp,
) -> Result<Vec<LeaseState>> {
    let mut st = c
        .prepare_cached(
            "UPDATE runs SET lease_expires_at = ?3
             WHERE id = ?1 AND lease_id = ?2 AND status = 'running' RETURNING cancel_requested",
        )
        .map_err(db_err)?;
    leases
        .iter()
        .map(|l| {
            let r: Option<i64> = st
                .query_row(
                    params![l.run_id.to_string(), l.lease_id.to_string(), expires_at.0],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            Ok(match r {
                Some(cancel) => LeaseState {
                    held: true,
                    cancel_requested: cancel != 0,
                },
                None => LeaseState {
                    held: false,
                    cancel_requested: false,
                },
            })
        })
        .collect()
}

pub(super) fn expired_leases(c: &Connection, now: Timestamp, limit: usize) -> Result<Vec<Run>> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE status = 'running' AND lease_expires_at <= ?1
             ORDER BY lease_expires_at LIMIT ?2"
        ))
        .map_err(db_err)?;
    let rows = st
        .query_map(params![now.0, limit as i64], run_from_row)
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

pub(super) fn next_due(c: &Connection, jobs: &[String]) -> Result<Option<Timestamp>> {
    if jobs.is_empty() {
        return Ok(None);
    }
    let sql = format!(
        "SELECT MIN(run_after) FROM runs WHERE status IN ('pending', 'postponed') AND job IN ({}) AND {}",
        placeholders(1, jobs.len()),
        crate::retention::NOT_PAUSED
    );
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let v: Option<i64> = st
        .query_row(params_from_iter(jobs.iter()), |r| r.get(0))
        .map_err(db_err)?;
    Ok(v.map(Timestamp))
}

pub(super) fn list_runs(c: &Connection, f: &RunFilter) -> Result<Vec<Run>> {
    let mut sql = format!("SELECT {RUN_COLS} FROM runs WHERE 1 = 1");
    let mut args: Vec<SqlValue> = Vec::new();
    let mut push = |sql: &mut String, clause: &str, v: SqlValue| {
        args.push(v);
        sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
    };
    if let Some(t) = &f.tenant {
        push(&mut sql, " AND tenant = ?", t.clone().into());
    }
    if let Some(j) = &f.job {
        push(&mut sql, " AND job = ?", j.clone().into());
    }
    if let Some(t) = f.created_after {
        push(&mut sql, " AND created_at >= ?", t.0.into());
    }
    if let Some(t) = f.created_before {
        push(&mut sql, " AND created_at < ?", t.0.into());
    }
    if let Some(id) = f.before_id {
        push(&mut sql, " AND id < ?", id.to_string().into());
    }
    if !f.statuses.is_empty() {
        // Written as literals, sorted: they come from the `RunStatus` enum
        // (never from input), and only a literal list can match the partial
        // index `runs_attention` (`status IN ('failed', 'needs_input')`) —
        // the planner cannot prove a bound parameter implies it.
        let mut names: Vec<&str> = f.statuses.iter().map(|s| s.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
        sql.push_str(&format!(" AND status IN ({})", list.join(", ")));
    }
    let limit = if f.limit == 0 { 100 } else { f.limit };
    push(&mut sql, " ORDER BY id DESC LIMIT ?", (limit as i64).into());
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let rows = st
        .query_map(params_from_iter(args), run_from_row)
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

pub(super) fn count_runs(c: &Connection, tenant: Option<&str>) -> Result<Vec<StatusCount>> {
    let mut st = c
        .prepare_cached(
            "SELECT job, status, COUNT(*) FROM runs WHERE (?1 IS NULL OR tenant = ?1)
             GROUP BY job, status ORDER BY job, status",
        )
        .map_err(db_err)?;
    let rows = st
        .query_map([tenant], |r| {
            Ok(StatusCount {
                job: r.get(0)?,
                status: parse("status", r.get(1)?)?,
                count: r.get(2)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

pub(super) fn attempts(c: &Connection, run_id: RunId) -> Result<Vec<AttemptRecord>> {
    let mut st = c
        .prepare_cached(
            "SELECT run_id, attempt, lease_id, worker, started_at, finished_at, outcome, error_class,
                error_message, fingerprint, failure_key, action, retry_policy, delay_ms, eligible_at, retry_reason
             FROM attempts WHERE run_id = ?1 ORDER BY attempt",
        )
        .map_err(db_err)?;
    let rows = st
        .query_map([run_id.to_string()], |r| {
            Ok(AttemptRecord {
                run_id: parse("run id", r.get(0)?)?,
                attempt: r.get(1)?,
                lease_id: parse("lease id", r.get(2)?)?,
                worker: r.get(3)?,
                started_at: Timestamp(r.get(4)?),
                finished_at: r.get::<_, Option<i64>>(5)?.map(Timestamp),
                outcome: r.get(6)?,
                error_class: parse_opt("error class", r.get(7)?)?,
                error_message: r.get(8)?,
                fingerprint: r.get(9)?,
                failure_key: r.get(10)?,
                action: r.get(11)?,
                retry_policy: r.get(12)?,
                delay_ms: r.get(13)?,
                eligible_at: r.get::<_, Option<i64>>(14)?.map(Timestamp),
                retry_reason: r.get(15)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

pub(super) fn events(c: &Connection, f: &EventFilter) -> Result<Vec<EventRecord>> {
    let limit = if f.limit == 0 { 1000 } else { f.limit };
    let mut st = c
        .prepare_cached(
            "SELECT id, run_id, tenant, job, kind, at, attempt, lease_id, actor, comment, data FROM events
             WHERE (?1 IS NULL OR run_id = ?1) AND (?2 IS NULL OR tenant = ?2) AND (?3 IS NULL OR job = ?3)
               AND id > ?4
             ORDER BY id LIMIT ?5",
        )
        .map_err(db_err)?;
    let rows = st
        .query_map(
            params![
                f.run_id.map(|r| r.to_string()),
                f.tenant,
                f.job,
                f.after_id.unwrap_or(0),
                limit as i64
            ],
            |r| {
                Ok(EventRecord {
                    id: r.get(0)?,
                    run_id: parse("run id", r.get(1)?)?,
                    tenant: r.get(2)?,
                    job: r.get(3)?,
                    kind: r.get(4)?,
                    at: Timestamp(r.get(5)?),
                    attempt: r.get(6)?,
                    lease_id: parse_opt("lease id", r.get(7)?)?,
                    actor: r.get(8)?,
                    comment: r.get(9)?,
                    data: json_col(r.get(10)?)?,
                })
            },
        )
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

// ---- durable steps, ledger, events, operator commands ----

/// Checks the lease holds the run; when it does not, records
/// `stale_write_refused` and answers the error for the caller's slot.
fn fence(
    c: &Connection,
    lease: LeaseRef,
    attempted: &str,
    now: Timestamp,
) -> Result<Result<Fence>> {
    let run = fence_row(c, lease.run_id)?.ok_or(StoreError::NotFound(lease.run_id))?;
    if run.status == RunStatus::Running && run.lease_id == Some(lease.lease_id) {
        return Ok(Ok(run));
    }
    insert_event(
        c,
        run.id,
        &run.tenant,
        &run.job,
        "stale_write_refused",
        now,
        None,
        Some(lease.lease_id),
        None,
        None,
        &json!({
            "attempted": attempted,
            "current_status": run.status,
            "current_lease_id": run.lease_id,
            "current_attempt": run.attempt,
        }),
    )?;
    Ok(Err(StoreError::StaleLease {
        run_id: run.id,
        lease_id: lease.lease_id,
        status: run.status,
    }))
}

fn step_from_row(r: &Row<'_>) -> rusqlite::Result<StepRecord> {
    Ok(StepRecord {
        run_id: parse("run id", r.get(0)?)?,
        name: r.get(1)?,
        status: parse("step status", r.get(2)?)?,
        result: json_opt(r.get(3)?)?,
        error_class: parse_opt("error class", r.get(4)?)?,
        error_message: r.get(5)?,
        attempt: r.get(6)?,
        updated_at: Timestamp(r.get(7)?),
        actor: r.get(8)?,
        comment: r.get(9)?,
    })
}

pub(super) fn steps(c: &Connection, run_id: RunId) -> Result<Vec<StepRecord>> {
    let mut st = c
        .prepare_cached(
            "SELECT run_id, name, status, result, error_class, error_message, attempt, updated_at, actor, comment
             FROM steps WHERE run_id = ?1 ORDER BY updated_at, name",
        )
        .map_err(db_err)?;
    let rows = st
        .query_map([run_id.to_string()], step_from_row)
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

pub(super) fn save_step(
    c: &Connection,
    lease: LeaseRef,
    name: &str,
    result: &Value,
    now: Timestamp,
) -> Result<Result<LeaseState>> {
    let run = match fence(c, lease, "step_completed", now)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let existing: Option<String> = c
        .prepare_cached("SELECT status FROM steps WHERE run_id = ?1 AND name = ?2")
        .map_err(db_err)?
        .query_row(params![run.id.to_string(), name], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    if matches!(existing.as_deref(), Some("completed") | Some("skipped")) {
        return Ok(Err(StoreError::Conflict(format!(
            "step `{name}` of run {} is already {}; step names must be unique within a run",
            run.id,
            existing.unwrap_or_default()
        ))));
    }
    c.prepare_cached(
        "INSERT INTO steps (run_id, name, status, result, attempt, updated_at)
         VALUES (?1, ?2, 'completed', ?3, ?4, ?5)
         ON CONFLICT (run_id, name) DO UPDATE SET status = 'completed', result = excluded.result,
            error_class = NULL, error_message = NULL, attempt = excluded.attempt, updated_at = excluded.updated_at",
    )
    .map_err(db_err)?
    .execute(params![run.id.to_string(), name, result.to_string(), run.attempt, now.0])
    .map_err(db_err)?;
    attempt_event(
        c,
        &run,
        lease,
        "step_completed",
        now,
        &json!({ "step": name }),
    )?;
    let cancel: i64 = c
        .prepare_cached("SELECT cancel_requested FROM runs WHERE id = ?1")
        .map_err(db_err)?
        .query_row([run.id.to_string()], |r| r.get(0))
        .map_err(db_err)?;
    Ok(Ok(LeaseState {
        held: true,
        cancel_requested: cancel != 0,
    }))
}

/// Records a failed step with a `step_failed` event, fenced by the lease,
/// unless the step already completed or was skipped.
pub(super) fn fail_step(
    c: &Connection,
    lease: LeaseRef,
    name: &str,
    class: ErrorClass,
    message: &str,
    now: Timestamp,
) -> Result<Result<()>> {
    let run = match fence(c, lease, "step_failed", now)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let n = c
        .prepare_cached(
            "INSERT INTO steps (run_id, name, status, error_class, error_message, attempt, updated_at)
             VALUES (?1, ?2, 'failed', ?3, ?4, ?5, ?6)
             ON CONFLICT (run_id, name) DO UPDATE SET status = 'failed', error_class = excluded.error_class,
                error_message = excluded.error_message, attempt = excluded.attempt, updated_at = excluded.updated_at
             WHERE steps.status = 'failed'",
        )
        .map_err(db_err)?
        .execute(params![run.id.to_string(), name, class.as_str(), message, run.attempt, now.0])
        .map_err(db_err)?;
    if n == 0 {
        return Ok(Err(StoreError::Conflict(format!(
            "step `{name}` of run {} is already completed or skipped",
            run.id
        ))));
    }
    attempt_event(
        c,
        &run,
        lease,
        "step_failed",
        now,
        &json!({ "step": name, "error_class": class, "message": message }),
    )?;
    Ok(Ok(()))
}

fn ledger_from_row(r: &Row<'_>) -> rusqlite::Result<LedgerEntry> {
    Ok(LedgerEntry {
        tenant: r.get(0)?,
        idempotency_key: r.get(1)?,
        action: r.get(2)?,
        run_id: parse("run id", r.get(3)?)?,
        attempt: r.get(4)?,
        lease_id: parse("lease id", r.get(5)?)?,
        state: parse("ledger state", r.get(6)?)?,
        result: json_opt(r.get(7)?)?,
        error_class: parse_opt("error class", r.get(8)?)?,
        error_message: r.get(9)?,
        created_at: Timestamp(r.get(10)?),
        updated_at: Timestamp(r.get(11)?),
    })
}

const LEDGER_COLS: &str = "tenant, idempotency_key, action, run_id, attempt, lease_id, state, result, error_class, error_message, created_at, updated_at";

pub(super) fn ledger_get(c: &Connection, tenant: &str, key: &str) -> Result<Option<LedgerEntry>> {
    c.prepare_cached(&format!(
        "SELECT {LEDGER_COLS} FROM ledger WHERE tenant = ?1 AND idempotency_key = ?2"
    ))
    .map_err(db_err)?
    .query_row(params![tenant, key], ledger_from_row)
    .optional()
    .map_err(db_err)
}

pub(super) fn ledger_for_run(c: &Connection, run_id: RunId) -> Result<Vec<LedgerEntry>> {
    let mut st = c
        .prepare_cached(&format!("SELECT {LEDGER_COLS} FROM ledger WHERE run_id = ?1 ORDER BY created_at, idempotency_key"))
        .map_err(db_err)?;
    let rows = st
        .query_map([run_id.to_string()], ledger_from_row)
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

/// The holder of a `started` row held by another lease, read from its run.
fn ledger_holder(c: &Connection, row: &LedgerEntry, now: Timestamp) -> Result<Holder> {
    let run = fence_row(c, row.run_id)?;
    Ok(match run {
        Some(r) => Holder::from_run(
            r.status == RunStatus::Running,
            r.lease_id,
            r.lease_expires_at,
            row.lease_id,
            now,
        ),
        None => Holder::Gone,
    })
}

pub(super) fn ledger_begin(
    c: &Connection,
    lease: LeaseRef,
    key: &str,
    action: &str,
    now: Timestamp,
) -> Result<Result<LedgerBegin>> {
    let run = match fence(c, lease, "action_started", now)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let current = ledger_get(c, &run.tenant, key)?;
    let holder = match &current {
        Some(row) if row.state == LedgerState::Started && row.lease_id != lease.lease_id => {
            ledger_holder(c, row, now)?
        }
        _ => Holder::Gone,
    };
    let plan = plan::ledger_begin(current.as_ref(), holder, lease.lease_id);
    let ev = |kind: &str, data: Value| attempt_event(c, &run, lease, kind, now, &data);
    match plan {
        BeginPlan::Insert | BeginPlan::TakeOver { .. } => {
            c.prepare_cached(
                "INSERT INTO ledger (tenant, idempotency_key, action, run_id, attempt, lease_id, state, result, error_class, error_message, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'started', NULL, NULL, NULL, ?7, ?7)
                 ON CONFLICT (tenant, idempotency_key) DO UPDATE SET action = excluded.action, run_id = excluded.run_id,
                    attempt = excluded.attempt, lease_id = excluded.lease_id, state = 'started', result = NULL,
                    error_class = NULL, error_message = NULL, updated_at = excluded.updated_at",
            )
            .map_err(db_err)?
            .execute(params![
                run.tenant,
                key,
                action,
                run.id.to_string(),
                run.attempt,
                lease.lease_id.to_string(),
                now.0
            ])
            .map_err(db_err)?;
            ev(
                "action_started",
                plan::begin_event(action, key, current.as_ref(), plan),
            )?;
            let reconcile_first = matches!(
                plan,
                BeginPlan::TakeOver {
                    reconcile_first: true
                }
            );
            Ok(Ok(LedgerBegin::Acquired {
                previous: current,
                reconcile_first,
            }))
        }
        BeginPlan::ReturnCommitted => Ok(Ok(LedgerBegin::Committed(
            current.expect("a committed plan has a row"),
        ))),
        BeginPlan::InFlight {
            holder_lease_expires_at,
        } => {
            let entry = current.expect("an in-flight plan has a row");
            ev(
                "action_in_flight",
                plan::in_flight_event(&entry, holder_lease_expires_at),
            )?;
            Ok(Ok(LedgerBegin::InFlight {
                entry,
                holder_lease_expires_at,
            }))
        }
    }
}

pub(super) fn ledger_write(
    c: &Connection,
    lease: LeaseRef,
    w: &LedgerWrite,
    event: &str,
    now: Timestamp,
) -> Result<Result<()>> {
    let run = match fence(c, lease, event, now)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let current = ledger_get(c, &run.tenant, &w.idempotency_key)?;
    let (kind, data, answer) = match plan::ledger_write(current.as_ref(), lease.lease_id, w.state) {
        Ok(()) => {
            c.prepare_cached(
                "UPDATE ledger SET state = ?3, result = ?4, error_class = ?5, error_message = ?6, updated_at = ?7
                 WHERE tenant = ?1 AND idempotency_key = ?2",
            )
            .map_err(db_err)?
            .execute(params![
                run.tenant,
                w.idempotency_key,
                w.state.as_str(),
                w.result.as_ref().map(|v| v.to_string()),
                w.error_class.map(|e| e.as_str()),
                w.error_message,
                now.0
            ])
            .map_err(db_err)?;
            (event, plan::write_event(w), Ok(()))
        }
        Err(refusal) => (
            "ledger_write_refused",
            plan::refused_event(w, event, &refusal),
            Err(plan::refusal_error(w, &refusal, run.id)),
        ),
    };
    attempt_event(c, &run, lease, kind, now, &data)?;
    Ok(answer)
}

/// An event on a fenced run, under the attempt's lease (the ledger's and
/// the handler's own events).
fn attempt_event(
    c: &Connection,
    run: &Fence,
    lease: LeaseRef,
    kind: &str,
    now: Timestamp,
    data: &Value,
) -> Result<()> {
    insert_event(
        c,
        run.id,
        &run.tenant,
        &run.job,
        kind,
        now,
        Some(run.attempt),
        Some(lease.lease_id),
        None,
        None,
        data,
    )
}

pub(super) fn append_event(
    c: &Connection,
    lease: LeaseRef,
    kind: &str,
    data: &Value,
    now: Timestamp,
) -> Result<Result<()>> {
    let run = match fence(c, lease, kind, now)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    attempt_event(c, &run, lease, kind, now, data)?;
    Ok(Ok(()))
}

fn wrong_state(run: &Run, message: String) -> StoreError {
    StoreError::WrongState {
        run_id: run.id,
        current: run.status,
        message,
    }
}

pub(super) fn operator(c: &Connection, req: &OperatorRequest) -> Result<Run> {
    let run = get_run(c, req.run_id)?.ok_or(StoreError::NotFound(req.run_id))?;
    let id = run.id.to_string();
    let now = req.now;
    let actor = Some(req.actor.as_str());
    let comment = req.comment.as_deref();
    let ev = |kind: &str, data: Value| {
        insert_event(
            c,
            run.id,
            &run.tenant,
            &run.job,
            kind,
            now,
            None,
            None,
            actor,
            comment,
            &data,
        )
    };
    let exec = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<()> {
        c.prepare_cached(sql)
            .map_err(db_err)?
            .execute(p)
            .map_err(db_err)?;
        Ok(())
    };
    let check = |t: Transition| {
        run.status
            .apply(t)
            .map_err(|e| wrong_state(&run, e.to_string()))
    };
    match &req.command {
        OperatorCommand::Cancel => {
            check(Transition::Cancel)?;
            if run.status == RunStatus::Running {
                exec(
                    "UPDATE runs SET cancel_requested = 1, updated_at = ?2 WHERE id = ?1",
                    &[&id, &now.0],
                )?;
                ev("cancel_requested", json!({ "at_step_boundary": true }))?;
            } else {
                exec("UPDATE runs SET status = 'cancelled', input_request = NULL, updated_at = ?2, finished_at = ?2 WHERE id = ?1", &[&id, &now.0])?;
                ev("run_cancelled", json!({ "from": run.status }))?;
            }
        }
        OperatorCommand::Postpone { until } => {
            if run.status == RunStatus::Running {
                return Err(wrong_state(&run, "cannot postpone a run that is running: its handler can postpone itself, or cancel it".into()));
            }
            check(Transition::Postpone)?;
            exec("UPDATE runs SET status = 'postponed', run_after = ?2, input_request = NULL, updated_at = ?3 WHERE id = ?1", &[&id, &until.0, &now.0])?;
            ev(
                "run_postponed",
                json!({ "until": until, "by": "operator", "from": run.status }),
            )?;
        }
        OperatorCommand::Approve { data } | OperatorCommand::Reject { data } => {
            check(Transition::Decide)?;
            let approved = matches!(req.command, OperatorCommand::Approve { .. });
            let name = run
                .input_request
                .as_ref()
                .and_then(|r| r.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("input")
                .to_string();
            let decision =
                json!({ "decision": if approved { "approved" } else { "rejected" }, "data": data });
            exec(
                "INSERT INTO steps (run_id, name, status, result, attempt, updated_at, actor, comment)
                 VALUES (?1, ?2, 'completed', ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (run_id, name) DO UPDATE SET status = 'completed', result = excluded.result,
                    updated_at = excluded.updated_at, actor = excluded.actor, comment = excluded.comment",
                &[&id, &format!("input:{name}"), &decision.to_string(), &run.attempt, &now.0, &req.actor, &req.comment],
            )?;
            exec("UPDATE runs SET status = 'pending', run_after = ?2, input_request = NULL, updated_at = ?2 WHERE id = ?1", &[&id, &now.0])?;
            ev(
                "input_received",
                json!({ "name": name, "decision": decision["decision"], "data": data }),
            )?;
        }
        OperatorCommand::Retry { updated_variables } => {
            check(Transition::OperatorRetry)?;
            let vars = match updated_variables {
                Some(p) => crate::merge_variables(&run.variables, p),
                None => run.variables.clone(),
            };
            exec(
                "UPDATE runs SET status = 'pending', run_after = ?2, variables = ?3, terminal_reason = NULL, finished_at = NULL,
                    attempts_forgiven = attempt, updated_at = ?2 WHERE id = ?1",
                &[&id, &now.0, &vars.to_string()],
            )?;
            exec(
                "DELETE FROM steps WHERE run_id = ?1 AND status = 'failed'",
                &[&id],
            )?;
            ev(
                "operator_retry",
                json!({ "updated_variables": updated_variables, "previous_reason": run.terminal_reason, "fresh_attempt_budget": true }),
            )?;
        }
        OperatorCommand::Skip => {
            check(Transition::OperatorSkip)?;
            let failed: Option<String> = c
                .prepare_cached("SELECT name FROM steps WHERE run_id = ?1 AND status = 'failed' ORDER BY updated_at DESC, name LIMIT 1")
                .map_err(db_err)?
                .query_row([&id], |r| r.get(0))
                .optional()
                .map_err(db_err)?;
            let Some(step) = failed else {
                return Err(wrong_state(&run, "the run failed outside any step, so there is no failed step to skip; retry or retrigger it".into()));
            };
            exec(
                "UPDATE steps SET status = 'skipped', actor = ?3, comment = ?4, updated_at = ?5 WHERE run_id = ?1 AND name = ?2",
                &[&id, &step, &req.actor, &req.comment, &now.0],
            )?;
            exec(
                "UPDATE runs SET status = 'pending', run_after = ?2, terminal_reason = NULL, finished_at = NULL,
                    attempts_forgiven = attempt, updated_at = ?2 WHERE id = ?1",
                &[&id, &now.0],
            )?;
            ev("step_skipped", json!({ "step": step }))?;
            ev(
                "operator_skip",
                json!({ "step": step, "previous_reason": run.terminal_reason }),
            )?;
        }
    }
    get_run(c, run.id)?.ok_or(StoreError::NotFound(run.id))
}
