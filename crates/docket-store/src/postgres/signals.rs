//! Signals on PostgreSQL (the same concerns as `sqlite/signals.rs`, statement
//! for statement): each operation is one transaction that locks the runs it
//! writes (`FOR UPDATE`, in id order) before it reads what the plan needs.

use super::db;
use super::durable::{attempt_event, event, fence};
use super::ops::{json, run_from_row, RUN_COLS};
use super::{PgStore, WAKEUP_CHANNEL};
use crate::plan::signal::{self as plan, WaitPlan, Wake};
use crate::signals::*;
use crate::{LeaseRef, Result, Run, StoreError};
use async_trait::async_trait;
use docket_core::{RunId, Timestamp};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;

const COLS: &str = "seq, id, run_id, tenant, name, key, data, sent_by, received_at, \
    delivered_to, delivered_at";

fn from_row(r: &PgRow) -> Result<SignalRecord> {
    Ok(SignalRecord {
        seq: r.try_get("seq").map_err(db)?,
        id: r.try_get("id").map_err(db)?,
        run_id: RunId(r.try_get("run_id").map_err(db)?),
        tenant: r.try_get("tenant").map_err(db)?,
        name: r.try_get("name").map_err(db)?,
        key: r.try_get("key").map_err(db)?,
        data: json(r, "data")?,
        sent_by: r.try_get("sent_by").map_err(db)?,
        received_at: Timestamp(r.try_get("received_at").map_err(db)?),
        delivered_to: r.try_get("delivered_to").map_err(db)?,
        delivered_at: r
            .try_get::<Option<i64>, _>("delivered_at")
            .map_err(db)?
            .map(Timestamp),
    })
}

async fn by_id(c: &mut PgConnection, run: RunId, id: &str) -> Result<Option<SignalRecord>> {
    sqlx::query(&format!(
        "SELECT {COLS} FROM signals WHERE run_id = $1 AND id = $2"
    ))
    .bind(run.0)
    .bind(id)
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?
    .as_ref()
    .map(from_row)
    .transpose()
}

async fn locked_run(c: &mut PgConnection, id: RunId) -> Result<Option<Run>> {
    sqlx::query(&format!(
        "SELECT {RUN_COLS} FROM runs WHERE id = $1 FOR UPDATE"
    ))
    .bind(id.0)
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?
    .as_ref()
    .map(run_from_row)
    .transpose()
}

/// Stores one signal for `run` (locked in this transaction) and applies its
/// wake, as `plan::signal` decides.
#[allow(clippy::too_many_arguments)]
async fn send_to(
    c: &mut PgConnection,
    run: &Run,
    name: &str,
    key: Option<&str>,
    signal_id: &str,
    data: &serde_json::Value,
    sent_by: &str,
    now: Timestamp,
) -> Result<Sent> {
    if let Some(signal) = by_id(c, run.id, signal_id).await? {
        return Ok(Sent {
            signal,
            duplicate: true,
            woke: false,
        });
    }
    plan::may_send(run.id, run.status)?;
    let waiting: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM signal_waits WHERE run_id = $1 AND name = $2)",
    )
    .bind(run.id.0)
    .bind(name)
    .fetch_one(&mut *c)
    .await
    .map_err(db)?;
    let wake = plan::wake(run.status, run.run_after, waiting, now);
    let row = sqlx::query(&format!(
        "INSERT INTO signals (id, run_id, tenant, name, key, data, sent_by, received_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLS}"
    ))
    .bind(signal_id)
    .bind(run.id.0)
    .bind(&run.tenant)
    .bind(name)
    .bind(key)
    .bind(data)
    .bind(sent_by)
    .bind(now.0)
    .fetch_one(&mut *c)
    .await
    .map_err(db)?;
    let signal = from_row(&row)?;
    match wake {
        Wake::None => {}
        Wake::Now(at) => {
            sqlx::query("UPDATE runs SET run_after = $2, updated_at = $3 WHERE id = $1")
                .bind(run.id.0)
                .bind(at.0)
                .bind(now.0)
                .execute(&mut *c)
                .await
                .map_err(db)?;
            // Every process's idle workers look again (at commit).
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(WAKEUP_CHANNEL)
                .bind(&run.job)
                .execute(&mut *c)
                .await
                .map_err(db)?;
        }
        Wake::AtEnd => {
            sqlx::query("UPDATE runs SET wake_requested = true WHERE id = $1")
                .bind(run.id.0)
                .execute(&mut *c)
                .await
                .map_err(db)?;
        }
    }
    let ev = plan::received(&signal, wake);
    event(
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
    )
    .await?;
    Ok(Sent {
        signal,
        duplicate: false,
        woke: wake != Wake::None,
    })
}

async fn wait(
    c: &mut PgConnection,
    lease: LeaseRef,
    w: &WaitSignal,
) -> Result<Result<WaitOutcome>> {
    let run = match fence(c, lease, "signal_wait", w.now).await? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let existing: Option<String> =
        sqlx::query_scalar("SELECT status FROM steps WHERE run_id = $1 AND name = $2")
            .bind(run.id.0)
            .bind(&w.wait)
            .fetch_optional(&mut *c)
            .await
            .map_err(db)?;
    if let Err(e) = crate::plan::step::may_write(existing.as_deref(), run.id, &w.wait) {
        return Ok(Err(e));
    }
    let stored: Option<i64> =
        sqlx::query_scalar("SELECT until FROM signal_waits WHERE run_id = $1 AND wait = $2")
            .bind(run.id.0)
            .bind(&w.wait)
            .fetch_optional(&mut *c)
            .await
            .map_err(db)?;
    let stored = stored.map(Timestamp);
    let until = plan::deadline(w, stored);
    let pending = sqlx::query(&format!(
        "SELECT {COLS} FROM signals
         WHERE run_id = $1 AND name = $2 AND delivered_at IS NULL AND received_at <= $3
         ORDER BY seq LIMIT 1"
    ))
    .bind(run.id.0)
    .bind(&w.name)
    .bind(until.0)
    .fetch_optional(&mut *c)
    .await
    .map_err(db)?
    .as_ref()
    .map(from_row)
    .transpose()?;
    let (step, ev, outcome) = match plan::wait(w, stored, pending.as_ref()) {
        WaitPlan::Wait { open } => {
            if let Some(ev) = open {
                sqlx::query(
                    "INSERT INTO signal_waits (run_id, wait, tenant, name, key, until, since)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(run.id.0)
                .bind(&w.wait)
                .bind(&run.tenant)
                .bind(&w.name)
                .bind(&w.key)
                .bind(until.0)
                .bind(w.now.0)
                .execute(&mut *c)
                .await
                .map_err(db)?;
                attempt_event(c, &run, lease, &ev.kind, w.now, &ev.data).await?;
            }
            return Ok(Ok(WaitOutcome::Waiting { until }));
        }
        WaitPlan::Deliver { step, event } => {
            let mut sig = pending.expect("a delivery has a signal");
            sqlx::query("UPDATE signals SET delivered_to = $2, delivered_at = $3 WHERE seq = $1")
                .bind(sig.seq)
                .bind(&w.wait)
                .bind(w.now.0)
                .execute(&mut *c)
                .await
                .map_err(db)?;
            sig.delivered_to = Some(w.wait.clone());
            sig.delivered_at = Some(w.now);
            (step, event, WaitOutcome::Delivered(Box::new(sig)))
        }
        WaitPlan::TimeOut { step, event } => (step, event, WaitOutcome::TimedOut { until }),
    };
    sqlx::query(
        "INSERT INTO steps (run_id, name, status, result, attempt, updated_at)
         VALUES ($1, $2, 'completed', $3, $4, $5)
         ON CONFLICT (run_id, name) DO UPDATE SET status = 'completed', result = excluded.result,
            error_class = NULL, error_message = NULL, attempt = excluded.attempt, updated_at = excluded.updated_at",
    )
    .bind(run.id.0)
    .bind(&w.wait)
    .bind(&step)
    .bind(run.attempt)
    .bind(w.now.0)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    sqlx::query("DELETE FROM signal_waits WHERE run_id = $1 AND wait = $2")
        .bind(run.id.0)
        .bind(&w.wait)
        .execute(&mut *c)
        .await
        .map_err(db)?;
    attempt_event(c, &run, lease, &ev.kind, w.now, &ev.data).await?;
    Ok(Ok(outcome))
}

#[async_trait]
impl SignalStore for PgStore {
    async fn send_signal(&self, s: SendSignal) -> Result<Sent> {
        crate::json::check_depth("data", &s.data)?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        let run = locked_run(&mut tx, s.run_id)
            .await?
            .filter(|r| s.tenant.as_ref().is_none_or(|t| *t == r.tenant))
            .ok_or(StoreError::NotFound(s.run_id))?;
        let sent = send_to(
            &mut tx,
            &run,
            &s.name,
            None,
            &s.signal_id,
            &s.data,
            &s.sent_by,
            s.now,
        )
        .await?;
        tx.commit().await.map_err(db)?;
        Ok(sent)
    }

    async fn send_keyed_signal(&self, s: SendKeyed) -> Result<Vec<Sent>> {
        crate::json::check_depth("data", &s.data)?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        // The runs waiting now, and the runs an earlier send of this id
        // reached (answered as duplicates), locked in id order so two
        // keyed sends cannot deadlock.
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT w.run_id FROM signal_waits w JOIN runs r ON r.id = w.run_id
             WHERE w.tenant = $1 AND w.name = $2 AND w.key = $3
               AND r.status NOT IN ('completed', 'failed', 'cancelled')
             UNION
             SELECT run_id FROM signals WHERE tenant = $1 AND id = $4
             ORDER BY 1",
        )
        .bind(&s.tenant)
        .bind(&s.name)
        .bind(&s.key)
        .bind(&s.signal_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(run) = locked_run(&mut tx, RunId(id)).await? else {
                continue;
            };
            out.push(
                send_to(
                    &mut tx,
                    &run,
                    &s.name,
                    Some(&s.key),
                    &s.signal_id,
                    &s.data,
                    &s.sent_by,
                    s.now,
                )
                .await?,
            );
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    async fn signal_wait(&self, lease: LeaseRef, w: WaitSignal) -> Result<WaitOutcome> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let out = wait(&mut tx, lease, &w).await?;
        tx.commit().await.map_err(db)?;
        out
    }

    async fn signals(&self, run_id: RunId) -> Result<Vec<SignalRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM signals WHERE run_id = $1 ORDER BY seq"
        ))
        .bind(run_id.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(from_row).collect()
    }

    async fn signal_waits(&self, run_id: RunId) -> Result<Vec<SignalWaitRecord>> {
        let rows = sqlx::query(
            "SELECT run_id, wait, name, key, until, since FROM signal_waits
             WHERE run_id = $1 ORDER BY since, wait COLLATE \"C\"",
        )
        .bind(run_id.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(SignalWaitRecord {
                    run_id: RunId(r.try_get("run_id").map_err(db)?),
                    wait: r.try_get("wait").map_err(db)?,
                    name: r.try_get("name").map_err(db)?,
                    key: r.try_get("key").map_err(db)?,
                    until: Timestamp(r.try_get("until").map_err(db)?),
                    since: Timestamp(r.try_get("since").map_err(db)?),
                })
            })
            .collect()
    }

    async fn waiting_for_signals(&self, tenant: Option<String>) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT w.name, COUNT(DISTINCT w.run_id) AS n FROM signal_waits w
             JOIN runs r ON r.id = w.run_id
             WHERE r.status = 'postponed' AND ($1::text IS NULL OR w.tenant = $1)
             GROUP BY w.name ORDER BY w.name COLLATE \"C\"",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| Ok((r.try_get(0).map_err(db)?, r.try_get(1).map_err(db)?)))
            .collect()
    }

    async fn count_sleeping(&self, tenant: Option<String>) -> Result<i64> {
        let q = sqlx::query_scalar(sleeping_sql(tenant.is_some()));
        let q = match tenant {
            Some(t) => q.bind(t),
            None => q,
        };
        q.fetch_one(&self.pool).await.map_err(db)
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
     WHERE r.status = 'postponed' AND r.tenant = $1
       AND EXISTS (SELECT 1 FROM steps s
                   WHERE s.run_id = r.id AND s.name >= 'sleep:' AND s.name < 'sleep;'
                     AND (s.result->>'until')::int8 = r.run_after)";

const SLEEPING_SQL_ALL: &str = "SELECT count(*) FROM runs r
     WHERE r.status = 'postponed'
       AND EXISTS (SELECT 1 FROM steps s
                   WHERE s.run_id = r.id AND s.name >= 'sleep:' AND s.name < 'sleep;'
                     AND (s.result->>'until')::int8 = r.run_after)";
