//! The hot path on SQLite: claims, attempt ends and reaps (the same
//! concerns as `postgres/hot.rs`). Each persists a plan from
//! `crate::plan` and decides nothing. Runs on the writer thread, under the
//! caller's savepoint; the group commit batches them.

use crate::{AttemptEnd, ClaimRequest, Result, Run, StoreError};
use docket_core::{ErrorClass, EventKind, LeaseId, RunId, RunStatus, Timestamp};
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
///
/// Set-based: three statements per claim, not three per run (the
/// per-run `UPDATE … RETURNING` was a third of the writer thread's
/// instructions in W1). The ids and their Rust-drawn lease ids go in as
/// one JSON array; `json_each` keeps its order, so attempts and events
/// are written in claim order, as before.
fn take(c: &Connection, req: &ClaimRequest, ids: Vec<String>) -> Result<Vec<Run>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let p = plan::claim::claim(req);
    let leases: Vec<(String, String)> = ids
        .into_iter()
        .map(|id| (id, LeaseId::new().to_string()))
        .collect();
    let order: std::collections::HashMap<&str, usize> = leases
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    let mut st = c.prepare_cached(&take_sql()).map_err(db_err)?;
    let rows = st
        .query_map(
            params![
                Value::from(
                    leases
                        .iter()
                        .map(|(id, l)| serde_json::json!([id, l]))
                        .collect::<Vec<_>>()
                )
                .to_string(),
                p.lease_expires_at.0,
                req.worker,
                req.now.0,
                p.status.as_str()
            ],
            run_from_row,
        )
        .map_err(db_err)?;
    let mut out = rows
        .collect::<rusqlite::Result<Vec<Run>>>()
        .map_err(db_err)?;
    // RETURNING's row order is unspecified: back to claim order.
    out.sort_by_cached_key(|r| order.get(r.id.to_string().as_str()).copied());
    if out.len() != leases.len() {
        // The ids were read in this transaction: a run missing now is a bug,
        // and the caller's savepoint rolls the claim back.
        return Err(StoreError::Database(format!(
            "claimed {} of the {} runs picked",
            out.len(),
            leases.len()
        )));
    }
    let claimed = Value::from(
        out.iter()
            .map(|r| {
                serde_json::json!([
                    r.id.to_string(),
                    r.tenant,
                    r.job,
                    r.attempt,
                    r.lease_id.map(|l| l.to_string())
                ])
            })
            .collect::<Vec<_>>(),
    )
    .to_string();
    c.prepare_cached(
        "INSERT INTO attempts (run_id, attempt, lease_id, worker, started_at, outcome)
         SELECT value ->> 0, value ->> 3, value ->> 4, ?2, ?3, 'running' FROM json_each(?1)",
    )
    .map_err(db_err)?
    .execute(params![claimed, req.worker, req.now.0])
    .map_err(db_err)?;
    c.prepare_cached(
        "INSERT INTO events (run_id, tenant, job, kind, at, attempt, lease_id, actor, comment, data)
         SELECT value ->> 0, value ->> 1, value ->> 2, ?2, ?3, value ->> 3, value ->> 4,
                NULL, NULL, ?4
         FROM json_each(?1)",
    )
    .map_err(db_err)?
    .execute(params![
        claimed,
        p.event.kind.as_str(),
        req.now.0,
        p.event.data.to_string()
    ])
    .map_err(db_err)?;
    Ok(out)
}

/// The claim's run update: `?1` a JSON array of `[run id, lease id]`.
fn take_sql() -> String {
    format!(
        "UPDATE runs SET status = ?5, attempt = attempt + 1, lease_id = c.value ->> 1,
            lease_expires_at = ?2, worker = ?3, updated_at = ?4, held_at = NULL
         FROM json_each(?1) AS c
         WHERE runs.id = c.value ->> 0
         RETURNING {RUN_COLS}"
    )
}

/// Ends attempts. A stale lease is an `Err` in that end's slot (its
/// `stale_write_refused` event is kept). A database error fails the whole
/// call, and the caller's savepoint rolls every end of it back: ends need no
/// savepoint of their own, since each checks its fence before it writes.
///
/// Set-based: the ends of distinct runs are fenced by one read and
/// written by one statement per table (see [`persist_ends`]); a run that
/// ends twice in one call has its second end in a second such round, which
/// sees the first (so it is refused, exactly as one after another).
pub(super) fn finish_all(c: &Connection, ends: Vec<AttemptEnd>) -> Result<Vec<Result<RunStatus>>> {
    let mut out: Vec<Option<Result<RunStatus>>> = ends.iter().map(|_| None).collect();
    for round in rounds(&ends) {
        let fences = fence_rows(c, round.iter().map(|&i| ends[i].run_id))?;
        let mut passed = Vec::with_capacity(round.len());
        // In the order of the ends, refusals included (as on PostgreSQL).
        let mut events = Vec::with_capacity(round.len());
        for i in round {
            let end = &ends[i];
            out[i] = Some(match fences.get(&end.run_id) {
                // Nothing is written for an end before its fence passes, so
                // a missing run fails in its own slot (as on PostgreSQL).
                None => Err(StoreError::NotFound(end.run_id)),
                Some(run) if !holds(run, end) => {
                    events.push(refusal(run, end));
                    Err(StoreError::StaleLease {
                        run_id: run.id,
                        lease_id: end.lease_id,
                        status: run.status,
                    })
                }
                Some(run) => {
                    let p = plan::end::end(end);
                    events.extend(end_events(run, end, &p));
                    let status = p.run.status;
                    passed.push((run, end, p));
                    Ok(status)
                }
            });
        }
        persist_ends(c, &passed, events)?;
    }
    Ok(out
        .into_iter()
        .map(|o| o.expect("every end is in one round"))
        .collect())
}

/// Splits ends into rounds: the k-th end of each run goes into round k,
/// in the order given.
fn rounds(ends: &[AttemptEnd]) -> Vec<Vec<usize>> {
    let mut seen: std::collections::HashMap<RunId, usize> =
        std::collections::HashMap::with_capacity(ends.len());
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (i, e) in ends.iter().enumerate() {
        let k = seen.entry(e.run_id).or_insert(0);
        if rounds.len() <= *k {
            rounds.push(Vec::new());
        }
        rounds[*k].push(i);
        *k += 1;
    }
    rounds
}

/// The fences of `ids` (distinct), read by one statement.
fn fence_rows(
    c: &Connection,
    ids: impl Iterator<Item = RunId>,
) -> Result<std::collections::HashMap<RunId, Fence>> {
    let ids = Value::from(ids.map(|i| i.to_string()).collect::<Vec<_>>()).to_string();
    let mut st = c
        .prepare_cached(
            "SELECT r.id, r.tenant, r.job, r.status, r.attempt, r.lease_id, r.lease_expires_at,
                CASE WHEN r.parent_waits = 1 THEN r.parent_id END
             FROM json_each(?1) AS i JOIN runs AS r ON r.id = i.value",
        )
        .map_err(db_err)?;
    let rows = st
        .query_map([ids], |r| {
            let id: RunId = parse("run id", r.get(0)?)?;
            Ok((
                id,
                Fence {
                    id,
                    tenant: r.get(1)?,
                    job: r.get(2)?,
                    status: parse("status", r.get(3)?)?,
                    attempt: r.get(4)?,
                    lease_id: parse_opt("lease id", r.get(5)?)?,
                    lease_expires_at: r.get::<_, Option<i64>>(6)?.map(Timestamp),
                    awaited_by: parse_opt("parent id", r.get(7)?)?,
                },
            ))
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

/// Whether `end`'s lease still holds its run.
fn holds(run: &Fence, end: &AttemptEnd) -> bool {
    run.status == RunStatus::Running && run.lease_id == Some(end.lease_id)
}

/// The `stale_write_refused` event of `end`, whose lease no longer holds
/// `run`, as a row for [`insert_events`].
fn refusal(run: &Fence, end: &AttemptEnd) -> Value {
    event_row(
        run,
        &EventKind::StaleWriteRefused,
        end.now,
        None,
        end.lease_id,
        &plan::end::refused(end, run.status, run.lease_id, run.attempt),
    )
}

/// The events of an end's plan, as rows for [`insert_events`].
fn end_events(run: &Fence, end: &AttemptEnd, p: &plan::end::EndPlan) -> Vec<Value> {
    p.events
        .iter()
        .map(|e| {
            let data = e
                .fill
                .apply(e.data.clone(), run.attempt, run.lease_expires_at);
            event_row(
                run,
                &e.kind,
                end.now,
                Some(run.attempt),
                end.lease_id,
                &data,
            )
        })
        .collect()
}

/// One event as a JSON row: run id, tenant, job, kind, at, attempt, lease
/// id, data (as text).
fn event_row(
    run: &Fence,
    kind: &EventKind,
    at: Timestamp,
    attempt: Option<u32>,
    lease: LeaseId,
    data: &Value,
) -> Value {
    serde_json::json!([
        run.id.to_string(),
        run.tenant,
        run.job,
        kind.as_str(),
        at.0,
        attempt,
        lease.to_string(),
        data.to_string(),
    ])
}

/// Inserts event rows (see [`event_row`]) in their order, by one statement.
fn insert_events(c: &Connection, rows: Vec<Value>) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    c.prepare_cached(
        "INSERT INTO events (run_id, tenant, job, kind, at, attempt, lease_id, actor, comment, data)
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,
                value ->> 6, NULL, NULL, value ->> 7
         FROM json_each(?1)",
    )
    .map_err(db_err)?
    .execute([Value::from(rows).to_string()])
    .map_err(db_err)?;
    Ok(())
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
            let Some(run) = fence_row(c, end.run_id)? else {
                return Ok(Ok(None));
            };
            let expired = holds(&run, &end) && run.lease_expires_at.is_some_and(|t| t <= end.now);
            if !expired {
                return Ok(Ok(None));
            }
            let p = plan::end::end(&end);
            let status = p.run.status;
            let events = end_events(&run, &end, &p);
            persist_ends(c, &[(&run, &end, p)], events)?;
            Ok(Ok(Some(status)))
        })
        .collect()
}

/// Run columns an end writes, `?N` of the per-end statement being element
/// N-1 of each JSON array in [`persist_ends`]: the same "absent keeps the
/// stored value" rule as PostgreSQL's set-based statement.
const END_RUN_SET: &str = "status = ?2, output = COALESCE(?3, output),
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
    input_request = COALESCE(?12, input_request)";

/// Attempt columns an end writes (as [`END_RUN_SET`]; `?1`, `?2` are the
/// run id and attempt number).
const END_ATTEMPT_SET: &str = "finished_at = ?3, outcome = ?4,
    error_class = COALESCE(?5, error_class), error_message = COALESCE(?6, error_message),
    fingerprint = COALESCE(?7, fingerprint), failure_key = COALESCE(?8, failure_key),
    action = COALESCE(?9, action), retry_policy = COALESCE(?10, retry_policy),
    delay_ms = COALESCE(?11, delay_ms), eligible_at = COALESCE(?12, eligible_at),
    retry_reason = COALESCE(?13, retry_reason)";

/// `sql` with each `?N` read from element N-1 of the JSON array `e.value`.
fn from_row(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() * 2);
    let mut chars = sql.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch != '?' {
            out.push(ch);
            continue;
        }
        let mut n = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            n.push(*d);
            chars.next();
        }
        let n: usize = n.parse().expect("a numbered placeholder");
        out.push_str(&format!("(e.value ->> {})", n - 1));
    }
    out
}

/// The statements of [`persist_ends`], built once.
struct EndSql {
    runs: String,
    attempts: String,
}

static END_SQL: std::sync::LazyLock<EndSql> = std::sync::LazyLock::new(|| EndSql {
    runs: format!(
        "UPDATE runs SET {} FROM json_each(?1) AS e WHERE runs.id = e.value ->> 0",
        from_row(END_RUN_SET)
    ),
    attempts: format!(
        "UPDATE attempts SET {} FROM json_each(?1) AS e
         WHERE attempts.run_id = e.value ->> 0 AND attempts.attempt = e.value ->> 1",
        from_row(END_ATTEMPT_SET)
    ),
});

/// Persists the plans of ends whose leases hold their runs (distinct
/// runs) and the round's `events` (rows of [`event_row`], in order): one
/// run update, one attempt update and one event insert for all of them
/// (per-run statements were the other half of the writer thread's
/// instructions in W1), then each finished child's fan-in.
fn persist_ends(
    c: &Connection,
    ends: &[(&Fence, &AttemptEnd, plan::end::EndPlan)],
    events: Vec<Value>,
) -> Result<()> {
    write_ends(c, ends)?;
    insert_events(c, events)?;
    for (run, end, p) in ends {
        if let (true, Some(parent)) = (p.run.finished, run.awaited_by) {
            super::children::fan_in(c, parent, end.now)?;
        }
    }
    Ok(())
}

/// The run and attempt updates of [`persist_ends`].
fn write_ends(c: &Connection, ends: &[(&Fence, &AttemptEnd, plan::end::EndPlan)]) -> Result<()> {
    if ends.is_empty() {
        return Ok(());
    }
    let json_text = |v: &Option<Value>| v.as_ref().map(Value::to_string);
    let mut runs = Vec::with_capacity(ends.len());
    let mut attempts = Vec::with_capacity(ends.len());
    for (run, end, p) in ends {
        let (r, a) = (&p.run, &p.attempt);
        let id = run.id.to_string();
        runs.push(serde_json::json!([
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
        ]));
        attempts.push(serde_json::json!([
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
        ]));
    }
    let exec = |sql: &str, rows: Vec<Value>| -> Result<usize> {
        c.prepare_cached(sql)
            .map_err(db_err)?
            .execute([Value::from(rows).to_string()])
            .map_err(db_err)
    };
    let n = exec(&END_SQL.runs, runs)?;
    let m = exec(&END_SQL.attempts, attempts)?;
    if n != ends.len() || m != ends.len() {
        // Every run was fenced in this transaction: a bug; the caller's
        // savepoint rolls the whole call back.
        return Err(StoreError::Database(format!(
            "an end wrote {n} runs and {m} attempts for {} ends",
            ends.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// The set-based claim looks each run up by its primary key, one probe
    /// per id of the JSON array, never by scanning `runs`.
    #[test]
    fn the_claims_update_finds_each_run_by_its_key() {
        let c = Connection::open_in_memory().unwrap();
        super::super::migrate(&c).unwrap();
        let mut st = c
            .prepare(&format!("EXPLAIN QUERY PLAN {}", take_sql()))
            .unwrap();
        let steps: Vec<String> = st
            .query_map(params!["[]", 0, "w", 0, "running"], |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let all = steps.join("; ");
        assert!(all.contains("SCAN c VIRTUAL TABLE"), "{all}");
        assert!(
            steps
                .iter()
                .any(|s| s.starts_with("SEARCH runs USING INDEX sqlite_autoindex_runs")),
            "{all}"
        );
        assert!(!steps.iter().any(|s| s.starts_with("SCAN runs")), "{all}");
    }

    fn steps(c: &Connection, sql: &str) -> Vec<String> {
        let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = st.query_map(["[]"], |r| r.get::<_, String>(3)).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }

    /// The set-based end statements probe each run and attempt by key.
    #[test]
    fn the_end_statements_find_each_row_by_its_key() {
        let c = Connection::open_in_memory().unwrap();
        super::super::migrate(&c).unwrap();
        for (sql, table, index) in [
            (&END_SQL.runs, "runs", "USING INDEX sqlite_autoindex_runs"),
            (&END_SQL.attempts, "attempts", "USING PRIMARY KEY"),
        ] {
            let steps = steps(&c, sql);
            let all = steps.join("; ");
            assert!(
                steps
                    .iter()
                    .any(|s| s.starts_with(&format!("SEARCH {table} {index}"))),
                "{all}"
            );
            assert!(
                !steps
                    .iter()
                    .any(|s| s.starts_with(&format!("SCAN {table}"))),
                "{all}"
            );
        }
        let fence = "SELECT r.id FROM json_each(?1) AS i JOIN runs AS r ON r.id = i.value";
        let all = steps(&c, fence).join("; ");
        assert!(
            all.contains("SEARCH r USING") && all.contains("INDEX sqlite_autoindex_runs_1 (id=?)"),
            "{all}"
        );
    }

    #[test]
    fn placeholders_become_elements_of_the_row() {
        assert_eq!(
            from_row("a = ?2, b = COALESCE(?13, b)"),
            "a = (e.value ->> 1), b = COALESCE((e.value ->> 12), b)"
        );
    }

    #[test]
    fn a_runs_kth_end_goes_into_round_k_in_the_order_given() {
        let (a, b) = (RunId::new(), RunId::new());
        let end = |run_id| AttemptEnd {
            run_id,
            lease_id: LeaseId::new(),
            now: Timestamp(0),
            outcome: crate::Outcome::Cancelled,
        };
        let ends = vec![end(b), end(a), end(b), end(b), end(a)];
        assert_eq!(rounds(&ends), vec![vec![0, 1], vec![2, 4], vec![3]]);
    }
}
