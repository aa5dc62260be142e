//! [`ScheduleStore`] on PostgreSQL, mirroring `sqlite/schedules.rs`. Each
//! write is one transaction that locks the schedule's row (`FOR UPDATE`)
//! before it decides, so two processes changing or ticking one schedule
//! are serialised on it: the second sees the first's cursor.

use super::ops::{self, json};
use super::{db, PgStore};
use crate::plan;
use crate::schedules::{def_json, COLS, HISTORY_COLS};
use crate::{
    PutOutcome, Result, Schedule, ScheduleDef, ScheduleHistory, SchedulePut, ScheduleStore,
    ScheduleTick, StoreError, TickOutcome,
};
use async_trait::async_trait;
use docket_core::{RunId, Timestamp};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;

fn ts(r: &PgRow, col: &str) -> Result<Option<Timestamp>> {
    Ok(r.try_get::<Option<i64>, _>(col).map_err(db)?.map(Timestamp))
}

fn run_id(r: &PgRow, col: &str) -> Result<Option<RunId>> {
    r.try_get::<Option<String>, _>(col)
        .map_err(db)?
        .map(|s| {
            s.parse()
                .map_err(|_| StoreError::Corrupt(format!("`{col}` `{s}` is not a run id")))
        })
        .transpose()
}

fn from_row(r: &PgRow) -> Result<Schedule> {
    let text = |col: &str| -> Result<String> { r.try_get(col).map_err(db) };
    Ok(Schedule {
        def: ScheduleDef {
            tenant: text("tenant")?,
            name: text("name")?,
            job: text("job")?,
            input: json(r, "input")?,
            cron: r.try_get("cron").map_err(db)?,
            every_ms: r.try_get("every_ms").map_err(db)?,
            timezone: text("timezone")?,
            start_at: ts(r, "start_at")?,
            end_at: ts(r, "end_at")?,
            jitter_ms: r.try_get("jitter_ms").map_err(db)?,
            overlap: text("overlap")?
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("{e}")))?,
            catch_up: text("catch_up")?
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("{e}")))?,
            catch_up_window_ms: r.try_get("catch_up_window_ms").map_err(db)?,
            paused: r.try_get("paused").map_err(db)?,
            source: text("source")?,
        },
        cursor_at: Timestamp(r.try_get("cursor_at").map_err(db)?),
        buffered_slot: ts(r, "buffered_slot")?,
        last_slot: ts(r, "last_slot")?,
        last_run_id: run_id(r, "last_run_id")?,
        last_fired_at: ts(r, "last_fired_at")?,
        created_at: Timestamp(r.try_get("created_at").map_err(db)?),
        updated_at: Timestamp(r.try_get("updated_at").map_err(db)?),
        updated_by: text("updated_by")?,
        comment: r.try_get("comment").map_err(db)?,
    })
}

fn history_from_row(r: &PgRow) -> Result<ScheduleHistory> {
    Ok(ScheduleHistory {
        id: r.try_get("id").map_err(db)?,
        tenant: r.try_get("tenant").map_err(db)?,
        schedule: r.try_get("schedule").map_err(db)?,
        kind: r.try_get("kind").map_err(db)?,
        slot_at: ts(r, "slot_at")?,
        at: Timestamp(r.try_get("at").map_err(db)?),
        run_id: run_id(r, "run_id")?,
        reason: r.try_get("reason").map_err(db)?,
        actor: r.try_get("actor").map_err(db)?,
        comment: r.try_get("comment").map_err(db)?,
        data: json(r, "data")?,
    })
}

async fn locked(c: &mut PgConnection, tenant: &str, name: &str) -> Result<Option<Schedule>> {
    let row = sqlx::query(&format!(
        "SELECT {COLS} FROM schedules WHERE tenant = $1 AND name = $2 FOR UPDATE"
    ))
    .bind(tenant)
    .bind(name)
    .fetch_optional(c)
    .await
    .map_err(db)?;
    row.as_ref().map(from_row).transpose()
}

#[allow(clippy::too_many_arguments)]
async fn history(
    c: &mut PgConnection,
    tenant: &str,
    schedule: &str,
    kind: &str,
    slot_at: Option<Timestamp>,
    at: Timestamp,
    run_id: Option<String>,
    reason: Option<&str>,
    actor: Option<&str>,
    comment: Option<&str>,
    data: &Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO schedule_history (tenant, schedule, kind, slot_at, at, run_id, reason, actor, comment, data)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(tenant)
    .bind(schedule)
    .bind(kind)
    .bind(slot_at.map(|t| t.0))
    .bind(at.0)
    .bind(run_id)
    .bind(reason)
    .bind(actor)
    .bind(comment)
    .bind(data)
    .execute(c)
    .await
    .map_err(db)?;
    Ok(())
}

async fn write_def(
    c: &mut PgConnection,
    p: &SchedulePut,
    insert: bool,
) -> Result<Option<Schedule>> {
    let d = &p.def;
    let sql = if insert {
        format!(
            "INSERT INTO schedules ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                $11, $12, $13, $14, $15, $16, NULL, NULL, NULL, NULL, $16, $16, $17, $18)
             ON CONFLICT (tenant, name) DO NOTHING RETURNING {COLS}"
        )
    } else {
        format!(
            "UPDATE schedules SET job = $3, input = $4, cron = $5, every_ms = $6, timezone = $7,
                start_at = $8, end_at = $9, jitter_ms = $10, overlap = $11, catch_up = $12,
                catch_up_window_ms = $13, paused = $14, source = $15, updated_at = $16,
                updated_by = $17, comment = $18
             WHERE tenant = $1 AND name = $2 RETURNING {COLS}"
        )
    };
    let row = sqlx::query(&sql)
        .bind(&d.tenant)
        .bind(&d.name)
        .bind(&d.job)
        .bind(&d.input)
        .bind(&d.cron)
        .bind(d.every_ms)
        .bind(&d.timezone)
        .bind(d.start_at.map(|t| t.0))
        .bind(d.end_at.map(|t| t.0))
        .bind(d.jitter_ms)
        .bind(d.overlap.as_str())
        .bind(d.catch_up.as_str())
        .bind(d.catch_up_window_ms)
        .bind(d.paused)
        .bind(&d.source)
        .bind(p.now.0)
        .bind(&p.actor)
        .bind(&p.comment)
        .fetch_optional(c)
        .await
        .map_err(db)?;
    row.as_ref().map(from_row).transpose()
}

#[async_trait]
impl ScheduleStore for PgStore {
    async fn put_schedule(&self, p: SchedulePut) -> Result<(Schedule, PutOutcome)> {
        crate::json::check_depth("input", &p.def.input)?;
        let d = &p.def;
        let mut tx = self.pool.begin().await.map_err(db)?;
        // A new schedule: the insert's unique key serialises two creators
        // (the loser inserts nothing and then locks the winner's row).
        let (row, outcome) = match write_def(&mut tx, &p, true).await? {
            Some(row) => (row, PutOutcome::Created),
            None => {
                let before = locked(&mut tx, &d.tenant, &d.name).await?.ok_or_else(|| {
                    StoreError::Database("a schedule vanished while it was updated".into())
                })?;
                if before.def == *d {
                    tx.commit().await.map_err(db)?;
                    return Ok((before, PutOutcome::Unchanged));
                }
                let row = write_def(&mut tx, &p, false)
                    .await?
                    .ok_or_else(|| StoreError::Database("a locked schedule vanished".into()))?;
                (row, PutOutcome::Updated)
            }
        };
        let kind = match outcome {
            PutOutcome::Created => "created",
            _ => "updated",
        };
        history(
            &mut tx,
            &d.tenant,
            &d.name,
            kind,
            None,
            p.now,
            None,
            None,
            Some(&p.actor),
            p.comment.as_deref(),
            &def_json(d),
        )
        .await?;
        tx.commit().await.map_err(db)?;
        Ok((row, outcome))
    }

    async fn get_schedule(&self, tenant: String, name: String) -> Result<Option<Schedule>> {
        let row = sqlx::query(&format!(
            "SELECT {COLS} FROM schedules WHERE tenant = $1 AND name = $2"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(from_row).transpose()
    }

    async fn list_schedules(&self, tenant: Option<String>) -> Result<Vec<Schedule>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLS} FROM schedules WHERE ($1::text IS NULL OR tenant = $1) ORDER BY tenant, name"
        ))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(from_row).collect()
    }

    async fn set_schedule_paused(
        &self,
        tenant: String,
        name: String,
        paused: bool,
        actor: String,
        comment: Option<String>,
        now: Timestamp,
    ) -> Result<Option<Schedule>> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let Some(s) = locked(&mut tx, &tenant, &name).await? else {
            return Ok(None);
        };
        if s.def.paused == paused {
            return Ok(Some(s));
        }
        let cursor = if paused {
            s.cursor_at
        } else {
            s.cursor_at.max(now)
        };
        let row = sqlx::query(&format!(
            "UPDATE schedules SET paused = $3, cursor_at = $4, updated_at = $5, updated_by = $6,
                comment = $7
             WHERE tenant = $1 AND name = $2 RETURNING {COLS}"
        ))
        .bind(&tenant)
        .bind(&name)
        .bind(paused)
        .bind(cursor.0)
        .bind(now.0)
        .bind(&actor)
        .bind(&comment)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let kind = if paused { "paused" } else { "resumed" };
        history(
            &mut tx,
            &tenant,
            &name,
            kind,
            None,
            now,
            None,
            None,
            Some(&actor),
            comment.as_deref(),
            &json!({ "cursor_at": cursor }),
        )
        .await?;
        tx.commit().await.map_err(db)?;
        from_row(&row).map(Some)
    }

    async fn delete_schedule(
        &self,
        tenant: String,
        name: String,
        actor: String,
        comment: Option<String>,
        now: Timestamp,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let Some(s) = locked(&mut tx, &tenant, &name).await? else {
            return Ok(false);
        };
        sqlx::query("DELETE FROM schedules WHERE tenant = $1 AND name = $2")
            .bind(&tenant)
            .bind(&name)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let data =
            json!({ "definition": def_json(&s.def), "dropped_buffered_slot": s.buffered_slot });
        history(
            &mut tx,
            &tenant,
            &name,
            "deleted",
            None,
            now,
            None,
            None,
            Some(&actor),
            comment.as_deref(),
            &data,
        )
        .await?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn schedule_tick(&self, t: ScheduleTick) -> Result<TickOutcome> {
        for o in &t.slots {
            if let Some(r) = &o.run {
                crate::json::check_depth("input", &r.input)?;
            }
        }
        let refused = TickOutcome {
            applied: false,
            runs: Vec::new(),
        };
        let mut tx = self.pool.begin().await.map_err(db)?;
        // The schedule's row first: two ticks of one schedule wait here for
        // each other, and the second then sees the first's cursor.
        let Some(s) = locked(&mut tx, &t.tenant, &t.name).await? else {
            return Ok(refused);
        };
        if let Some((task, token)) = &t.fence {
            let held: Option<i32> = sqlx::query_scalar(
                "SELECT 1 FROM leaders WHERE task = $1 AND token = $2 AND expires_at > $3",
            )
            .bind(task)
            .bind(token.0)
            .bind(t.now.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            if held.is_none() {
                return Ok(refused);
            }
        }
        if !plan::schedule::applies(&s, &t) {
            return Ok(refused);
        }
        let mut runs = Vec::new();
        let cursor = plan::schedule::new_cursor(&t);
        let mut last = plan::schedule::LastFired::of(&s);
        for o in t.slots {
            let (run_id, data) = match (plan::schedule::fires(o.kind), o.run) {
                (true, Some(run)) => {
                    let jobs = [run.job.clone()];
                    let tr = ops::trigger(&mut tx, vec![run], t.now, &jobs)
                        .await?
                        .remove(0);
                    let data = last.fired(o.slot, t.now, &tr);
                    let id = tr.run.id.to_string();
                    runs.push(tr);
                    (Some(id), data)
                }
                (true, None) => return Err(plan::schedule::missing_run(o.slot, o.kind)),
                (false, _) => (None, json!({})),
            };
            history(
                &mut tx,
                &t.tenant,
                &t.name,
                o.kind.as_str(),
                Some(o.slot),
                t.now,
                run_id,
                o.reason.as_deref(),
                Some(&t.actor),
                t.comment.as_deref(),
                &data,
            )
            .await?;
        }
        let fired_now = last.moved_from(&s);
        sqlx::query(
            "UPDATE schedules SET cursor_at = COALESCE($3, cursor_at),
                buffered_slot = CASE WHEN $4 THEN $5 ELSE buffered_slot END,
                last_slot = $6, last_run_id = $7,
                last_fired_at = CASE WHEN $8 THEN $9 ELSE last_fired_at END
             WHERE tenant = $1 AND name = $2",
        )
        .bind(&t.tenant)
        .bind(&t.name)
        .bind(cursor.map(|c| c.0))
        .bind(t.set_buffer.is_some())
        .bind(t.set_buffer.flatten().map(|b| b.0))
        .bind(last.slot.map(|l| l.0))
        .bind(last.run.map(|r| r.to_string()))
        .bind(fired_now)
        .bind(t.now.0)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(TickOutcome {
            applied: true,
            runs,
        })
    }

    async fn schedule_history(
        &self,
        tenant: String,
        name: String,
        limit: usize,
    ) -> Result<Vec<ScheduleHistory>> {
        let rows = sqlx::query(&format!(
            "SELECT {HISTORY_COLS} FROM schedule_history WHERE tenant = $1 AND schedule = $2
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(tenant)
        .bind(name)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(history_from_row).collect()
    }
}
