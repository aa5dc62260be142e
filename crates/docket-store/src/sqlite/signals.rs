//! Signals on SQLite (the same concerns as `postgres/signals.rs`): each
//! operation is one request on the writer thread, so the reads a plan
//! needs and its writes cannot interleave with another writer's.

use super::db_err;
use super::durable::{attempt_event, fence};
use super::ops::{get_run, insert_event, json_col, parse};
use super::SqliteStore;
use crate::plan::signal::{self as plan, WaitPlan, Wake};
use crate::signals::*;
use crate::{LeaseRef, Result, Run, StoreError};
use async_trait::async_trait;
use docket_core::{RunId, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};

const COLS: &str = "seq, id, run_id, tenant, name, key, data, sent_by, received_at, \
    delivered_to, delivered_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<SignalRecord> {
    Ok(SignalRecord {
        seq: r.get(0)?,
        id: r.get(1)?,
        run_id: parse("run id", r.get(2)?)?,
        tenant: r.get(3)?,
        name: r.get(4)?,
        key: r.get(5)?,
        data: json_col(r.get(6)?)?,
        sent_by: r.get(7)?,
        received_at: Timestamp(r.get(8)?),
        delivered_to: r.get(9)?,
        delivered_at: r.get::<_, Option<i64>>(10)?.map(Timestamp),
    })
}

fn by_id(c: &Connection, run: RunId, id: &str) -> Result<Option<SignalRecord>> {
    c.prepare_cached(&format!(
        "SELECT {COLS} FROM signals WHERE run_id = ?1 AND id = ?2"
    ))
    .map_err(db_err)?
    .query_row(params![run.to_string(), id], from_row)
    .optional()
    .map_err(db_err)
}

/// Stores one signal for `run` (already read in this transaction) and
/// applies its wake, as `plan::signal` decides.
#[allow(clippy::too_many_arguments)]
fn send_to(
    c: &Connection,
    run: &Run,
    name: &str,
    key: Option<&str>,
    signal_id: &str,
    data: &serde_json::Value,
    sent_by: &str,
    now: Timestamp,
) -> Result<Sent> {
    if let Some(signal) = by_id(c, run.id, signal_id)? {
        return Ok(Sent {
            signal,
            duplicate: true,
            woke: false,
        });
    }
    plan::may_send(run.id, run.status)?;
    let waiting: bool = c
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM signal_waits WHERE run_id = ?1 AND name = ?2)",
        )
        .map_err(db_err)?
        .query_row(params![run.id.to_string(), name], |r| r.get(0))
        .map_err(db_err)?;
    let wake = plan::wake(run.status, run.run_after, waiting, now);
    c.prepare_cached(
        "INSERT INTO signals (id, run_id, tenant, name, key, data, sent_by, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .map_err(db_err)?
    .execute(params![
        signal_id,
        run.id.to_string(),
        run.tenant,
        name,
        key,
        data.to_string(),
        sent_by,
        now.0
    ])
    .map_err(db_err)?;
    let signal = by_id(c, run.id, signal_id)?
        .ok_or_else(|| StoreError::Corrupt("signal vanished after insert".into()))?;
    match wake {
        Wake::None => {}
        Wake::Now(at) => {
            c.prepare_cached("UPDATE runs SET run_after = ?2, updated_at = ?3 WHERE id = ?1")
                .map_err(db_err)?
                .execute(params![run.id.to_string(), at.0, now.0])
                .map_err(db_err)?;
        }
        Wake::AtEnd => {
            c.prepare_cached("UPDATE runs SET wake_requested = 1 WHERE id = ?1")
                .map_err(db_err)?
                .execute([run.id.to_string()])
                .map_err(db_err)?;
        }
    }
    let ev = plan::received(&signal, wake);
    insert_event(
        c,
        run.id,
        &run.tenant,
        &run.job,
        &ev.kind,
        now,
        None,
        None,
        Some(sent_by),
        None,
        &ev.data,
    )?;
    Ok(Sent {
        signal,
        duplicate: false,
        woke: wake != Wake::None,
    })
}

fn send(c: &Connection, s: &SendSignal) -> Result<Sent> {
    let run = get_run(c, s.run_id)?
        .filter(|r| s.tenant.as_ref().is_none_or(|t| *t == r.tenant))
        .ok_or(StoreError::NotFound(s.run_id))?;
    send_to(
        c,
        &run,
        &s.name,
        None,
        &s.signal_id,
        &s.data,
        &s.sent_by,
        s.now,
    )
}

fn send_keyed(c: &Connection, s: &SendKeyed) -> Result<Vec<Sent>> {
    // The runs waiting now, and the runs an earlier send of this id
    // reached (answered as duplicates), in run id order.
    let mut st = c
        .prepare_cached(
            "SELECT w.run_id FROM signal_waits w JOIN runs r ON r.id = w.run_id
             WHERE w.tenant = ?1 AND w.name = ?2 AND w.key = ?3
               AND r.status NOT IN ('completed', 'failed', 'cancelled')
             UNION
             SELECT run_id FROM signals WHERE tenant = ?1 AND id = ?4
             ORDER BY 1",
        )
        .map_err(db_err)?;
    let ids: Vec<String> = st
        .query_map(params![s.tenant, s.name, s.key, s.signal_id], |r| r.get(0))
        .map_err(db_err)?
        .collect::<rusqlite::Result<_>>()
        .map_err(db_err)?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let id: RunId = id
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("run id {id}: {e}")))?;
        let Some(run) = get_run(c, id)? else { continue };
        out.push(send_to(
            c,
            &run,
            &s.name,
            Some(&s.key),
            &s.signal_id,
            &s.data,
            &s.sent_by,
            s.now,
        )?);
    }
    Ok(out)
}

fn wait(c: &Connection, lease: LeaseRef, w: &WaitSignal) -> Result<Result<WaitOutcome>> {
    let run = match fence(c, lease, "signal_wait", w.now)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let id = run.id.to_string();
    let existing: Option<String> = c
        .prepare_cached("SELECT status FROM steps WHERE run_id = ?1 AND name = ?2")
        .map_err(db_err)?
        .query_row(params![id, w.wait], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    if let Err(e) = crate::plan::step::may_write(existing.as_deref(), run.id, &w.wait) {
        return Ok(Err(e));
    }
    let stored: Option<i64> = c
        .prepare_cached("SELECT until FROM signal_waits WHERE run_id = ?1 AND wait = ?2")
        .map_err(db_err)?
        .query_row(params![id, w.wait], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    let stored = stored.map(Timestamp);
    let until = plan::deadline(w, stored);
    let pending = c
        .prepare_cached(&format!(
            "SELECT {COLS} FROM signals
             WHERE run_id = ?1 AND name = ?2 AND delivered_at IS NULL AND received_at <= ?3
             ORDER BY seq LIMIT 1"
        ))
        .map_err(db_err)?
        .query_row(params![id, w.name, until.0], from_row)
        .optional()
        .map_err(db_err)?;
    let (step, event, outcome) = match plan::wait(w, stored, pending.as_ref()) {
        WaitPlan::Wait { open } => {
            if let Some(ev) = open {
                c.prepare_cached(
                    "INSERT INTO signal_waits (run_id, wait, tenant, name, key, until, since)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(db_err)?
                .execute(params![
                    id, w.wait, run.tenant, w.name, w.key, until.0, w.now.0
                ])
                .map_err(db_err)?;
                attempt_event(c, &run, lease, &ev.kind, w.now, &ev.data)?;
            }
            return Ok(Ok(WaitOutcome::Waiting { until }));
        }
        WaitPlan::Deliver { step, event } => {
            let mut sig = pending.expect("a delivery has a signal");
            c.prepare_cached(
                "UPDATE signals SET delivered_to = ?2, delivered_at = ?3 WHERE seq = ?1",
            )
            .map_err(db_err)?
            .execute(params![sig.seq, w.wait, w.now.0])
            .map_err(db_err)?;
            sig.delivered_to = Some(w.wait.clone());
            sig.delivered_at = Some(w.now);
            (step, event, WaitOutcome::Delivered(Box::new(sig)))
        }
        WaitPlan::TimeOut { step, event } => (step, event, WaitOutcome::TimedOut { until }),
    };
    c.prepare_cached(
        "INSERT INTO steps (run_id, name, status, result, attempt, updated_at)
         VALUES (?1, ?2, 'completed', ?3, ?4, ?5)
         ON CONFLICT (run_id, name) DO UPDATE SET status = 'completed', result = excluded.result,
            error_class = NULL, error_message = NULL, attempt = excluded.attempt, updated_at = excluded.updated_at",
    )
    .map_err(db_err)?
    .execute(params![id, w.wait, step.to_string(), run.attempt, w.now.0])
    .map_err(db_err)?;
    c.prepare_cached("DELETE FROM signal_waits WHERE run_id = ?1 AND wait = ?2")
        .map_err(db_err)?
        .execute(params![id, w.wait])
        .map_err(db_err)?;
    attempt_event(c, &run, lease, &event.kind, w.now, &event.data)?;
    Ok(Ok(outcome))
}

#[async_trait]
impl SignalStore for SqliteStore {
    async fn send_signal(&self, s: SendSignal) -> Result<Sent> {
        crate::json::check_depth("data", &s.data)?;
        self.call(move |c| send(c, &s)).await
    }

    async fn send_keyed_signal(&self, s: SendKeyed) -> Result<Vec<Sent>> {
        crate::json::check_depth("data", &s.data)?;
        self.call(move |c| send_keyed(c, &s)).await
    }

    async fn signal_wait(&self, lease: LeaseRef, w: WaitSignal) -> Result<WaitOutcome> {
        self.call(move |c| wait(c, lease, &w)).await?
    }

    async fn signals(&self, run_id: RunId) -> Result<Vec<SignalRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {COLS} FROM signals WHERE run_id = ?1 ORDER BY seq"
                ))
                .map_err(db_err)?;
            let rows = st
                .query_map([run_id.to_string()], from_row)
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        })
        .await
    }

    async fn signal_waits(&self, run_id: RunId) -> Result<Vec<SignalWaitRecord>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT run_id, wait, name, key, until, since FROM signal_waits
                     WHERE run_id = ?1 ORDER BY since, wait",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map([run_id.to_string()], |r| {
                    Ok(SignalWaitRecord {
                        run_id: parse("run id", r.get(0)?)?,
                        wait: r.get(1)?,
                        name: r.get(2)?,
                        key: r.get(3)?,
                        until: Timestamp(r.get(4)?),
                        since: Timestamp(r.get(5)?),
                    })
                })
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        })
        .await
    }

    async fn waiting_for_signals(&self, tenant: Option<String>) -> Result<Vec<(String, i64)>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT w.name, COUNT(DISTINCT w.run_id) FROM signal_waits w
                     JOIN runs r ON r.id = w.run_id
                     WHERE r.status = 'postponed' AND (?1 IS NULL OR w.tenant = ?1)
                     GROUP BY w.name ORDER BY w.name",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map([tenant], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        })
        .await
    }

    async fn count_sleeping(&self, tenant: Option<String>) -> Result<i64> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(sleeping_sql(tenant.is_some()))
                .map_err(db_err)?;
            match tenant {
                Some(t) => st.query_row([t], |r| r.get(0)),
                None => st.query_row([], |r| r.get(0)),
            }
            .map_err(db_err)
        })
        .await
    }
}

/// `count_sleeping`: the postponed runs (index `runs_postponed`, searched by
/// tenant when one is given: [`sleeping_sql`]), each with its `sleep:` steps
/// by primary key prefix.
fn sleeping_sql(tenant: bool) -> &'static str {
    if tenant {
        SLEEPING_SQL_TENANT
    } else {
        SLEEPING_SQL_ALL
    }
}

const SLEEPING_SQL_TENANT: &str = "SELECT count(*) FROM runs r
     WHERE r.status = 'postponed' AND r.tenant = ?1
       AND EXISTS (SELECT 1 FROM steps s
                   WHERE s.run_id = r.id AND s.name >= 'sleep:' AND s.name < 'sleep;'
                     AND json_extract(s.result, '$.until') = r.run_after)";

const SLEEPING_SQL_ALL: &str = "SELECT count(*) FROM runs r
     WHERE r.status = 'postponed'
       AND EXISTS (SELECT 1 FROM steps s
                   WHERE s.run_id = r.id AND s.name >= 'sleep:' AND s.name < 'sleep;'
                     AND json_extract(s.result, '$.until') = r.run_after)";
