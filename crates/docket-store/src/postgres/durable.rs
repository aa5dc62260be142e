//! Durable steps, the side-effect ledger, appended events and operator
//! commands on PostgreSQL, mirroring `sqlite/ops.rs` statement for statement.
//! Each public function is one transaction; lease-fenced writes lock the run
//! row (`FOR UPDATE`) before checking the fence.

use super::db;
use super::ops::{get_run, json_opt, run_from_row, RUN_COLS};
use crate::plan::{self, BeginPlan, Holder};
use crate::{
    LeaseRef, LeaseState, LedgerBegin, LedgerEntry, LedgerState, LedgerWrite, OperatorRequest,
    Result, Run, StepRecord, StoreError,
};
use docket_core::{ErrorClass, EventKind, LeaseId, RunId, RunStatus, Timestamp};
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::Row;

pub(super) struct Fence {
    pub(super) id: RunId,
    pub(super) tenant: String,
    pub(super) job: String,
    pub(super) attempt: i32,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn event(
    c: &mut PgConnection,
    run_id: RunId,
    tenant: &str,
    job: &str,
    kind: &docket_core::EventKind,
    at: Timestamp,
    attempt: Option<i32>,
    lease_id: Option<LeaseId>,
    actor: Option<&str>,
    comment: Option<&str>,
    data: &Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO events (run_id, tenant, job, kind, at, attempt, lease_id, actor, comment, data)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(run_id.0)
    .bind(tenant)
    .bind(job)
    .bind(kind.as_str())
    .bind(at.0)
    .bind(attempt)
    .bind(lease_id.map(|l| l.0))
    .bind(actor)
    .bind(comment)
    .bind(data)
    .execute(c)
    .await
    .map_err(db)?;
    Ok(())
}

/// Locks the run and checks the lease holds it; when it does not, records
/// `stale_write_refused` and answers the error for the caller.
pub(super) async fn fence(
    c: &mut PgConnection,
    lease: LeaseRef,
    attempted: &str,
    now: Timestamp,
) -> Result<Result<Fence>> {
    let row = sqlx::query(
        "SELECT tenant, job, status, attempt, lease_id FROM runs WHERE id = $1 FOR UPDATE",
    )
    .bind(lease.run_id.0)
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?
    .ok_or(StoreError::NotFound(lease.run_id))?;
    let tenant: String = row.try_get("tenant").map_err(db)?;
    let job: String = row.try_get("job").map_err(db)?;
    let status: String = row.try_get("status").map_err(db)?;
    let status: RunStatus = status.parse().map_err(StoreError::Corrupt)?;
    let attempt: i32 = row.try_get("attempt").map_err(db)?;
    let current: Option<uuid::Uuid> = row.try_get("lease_id").map_err(db)?;
    if status == RunStatus::Running && current == Some(lease.lease_id.0) {
        return Ok(Ok(Fence {
            id: lease.run_id,
            tenant,
            job,
            attempt,
        }));
    }
    event(
        c,
        lease.run_id,
        &tenant,
        &job,
        &EventKind::StaleWriteRefused,
        now,
        None,
        Some(lease.lease_id),
        None,
        None,
        &plan::stale_write(
            attempted,
            status,
            current.map(LeaseId),
            u32::try_from(attempt).unwrap_or(0),
        ),
    )
    .await?;
    Ok(Err(StoreError::StaleLease {
        run_id: lease.run_id,
        lease_id: lease.lease_id,
        status,
    }))
}

fn step_from_row(r: &PgRow) -> Result<StepRecord> {
    let status: String = r.try_get("status").map_err(db)?;
    let class: Option<String> = r.try_get("error_class").map_err(db)?;
    Ok(StepRecord {
        run_id: RunId(r.try_get("run_id").map_err(db)?),
        name: r.try_get("name").map_err(db)?,
        status: status.parse().map_err(StoreError::Corrupt)?,
        result: json_opt(r, "result")?,
        error_class: class
            .map(|c| c.parse::<ErrorClass>())
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        error_message: r.try_get("error_message").map_err(db)?,
        attempt: u32::try_from(r.try_get::<i32, _>("attempt").map_err(db)?).unwrap_or(0),
        updated_at: Timestamp(r.try_get("updated_at").map_err(db)?),
        actor: r.try_get("actor").map_err(db)?,
        comment: r.try_get("comment").map_err(db)?,
    })
}

pub(super) async fn steps(pool: &PgPool, run_id: RunId) -> Result<Vec<StepRecord>> {
    let rows = sqlx::query(
        "SELECT run_id, name, status, result, error_class, error_message, attempt, updated_at, actor, comment
         FROM steps WHERE run_id = $1 ORDER BY updated_at, name COLLATE \"C\"",
    )
    .bind(run_id.0)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.iter().map(step_from_row).collect()
}

pub(super) async fn save_step(
    pool: &PgPool,
    lease: LeaseRef,
    name: &str,
    result: &Value,
    now: Timestamp,
) -> Result<LeaseState> {
    let mut tx = pool.begin().await.map_err(db)?;
    let run = match fence(&mut tx, lease, "step_completed", now).await? {
        Ok(r) => r,
        Err(e) => {
            tx.commit().await.map_err(db)?;
            return Err(e);
        }
    };
    let existing: Option<String> =
        sqlx::query_scalar("SELECT status FROM steps WHERE run_id = $1 AND name = $2")
            .bind(run.id.0)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
    plan::step::may_write(existing.as_deref(), run.id, name)?;
    sqlx::query(
        "INSERT INTO steps (run_id, name, status, result, attempt, updated_at)
         VALUES ($1, $2, 'completed', $3, $4, $5)
         ON CONFLICT (run_id, name) DO UPDATE SET status = 'completed', result = excluded.result,
            error_class = NULL, error_message = NULL, attempt = excluded.attempt, updated_at = excluded.updated_at",
    )
    .bind(run.id.0)
    .bind(name)
    .bind(result)
    .bind(run.attempt)
    .bind(now.0)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let ev = plan::step::completed(name);
    attempt_event(&mut tx, &run, lease, &ev.kind, now, &ev.data).await?;
    let cancel: bool = sqlx::query_scalar("SELECT cancel_requested FROM runs WHERE id = $1")
        .bind(run.id.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(LeaseState {
        held: true,
        cancel_requested: cancel,
    })
}

pub(super) async fn fail_step(
    pool: &PgPool,
    lease: LeaseRef,
    name: &str,
    class: ErrorClass,
    message: &str,
    now: Timestamp,
) -> Result<()> {
    let mut tx = pool.begin().await.map_err(db)?;
    let run = match fence(&mut tx, lease, "step_failed", now).await? {
        Ok(r) => r,
        Err(e) => {
            tx.commit().await.map_err(db)?;
            return Err(e);
        }
    };
    let n = sqlx::query(
        "INSERT INTO steps (run_id, name, status, error_class, error_message, attempt, updated_at)
         VALUES ($1, $2, 'failed', $3, $4, $5, $6)
         ON CONFLICT (run_id, name) DO UPDATE SET status = 'failed', error_class = excluded.error_class,
            error_message = excluded.error_message, attempt = excluded.attempt, updated_at = excluded.updated_at
         WHERE steps.status = 'failed'",
    )
    .bind(run.id.0)
    .bind(name)
    .bind(class.as_str())
    .bind(message)
    .bind(run.attempt)
    .bind(now.0)
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "step `{name}` of run {} is already completed or skipped",
            run.id
        )));
    }
    let ev = plan::step::failed(name, class, message);
    attempt_event(&mut tx, &run, lease, &ev.kind, now, &ev.data).await?;
    tx.commit().await.map_err(db)?;
    Ok(())
}

const LEDGER_COLS: &str = "tenant, idempotency_key, action, run_id, attempt, lease_id, state, result, error_class, error_message, created_at, updated_at";

fn ledger_from_row(r: &PgRow) -> Result<LedgerEntry> {
    let state: String = r.try_get("state").map_err(db)?;
    let class: Option<String> = r.try_get("error_class").map_err(db)?;
    Ok(LedgerEntry {
        tenant: r.try_get("tenant").map_err(db)?,
        idempotency_key: r.try_get("idempotency_key").map_err(db)?,
        action: r.try_get("action").map_err(db)?,
        run_id: RunId(r.try_get("run_id").map_err(db)?),
        attempt: u32::try_from(r.try_get::<i32, _>("attempt").map_err(db)?).unwrap_or(0),
        lease_id: LeaseId(r.try_get("lease_id").map_err(db)?),
        state: state.parse().map_err(StoreError::Corrupt)?,
        result: json_opt(r, "result")?,
        error_class: class
            .map(|c| c.parse::<ErrorClass>())
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        error_message: r.try_get("error_message").map_err(db)?,
        created_at: Timestamp(r.try_get("created_at").map_err(db)?),
        updated_at: Timestamp(r.try_get("updated_at").map_err(db)?),
    })
}

pub(super) async fn ledger_get(
    pool: &PgPool,
    tenant: &str,
    key: &str,
) -> Result<Option<LedgerEntry>> {
    let row = sqlx::query(&format!(
        "SELECT {LEDGER_COLS} FROM ledger WHERE tenant = $1 AND idempotency_key = $2"
    ))
    .bind(tenant)
    .bind(key)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    row.as_ref().map(ledger_from_row).transpose()
}

pub(super) async fn ledger_for_run(pool: &PgPool, run_id: RunId) -> Result<Vec<LedgerEntry>> {
    let rows = sqlx::query(&format!(
        "SELECT {LEDGER_COLS} FROM ledger WHERE run_id = $1 ORDER BY created_at, idempotency_key COLLATE \"C\""
    ))
    .bind(run_id.0)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.iter().map(ledger_from_row).collect()
}

/// An event on a fenced run, under the attempt's lease (the ledger's and
/// the handler's own events).
pub(super) async fn attempt_event(
    c: &mut PgConnection,
    run: &Fence,
    lease: LeaseRef,
    kind: &EventKind,
    now: Timestamp,
    data: &Value,
) -> Result<()> {
    event(
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
    .await
}

/// The ledger row, locked for the rest of the transaction.
async fn ledger_locked(
    c: &mut PgConnection,
    tenant: &str,
    key: &str,
) -> Result<Option<LedgerEntry>> {
    let row = sqlx::query(&format!(
        "SELECT {LEDGER_COLS} FROM ledger WHERE tenant = $1 AND idempotency_key = $2 FOR UPDATE"
    ))
    .bind(tenant)
    .bind(key)
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?;
    row.as_ref().map(ledger_from_row).transpose()
}

/// The holder of a `started` row held by another lease, read from its run
/// (not locked: its lease columns are all that is needed).
async fn ledger_holder(c: &mut PgConnection, row: &LedgerEntry, now: Timestamp) -> Result<Holder> {
    let run = sqlx::query("SELECT status, lease_id, lease_expires_at FROM runs WHERE id = $1")
        .bind(row.run_id.0)
        .fetch_optional(&mut *c)
        .await
        .map_err(db)?;
    let Some(run) = run else {
        return Ok(Holder::Gone);
    };
    let status: String = run.try_get("status").map_err(db)?;
    let lease: Option<uuid::Uuid> = run.try_get("lease_id").map_err(db)?;
    let expires: Option<i64> = run.try_get("lease_expires_at").map_err(db)?;
    Ok(Holder::from_run(
        status == RunStatus::Running.as_str(),
        lease.map(LeaseId),
        expires.map(Timestamp),
        row.lease_id,
        now,
    ))
}

pub(super) async fn ledger_begin(
    pool: &PgPool,
    lease: LeaseRef,
    key: &str,
    action: &str,
    now: Timestamp,
) -> Result<LedgerBegin> {
    let mut tx = pool.begin().await.map_err(db)?;
    let run = match fence(&mut tx, lease, "action_started", now).await? {
        Ok(r) => r,
        Err(e) => {
            tx.commit().await.map_err(db)?;
            return Err(e);
        }
    };
    // Two passes at most: a row inserted by a concurrent begin between our
    // read and our insert is read (committed, locked) on the second pass.
    for _ in 0..2 {
        let current = ledger_locked(&mut tx, &run.tenant, key).await?;
        let holder = match &current {
            Some(row) if row.state == LedgerState::Started && row.lease_id != lease.lease_id => {
                ledger_holder(&mut tx, row, now).await?
            }
            _ => Holder::Gone,
        };
        let plan = plan::ledger_begin(current.as_ref(), holder, lease.lease_id);
        let answer = match plan {
            BeginPlan::Insert | BeginPlan::TakeOver { .. } => {
                let on_conflict = if plan == BeginPlan::Insert {
                    "DO NOTHING"
                } else {
                    "DO UPDATE SET action = excluded.action, run_id = excluded.run_id,
                    attempt = excluded.attempt, lease_id = excluded.lease_id, state = 'started', result = NULL,
                    error_class = NULL, error_message = NULL, updated_at = excluded.updated_at"
                };
                let written = sqlx::query(&format!(
                    "INSERT INTO ledger (tenant, idempotency_key, action, run_id, attempt, lease_id, state, result, error_class, error_message, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, 'started', NULL, NULL, NULL, $7, $7)
                     ON CONFLICT (tenant, idempotency_key) {on_conflict}"
                ))
                .bind(&run.tenant)
                .bind(key)
                .bind(action)
                .bind(run.id.0)
                .bind(run.attempt)
                .bind(lease.lease_id.0)
                .bind(now.0)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
                if written == 0 {
                    continue;
                }
                let data = plan::begin_event(action, key, current.as_ref(), plan);
                attempt_event(&mut tx, &run, lease, &EventKind::ActionStarted, now, &data).await?;
                LedgerBegin::Acquired {
                    previous: current,
                    reconcile_first: matches!(
                        plan,
                        BeginPlan::TakeOver {
                            reconcile_first: true
                        }
                    ),
                }
            }
            BeginPlan::ReturnCommitted => {
                LedgerBegin::Committed(current.expect("a committed plan has a row"))
            }
            BeginPlan::InFlight {
                holder_lease_expires_at,
            } => {
                let entry = current.expect("an in-flight plan has a row");
                let data = plan::in_flight_event(&entry, holder_lease_expires_at);
                attempt_event(&mut tx, &run, lease, &EventKind::ActionInFlight, now, &data).await?;
                LedgerBegin::InFlight {
                    entry,
                    holder_lease_expires_at,
                }
            }
        };
        tx.commit().await.map_err(db)?;
        return Ok(answer);
    }
    Err(StoreError::Conflict(format!(
        "ledger key `{key}`: inserted concurrently and not readable after; try again"
    )))
}

pub(super) async fn ledger_write(
    pool: &PgPool,
    lease: LeaseRef,
    w: &LedgerWrite,
    kind: &EventKind,
    now: Timestamp,
) -> Result<()> {
    let mut tx = pool.begin().await.map_err(db)?;
    let run = match fence(&mut tx, lease, kind.as_str(), now).await? {
        Ok(r) => r,
        Err(e) => {
            tx.commit().await.map_err(db)?;
            return Err(e);
        }
    };
    let current = ledger_locked(&mut tx, &run.tenant, &w.idempotency_key).await?;
    let (kind, data, answer) = match plan::ledger_write(current.as_ref(), lease.lease_id, w.state) {
        Ok(()) => {
            sqlx::query(
                "UPDATE ledger SET state = $3, result = $4, error_class = $5, error_message = $6, updated_at = $7
                 WHERE tenant = $1 AND idempotency_key = $2",
            )
            .bind(&run.tenant)
            .bind(&w.idempotency_key)
            .bind(w.state.as_str())
            .bind(&w.result)
            .bind(w.error_class.map(|e| e.as_str()))
            .bind(&w.error_message)
            .bind(now.0)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            (kind.clone(), plan::write_event(w), Ok(()))
        }
        Err(refusal) => (
            EventKind::LedgerWriteRefused,
            plan::refused_event(w, kind.as_str(), &refusal),
            Err(plan::refusal_error(w, &refusal, run.id)),
        ),
    };
    attempt_event(&mut tx, &run, lease, &kind, now, &data).await?;
    tx.commit().await.map_err(db)?;
    answer
}

pub(super) async fn append_event(
    pool: &PgPool,
    lease: LeaseRef,
    kind: &EventKind,
    data: &Value,
    now: Timestamp,
) -> Result<()> {
    let mut tx = pool.begin().await.map_err(db)?;
    let run = match fence(&mut tx, lease, kind.as_str(), now).await? {
        Ok(r) => r,
        Err(e) => {
            tx.commit().await.map_err(db)?;
            return Err(e);
        }
    };
    attempt_event(&mut tx, &run, lease, kind, now, data).await?;
    tx.commit().await.map_err(db)?;
    Ok(())
}

/// How many times an operator command is tried when PostgreSQL aborts its
/// transaction for a deadlock or a serialization failure (nothing of it
/// was written); the last failure is answered.
const OPERATOR_TRIES: usize = 5;

/// One operator command, one transaction. A transaction PostgreSQL aborted
/// to break a deadlock is tried again (see [`lock_order_conflict`]): the
/// cascade takes its locks in the order of the other paths, so that is a
/// safety net, not the rule.
pub(super) async fn operator(pool: &PgPool, req: &OperatorRequest) -> Result<Run> {
    let mut tries = 0;
    loop {
        tries += 1;
        match operator_once(pool, req).await {
            Err(e) if tries < OPERATOR_TRIES && lock_order_conflict(&e) => {
                tracing::debug!(run = %req.run_id, error = %e, "operator command tried again");
            }
            other => return other,
        }
    }
}

/// Whether PostgreSQL rolled a transaction back to break a deadlock
/// (`40P01`) or a serialization conflict (`40001`): nothing was written,
/// and the same transaction may succeed when tried again.
pub(super) fn lock_order_conflict(e: &StoreError) -> bool {
    let StoreError::Db { source, .. } = e else {
        return false;
    };
    match source.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(d)) => {
            matches!(d.code().as_deref(), Some("40P01") | Some("40001"))
        }
        _ => false,
    }
}

async fn operator_once(pool: &PgPool, req: &OperatorRequest) -> Result<Run> {
    let mut tx = pool.begin().await.map_err(db)?;
    if matches!(req.command, crate::OperatorCommand::Cancel) {
        // Lock order: a child's end, reap or cancel locks the child, then
        // its parent (the fan-in); a join locks the children, then the
        // parent. So a cancel locks the descendants it may cascade to (in
        // id order, as a batch of ends does) BEFORE the run itself.
        super::children::lock_cascade(&mut tx, req.run_id).await?;
    }
    let row = sqlx::query(&format!(
        "SELECT {RUN_COLS} FROM runs WHERE id = $1 FOR UPDATE"
    ))
    .bind(req.run_id.0)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?
    .ok_or(StoreError::NotFound(req.run_id))?;
    let run = run_from_row(&row)?;
    let failed_step: Option<String> = if plan::operator::needs_failed_step(&req.command) {
        sqlx::query_scalar(
            "SELECT name FROM steps WHERE run_id = $1 AND status = 'failed' ORDER BY updated_at DESC, name LIMIT 1",
        )
        .bind(run.id.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
    } else {
        None
    };
    let p = plan::operator::operator(&run, &req.command, failed_step.as_deref(), req.now)?;
    persist_operator(&mut tx, &run, req, &p).await?;
    if p.run.finish {
        super::children::fan_in_of(&mut tx, run.id, req.now).await?;
    }
    if matches!(req.command, crate::OperatorCommand::Cancel) {
        super::children::cascade_cancel(&mut tx, run.id, req).await?;
    }
    let out = get_run(&mut *tx, run.id)
        .await?
        .ok_or(StoreError::NotFound(run.id))?;
    tx.commit().await.map_err(db)?;
    Ok(out)
}

/// Persists a command's plan: the run, the step write, the events (each
/// with the operator and the comment), as SQLite does.
pub(super) async fn persist_operator(
    c: &mut PgConnection,
    run: &Run,
    req: &OperatorRequest,
    p: &plan::operator::OperatorPlan,
) -> Result<()> {
    use plan::operator::StepWrite;
    let (id, now, w) = (run.id.0, req.now.0, &p.run);
    sqlx::query(
        "UPDATE runs SET status = $2, run_after = COALESCE($3, run_after), variables = COALESCE($4, variables),
            terminal_reason = CASE WHEN $5 THEN NULL ELSE terminal_reason END,
            finished_at = CASE WHEN $5 THEN NULL WHEN $6 THEN $10 ELSE finished_at END,
            attempts_forgiven = CASE WHEN $7 THEN attempt ELSE attempts_forgiven END,
            input_request = CASE WHEN $8 THEN NULL ELSE input_request END,
            cancel_requested = cancel_requested OR $9,
            updated_at = $10
         WHERE id = $1",
    )
    .bind(id)
    .bind(w.status.as_str())
    .bind(w.run_after.map(|t| t.0))
    .bind(&w.variables)
    .bind(w.reopen)
    .bind(w.finish)
    .bind(w.reset_budget)
    .bind(w.clear_input_request)
    .bind(w.request_cancel)
    .bind(now)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    match &p.step {
        None => {}
        Some(StepWrite::Decide { name, result }) => {
            sqlx::query(
                "INSERT INTO steps (run_id, name, status, result, attempt, updated_at, actor, comment)
                 VALUES ($1, $2, 'completed', $3, $4, $5, $6, $7)
                 ON CONFLICT (run_id, name) DO UPDATE SET status = 'completed', result = excluded.result,
                    updated_at = excluded.updated_at, actor = excluded.actor, comment = excluded.comment",
            )
            .bind(id)
            .bind(name)
            .bind(result)
            .bind(run.attempt as i32)
            .bind(now)
            .bind(&req.actor)
            .bind(&req.comment)
            .execute(&mut *c)
            .await
            .map_err(db)?;
        }
        Some(StepWrite::Skip { name }) => {
            sqlx::query(
                "UPDATE steps SET status = 'skipped', actor = $3, comment = $4, updated_at = $5 WHERE run_id = $1 AND name = $2",
            )
            .bind(id)
            .bind(name)
            .bind(&req.actor)
            .bind(&req.comment)
            .bind(now)
            .execute(&mut *c)
            .await
            .map_err(db)?;
        }
        Some(StepWrite::DeleteFailed) => {
            sqlx::query("DELETE FROM steps WHERE run_id = $1 AND status = 'failed'")
                .bind(id)
                .execute(&mut *c)
                .await
                .map_err(db)?;
        }
    }
    for e in &p.events {
        event(
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
        )
        .await?;
    }
    Ok(())
}
