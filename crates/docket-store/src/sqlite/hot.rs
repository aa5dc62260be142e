//! The hot path on SQLite: claims, attempt ends and reaps (the same
//! concerns as `postgres/hot.rs`). Each persists a plan from
//! `crate::plan` and decides nothing. Runs on the writer thread, under the
//! caller's savepoint; the group commit batches them.

use crate::{AttemptEnd, ClaimRequest, Result, Run, StoreError};
use docket_core::{ErrorClass, EventKind, LeaseId, RunStatus};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection};
use serde_json::Value;

use super::db_err;
use super::ops::*;
use crate::plan;
use crate::plan::fair::Cursor;

/// Claims keyed runs first (bounded by their keys' limits, see
/// `plan::concurrency`), then unkeyed runs with the rest of the limit,
/// shared among tenants (`plan::fair`).
pub(super) fn claim(c: &Connection, req: &ClaimRequest, cursor: &Cursor) -> Result<Vec<Run>> {
    if req.jobs.is_empty() || req.limit == 0 {
        return Ok(Vec::new());
    }
    let keyed = keyed_ids(c, req)?;
    let mut out = take(c, req, keyed)?;
    let rest = req.limit - out.len();
    if rest > 0 {
        let tenants = match &req.tenant {
            Some(t) => vec![t.clone()],
            None => tenants_to_visit(c, cursor.get())?,
        };
        let mut dealer = plan::fair::Dealer::new(&tenants, rest);
        while let Some((tenant, n)) = dealer.ask() {
            let ids = unkeyed_ids(c, req, &tenant, n)?;
            dealer.got(ids.len());
            out.extend(take(c, req, ids)?);
        }
        if req.tenant.is_none() {
            cursor.advance(&dealer);
        }
    }
    Ok(out)
}

/// The tenants with claimable unkeyed runs a claim visits (see
/// `plan::fair::visit`): a skip scan of `runs_claim` after the cursor,
/// then from the start; one index probe per tenant, at most
/// `plan::fair::MAX_TENANTS_PER_CLAIM` each.
fn tenants_to_visit(c: &Connection, cursor: Option<String>) -> Result<Vec<String>> {
    let count = plan::fair::MAX_TENANTS_PER_CLAIM;
    let scan = |after: bool| -> Result<Vec<String>> {
        let from = |bound: &str| {
            format!(
                "SELECT MIN(tenant) FROM runs INDEXED BY runs_claim
                 WHERE status IN ({}) AND concurrency_key IS NULL{bound}",
                plan::claim::CLAIMABLE_SQL
            )
        };
        let sql = format!(
            "WITH RECURSIVE t(tenant, n) AS (
                SELECT ({}), 1
                UNION ALL
                SELECT ({}), n + 1 FROM t WHERE t.tenant IS NOT NULL AND n < ?2
             )
             SELECT tenant FROM t WHERE tenant IS NOT NULL",
            from(if after {
                " AND tenant > ?1"
            } else {
                " AND ?1 IS NULL"
            }),
            from(" AND tenant > t.tenant"),
        );
        let mut st = c.prepare_cached(&sql).map_err(db_err)?;
        let bound = if after { cursor.clone() } else { None };
        let rows = st
            .query_map(params![bound, count as i64], |r| r.get(0))
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    };
    let after = if cursor.is_some() {
        scan(true)?
    } else {
        Vec::new()
    };
    let wrapped = if after.len() < count {
        scan(false)?
    } else {
        Vec::new()
    };
    Ok(plan::fair::visit(after, wrapped))
}

/// The keys that have claimable runs, by a skip scan of `runs_keyed_claim`
/// (one index probe per key, however many runs a key holds back).
pub(super) fn claimable_keys(c: &Connection) -> Result<Vec<String>> {
    let sql = format!(
        "WITH RECURSIVE k(key) AS (
            SELECT (SELECT MIN(concurrency_key) FROM runs INDEXED BY runs_keyed_claim
                    WHERE status IN ({c}) AND concurrency_key IS NOT NULL)
            UNION ALL
            SELECT (SELECT MIN(concurrency_key) FROM runs INDEXED BY runs_keyed_claim
                    WHERE status IN ({c}) AND concurrency_key IS NOT NULL
                      AND concurrency_key > k.key)
            FROM k WHERE k.key IS NOT NULL
         )
         SELECT key FROM k WHERE key IS NOT NULL",
        c = plan::claim::CLAIMABLE_SQL
    );
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let rows = st.query_map([], |r| r.get(0)).map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

/// Decides (by `plan::concurrency::pick`) which keyed runs `req` claims,
/// and marks the newly held ones with their `run_held` event.
fn keyed_ids(c: &Connection, req: &ClaimRequest) -> Result<Vec<String>> {
    let keys = claimable_keys(c)?;
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let cand_sql = format!(
        "SELECT id, priority, run_after, concurrency_limit, held_at IS NOT NULL
         FROM runs INDEXED BY runs_keyed_claim
         WHERE concurrency_key = ?1 AND status IN ({}) AND run_after <= ?2
           AND (?4 IS NULL OR tenant = ?4) AND job IN ({}) AND {}
         ORDER BY priority DESC, run_after, id LIMIT ?3",
        plan::claim::CLAIMABLE_SQL,
        placeholders(5, req.jobs.len()),
        crate::retention::NOT_PAUSED
    );
    let mut states = Vec::with_capacity(keys.len());
    for key in keys {
        let running: u32 = c
            .prepare_cached(
                "SELECT COUNT(*) FROM runs INDEXED BY runs_keyed_running
                 WHERE status = 'running' AND concurrency_key = ?1",
            )
            .map_err(db_err)?
            .query_row([&key], |r| r.get(0))
            .map_err(db_err)?;
        let mut args: Vec<SqlValue> = vec![
            key.clone().into(),
            req.now.0.into(),
            (req.limit as i64).into(),
            req.tenant.clone().map_or(SqlValue::Null, SqlValue::from),
        ];
        args.extend(req.jobs.iter().map(|j| SqlValue::from(j.clone())));
        let mut st = c.prepare_cached(&cand_sql).map_err(db_err)?;
        let rows = st
            .query_map(params_from_iter(args), |r| {
                Ok(plan::concurrency::Candidate {
                    id: parse("run id", r.get(0)?)?,
                    priority: r.get(1)?,
                    run_after: docket_core::Timestamp(r.get(2)?),
                    limit: r.get::<_, Option<u32>>(3)?.unwrap_or(1),
                    held: r.get(4)?,
                })
            })
            .map_err(db_err)?;
        let candidates = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?;
        states.push(plan::concurrency::KeyState {
            key,
            running,
            candidates,
        });
    }
    let p = plan::concurrency::pick(&states, req.limit);
    for (id, ev) in &p.held {
        let run = c
            .prepare_cached("UPDATE runs SET held_at = ?2 WHERE id = ?1 RETURNING tenant, job")
            .map_err(db_err)?
            .query_row(params![id.to_string(), req.now.0], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(db_err)?;
        insert_event(
            c, *id, &run.0, &run.1, &ev.kind, req.now, None, None, None, None, &ev.data,
        )?;
    }
    Ok(p.claim.iter().map(|id| id.to_string()).collect())
}

/// Up to `limit` of `tenant`'s unkeyed runs that `req` may claim, in claim
/// order (an index range of `runs_claim`).
fn unkeyed_ids(
    c: &Connection,
    req: &ClaimRequest,
    tenant: &str,
    limit: usize,
) -> Result<Vec<String>> {
    let sql = format!(
        "SELECT id FROM runs INDEXED BY runs_claim
         WHERE tenant = ?3 AND status IN ({}) AND run_after <= ?1 AND concurrency_key IS NULL
           AND job IN ({})
           AND {}
         ORDER BY priority DESC, run_after, id LIMIT ?2",
        plan::claim::CLAIMABLE_SQL,
        placeholders(4, req.jobs.len()),
        crate::retention::NOT_PAUSED
    );
    let mut args: Vec<SqlValue> = vec![
        req.now.0.into(),
        (limit as i64).into(),
        tenant.to_string().into(),
    ];
    args.extend(req.jobs.iter().map(|j| SqlValue::from(j.clone())));
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let rows = st
        .query_map(params_from_iter(args), |r| r.get::<_, String>(0))
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

/// Claims the runs `ids` (picked by one of the two claims above): a new
/// lease, the attempt row and its `attempt_started` event each.
fn take(c: &Connection, req: &ClaimRequest, ids: Vec<String>) -> Result<Vec<Run>> {
    let p = plan::claim::claim(req);
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let lease = LeaseId::new();
        let mut st = c
            .prepare_cached(&format!(
                "UPDATE runs SET status = ?6, attempt = attempt + 1, lease_id = ?2,
                    lease_expires_at = ?3, worker = ?4, updated_at = ?5, held_at = NULL
                 WHERE id = ?1 RETURNING {RUN_COLS}"
            ))
            .map_err(db_err)?;
        let run = st
            .query_row(
                params![
                    id,
                    lease.to_string(),
                    p.lease_expires_at.0,
                    req.worker,
                    req.now.0,
                    p.status.as_str()
                ],
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
            &p.event.kind,
            req.now,
            Some(run.attempt),
            Some(lease),
            None,
            None,
            &p.event.data,
        )?;
        out.push(run);
    }
    Ok(out)
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

pub(super) fn finish_inner(c: &Connection, end: AttemptEnd) -> Result<Result<RunStatus>> {
    // Nothing is written for an end before its fence passes, so a missing
    // run fails in its own slot (as on PostgreSQL), not the whole batch.
    let Some(run) = fence_row(c, end.run_id)? else {
        return Ok(Err(StoreError::NotFound(end.run_id)));
    };
    if run.status != RunStatus::Running || run.lease_id != Some(end.lease_id) {
        insert_event(
            c,
            run.id,
            &run.tenant,
            &run.job,
            &EventKind::StaleWriteRefused,
            end.now,
            None,
            Some(end.lease_id),
            None,
            None,
            &plan::end::refused(&end, run.status, run.lease_id, run.attempt),
        )?;
        return Ok(Err(StoreError::StaleLease {
            run_id: run.id,
            lease_id: end.lease_id,
            status: run.status,
        }));
    }
    let p = plan::end::end(&end);
    persist_end(c, &run, &end, &p)?;
    Ok(Ok(p.run.status))
}

/// Persists an end's plan for a run its lease holds: the same three writes,
/// with the same "absent keeps the stored value" rule, as PostgreSQL's
/// set-based statement.
pub(super) fn persist_end(
    c: &Connection,
    run: &Fence,
    end: &AttemptEnd,
    p: &plan::end::EndPlan,
) -> Result<()> {
    let (r, a) = (&p.run, &p.attempt);
    let id = run.id.to_string();
    let json_text = |v: &Option<Value>| v.as_ref().map(Value::to_string);
    c.prepare_cached(
        "UPDATE runs SET status = ?2, output = COALESCE(?3, output),
            run_after = CASE WHEN ?13 AND wake_requested THEN MIN(COALESCE(?4, run_after), ?5)
                             ELSE COALESCE(?4, run_after) END,
            wake_requested = 0,
            lease_id = NULL, lease_expires_at = NULL, worker = NULL, updated_at = ?5,
            finished_at = CASE WHEN ?6 THEN ?5 ELSE finished_at END,
            terminal_reason = COALESCE(?7, terminal_reason),
            last_error_class = COALESCE(?8, last_error_class),
            last_error_message = COALESCE(?9, last_error_message),
            cancel_requested = cancel_requested AND NOT ?10,
            attempts_forgiven = attempts_forgiven + ?11,
            input_request = COALESCE(?12, input_request)
         WHERE id = ?1",
    )
    .map_err(db_err)?
    .execute(params![
        id,
        r.status.as_str(),
        json_text(&r.output),
        r.run_after.map(|t| t.0),
        end.now.0,
        r.finished,
        r.terminal_reason,
        r.error_class.map(ErrorClass::as_str),
        r.error_message,
        r.clear_cancel,
        r.forgive,
        json_text(&r.input_request),
        // A signal reached the wait this attempt recorded while it ran.
        plan::signal::postponement_wakes(r.status),
    ])
    .map_err(db_err)?;
    c.prepare_cached(
        "UPDATE attempts SET finished_at = ?3, outcome = ?4,
            error_class = COALESCE(?5, error_class), error_message = COALESCE(?6, error_message),
            fingerprint = COALESCE(?7, fingerprint), failure_key = COALESCE(?8, failure_key),
            action = COALESCE(?9, action), retry_policy = COALESCE(?10, retry_policy),
            delay_ms = COALESCE(?11, delay_ms), eligible_at = COALESCE(?12, eligible_at),
            retry_reason = COALESCE(?13, retry_reason)
         WHERE run_id = ?1 AND attempt = ?2",
    )
    .map_err(db_err)?
    .execute(params![
        id,
        run.attempt,
        end.now.0,
        a.outcome.as_str(),
        a.error_class.map(ErrorClass::as_str),
        a.error_message,
        a.fingerprint,
        a.failure_key,
        a.action,
        a.retry_policy,
        a.delay_ms,
        a.eligible_at.map(|t| t.0),
        a.retry_reason.map(|r| r.as_str()),
    ])
    .map_err(db_err)?;
    for e in &p.events {
        let data = e
            .fill
            .apply(e.data.clone(), run.attempt, run.lease_expires_at);
        insert_event(
            c,
            run.id,
            &run.tenant,
            &run.job,
            &e.kind,
            end.now,
            Some(run.attempt),
            Some(end.lease_id),
            None,
            None,
            &data,
        )?;
    }
    if let (true, Some(parent)) = (r.finished, run.awaited_by) {
        super::children::fan_in(c, parent, end.now)?;
    }
    Ok(())
}
