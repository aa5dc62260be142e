//! [`ScheduleStore`] on SQLite. Every write runs on the writer thread under
//! its per-request savepoint: a change and its history rows are written
//! together or not at all.

use super::{db_err, ops, SqliteStore};
use crate::plan;
use crate::schedules::{def_json, COLS, HISTORY_COLS};
use crate::{
    PutOutcome, Result, Schedule, ScheduleDef, ScheduleHistory, SchedulePut, ScheduleStore,
    ScheduleTick, TickOutcome,
};
use async_trait::async_trait;
use docket_core::Timestamp;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{json, Value};

fn conv<T, E: std::fmt::Display>(r: std::result::Result<T, E>) -> rusqlite::Result<T> {
    r.map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            e.to_string().into(),
        )
    })
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<Schedule> {
    let ts = |i: usize| -> rusqlite::Result<Option<Timestamp>> {
        Ok(r.get::<_, Option<i64>>(i)?.map(Timestamp))
    };
    Ok(Schedule {
        def: ScheduleDef {
            tenant: r.get(0)?,
            name: r.get(1)?,
            job: r.get(2)?,
            input: crate::json::decode_text(&r.get::<_, String>(3)?),
            cron: r.get(4)?,
            every_ms: r.get(5)?,
            timezone: r.get(6)?,
            start_at: ts(7)?,
            end_at: ts(8)?,
            jitter_ms: r.get(9)?,
            overlap: conv(r.get::<_, String>(10)?.parse())?,
            catch_up: conv(r.get::<_, String>(11)?.parse())?,
            catch_up_window_ms: r.get(12)?,
            paused: r.get::<_, i64>(13)? != 0,
            source: r.get(14)?,
        },
        cursor_at: Timestamp(r.get(15)?),
        buffered_slot: ts(16)?,
        last_slot: ts(17)?,
        last_run_id: r
            .get::<_, Option<String>>(18)?
            .map(|s| conv(s.parse()))
            .transpose()?,
        last_fired_at: ts(19)?,
        created_at: Timestamp(r.get(20)?),
        updated_at: Timestamp(r.get(21)?),
        updated_by: r.get(22)?,
        comment: r.get(23)?,
    })
}

fn history_from_row(r: &Row<'_>) -> rusqlite::Result<ScheduleHistory> {
    Ok(ScheduleHistory {
        id: r.get(0)?,
        tenant: r.get(1)?,
        schedule: r.get(2)?,
        kind: r.get(3)?,
        slot_at: r.get::<_, Option<i64>>(4)?.map(Timestamp),
        at: Timestamp(r.get(5)?),
        run_id: r
            .get::<_, Option<String>>(6)?
            .map(|s| conv(s.parse()))
            .transpose()?,
        reason: r.get(7)?,
        actor: r.get(8)?,
        comment: r.get(9)?,
        data: crate::json::decode_text(&r.get::<_, String>(10)?),
    })
}

fn get(c: &Connection, tenant: &str, name: &str) -> Result<Option<Schedule>> {
    c.query_row(
        &format!("SELECT {COLS} FROM schedules WHERE tenant = ?1 AND name = ?2"),
        params![tenant, name],
        from_row,
    )
    .optional()
    .map_err(db_err)
}

#[allow(clippy::too_many_arguments)]
fn history(
    c: &Connection,
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
    c.prepare_cached(
        "INSERT INTO schedule_history (tenant, schedule, kind, slot_at, at, run_id, reason, actor, comment, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .map_err(db_err)?
    .execute(params![
        tenant,
        schedule,
        kind,
        slot_at.map(|t| t.0),
        at.0,
        run_id,
        reason,
        actor,
        comment,
        data.to_string()
    ])
    .map_err(db_err)?;
    Ok(())
}

fn put(c: &Connection, p: &SchedulePut) -> Result<(Schedule, PutOutcome)> {
    let d = &p.def;
    let before = get(c, &d.tenant, &d.name)?;
    let outcome = match &before {
        None => PutOutcome::Created,
        Some(b) if b.def == *d => return Ok((b.clone(), PutOutcome::Unchanged)),
        Some(_) => PutOutcome::Updated,
    };
    let row = c
        .query_row(
            &format!(
                "INSERT INTO schedules ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,
                    ?11, ?12, ?13, ?14, ?15, ?16, NULL, NULL, NULL, NULL, ?16, ?16, ?17, ?18)
                 ON CONFLICT (tenant, name) DO UPDATE SET job = excluded.job, input = excluded.input,
                    cron = excluded.cron, every_ms = excluded.every_ms, timezone = excluded.timezone,
                    start_at = excluded.start_at, end_at = excluded.end_at, jitter_ms = excluded.jitter_ms,
                    overlap = excluded.overlap, catch_up = excluded.catch_up,
                    catch_up_window_ms = excluded.catch_up_window_ms, paused = excluded.paused,
                    source = excluded.source, updated_at = excluded.updated_at,
                    updated_by = excluded.updated_by, comment = excluded.comment
                 RETURNING {COLS}"
            ),
            params![
                d.tenant,
                d.name,
                d.job,
                d.input.to_string(),
                d.cron,
                d.every_ms,
                d.timezone,
                d.start_at.map(|t| t.0),
                d.end_at.map(|t| t.0),
                d.jitter_ms,
                d.overlap.as_str(),
                d.catch_up.as_str(),
                d.catch_up_window_ms,
                d.paused,
                d.source,
                p.now.0,
                p.actor,
                p.comment,
            ],
            from_row,
        )
        .map_err(db_err)?;
    let kind = match outcome {
        PutOutcome::Created => "created",
        _ => "updated",
    };
    history(
        c,
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
    )?;
    Ok((row, outcome))
}

fn set_paused(
    c: &Connection,
    tenant: &str,
    name: &str,
    paused: bool,
    actor: &str,
    comment: Option<&str>,
    now: Timestamp,
) -> Result<Option<Schedule>> {
    let Some(s) = get(c, tenant, name)? else {
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
    let row = c
        .query_row(
            &format!(
                "UPDATE schedules SET paused = ?3, cursor_at = ?4, updated_at = ?5, updated_by = ?6,
                    comment = ?7
                 WHERE tenant = ?1 AND name = ?2 RETURNING {COLS}"
            ),
            params![tenant, name, paused, cursor.0, now.0, actor, comment],
            from_row,
        )
        .map_err(db_err)?;
    let kind = if paused { "paused" } else { "resumed" };
    let data = json!({ "cursor_at": cursor });
    history(
        c,
        tenant,
        name,
        kind,
        None,
        now,
        None,
        None,
        Some(actor),
        comment,
        &data,
    )?;
    Ok(Some(row))
}

fn delete(
    c: &Connection,
    tenant: &str,
    name: &str,
    actor: &str,
    comment: Option<&str>,
    now: Timestamp,
) -> Result<bool> {
    let Some(s) = get(c, tenant, name)? else {
        return Ok(false);
    };
    c.execute(
        "DELETE FROM schedules WHERE tenant = ?1 AND name = ?2",
        params![tenant, name],
    )
    .map_err(db_err)?;
    let data = json!({ "definition": def_json(&s.def), "dropped_buffered_slot": s.buffered_slot });
    history(
        c,
        tenant,
        name,
        "deleted",
        None,
        now,
        None,
        None,
        Some(actor),
        comment,
        &data,
    )?;
    Ok(true)
}

fn tick(c: &Connection, t: ScheduleTick) -> Result<TickOutcome> {
    let refused = TickOutcome {
        applied: false,
        runs: Vec::new(),
    };
    if let Some((task, token)) = &t.fence {
        let held: Option<i64> = c
            .query_row(
                "SELECT 1 FROM leaders WHERE task = ?1 AND token = ?2 AND expires_at > ?3",
                params![task, token.0, t.now.0],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        if held.is_none() {
            return Ok(refused);
        }
    }
    let Some(s) = get(c, &t.tenant, &t.name)? else {
        return Ok(refused);
    };
    if !plan::schedule::applies(&s, &t) {
        return Ok(refused);
    }
    let mut runs = Vec::new();
    let cursor = plan::schedule::new_cursor(&t);
    let mut last = plan::schedule::LastFired::of(&s);
    for o in t.slots {
        let (run_id, data) = match (plan::schedule::fires(o.kind), o.run) {
            (true, Some(run)) => {
                let tr = ops::trigger(c, vec![run], t.now)?.remove(0);
                let data = last.fired(o.slot, t.now, &tr);
                let id = tr.run.id.to_string();
                runs.push(tr);
                (Some(id), data)
            }
            (true, None) => return Err(plan::schedule::missing_run(o.slot, o.kind)),
            (false, _) => (None, json!({})),
        };
        history(
            c,
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
        )?;
    }
    let fired_now = last.moved_from(&s);
    c.execute(
        "UPDATE schedules SET cursor_at = COALESCE(?3, cursor_at),
            buffered_slot = CASE WHEN ?4 THEN ?5 ELSE buffered_slot END,
            last_slot = ?6, last_run_id = ?7,
            last_fired_at = CASE WHEN ?8 THEN ?9 ELSE last_fired_at END
         WHERE tenant = ?1 AND name = ?2",
        params![
            t.tenant,
            t.name,
            cursor.map(|c| c.0),
            t.set_buffer.is_some(),
            t.set_buffer.flatten().map(|b| b.0),
            last.slot.map(|l| l.0),
            last.run.map(|r| r.to_string()),
            fired_now,
            t.now.0,
        ],
    )
    .map_err(db_err)?;
    Ok(TickOutcome {
        applied: true,
        runs,
    })
}

#[async_trait]
impl ScheduleStore for SqliteStore {
    async fn put_schedule(&self, put: SchedulePut) -> Result<(Schedule, PutOutcome)> {
        crate::json::check_depth("input", &put.def.input)?;
        self.call(move |c| self::put(c, &put)).await
    }

    async fn get_schedule(&self, tenant: String, name: String) -> Result<Option<Schedule>> {
        self.read(move |c| get(c, &tenant, &name)).await
    }

    async fn list_schedules(&self, tenant: Option<String>) -> Result<Vec<Schedule>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {COLS} FROM schedules WHERE (?1 IS NULL OR tenant = ?1) ORDER BY tenant, name"
                ))
                .map_err(db_err)?;
            let rows = st.query_map([tenant], from_row).map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        })
        .await
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
        self.call(move |c| set_paused(c, &tenant, &name, paused, &actor, comment.as_deref(), now))
            .await
    }

    async fn delete_schedule(
        &self,
        tenant: String,
        name: String,
        actor: String,
        comment: Option<String>,
        now: Timestamp,
    ) -> Result<bool> {
        self.call(move |c| delete(c, &tenant, &name, &actor, comment.as_deref(), now))
            .await
    }

    async fn schedule_tick(&self, tick: ScheduleTick) -> Result<TickOutcome> {
        for o in &tick.slots {
            if let Some(r) = &o.run {
                crate::json::check_depth("input", &r.input)?;
            }
        }
        self.call(move |c| self::tick(c, tick)).await
    }

    async fn schedule_history(
        &self,
        tenant: String,
        name: String,
        limit: usize,
    ) -> Result<Vec<ScheduleHistory>> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT {HISTORY_COLS} FROM schedule_history WHERE tenant = ?1 AND schedule = ?2
                     ORDER BY id DESC LIMIT ?3"
                ))
                .map_err(db_err)?;
            let rows = st
                .query_map(
                    params![tenant, name, i64::try_from(limit).unwrap_or(i64::MAX)],
                    history_from_row,
                )
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        })
        .await
    }
}
