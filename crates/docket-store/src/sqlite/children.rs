//! [`ChildStore`] on SQLite, the fan-in hook of an end, and the cancel
//! cascade (the same concerns as `postgres/children.rs`). Decisions come
//! from `plan::child`; this file persists them.

use super::durable::{attempt_event, fence, persist_operator};
use super::ops::*;
use super::{db_err, SqliteStore};
use crate::children::{ChildSpawn, ChildStore, Family, JoinState, Spawned};
use crate::plan::{self, child::FINAL_SQL};
use crate::{LeaseRef, OperatorCommand, OperatorRequest, Result, Run, StoreError};
use async_trait::async_trait;
use docket_core::{RunId, RunStatus, Timestamp};
use rusqlite::{params, Connection, OptionalExtension};

fn spawn(
    c: &Connection,
    lease: LeaseRef,
    children: Vec<ChildSpawn>,
    now: Timestamp,
) -> Result<Result<Vec<Spawned>>> {
    let parent = match fence(c, lease, "child_spawned", now)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    // First every check, then the writes in the order PostgreSQL writes
    // them (its set-based statements): the new runs with their
    // `run_triggered`, each child's link, then the parent's steps and its
    // `child_spawned` events in spawn order. So a refused step spawns
    // nothing, and both backends number a spawn's events alike.
    let mut out = Vec::with_capacity(children.len());
    let mut fresh = Vec::new();
    for ch in children {
        let step = plan::child::step_name(&ch.step);
        let existing: Option<(String, Option<String>)> = c
            .prepare_cached("SELECT status, result FROM steps WHERE run_id = ?1 AND name = ?2")
            .map_err(db_err)?
            .query_row(params![parent.id.to_string(), step], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(db_err)?;
        if let Some((_, result)) = &existing {
            let result = result.as_deref().and_then(|t| serde_json::from_str(t).ok());
            if let Some(id) = plan::child::step_child(result.as_ref()) {
                out.push(Spawned {
                    step: ch.step,
                    run_id: id,
                    existing: true,
                });
                continue;
            }
        }
        if let Err(e) =
            plan::step::may_write(existing.as_ref().map(|e| e.0.as_str()), parent.id, &step)
        {
            return Ok(Err(e));
        }
        out.push(Spawned {
            step: ch.step.clone(),
            run_id: ch.run.id,
            existing: false,
        });
        fresh.push((step, ch));
    }
    if fresh.is_empty() {
        return Ok(Ok(out));
    }
    let made = trigger(c, fresh.iter().map(|(_, ch)| ch.run.clone()).collect(), now)?;
    for ((step, ch), t) in fresh.iter().zip(&made) {
        let child = &t.run;
        c.prepare_cached("UPDATE runs SET parent_id = ?2, child_policy = ?3 WHERE id = ?1")
            .map_err(db_err)?
            .execute(params![
                child.id.to_string(),
                parent.id.to_string(),
                ch.policy.as_str()
            ])
            .map_err(db_err)?;
        let ev = plan::child::spawned_on_child(step, parent.id, ch.policy);
        insert_event(
            c,
            child.id,
            &child.tenant,
            &child.job,
            &ev.kind,
            now,
            None,
            None,
            None,
            None,
            &ev.data,
        )?;
    }
    for (step, ch) in &fresh {
        let result = plan::child::step_result(ch.run.id, &ch.run.job, ch.policy);
        c.prepare_cached(
            "INSERT INTO steps (run_id, name, status, result, attempt, updated_at)
             VALUES (?1, ?2, 'completed', ?3, ?4, ?5)
             ON CONFLICT (run_id, name) DO UPDATE SET status = 'completed', result = excluded.result,
                error_class = NULL, error_message = NULL, attempt = excluded.attempt, updated_at = excluded.updated_at",
        )
        .map_err(db_err)?
        .execute(params![parent.id.to_string(), step, result.to_string(), parent.attempt, now.0])
        .map_err(db_err)?;
        let ev = plan::child::spawned_on_parent(step, ch.run.id, &ch.run.job, ch.policy);
        attempt_event(c, &parent, lease, &ev.kind, now, &ev.data)?;
    }
    Ok(Ok(out))
}

fn join(
    c: &Connection,
    lease: LeaseRef,
    children: &[RunId],
    now: Timestamp,
) -> Result<Result<JoinState>> {
    let parent = match fence(c, lease, "join_children", now)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let mut waiting = 0u32;
    let mut of = 0u32;
    let mut mark = c
        .prepare_cached(&format!(
            "UPDATE runs SET parent_waits = 1
             WHERE id = ?1 AND parent_id = ?2 AND status NOT IN ({FINAL_SQL})"
        ))
        .map_err(db_err)?;
    let mut mine = c
        .prepare_cached("SELECT 1 FROM runs WHERE id = ?1 AND parent_id = ?2")
        .map_err(db_err)?;
    let pid = parent.id.to_string();
    for id in children {
        let id = id.to_string();
        if mine
            .query_row(params![id, pid], |_| Ok(()))
            .optional()
            .map_err(db_err)?
            .is_none()
        {
            continue;
        }
        of += 1;
        waiting += mark.execute(params![id, pid]).map_err(db_err)? as u32;
    }
    let state = JoinState { waiting, of };
    c.prepare_cached(
        "UPDATE runs SET join_waiting = ?2, join_of = ?3, run_after = COALESCE(?4, run_after) WHERE id = ?1",
    )
    .map_err(db_err)?
    .execute(params![
        pid,
        state.waiting,
        state.of,
        plan::child::join_run_after(state).map(|t| t.0)
    ])
    .map_err(db_err)?;
    Ok(Ok(state))
}

/// The fan-in: a child that just became final and that its parent's join
/// waits for (`parent_waits`) decrements the parent's count, and the last
/// one makes the parent due at `now` — in the child's transaction.
pub(super) fn fan_in(c: &Connection, parent: RunId, now: Timestamp) -> Result<()> {
    c.prepare_cached(&format!(
        "UPDATE runs SET {} WHERE id = ?1",
        plan::child::fan_in_set("", "1", "?2")
    ))
    .map_err(db_err)?
    .execute(params![parent.to_string(), now.0])
    .map_err(db_err)?;
    Ok(())
}

/// The fan-in for a run an operator command just made final (its parent
/// link and mark read from the row).
pub(super) fn fan_in_of(c: &Connection, child: RunId, now: Timestamp) -> Result<()> {
    let parent: Option<Option<String>> = c
        .prepare_cached("SELECT parent_id FROM runs WHERE id = ?1 AND parent_waits = 1")
        .map_err(db_err)?
        .query_row([child.to_string()], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    if let Some(Some(p)) = parent {
        let p: RunId = p
            .parse()
            .map_err(|_| StoreError::Database(format!("bad parent id {p}")))?;
        fan_in(c, p, now)?;
    }
    Ok(())
}

/// Cancels the unfinished descendants of `parent` whose policy is
/// `cancel` (the operator's cancel plan for each, with the canceller as
/// actor, a `cancelled_with_parent` event and the fan-in), in the caller's
/// transaction. Children with policy `abandon` and their subtrees are left.
pub(super) fn cascade_cancel(c: &Connection, parent: RunId, req: &OperatorRequest) -> Result<()> {
    let mut frontier = vec![parent];
    while let Some(p) = frontier.pop() {
        let ids: Vec<String> = {
            let mut st = c
                .prepare_cached(&format!(
                    "SELECT id FROM runs WHERE parent_id = ?1 AND child_policy = 'cancel'
                       AND status NOT IN ({FINAL_SQL}) ORDER BY id"
                ))
                .map_err(db_err)?;
            let rows = st
                .query_map([p.to_string()], |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)?
        };
        for id in ids {
            let id: RunId = id
                .parse()
                .map_err(|_| StoreError::Database(format!("bad run id {id}")))?;
            let Some(child) = get_run(c, id)? else {
                continue;
            };
            let p_plan = plan::operator::operator(&child, &OperatorCommand::Cancel, None, req.now)?;
            let sub = OperatorRequest {
                run_id: child.id,
                command: OperatorCommand::Cancel,
                actor: req.actor.clone(),
                comment: Some(plan::child::cascade_comment(p, req.comment.as_deref())),
                now: req.now,
            };
            persist_operator(c, &child, &sub, &p_plan)?;
            let ev = plan::child::cancelled_with_parent(p, child.status);
            insert_event(
                c,
                child.id,
                &child.tenant,
                &child.job,
                &ev.kind,
                req.now,
                None,
                None,
                Some(req.actor.as_str()),
                sub.comment.as_deref(),
                &ev.data,
            )?;
            if p_plan.run.finish {
                fan_in_of(c, child.id, req.now)?;
            }
            frontier.push(child.id);
        }
    }
    Ok(())
}

fn children(c: &Connection, parent: RunId, after: Option<RunId>, limit: usize) -> Result<Vec<Run>> {
    let limit = if limit == 0 { 100 } else { limit } as i64;
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {RUN_COLS} FROM runs INDEXED BY runs_parent
             WHERE parent_id = ?1 AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3"
        ))
        .map_err(db_err)?;
    let rows = st
        .query_map(
            params![parent.to_string(), after.map(|a| a.to_string()), limit],
            run_from_row,
        )
        .map_err(db_err)?;
    rows.collect::<rusqlite::Result<_>>().map_err(db_err)
}

fn family(c: &Connection, run: RunId) -> Result<Option<Family>> {
    let row: Option<(Option<String>, String, u32, u32)> = c
        .prepare_cached("SELECT parent_id, status, join_waiting, join_of FROM runs WHERE id = ?1")
        .map_err(db_err)?
        .query_row([run.to_string()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()
        .map_err(db_err)?;
    let Some((parent, status, waiting, of)) = row else {
        return Ok(None);
    };
    let children: i64 = c
        .prepare_cached("SELECT count(*) FROM runs WHERE parent_id = ?1")
        .map_err(db_err)?
        .query_row([run.to_string()], |r| r.get(0))
        .map_err(db_err)?;
    let waiting = (status == RunStatus::Postponed.as_str() && waiting > 0)
        .then_some(JoinState { waiting, of });
    Ok(Some(Family {
        parent_id: parent.and_then(|p| p.parse().ok()),
        children,
        waiting,
    }))
}

#[async_trait]
impl ChildStore for SqliteStore {
    async fn spawn_children(
        &self,
        lease: LeaseRef,
        children: Vec<ChildSpawn>,
        now: Timestamp,
    ) -> Result<Vec<Spawned>> {
        for ch in &children {
            crate::json::check_depth("input", &ch.run.input)?;
        }
        self.call(move |c| spawn(c, lease, children, now)).await?
    }

    async fn join_children(
        &self,
        lease: LeaseRef,
        children: Vec<RunId>,
        now: Timestamp,
    ) -> Result<JoinState> {
        self.call(move |c| join(c, lease, &children, now)).await?
    }

    async fn children(
        &self,
        parent: RunId,
        after: Option<RunId>,
        limit: usize,
    ) -> Result<Vec<Run>> {
        self.read(move |c| children(c, parent, after, limit)).await
    }

    async fn family(&self, run: RunId) -> Result<Option<Family>> {
        self.read(move |c| family(c, run)).await
    }

    async fn count_joining(&self, tenant: Option<String>) -> Result<i64> {
        self.read(move |c| {
            c.prepare_cached(
                "SELECT count(*) FROM runs WHERE status = 'postponed' AND join_waiting > 0
                   AND (?1 IS NULL OR tenant = ?1)",
            )
            .map_err(db_err)?
            .query_row([tenant], |r| r.get(0))
            .map_err(db_err)
        })
        .await
    }
}
