//! [`ChildStore`] on PostgreSQL, the fan-in of an operator's end, and the
//! cancel cascade (the same concerns as `sqlite/children.rs`; the fan-in of
//! an attempt's end is a CTE of the hot statement, `postgres/hot.rs`).
//!
//! Lock order: children before their parent. A join locks the children it
//! marks (in id order) before its parent, as a child's end does (its row,
//! then its parent's), so a join and the ends of its children cannot
//! deadlock. A cancel locks the descendants it cascades to (in id order,
//! [`lock_cascade`]) before the cancelled run, so a cascade and a child's
//! end, reap or cancel cannot deadlock either
//! (`children_conformance::children_cancel_races_child_ends`).

use super::durable::{event, fence, persist_operator};
use super::ops::{get_run, run_from_row, RUN_COLS};
use super::{db, PgStore};
use crate::children::{ChildSpawn, ChildStore, Family, JoinState, Spawned};
use crate::plan::{self, child::FINAL_SQL};
use crate::{LeaseRef, OperatorCommand, OperatorRequest, Result, Run};
use async_trait::async_trait;
use docket_core::{RunId, RunStatus, Timestamp};
use serde_json::Value;
use sqlx::postgres::PgConnection;
use sqlx::Row;
use std::collections::HashMap;
use uuid::Uuid;

/// The fan-in for a run an operator command just made final.
pub(super) async fn fan_in_of(c: &mut PgConnection, child: RunId, now: Timestamp) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE runs p SET {} FROM runs ch
         WHERE ch.id = $1 AND ch.parent_waits AND p.id = ch.parent_id",
        plan::child::fan_in_set("p.", "1", "$2")
    ))
    .bind(child.0)
    .bind(now.0)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// Locks the unfinished descendants of `parent` that a cancel would
/// cascade to (policy `cancel`, every generation), in id order, before the
/// cancel locks `parent` itself: the order of every other path that locks
/// a child and its parent (an end's fan-in, a join). A child spawned after
/// this read (its parent was running) is locked later by
/// [`cascade_cancel`] as before; a deadlock that could cause is retried by
/// the operator command.
pub(super) async fn lock_cascade(c: &mut PgConnection, parent: RunId) -> Result<()> {
    sqlx::query(&format!(
        "WITH RECURSIVE d(id) AS (
             SELECT id FROM runs WHERE parent_id = $1 AND child_policy = 'cancel'
               AND status NOT IN ({FINAL_SQL})
             UNION
             SELECT r.id FROM runs r JOIN d ON r.parent_id = d.id
             WHERE r.child_policy = 'cancel' AND r.status NOT IN ({FINAL_SQL})
         )
         SELECT id FROM runs WHERE id IN (SELECT id FROM d) ORDER BY id FOR UPDATE"
    ))
    .bind(parent.0)
    .fetch_all(&mut *c)
    .await
    .map_err(db)?;
    Ok(())
}

/// Cancels the unfinished descendants of `parent` whose policy is
/// `cancel`, in the caller's transaction (see `sqlite/children.rs`).
pub(super) async fn cascade_cancel(
    c: &mut PgConnection,
    parent: RunId,
    req: &OperatorRequest,
) -> Result<()> {
    let mut frontier = vec![parent];
    while let Some(p) = frontier.pop() {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE parent_id = $1 AND child_policy = 'cancel'
               AND status NOT IN ({FINAL_SQL}) ORDER BY id FOR UPDATE"
        ))
        .bind(p.0)
        .fetch_all(&mut *c)
        .await
        .map_err(db)?;
        for row in &rows {
            let child = run_from_row(row)?;
            let plan = plan::operator::operator(&child, &OperatorCommand::Cancel, None, req.now)?;
            let sub = OperatorRequest {
                run_id: child.id,
                command: OperatorCommand::Cancel,
                actor: req.actor.clone(),
                comment: Some(plan::child::cascade_comment(p, req.comment.as_deref())),
                now: req.now,
            };
            persist_operator(c, &child, &sub, &plan).await?;
            let ev = plan::child::cancelled_with_parent(p, child.status);
            event(
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
            )
            .await?;
            if plan.run.finish {
                fan_in_of(c, child.id, req.now).await?;
            }
            frontier.push(child.id);
        }
    }
    Ok(())
}

async fn spawn(
    c: &mut PgConnection,
    lease: LeaseRef,
    children: Vec<ChildSpawn>,
    now: Timestamp,
) -> Result<Result<Vec<Spawned>>> {
    let parent = match fence(c, lease, "child_spawned", now).await? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let names: Vec<String> = children
        .iter()
        .map(|ch| plan::child::step_name(&ch.step))
        .collect();
    let rows =
        sqlx::query("SELECT name, status, result FROM steps WHERE run_id = $1 AND name = ANY($2)")
            .bind(parent.id.0)
            .bind(&names)
            .fetch_all(&mut *c)
            .await
            .map_err(db)?;
    let mut existing: HashMap<String, (String, Option<Value>)> = HashMap::new();
    for r in &rows {
        existing.insert(
            r.try_get("name").map_err(db)?,
            (
                r.try_get("status").map_err(db)?,
                r.try_get("result").map_err(db)?,
            ),
        );
    }
    let mut out = Vec::with_capacity(children.len());
    let mut fresh = Vec::new();
    for (ch, step) in children.into_iter().zip(names) {
        if let Some((status, result)) = existing.get(&step) {
            if let Some(id) = plan::child::step_child(result.as_ref()) {
                out.push(Spawned {
                    step: ch.step,
                    run_id: id,
                    existing: true,
                });
                continue;
            }
            if let Err(e) = plan::step::may_write(Some(status.as_str()), parent.id, &step) {
                return Ok(Err(e));
            }
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
    let mut jobs: Vec<String> = fresh.iter().map(|(_, ch)| ch.run.job.clone()).collect();
    jobs.sort();
    jobs.dedup();
    let runs = fresh.iter().map(|(_, ch)| ch.run.clone()).collect();
    let made = super::ops::trigger(c, runs, now, &jobs).await?;
    let ids: Vec<Uuid> = made.iter().map(|t| t.run.id.0).collect();
    let policies: Vec<&str> = fresh.iter().map(|(_, ch)| ch.policy.as_str()).collect();
    sqlx::query(
        "UPDATE runs r SET parent_id = $1, child_policy = t.policy
         FROM unnest($2::uuid[], $3::text[]) AS t(id, policy) WHERE r.id = t.id",
    )
    .bind(parent.id.0)
    .bind(&ids)
    .bind(&policies)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    let steps: Vec<&str> = fresh.iter().map(|(s, _)| s.as_str()).collect();
    let results: Vec<Value> = fresh
        .iter()
        .map(|(_, ch)| plan::child::step_result(ch.run.id, &ch.run.job, ch.policy))
        .collect();
    sqlx::query(
        "INSERT INTO steps (run_id, name, status, result, attempt, updated_at)
         SELECT $1, t.name, 'completed', t.result, $4, $5
         FROM unnest($2::text[], $3::jsonb[]) AS t(name, result)
         ON CONFLICT (run_id, name) DO UPDATE SET status = 'completed', result = excluded.result,
            error_class = NULL, error_message = NULL, attempt = excluded.attempt, updated_at = excluded.updated_at",
    )
    .bind(parent.id.0)
    .bind(&steps)
    .bind(&results)
    .bind(parent.attempt)
    .bind(now.0)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    // The events: on each child its link, then on the parent each spawn
    // (in spawn order), in one statement.
    let (mut run_ids, mut tenants, mut jobs_ev, mut attempts, mut leases, mut kinds, mut datas) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for ((step, ch), t) in fresh.iter().zip(&made) {
        let ev = plan::child::spawned_on_child(step, parent.id, ch.policy);
        run_ids.push(t.run.id.0);
        tenants.push(t.run.tenant.clone());
        jobs_ev.push(t.run.job.clone());
        attempts.push(None::<i32>);
        leases.push(None::<Uuid>);
        kinds.push(ev.kind.as_str().to_string());
        datas.push(ev.data);
    }
    for (step, ch) in &fresh {
        let ev = plan::child::spawned_on_parent(step, ch.run.id, &ch.run.job, ch.policy);
        run_ids.push(parent.id.0);
        tenants.push(parent.tenant.clone());
        jobs_ev.push(parent.job.clone());
        attempts.push(Some(parent.attempt));
        leases.push(Some(lease.lease_id.0));
        kinds.push(ev.kind.as_str().to_string());
        datas.push(ev.data);
    }
    sqlx::query(
        "INSERT INTO events (run_id, tenant, job, kind, at, attempt, lease_id, data)
         SELECT t.run_id, t.tenant, t.job, t.kind, $8, t.attempt, t.lease_id, t.data
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::uuid[], $7::jsonb[])
              WITH ORDINALITY AS t(run_id, tenant, job, kind, attempt, lease_id, data, ord)
         ORDER BY t.ord",
    )
    .bind(&run_ids)
    .bind(&tenants)
    .bind(&jobs_ev)
    .bind(&kinds)
    .bind(&attempts)
    .bind(&leases)
    .bind(&datas)
    .bind(now.0)
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(Ok(out))
}

async fn join(
    c: &mut PgConnection,
    lease: LeaseRef,
    children: &[RunId],
    now: Timestamp,
) -> Result<Result<JoinState>> {
    let ids: Vec<Uuid> = children.iter().map(|r| r.0).collect();
    // Children first, in id order (the lock order of their own ends), then
    // the parent (the fence).
    let mine: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM runs WHERE id = ANY($1) AND parent_id = $2 ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .bind(lease.run_id.0)
    .fetch_all(&mut *c)
    .await
    .map_err(db)?;
    let parent = match fence(c, lease, "join_children", now).await? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    // A fresh snapshot (READ COMMITTED): every child's latest state, since
    // their rows are locked.
    let marked: i64 = sqlx::query_scalar(&format!(
        "WITH m AS (UPDATE runs SET parent_waits = true
                    WHERE id = ANY($1) AND status NOT IN ({FINAL_SQL}) RETURNING 1)
         SELECT count(*) FROM m"
    ))
    .bind(&mine)
    .fetch_one(&mut *c)
    .await
    .map_err(db)?;
    let state = JoinState {
        waiting: u32::try_from(marked).unwrap_or(u32::MAX),
        of: u32::try_from(mine.len()).unwrap_or(u32::MAX),
    };
    sqlx::query(
        "UPDATE runs SET join_waiting = $2, join_of = $3, run_after = COALESCE($4, run_after) WHERE id = $1",
    )
    .bind(parent.id.0)
    .bind(state.waiting as i32)
    .bind(state.of as i32)
    .bind(plan::child::join_run_after(state).map(|t| t.0))
    .execute(&mut *c)
    .await
    .map_err(db)?;
    Ok(Ok(state))
}

#[async_trait]
impl ChildStore for PgStore {
    async fn spawn_children(
        &self,
        lease: LeaseRef,
        children: Vec<ChildSpawn>,
        now: Timestamp,
    ) -> Result<Vec<Spawned>> {
        for ch in &children {
            crate::json::check_depth("input", &ch.run.input)?;
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        let out = spawn(&mut tx, lease, children, now).await?;
        tx.commit().await.map_err(db)?;
        out
    }

    async fn join_children(
        &self,
        lease: LeaseRef,
        children: Vec<RunId>,
        now: Timestamp,
    ) -> Result<JoinState> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let out = join(&mut tx, lease, &children, now).await?;
        tx.commit().await.map_err(db)?;
        out
    }

    async fn children(
        &self,
        parent: RunId,
        after: Option<RunId>,
        limit: usize,
    ) -> Result<Vec<Run>> {
        let limit = if limit == 0 { 100 } else { limit } as i64;
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLS} FROM runs
             WHERE parent_id = $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3"
        ))
        .bind(parent.0)
        .bind(after.map(|a| a.0))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(run_from_row).collect()
    }

    async fn family(&self, run: RunId) -> Result<Option<Family>> {
        let Some(r) = get_run(&self.pool, run).await? else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT join_waiting, join_of,
                    (SELECT count(*) FROM runs c WHERE c.parent_id = $1) AS children
             FROM runs WHERE id = $1",
        )
        .bind(run.0)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let waiting: i32 = row.try_get("join_waiting").map_err(db)?;
        let of: i32 = row.try_get("join_of").map_err(db)?;
        Ok(Some(Family {
            parent_id: r.parent_id,
            children: row.try_get("children").map_err(db)?,
            waiting: (r.status == RunStatus::Postponed && waiting > 0).then_some(JoinState {
                waiting: waiting as u32,
                of: of as u32,
            }),
        }))
    }

    async fn count_joining(&self, tenant: Option<String>) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE join_waiting > 0 AND status = 'postponed'
               AND ($1::text IS NULL OR tenant = $1)",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }
}
