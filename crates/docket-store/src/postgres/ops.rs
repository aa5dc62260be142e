//! Triggers, heartbeats and reads on PostgreSQL, and the row decoding the
//! other modules share (the same concerns as `sqlite/ops.rs`; claims and
//! ends are in `hot.rs`, steps, the ledger and operator commands in
//! `durable.rs`, as on SQLite). Set-based where PostgreSQL makes that
//! cheaper (trigger, heartbeat). All queries are runtime `sqlx::query`
//! calls with bound parameters.

use crate::{
    AttemptRecord, EventFilter, EventRecord, LeaseRef, LeaseState, NewRun, Result, Run, RunFilter,
    StatusCount, StoreError, TraceContext, Triggered,
};
use docket_core::{LeaseId, RunId, RunStatus, Timestamp};
use sqlx::postgres::{PgConnection, PgExecutor, PgRow, Postgres};
use sqlx::{QueryBuilder, Row};
use std::collections::HashMap;
use uuid::Uuid;

use super::db;

/// Every column of `runs`, in the order of [`Run`]'s fields. Decoded by name
/// in [`run_from_row`], so `RETURNING r.*` works as well.
pub(super) const RUN_COLS: &str = "id, tenant, job, status, priority, input, variables, output, attempt, \
    attempts_forgiven, run_after, lease_id, lease_expires_at, worker, idempotency_key, correlation_id, \
    created_at, updated_at, finished_at, terminal_reason, last_error_class, last_error_message, \
    cancel_requested, retriggered_from, input_request, traceparent, tracestate, parent_id, \
    concurrency_key, concurrency_limit, debounce_key, debounce_keep, debounce_until, collapsed, \
    debounce_current";

fn sql_limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn get<'r, T>(r: &'r PgRow, col: &str) -> Result<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    r.try_get(col).map_err(db)
}

/// A nullable JSON column: what cannot be decoded (e.g. nested deeper than
/// `serde_json` reads) is read as the `{"docket_undecodable": …}` marker, so
/// one bad row never fails a list.
pub(super) fn json_opt(r: &PgRow, col: &str) -> Result<Option<serde_json::Value>> {
    use sqlx::ValueRef;
    let raw = r.try_get_raw(col).map_err(db)?;
    if raw.is_null() {
        return Ok(None);
    }
    Ok(Some(
        match <sqlx::types::Json<serde_json::Value> as sqlx::Decode<Postgres>>::decode(raw) {
            Ok(v) => v.0,
            Err(e) => crate::json::undecodable(e),
        },
    ))
}

/// A JSON column that is never NULL (see [`json_opt`]).
pub(super) fn json(r: &PgRow, col: &str) -> Result<serde_json::Value> {
    json_opt(r, col)?.ok_or_else(|| StoreError::Corrupt(format!("`{col}` is NULL")))
}

fn parse<T: std::str::FromStr>(what: &str, s: String) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>()
        .map_err(|e| StoreError::Corrupt(format!("bad {what} `{s}`: {e}")))
}

fn parse_opt<T: std::str::FromStr>(what: &str, s: Option<String>) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    s.map(|s| parse(what, s)).transpose()
}

fn count(what: &str, v: i32) -> Result<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}: {v}")))
}

/// Decodes a row holding (at least) [`RUN_COLS`].
pub(super) fn run_from_row(r: &PgRow) -> Result<Run> {
    Ok(Run {
        id: RunId(get(r, "id")?),
        tenant: get(r, "tenant")?,
        job: get(r, "job")?,
        status: parse("status", get(r, "status")?)?,
        priority: get(r, "priority")?,
        input: json(r, "input")?,
        variables: json(r, "variables")?,
        output: json_opt(r, "output")?,
        attempt: count("attempt", get(r, "attempt")?)?,
        attempts_forgiven: count("attempts_forgiven", get(r, "attempts_forgiven")?)?,
        run_after: Timestamp(get(r, "run_after")?),
        lease_id: get::<Option<Uuid>>(r, "lease_id")?.map(LeaseId),
        lease_expires_at: get::<Option<i64>>(r, "lease_expires_at")?.map(Timestamp),
        worker: get(r, "worker")?,
        idempotency_key: get(r, "idempotency_key")?,
        correlation_id: get(r, "correlation_id")?,
        created_at: Timestamp(get(r, "created_at")?),
        updated_at: Timestamp(get(r, "updated_at")?),
        finished_at: get::<Option<i64>>(r, "finished_at")?.map(Timestamp),
        terminal_reason: parse_opt("terminal reason", get(r, "terminal_reason")?)?,
        last_error_class: parse_opt("error class", get(r, "last_error_class")?)?,
        last_error_message: get(r, "last_error_message")?,
        cancel_requested: get(r, "cancel_requested")?,
        retriggered_from: get::<Option<Uuid>>(r, "retriggered_from")?.map(RunId),
        input_request: json_opt(r, "input_request")?,
        trace: get::<Option<String>>(r, "traceparent")?
            .map(|traceparent| -> Result<_> {
                Ok(TraceContext {
                    traceparent,
                    tracestate: get(r, "tracestate")?,
                })
            })
            .transpose()?,
        parent_id: get::<Option<Uuid>>(r, "parent_id")?.map(RunId),
        concurrency: get::<Option<String>>(r, "concurrency_key")?
            .map(|key| -> Result<_> {
                Ok(crate::ConcurrencyKey {
                    key,
                    limit: u32::try_from(get::<Option<i64>>(r, "concurrency_limit")?.unwrap_or(1))
                        .unwrap_or(1),
                })
            })
            .transpose()?,
        debounce: get::<Option<String>>(r, "debounce_key")?
            .map(|key| -> Result<_> {
                let keep: Option<String> = get(r, "debounce_keep")?;
                Ok(crate::RunDebounce {
                    key,
                    keep: keep
                        .unwrap_or_default()
                        .parse()
                        .map_err(StoreError::Database)?,
                    until: Timestamp(get::<Option<i64>>(r, "debounce_until")?.unwrap_or(0)),
                    collapsed: u32::try_from(get::<i64>(r, "collapsed")?).unwrap_or(u32::MAX),
                    current: get::<Option<bool>>(r, "debounce_current")?.is_some(),
                })
            })
            .transpose()?,
    })
}

fn runs_from_rows(rows: Vec<PgRow>) -> Result<Vec<Run>> {
    rows.iter().map(run_from_row).collect()
}

pub(super) async fn get_run<'e>(ex: impl PgExecutor<'e>, id: RunId) -> Result<Option<Run>> {
    let row = sqlx::query(&format!("SELECT {RUN_COLS} FROM runs WHERE id = $1"))
        .bind(id.0)
        .fetch_optional(ex)
        .await
        .map_err(db)?;
    row.as_ref().map(run_from_row).transpose()
}

/// Inserts the batch in one statement (`ON CONFLICT DO NOTHING` on the
/// idempotency index, events for the inserted rows only, and a
/// `pg_notify` for each job of `notify_now` that got new runs, delivered
/// when the statement commits), then reads the runs whose keys were taken. The second statement runs with a fresh
/// snapshot, so it sees a conflicting run committed concurrently (the insert
/// waited for that transaction to end).
pub(super) async fn trigger(
    c: &mut PgConnection,
    runs: Vec<NewRun>,
    now: Timestamp,
    notify_now: &[String],
) -> Result<Vec<Triggered>> {
    if runs.iter().all(|r| r.debounce.is_none()) {
        // One set-based statement, in autocommit.
        return trigger_set(c, runs, now, notify_now).await;
    }
    // A batch with debounced runs: one transaction, run by run in order,
    // so a later entry of the batch sees (and may collapse into) an
    // earlier one.
    let mut tx = sqlx::Connection::begin(&mut *c).await.map_err(db)?;
    // Every debounced key of the batch is locked first, in one order for
    // every transaction (a transaction-level advisory lock per (tenant,
    // job, key), sorted): two batches with the same keys in different
    // orders queue instead of deadlocking on each other's window rows.
    let mut keys: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            r.debounce
                .as_ref()
                .map(|d| format!("{}\u{1f}{}\u{1f}{}", r.tenant, r.job, d.key))
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    for k in &keys {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('docket.debounce/' || current_schema() || '/' || $1, 0))",
        )
        .bind(k)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    }
    // Then the keys' current window runs, in id order (the order ends and
    // operator commands lock runs in), so this transaction cannot deadlock
    // with a batch of ends holding two of them.
    let (mut ts, mut js, mut ks) = (Vec::new(), Vec::new(), Vec::new());
    for r in &runs {
        if let Some(d) = &r.debounce {
            ts.push(r.tenant.as_str());
            js.push(r.job.as_str());
            ks.push(d.key.as_str());
        }
    }
    sqlx::query(
        "SELECT id FROM runs
         WHERE (tenant, job, debounce_key) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))
           AND debounce_current IS NOT NULL
         ORDER BY id FOR UPDATE",
    )
    .bind(&ts)
    .bind(&js)
    .bind(&ks)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        if r.debounce.is_some() {
            out.push(trigger_debounced(&mut tx, r, now, notify_now).await?);
        } else {
            out.extend(trigger_set(&mut tx, vec![r], now, notify_now).await?);
        }
    }
    tx.commit().await.map_err(db)?;
    Ok(out)
}

/// One debounced trigger, inside the caller's transaction: the key's
/// current window's run is locked (`FOR UPDATE`), `plan::debounce::decide`
/// says whether to collapse into it or open a new window, and the answer
/// is persisted. Two triggers racing to open a window meet on the partial
/// unique index `runs_debounce_current`: the loser's insert does nothing
/// (after the winner commits), and it reads and collapses into the
/// winner's run.
async fn trigger_debounced(
    c: &mut PgConnection,
    r: NewRun,
    now: Timestamp,
    notify_now: &[String],
) -> Result<Triggered> {
    let Some(d) = r.debounce.clone() else {
        return Err(StoreError::Database("not a debounced trigger".into()));
    };
    for _ in 0..4 {
        if let Some(key) = &r.idempotency_key {
            let found = sqlx::query(&format!(
                "SELECT {RUN_COLS} FROM runs WHERE tenant = $1 AND job = $2 AND idempotency_key = $3"
            ))
            .bind(&r.tenant)
            .bind(&r.job)
            .bind(key)
            .fetch_optional(&mut *c)
            .await
            .map_err(db)?;
            if let Some(row) = found {
                return Ok(Triggered {
                    run: run_from_row(&row)?,
                    existing: true,
                    collapsed: false,
                });
            }
        }
        let row = sqlx::query(
            "SELECT id, status, attempt, debounce_keep, debounce_until, collapsed, input
             FROM runs WHERE tenant = $1 AND job = $2 AND debounce_key = $3
                 AND debounce_current IS NOT NULL
             FOR UPDATE",
        )
        .bind(&r.tenant)
        .bind(&r.job)
        .bind(&d.key)
        .fetch_optional(&mut *c)
        .await
        .map_err(db)?;
        let current = match &row {
            None => None,
            Some(w) => {
                let status: String = get(w, "status")?;
                let keep: Option<String> = get(w, "debounce_keep")?;
                Some((
                    RunId(get(w, "id")?),
                    status.parse::<RunStatus>().map_err(StoreError::Database)?,
                    u32::try_from(get::<i32>(w, "attempt")?).unwrap_or(0),
                    keep.unwrap_or_default()
                        .parse::<crate::Keep>()
                        .map_err(StoreError::Database)?,
                    Timestamp(get::<Option<i64>>(w, "debounce_until")?.unwrap_or(0)),
                    u32::try_from(get::<i64>(w, "collapsed")?).unwrap_or(u32::MAX),
                    get::<serde_json::Value>(w, "input")?,
                ))
            }
        };
        let window = current.as_ref().map(|w| crate::plan::debounce::Window {
            run: w.0,
            status: w.1,
            attempt: w.2,
            keep: w.3,
            until: w.4,
            collapsed: w.5,
            input: &w.6,
        });
        let (p, close) = match crate::plan::debounce::decide(window.as_ref(), &r, &d, now) {
            crate::plan::debounce::Decision::Collapse(k) => {
                let row = sqlx::query(&format!(
                    "UPDATE runs SET input = COALESCE($2, input), collapsed = $3, updated_at = $4
                     WHERE id = $1 RETURNING {RUN_COLS}"
                ))
                .bind(k.run.0)
                .bind(k.input.as_ref())
                .bind(i64::from(k.collapsed))
                .bind(now.0)
                .fetch_one(&mut *c)
                .await
                .map_err(db)?;
                let run = run_from_row(&row)?;
                super::durable::event(
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
                )
                .await?;
                return Ok(Triggered {
                    run,
                    existing: true,
                    collapsed: true,
                });
            }
            crate::plan::debounce::Decision::Open { close, plan } => (plan, close),
        };
        if let Some(old) = close {
            sqlx::query("UPDATE runs SET debounce_current = NULL WHERE id = $1")
                .bind(old.0)
                .execute(&mut *c)
                .await
                .map_err(db)?;
        }
        // No conflict target: a racing trigger that took the window (or the
        // idempotency key) first makes this insert do nothing, after it
        // commits; the next round reads what it wrote.
        let inserted = sqlx::query(&format!(
            "INSERT INTO runs (id, tenant, job, status, priority, input, variables, run_after,
                idempotency_key, correlation_id, created_at, updated_at, retriggered_from,
                traceparent, tracestate, concurrency_key, concurrency_limit,
                debounce_key, debounce_keep, debounce_until, debounce_current)
             VALUES ($1, $2, $3, $4, $5, $6, '{{}}', $7, $8, $9, $10, $10, $11, $12, $13, $14, $15,
                $16, $17, $18, TRUE)
             ON CONFLICT DO NOTHING
             RETURNING {RUN_COLS}"
        ))
        .bind(r.id.0)
        .bind(&r.tenant)
        .bind(&r.job)
        .bind(p.status.as_str())
        .bind(r.priority)
        .bind(&r.input)
        .bind(p.run_after.0)
        .bind(r.idempotency_key.as_deref())
        .bind(r.correlation_id.as_deref())
        .bind(now.0)
        .bind(r.retriggered_from.map(|f| f.0))
        .bind(r.trace.as_ref().map(|t| t.traceparent.as_str()))
        .bind(r.trace.as_ref().and_then(|t| t.tracestate.as_deref()))
        .bind(r.concurrency.as_ref().map(|k| k.key.as_str()))
        .bind(r.concurrency.as_ref().map(|k| i64::from(k.limit)))
        .bind(&d.key)
        .bind(d.keep.as_str())
        .bind(p.debounce_until.map(|t| t.0))
        .fetch_optional(&mut *c)
        .await
        .map_err(db)?;
        let Some(row) = inserted else {
            continue;
        };
        let run = run_from_row(&row)?;
        super::durable::event(
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
        )
        .await?;
        if notify_now.contains(&run.job) {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(super::WAKEUP_CHANNEL)
                .bind(&run.job)
                .execute(&mut *c)
                .await
                .map_err(db)?;
        }
        return Ok(Triggered {
            run,
            existing: false,
            collapsed: false,
        });
    }
    Err(StoreError::Database(format!(
        "the debounce window of key `{}` kept changing during the trigger; retry",
        d.key
    )))
}

/// Triggers without a debounce: one set-based statement.
async fn trigger_set(
    c: &mut PgConnection,
    runs: Vec<NewRun>,
    now: Timestamp,
    notify_now: &[String],
) -> Result<Vec<Triggered>> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let n = runs.len();
    let mut ids = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut jobs = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut inputs = Vec::with_capacity(n);
    let mut run_afters = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut correlations = Vec::with_capacity(n);
    let mut from = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut datas = Vec::with_capacity(n);
    // Every new run starts in the same status with the same event kind
    // (the plan says which); only the values differ per run.
    let first = crate::plan::trigger::trigger(&runs[0], now);
    let (status, kind) = (first.status.as_str(), first.event.kind.as_str().to_string());
    let mut parents = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut ckeys: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut climits: Vec<Option<i64>> = Vec::with_capacity(n);
    for r in &runs {
        let p = crate::plan::trigger::trigger(r, now);
        debug_assert!(p.status.as_str() == status && p.event.kind.as_str() == kind);
        ids.push(r.id.0);
        tenants.push(r.tenant.as_str());
        jobs.push(r.job.as_str());
        priorities.push(r.priority);
        inputs.push(&r.input);
        run_afters.push(p.run_after.0);
        keys.push(r.idempotency_key.as_deref());
        correlations.push(r.correlation_id.as_deref());
        from.push(r.retriggered_from.map(|f| f.0));
        actors.push(r.actor.as_deref());
        datas.push(p.event.data);
        parents.push(r.trace.as_ref().map(|t| t.traceparent.as_str()));
        states.push(r.trace.as_ref().and_then(|t| t.tracestate.as_deref()));
        ckeys.push(r.concurrency.as_ref().map(|k| k.key.as_str()));
        climits.push(r.concurrency.as_ref().map(|k| i64::from(k.limit)));
    }
    let rows = sqlx::query(&format!(
        "WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::jsonb[],
                                 $6::int8[], $7::text[], $8::text[], $9::uuid[], $10::text[], $11::jsonb[],
                                 $15::text[], $16::text[], $19::text[], $20::int8[])
                WITH ORDINALITY AS t(id, tenant, job, priority, input, run_after, idempotency_key,
                                     correlation_id, retriggered_from, actor, data, traceparent,
                                     tracestate, concurrency_key, concurrency_limit, ord)
         ),
         ins AS (
            INSERT INTO runs (id, tenant, job, status, priority, input, variables, run_after,
                              idempotency_key, correlation_id, created_at, updated_at, retriggered_from,
                              traceparent, tracestate, concurrency_key, concurrency_limit)
            SELECT id, tenant, job, $17, priority, input, '{{}}', run_after, idempotency_key,
                   correlation_id, $12, $12, retriggered_from, traceparent, tracestate,
                   concurrency_key, concurrency_limit
            FROM input ORDER BY ord
            ON CONFLICT (tenant, job, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING {RUN_COLS}
         ),
         ev AS (
            INSERT INTO events (run_id, tenant, job, kind, at, actor, data)
            SELECT ins.id, ins.tenant, ins.job, $18, $12, i.actor, i.data
            FROM ins JOIN (SELECT DISTINCT ON (id) id, actor, data, ord FROM input ORDER BY id, ord) i
                ON i.id = ins.id
            ORDER BY i.ord
         ),
         note AS (
            SELECT pg_notify($13, j.job) FROM (SELECT DISTINCT job FROM ins) j
            WHERE j.job = ANY($14)
         )
         SELECT {RUN_COLS} FROM ins WHERE (SELECT count(*) FROM note) >= 0"
    ))
    .bind(&ids)
    .bind(&tenants)
    .bind(&jobs)
    .bind(&priorities)
    .bind(&inputs)
    .bind(&run_afters)
    .bind(&keys)
    .bind(&correlations)
    .bind(&from)
    .bind(&actors)
    .bind(&datas)
    .bind(now.0)
    .bind(super::WAKEUP_CHANNEL)
    .bind(notify_now)
    .bind(&parents)
    .bind(&states)
    .bind(status)
    .bind(&kind)
    .bind(&ckeys)
    .bind(&climits)
    .fetch_all(&mut *c)
    .await
    .map_err(db)?;
    let mut inserted: HashMap<RunId, Run> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let run = run_from_row(row)?;
        inserted.insert(run.id, run);
    }
    // The rest hit an idempotency key already used (by an earlier run, or
    // by an earlier entry of this batch).
    let mut taken: Vec<(&str, &str, &str)> = Vec::new();
    let mut slots: Vec<Option<Run>> = Vec::with_capacity(n);
    for r in &runs {
        let run = inserted.remove(&r.id);
        if run.is_none() {
            let key = r
                .idempotency_key
                .as_deref()
                .ok_or_else(|| StoreError::Database(format!("run {} was not inserted", r.id)))?;
            taken.push((r.tenant.as_str(), r.job.as_str(), key));
        }
        slots.push(run);
    }
    let mut found: HashMap<(String, String, String), Run> = HashMap::new();
    if !taken.is_empty() {
        taken.sort_unstable();
        taken.dedup();
        let t: Vec<&str> = taken.iter().map(|k| k.0).collect();
        let j: Vec<&str> = taken.iter().map(|k| k.1).collect();
        let k: Vec<&str> = taken.iter().map(|k| k.2).collect();
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLS} FROM runs
             WHERE (tenant, job, idempotency_key) IN
                 (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))"
        ))
        .bind(&t)
        .bind(&j)
        .bind(&k)
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
        for row in &rows {
            let run = run_from_row(row)?;
            if let Some(key) = run.idempotency_key.clone() {
                found.insert((run.tenant.clone(), run.job.clone(), key), run);
            }
        }
    }
    runs.iter()
        .zip(slots)
        .map(|(r, slot)| match slot {
            Some(run) => Ok(Triggered {
                run,
                existing: false,
                collapsed: false,
            }),
            None => {
                let key = (
                    r.tenant.clone(),
                    r.job.clone(),
                    r.idempotency_key.clone().unwrap_or_default(),
                );
                match found.get(&key) {
                    Some(run) => Ok(Triggered {
                        run: run.clone(),
                        existing: true,
                        collapsed: false,
                    }),
                    None => Err(StoreError::Database(format!(
                        "the run with idempotency key `{}` vanished during trigger; retry",
                        key.2
                    ))),
                }
            }
        })
        .collect()
}

/// One statement. Rows are locked in id order (as `finish` does) before
/// they are updated, so concurrent heartbeats and finishes cannot deadlock.
pub(super) async fn heartbeat<'e>(
    ex: impl PgExecutor<'e>,
    leases: &[LeaseRef],
    expires_at: Timestamp,
) -> Result<Vec<LeaseState>> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let runs: Vec<Uuid> = leases.iter().map(|l| l.run_id.0).collect();
    let ids: Vec<Uuid> = leases.iter().map(|l| l.lease_id.0).collect();
    let rows = sqlx::query(
        "WITH l AS (SELECT * FROM unnest($1::uuid[], $2::uuid[]) AS l(run_id, lease_id)),
         locked AS (
            SELECT r.id, r.lease_id FROM runs r JOIN l ON r.id = l.run_id AND r.lease_id = l.lease_id
            WHERE r.status = 'running'
            ORDER BY r.id
            FOR UPDATE OF r
         )
         UPDATE runs r SET lease_expires_at = $3 FROM locked
         WHERE r.id = locked.id AND r.lease_id = locked.lease_id AND r.status = 'running'
         RETURNING r.id, r.lease_id, r.cancel_requested",
    )
    .bind(&runs)
    .bind(&ids)
    .bind(expires_at.0)
    .fetch_all(ex)
    .await
    .map_err(db)?;
    let mut held: HashMap<(Uuid, Uuid), bool> = HashMap::with_capacity(rows.len());
    for row in &rows {
        held.insert(
            (get(row, "id")?, get(row, "lease_id")?),
            get(row, "cancel_requested")?,
        );
    }
    Ok(leases
        .iter()
        .map(|l| match held.get(&(l.run_id.0, l.lease_id.0)) {
            Some(&cancel) => LeaseState {
                held: true,
                cancel_requested: cancel,
            },
            None => LeaseState {
                held: false,
                cancel_requested: false,
            },
        })
        .collect())
}

pub(super) async fn expired_leases<'e>(
    ex: impl PgExecutor<'e>,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<Run>> {
    let rows = sqlx::query(&format!(
        "SELECT {RUN_COLS} FROM runs WHERE status = 'running' AND lease_expires_at <= $1
         ORDER BY lease_expires_at LIMIT $2"
    ))
    .bind(now.0)
    .bind(sql_limit(limit))
    .fetch_all(ex)
    .await
    .map_err(db)?;
    runs_from_rows(rows)
}

pub(super) async fn concurrency_usage<'e>(
    ex: impl PgExecutor<'e>,
    tenant: Option<&str>,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<crate::KeyUsage>> {
    let sql = crate::plan::concurrency::usage_sql("$1", "$2::text", "$3");
    let rows = sqlx::query(&sql)
        .bind(now.0)
        .bind(tenant)
        .bind(sql_limit(limit))
        .fetch_all(ex)
        .await
        .map_err(db)?;
    rows.iter()
        .map(|r| {
            let n = |col: &str| -> Result<u64> {
                Ok(u64::try_from(get::<Option<i64>>(r, col)?.unwrap_or(0)).unwrap_or(0))
            };
            Ok(crate::KeyUsage {
                key: get(r, "concurrency_key")?,
                limit: u32::try_from(get::<Option<i64>>(r, "lim")?.unwrap_or(1)).unwrap_or(1),
                running: n("running")?,
                due: n("due")?,
                waiting: n("waiting")?,
            })
        })
        .collect()
}

pub(super) async fn debounce_windows<'e>(
    ex: impl PgExecutor<'e>,
    tenant: Option<&str>,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<crate::DebounceWindow>> {
    let sql = crate::plan::debounce::windows_sql("$1", tenant.map(|_| "$3"), "$2");
    let mut q = sqlx::query(&sql).bind(now.0).bind(sql_limit(limit));
    if let Some(t) = tenant {
        q = q.bind(t);
    }
    let rows = q.fetch_all(ex).await.map_err(db)?;
    rows.iter()
        .map(|r| {
            let text = |i: usize| -> Result<String> { r.try_get(i).map_err(db) };
            Ok(crate::DebounceWindow {
                tenant: text(0)?,
                job: text(1)?,
                key: text(2)?,
                keep: text(3)?.parse().map_err(StoreError::Corrupt)?,
                opened_at: Timestamp(r.try_get(4).map_err(db)?),
                until: Timestamp(r.try_get(5).map_err(db)?),
                run: RunId(r.try_get(6).map_err(db)?),
                status: text(7)?.parse().map_err(StoreError::Corrupt)?,
                collapsed: u32::try_from(r.try_get::<i64, _>(8).map_err(db)?).unwrap_or(u32::MAX),
            })
        })
        .collect()
}

pub(super) async fn debounce_counts<'e>(
    ex: impl PgExecutor<'e>,
    tenant: Option<&str>,
    now: Timestamp,
) -> Result<Vec<crate::DebounceCount>> {
    let sql = crate::plan::debounce::counts_sql("$1", tenant.map(|_| "$2"));
    let mut q = sqlx::query(&sql).bind(now.0);
    if let Some(t) = tenant {
        q = q.bind(t);
    }
    let rows = q.fetch_all(ex).await.map_err(db)?;
    rows.iter()
        .map(|r| {
            Ok(crate::DebounceCount {
                tenant: r.try_get(0).map_err(db)?,
                job: r.try_get(1).map_err(db)?,
                open: u64::try_from(r.try_get::<i64, _>(2).map_err(db)?).unwrap_or(0),
            })
        })
        .collect()
}

pub(super) async fn next_due<'e>(
    ex: impl PgExecutor<'e>,
    jobs: &[String],
) -> Result<Option<Timestamp>> {
    if jobs.is_empty() {
        return Ok(None);
    }
    let v: Option<i64> = sqlx::query_scalar(&crate::plan::concurrency::next_due_sql("= ANY($1)"))
        .bind(jobs)
        .fetch_one(ex)
        .await
        .map_err(db)?;
    Ok(v.map(Timestamp))
}

pub(super) async fn list_runs<'e>(ex: impl PgExecutor<'e>, f: &RunFilter) -> Result<Vec<Run>> {
    let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {RUN_COLS} FROM runs WHERE true"));
    if let Some(t) = &f.tenant {
        q.push(" AND tenant = ").push_bind(t.clone());
    }
    if let Some(j) = &f.job {
        q.push(" AND job = ").push_bind(j.clone());
    }
    if let Some(t) = f.created_after {
        q.push(" AND created_at >= ").push_bind(t.0);
    }
    if let Some(t) = f.created_before {
        q.push(" AND created_at < ").push_bind(t.0);
    }
    if let Some(id) = f.before_id {
        q.push(" AND id < ").push_bind(id.0);
    }
    if !f.statuses.is_empty() {
        let st: Vec<&'static str> = f.statuses.iter().map(|s| s.as_str()).collect();
        q.push(" AND status = ANY(").push_bind(st).push(")");
    }
    let limit = if f.limit == 0 { 100 } else { f.limit };
    q.push(" ORDER BY id DESC LIMIT ")
        .push_bind(sql_limit(limit));
    let rows = q.build().fetch_all(ex).await.map_err(db)?;
    runs_from_rows(rows)
}

pub(super) async fn count_runs<'e>(
    ex: impl PgExecutor<'e>,
    tenant: Option<&str>,
) -> Result<Vec<StatusCount>> {
    // COLLATE "C": byte order, as SQLite's default BINARY collation.
    let rows = sqlx::query(
        "SELECT job, status, COUNT(*) AS n FROM runs WHERE ($1::text IS NULL OR tenant = $1)
         GROUP BY job, status ORDER BY job COLLATE \"C\", status COLLATE \"C\"",
    )
    .bind(tenant)
    .fetch_all(ex)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|r| {
            Ok(StatusCount {
                job: get(r, "job")?,
                status: parse("status", get(r, "status")?)?,
                count: get(r, "n")?,
            })
        })
        .collect()
}

pub(super) async fn attempts<'e>(
    ex: impl PgExecutor<'e>,
    run_id: RunId,
) -> Result<Vec<AttemptRecord>> {
    let rows = sqlx::query(
        "SELECT run_id, attempt, lease_id, worker, started_at, finished_at, outcome, error_class,
            error_message, fingerprint, failure_key, action, retry_policy, delay_ms, eligible_at, retry_reason
         FROM attempts WHERE run_id = $1 ORDER BY attempt",
    )
    .bind(run_id.0)
    .fetch_all(ex)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|r| {
            Ok(AttemptRecord {
                run_id: RunId(get(r, "run_id")?),
                attempt: count("attempt", get(r, "attempt")?)?,
                lease_id: LeaseId(get(r, "lease_id")?),
                worker: get(r, "worker")?,
                started_at: Timestamp(get(r, "started_at")?),
                finished_at: get::<Option<i64>>(r, "finished_at")?.map(Timestamp),
                outcome: parse("attempt outcome", get(r, "outcome")?)?,
                error_class: parse_opt("error class", get(r, "error_class")?)?,
                error_message: get(r, "error_message")?,
                fingerprint: get(r, "fingerprint")?,
                failure_key: get(r, "failure_key")?,
                action: get(r, "action")?,
                retry_policy: get(r, "retry_policy")?,
                delay_ms: get(r, "delay_ms")?,
                eligible_at: get::<Option<i64>>(r, "eligible_at")?.map(Timestamp),
                retry_reason: parse_opt("retry reason", get(r, "retry_reason")?)?,
            })
        })
        .collect()
}

pub(super) async fn events<'e>(
    ex: impl PgExecutor<'e>,
    f: &EventFilter,
) -> Result<Vec<EventRecord>> {
    let mut q = QueryBuilder::<Postgres>::new(
        "SELECT id, run_id, tenant, job, kind, at, attempt, lease_id, actor, comment, data
         FROM events WHERE id > ",
    );
    q.push_bind(f.after_id.unwrap_or(0));
    if let Some(r) = f.run_id {
        q.push(" AND run_id = ").push_bind(r.0);
    }
    if let Some(t) = &f.tenant {
        q.push(" AND tenant = ").push_bind(t.clone());
    }
    if let Some(j) = &f.job {
        q.push(" AND job = ").push_bind(j.clone());
    }
    let limit = if f.limit == 0 { 1000 } else { f.limit };
    q.push(" ORDER BY id LIMIT ").push_bind(sql_limit(limit));
    let rows = q.build().fetch_all(ex).await.map_err(db)?;
    rows.iter()
        .map(|r| {
            Ok(EventRecord {
                id: get(r, "id")?,
                run_id: RunId(get(r, "run_id")?),
                tenant: get(r, "tenant")?,
                job: get(r, "job")?,
                kind: docket_core::EventKind::parse(&get::<String>(r, "kind")?),
                at: Timestamp(get(r, "at")?),
                attempt: get::<Option<i32>>(r, "attempt")?
                    .map(|a| count("attempt", a))
                    .transpose()?,
                lease_id: get::<Option<Uuid>>(r, "lease_id")?.map(LeaseId),
                actor: get(r, "actor")?,
                comment: get(r, "comment")?,
                data: json(r, "data")?,
            })
        })
        .collect()
}
