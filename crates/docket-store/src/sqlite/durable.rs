//! Durable steps, the side-effect ledger, appended events and operator
//! commands on SQLite (the same concerns as `postgres/durable.rs`). Every
//! lease-fenced write checks its fence first, on the writer thread, so the
//! check and the write cannot interleave with another writer's.

use crate::{
    LeaseRef, LeaseState, LedgerEntry, LedgerWrite, OperatorRequest, Result, Run, StepRecord,
    StoreError,
};
use docket_core::{ErrorClass, EventKind, RunId, RunStatus, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::Value;

use super::db_err;
use super::ops::*;
use crate::plan::{self, BeginPlan, Holder};
use crate::{LedgerBegin, LedgerState};

// ---- durable steps, ledger, events, operator commands ----

/// Checks the lease holds the run; when it does not, records
/// `stale_write_refused` and answers the error for the caller's slot.
pub(super) fn fence(
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
        &EventKind::StaleWriteRefused,
        now,
        None,
        Some(lease.lease_id),
        None,
        None,
        &plan::stale_write(attempted, run.status, run.lease_id, run.attempt),
    )?;
    Ok(Err(StoreError::StaleLease {
        run_id: run.id,
        lease_id: lease.lease_id,
        status: run.status,
    }))
}

pub(super) fn step_from_row(r: &Row<'_>) -> rusqlite::Result<StepRecord> {
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
    if let Err(e) = plan::step::may_write(existing.as_deref(), run.id, name) {
        return Ok(Err(e));
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
    let ev = plan::step::completed(name);
    attempt_event(c, &run, lease, &ev.kind, now, &ev.data)?;
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
    let ev = plan::step::failed(name, class, message);
    attempt_event(c, &run, lease, &ev.kind, now, &ev.data)?;
    Ok(Ok(()))
}

pub(super) fn ledger_from_row(r: &Row<'_>) -> rusqlite::Result<LedgerEntry> {
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

pub(super) const LEDGER_COLS: &str = "tenant, idempotency_key, action, run_id, attempt, lease_id, state, result, error_class, error_message, created_at, updated_at";

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
pub(super) fn ledger_holder(c: &Connection, row: &LedgerEntry, now: Timestamp) -> Result<Holder> {
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
    let ev = |kind: EventKind, data: Value| attempt_event(c, &run, lease, &kind, now, &data);
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
                EventKind::ActionStarted,
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
                EventKind::ActionInFlight,
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
    event: &EventKind,
    now: Timestamp,
) -> Result<Result<()>> {
    let run = match fence(c, lease, event.as_str(), now)? {
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
            (event.clone(), plan::write_event(w), Ok(()))
        }
        Err(refusal) => (
            EventKind::LedgerWriteRefused,
            plan::refused_event(w, event.as_str(), &refusal),
            Err(plan::refusal_error(w, &refusal, run.id)),
        ),
    };
    attempt_event(c, &run, lease, &kind, now, &data)?;
    Ok(answer)
}

/// An event on a fenced run, under the attempt's lease (the ledger's and
/// the handler's own events).
pub(super) fn attempt_event(
    c: &Connection,
    run: &Fence,
    lease: LeaseRef,
    kind: &EventKind,
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
    kind: &EventKind,
    data: &Value,
    now: Timestamp,
) -> Result<Result<()>> {
    let run = match fence(c, lease, kind.as_str(), now)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    attempt_event(c, &run, lease, kind, now, data)?;
    Ok(Ok(()))
}

pub(super) fn operator(c: &Connection, req: &OperatorRequest) -> Result<Run> {
    let run = get_run(c, req.run_id)?.ok_or(StoreError::NotFound(req.run_id))?;
    let failed_step = if plan::operator::needs_failed_step(&req.command) {
        c.prepare_cached("SELECT name FROM steps WHERE run_id = ?1 AND status = 'failed' ORDER BY updated_at DESC, name LIMIT 1")
            .map_err(db_err)?
            .query_row([run.id.to_string()], |r| r.get::<_, String>(0))
            .optional()
            .map_err(db_err)?
    } else {
        None
    };
    let p = plan::operator::operator(&run, &req.command, failed_step.as_deref(), req.now)?;
    persist_operator(c, &run, req, &p)?;
    if p.run.finish {
        super::children::fan_in_of(c, run.id, req.now)?;
    }
    if matches!(req.command, crate::OperatorCommand::Cancel) {
        super::children::cascade_cancel(c, run.id, req)?;
    }
    get_run(c, run.id)?.ok_or(StoreError::NotFound(run.id))
}

/// Persists a command's plan: the run, the step write, the events (each
/// with the operator and the comment), as PostgreSQL does.
pub(super) fn persist_operator(
    c: &Connection,
    run: &Run,
    req: &OperatorRequest,
    p: &plan::operator::OperatorPlan,
) -> Result<()> {
    use plan::operator::StepWrite;
    let id = run.id.to_string();
    let now = req.now.0;
    let w = &p.run;
    c.prepare_cached(
        "UPDATE runs SET status = ?2, run_after = COALESCE(?3, run_after), variables = COALESCE(?4, variables),
            terminal_reason = CASE WHEN ?5 THEN NULL ELSE terminal_reason END,
            finished_at = CASE WHEN ?5 THEN NULL WHEN ?6 THEN ?10 ELSE finished_at END,
            attempts_forgiven = CASE WHEN ?7 THEN attempt ELSE attempts_forgiven END,
            input_request = CASE WHEN ?8 THEN NULL ELSE input_request END,
            cancel_requested = cancel_requested OR ?9,
            updated_at = ?10
         WHERE id = ?1",
    )
    .map_err(db_err)?
    .execute(params![
        id,
        w.status.as_str(),
        w.run_after.map(|t| t.0),
        w.variables.as_ref().map(Value::to_string),
        w.reopen,
        w.finish,
        w.reset_budget,
        w.clear_input_request,
        w.request_cancel,
        now,
    ])
    .map_err(db_err)?;
    match &p.step {
        None => {}
        Some(StepWrite::Decide { name, result }) => {
            c.prepare_cached(
                "INSERT INTO steps (run_id, name, status, result, attempt, updated_at, actor, comment)
                 VALUES (?1, ?2, 'completed', ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (run_id, name) DO UPDATE SET status = 'completed', result = excluded.result,
                    updated_at = excluded.updated_at, actor = excluded.actor, comment = excluded.comment",
            )
            .map_err(db_err)?
            .execute(params![id, name, result.to_string(), run.attempt, now, req.actor, req.comment])
            .map_err(db_err)?;
        }
        Some(StepWrite::Skip { name }) => {
            c.prepare_cached(
                "UPDATE steps SET status = 'skipped', actor = ?3, comment = ?4, updated_at = ?5 WHERE run_id = ?1 AND name = ?2",
            )
            .map_err(db_err)?
            .execute(params![id, name, req.actor, req.comment, now])
            .map_err(db_err)?;
        }
        Some(StepWrite::DeleteFailed) => {
            c.prepare_cached("DELETE FROM steps WHERE run_id = ?1 AND status = 'failed'")
                .map_err(db_err)?
                .execute([&id])
                .map_err(db_err)?;
        }
    }
    for e in &p.events {
        insert_event(
            c,
            run.id,
            &run.tenant,
            &run.job,
            &e.kind,
            req.now,
            None,
            None,
            Some(req.actor.as_str()),
            req.comment.as_deref(),
            &e.data,
        )?;
    }
    Ok(())
}
