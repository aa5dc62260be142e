//! Triggers, heartbeats and reads on SQLite, and the row decoding and
//! fencing the other modules share (the same concerns as
//! `postgres/ops.rs`). Every function runs inside the writer thread's
//! transaction (or on a read connection), under the caller's savepoint.

use crate::{
    AttemptRecord, EventFilter, EventRecord, LeaseRef, LeaseState, NewRun, Result, Run, RunFilter,
    StatusCount, TraceContext, Triggered,
};
use docket_core::{EventKind, LeaseId, RunId, RunStatus, Timestamp};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use serde_json::Value;

use super::db_err;
use crate::plan;

pub(super) const RUN_COLS: &str = "id, tenant, job, status, priority, input, variables, output, attempt, \
    attempts_forgiven, run_after, lease_id, lease_expires_at, worker, idempotency_key, correlation_id, \
    created_at, updated_at, finished_at, terminal_reason, last_error_class, last_error_message, \
    cancel_requested, retriggered_from, input_request, traceparent, tracestate, parent_id, \
    concurrency_key, concurrency_limit, debounce_key, debounce_keep, debounce_until, collapsed, \
    debounce_current";

pub(super) fn corrupt(what: &str, v: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("bad {what}: {v}").into(),
    )
}

pub(super) fn parse<T: std::str::FromStr>(what: &str, s: String) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| corrupt(what, e))
}

pub(super) fn parse_opt<T: std::str::FromStr>(
    what: &str,
    s: Option<String>,
) -> rusqlite::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    s.map(|s| parse(what, s)).transpose()
}

/// A JSON column: what cannot be decoded is read as the
/// `{"docket_undecodable": …}` marker, so one bad row never fails a list.
pub(super) fn json_col(s: String) -> rusqlite::Result<Value> {
    Ok(crate::json::decode_text(&s))
}

pub(super) fn json_opt(s: Option<String>) -> rusqlite::Result<Option<Value>> {
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
        trace: r
            .get::<_, Option<String>>(25)?
            .map(|traceparent| -> rusqlite::Result<_> {
                Ok(TraceContext {
                    traceparent,
                    tracestate: r.get(26)?,
                })
            })
            .transpose()?,
        parent_id: parse_opt("parent id", r.get(27)?)?,
        concurrency: r
            .get::<_, Option<String>>(28)?
            .map(|key| -> rusqlite::Result<_> {
                Ok(crate::ConcurrencyKey {
                    key,
                    limit: r.get::<_, Option<u32>>(29)?.unwrap_or(1),
                })
            })
            .transpose()?,
        debounce: r
            .get::<_, Option<String>>(30)?
            .map(|key| -> rusqlite::Result<_> {
                Ok(crate::RunDebounce {
                    key,
                    keep: parse(
                        "debounce mode",
                        r.get::<_, Option<String>>(31)?.unwrap_or_default(),
                    )?,
                    until: Timestamp(r.get::<_, Option<i64>>(32)?.unwrap_or(0)),
                    collapsed: r.get(33)?,
                    current: r.get::<_, Option<i64>>(34)?.is_some(),
                })
            })
            .transpose()?,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn insert_event(
    c: &Connection,
    run_id: RunId,
    tenant: &str,
    job: &str,
    kind: &EventKind,
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
        kind.as_str(),
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
                    collapsed: false,
                });
                continue;
            }
        }
        let (p, close) = match &r.debounce {
            None => (plan::trigger::trigger(&r, now), None),
            Some(d) => {
                let mut st = c
                    .prepare_cached(
                        "SELECT id, status, attempt, debounce_keep, debounce_until, collapsed, input
                         FROM runs WHERE tenant = ?1 AND job = ?2 AND debounce_key = ?3
                             AND debounce_current IS NOT NULL",
                    )
                    .map_err(db_err)?;
                let row = st
                    .query_row(params![r.tenant, r.job, d.key], |row| {
                        Ok((
                            parse::<RunId>("run id", row.get(0)?)?,
                            parse::<RunStatus>("status", row.get(1)?)?,
                            row.get::<_, u32>(2)?,
                            parse::<crate::Keep>("debounce mode", row.get(3)?)?,
                            Timestamp(row.get(4)?),
                            row.get::<_, u32>(5)?,
                            json_col(row.get(6)?)?,
                        ))
                    })
                    .optional()
                    .map_err(db_err)?;
                let window = row.as_ref().map(|w| plan::debounce::Window {
                    run: w.0,
                    status: w.1,
                    attempt: w.2,
                    keep: w.3,
                    until: w.4,
                    collapsed: w.5,
                    input: &w.6,
                });
                match plan::debounce::decide(window.as_ref(), &r, d, now) {
                    plan::debounce::Decision::Open { close, plan } => (plan, close),
                    plan::debounce::Decision::Collapse(k) => {
                        let mut st = c
                            .prepare_cached(&format!(
                                "UPDATE runs SET input = COALESCE(?2, input), collapsed = ?3, updated_at = ?4
                                 WHERE id = ?1 RETURNING {RUN_COLS}"
                            ))
                            .map_err(db_err)?;
                        let run = st
                            .query_row(
                                params![
                                    k.run.to_string(),
                                    k.input.as_ref().map(|v| v.to_string()),
                                    k.collapsed,
                                    now.0
                                ],
                                run_from_row,
                            )
                            .map_err(db_err)?;
                        insert_event(
                            c,
                            run.id,
                            &run.tenant,
                            &run.job,
                            &k.event.kind,
                            now,
                            None,
                            None,
                            r.actor.as_deref(),
                            None,
                            &k.event.data,
                        )?;
                        out.push(Triggered {
                            run,
                            existing: true,
                            collapsed: true,
                        });
                        continue;
                    }
                }
            }
        };
        if let Some(old) = close {
            c.prepare_cached("UPDATE runs SET debounce_current = NULL WHERE id = ?1")
                .map_err(db_err)?
                .execute([old.to_string()])
                .map_err(db_err)?;
        }
        let mut st = c
            .prepare_cached(&format!(
                "INSERT INTO runs (id, tenant, job, status, priority, input, variables, run_after,
                    idempotency_key, correlation_id, created_at, updated_at, retriggered_from,
                    traceparent, tracestate, concurrency_key, concurrency_limit,
                    debounce_key, debounce_keep, debounce_until, debounce_current)
                 VALUES (?1, ?2, ?3, ?11, ?4, ?5, '{{}}', ?6, ?7, ?8, ?9, ?9, ?10, ?12, ?13, ?14, ?15,
                    ?16, ?17, ?18, CASE WHEN ?16 IS NOT NULL THEN 1 END)
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
                    p.run_after.0,
                    r.idempotency_key,
                    r.correlation_id,
                    now.0,
                    r.retriggered_from.map(|i| i.to_string()),
                    p.status.as_str(),
                    r.trace.as_ref().map(|t| t.traceparent.as_str()),
                    r.trace.as_ref().and_then(|t| t.tracestate.as_deref()),
                    r.concurrency.as_ref().map(|k| k.key.as_str()),
                    r.concurrency.as_ref().map(|k| k.limit),
                    r.debounce.as_ref().map(|d| d.key.as_str()),
                    r.debounce.as_ref().map(|d| d.keep.as_str()),
                    p.debounce_until.map(|t| t.0),
                ],
                run_from_row,
            )
            .map_err(db_err)?;
        insert_event(
            c,
            run.id,
            &run.tenant,
            &run.job,
            &p.event.kind,
            now,
            None,
            None,
            r.actor.as_deref(),
            None,
            &p.event.data,
        )?;
        out.push(Triggered {
            run,
            existing: false,
            collapsed: false,
        });
    }
    Ok(out)
}

pub(super) fn placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns a fenced write needs (cheaper than decoding the whole run).
pub(super) struct Fence {
    pub(super) id: RunId,
    pub(super) tenant: String,
    pub(super) job: String,
    pub(super) status: RunStatus,
    pub(super) attempt: u32,
    pub(super) lease_id: Option<LeaseId>,
    pub(super) lease_expires_at: Option<Timestamp>,
    /// The parent whose join waits for this run (`parent_waits`), if any:
    /// its end to a final state is the parent's fan-in.
    pub(super) awaited_by: Option<RunId>,
}

pub(super) fn fence_row(c: &Connection, id: RunId) -> Result<Option<Fence>> {
    let mut st = c
        .prepare_cached(
            "SELECT tenant, job, status, attempt, lease_id, lease_expires_at,
            CASE WHEN parent_waits = 1 THEN parent_id END FROM runs WHERE id = ?1",
        )
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
            awaited_by: parse_opt("parent id", r.get(6)?)?,
        })
    })
    .optional()
    .map_err(db_err)
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
    let sql = plan::concurrency::next_due_sql(&format!("IN ({})", placeholders(1, jobs.len())));
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let v: Option<i64> = st
        .query_row(params_from_iter(jobs.iter()), |r| r.get(0))
        .map_err(db_err)?;
    Ok(v.map(Timestamp))
}

pub(super) fn concurrency_usage(
    c: &Connection,
    tenant: Option<&str>,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<crate::KeyUsage>> {
    let sql = plan::concurrency::usage_sql("?1", "?2", "?3");
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let rows = st
        .query_map(params![now.0, tenant, limit as i64], |r| {
            Ok(crate::KeyUsage {
                key: r.get(0)?,
                limit: r.get::<_, Option<u32>>(1)?.unwrap_or(1),
                running: r.get(2)?,
                due: r.get(3)?,
                waiting: r.get(4)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

pub(super) fn debounce_windows(
    c: &Connection,
    tenant: Option<&str>,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<crate::DebounceWindow>> {
    let sql = plan::debounce::windows_sql("?1", tenant.map(|_| "?3"), "?2");
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let map = |r: &Row<'_>| {
        Ok(crate::DebounceWindow {
            tenant: r.get(0)?,
            job: r.get(1)?,
            key: r.get(2)?,
            keep: parse("debounce keep", r.get(3)?)?,
            opened_at: Timestamp(r.get(4)?),
            until: Timestamp(r.get(5)?),
            run: parse("run id", r.get(6)?)?,
            status: parse("status", r.get(7)?)?,
            collapsed: r.get(8)?,
        })
    };
    let rows = match tenant {
        Some(t) => st.query_map(params![now.0, limit as i64, t], map),
        None => st.query_map(params![now.0, limit as i64], map),
    }
    .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

pub(super) fn debounce_counts(
    c: &Connection,
    tenant: Option<&str>,
    now: Timestamp,
) -> Result<Vec<crate::DebounceCount>> {
    let sql = plan::debounce::counts_sql("?1", tenant.map(|_| "?2"));
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let map = |r: &Row<'_>| {
        Ok(crate::DebounceCount {
            tenant: r.get(0)?,
            job: r.get(1)?,
            open: r.get(2)?,
        })
    };
    let rows = match tenant {
        Some(t) => st.query_map(params![now.0, t], map),
        None => st.query_map(params![now.0], map),
    }
    .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
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
                outcome: parse("attempt outcome", r.get(6)?)?,
                error_class: parse_opt("error class", r.get(7)?)?,
                error_message: r.get(8)?,
                fingerprint: r.get(9)?,
                failure_key: r.get(10)?,
                action: r.get(11)?,
                retry_policy: r.get(12)?,
                delay_ms: r.get(13)?,
                eligible_at: r.get::<_, Option<i64>>(14)?.map(Timestamp),
                retry_reason: parse_opt("retry reason", r.get(15)?)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

/// The events query with a clause only for each filter given. Written out
/// per shape rather than as `(?1 IS NULL OR run_id = ?1)`: SQLite plans a
/// statement once, before it sees the values, and cannot use `events_run`
/// for such an OR, so every run's timeline scanned the whole table (a job's
/// forensic report, one query per run, took over 20 s on a busy database).
fn events_sql(f: &EventFilter) -> (String, Vec<SqlValue>) {
    let mut sql = String::from(
        "SELECT id, run_id, tenant, job, kind, at, attempt, lease_id, actor, comment, data
         FROM events WHERE id > ?1",
    );
    let mut args: Vec<SqlValue> = vec![f.after_id.unwrap_or(0).into()];
    let mut push = |sql: &mut String, clause: &str, v: SqlValue| {
        args.push(v);
        sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
    };
    if let Some(r) = f.run_id {
        push(&mut sql, " AND run_id = ?", r.to_string().into());
    }
    if let Some(t) = &f.tenant {
        push(&mut sql, " AND tenant = ?", t.clone().into());
    }
    if let Some(j) = &f.job {
        push(&mut sql, " AND job = ?", j.clone().into());
    }
    let limit = if f.limit == 0 { 1000 } else { f.limit };
    push(&mut sql, " ORDER BY id LIMIT ?", (limit as i64).into());
    (sql, args)
}

pub(super) fn events(c: &Connection, f: &EventFilter) -> Result<Vec<EventRecord>> {
    let (sql, args) = events_sql(f);
    let mut st = c.prepare_cached(&sql).map_err(db_err)?;
    let rows = st
        .query_map(params_from_iter(args), |r| {
            Ok(EventRecord {
                id: r.get(0)?,
                run_id: parse("run id", r.get(1)?)?,
                tenant: r.get(2)?,
                job: r.get(3)?,
                kind: EventKind::parse(&r.get::<_, String>(4)?),
                at: Timestamp(r.get(5)?),
                attempt: r.get(6)?,
                lease_id: parse_opt("lease id", r.get(7)?)?,
                actor: r.get(8)?,
                comment: r.get(9)?,
                data: json_col(r.get(10)?)?,
            })
        })
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    fn plan(c: &Connection, f: &EventFilter) -> String {
        let (sql, args) = events_sql(f);
        let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = st
            .query_map(params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap();
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
            .join("; ")
    }

    /// A run's timeline is read through `events_run`, not by scanning every
    /// event: the forensic report reads it once per run of a job.
    #[test]
    fn a_runs_events_are_read_by_index() {
        let c = Connection::open_in_memory().unwrap();
        super::super::migrate(&c).unwrap();
        let by_run = plan(
            &c,
            &EventFilter {
                run_id: Some(RunId(uuid::Uuid::nil())),
                limit: 10,
                ..Default::default()
            },
        );
        assert!(by_run.contains("USING INDEX events_run"), "{by_run}");
        // The feed (no run) walks the primary key from the cursor.
        let feed = plan(&c, &EventFilter::default());
        assert!(!feed.contains("events_run"), "{feed}");
        assert!(feed.contains("INTEGER PRIMARY KEY"), "{feed}");
    }

    /// `next_due` never reads the whole table: unkeyed runs through
    /// `runs_due` in due order, keys by a skip scan of `runs_keyed_claim`
    /// (a full scan per idle turn used to cost as much as the backlog).
    #[test]
    fn next_due_is_read_by_index() {
        let c = Connection::open_in_memory().unwrap();
        super::super::migrate(&c).unwrap();
        let sql = plan::concurrency::next_due_sql("IN (?1)");
        let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let steps: Vec<String> = st
            .query_map(["job"], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let all = steps.join("; ");
        assert!(all.contains("USING INDEX runs_due"), "{all}");
        assert!(all.contains("runs_keyed_claim"), "{all}");
        for s in &steps {
            assert!(
                !s.starts_with("SCAN runs") || s.contains("INDEX"),
                "a full scan of runs: {all}"
            );
        }
    }
}
