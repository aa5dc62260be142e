//! The conformance suite of child runs ([`crate::children`]): spawning
//! exactly once, the fan-in in every order the ends can commit in, the
//! cancel cascade, and the reads. Run against every backend by
//! `tests/children_conformance.rs`.

use crate::*;
use docket_core::{ErrorClass, LeaseId, RunStatus, TerminalReason, Timestamp};
use serde_json::json;

const T0: Timestamp = crate::conformance::T0;

fn claim_of(job: &str, now: Timestamp, limit: usize) -> ClaimRequest {
    ClaimRequest {
        tenant: None,
        jobs: vec![job.into()],
        limit,
        now,
        lease_ms: 30_000,
        worker: "w1".into(),
    }
}

/// A claimed `parent` run and its lease.
async fn parent(store: &DynStore) -> (Run, LeaseRef) {
    let mut n = NewRun::new("parent", json!({}));
    n.tenant = "acme".into();
    n.correlation_id = Some("corr-9".into());
    store.trigger(vec![n], T0).await.unwrap();
    let run = store
        .claim(claim_of("parent", T0, 1))
        .await
        .unwrap()
        .remove(0);
    let lease = LeaseRef {
        run_id: run.id,
        lease_id: run.lease_id.unwrap(),
    };
    (run, lease)
}

fn child(parent: &Run, step: &str, policy: ChildPolicy) -> ChildSpawn {
    let mut run = NewRun::new("child", json!({ "step": step }));
    run.tenant = parent.tenant.clone();
    run.correlation_id = parent.correlation_id.clone();
    ChildSpawn {
        step: step.into(),
        run,
        policy,
    }
}

async fn spawn(store: &DynStore, p: &Run, lease: LeaseRef, steps: &[&str]) -> Vec<RunId> {
    store
        .spawn_children(
            lease,
            steps
                .iter()
                .map(|s| child(p, s, ChildPolicy::Cancel))
                .collect(),
            T0,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.run_id)
        .collect()
}

async fn end(store: &DynStore, run: RunId, lease: LeaseId, now: Timestamp, outcome: Outcome) {
    store
        .finish(vec![AttemptEnd {
            run_id: run,
            lease_id: lease,
            now,
            outcome,
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
}

/// Claims every due `child` run at `now`: id → lease.
async fn claim_children(store: &DynStore, now: Timestamp) -> Vec<(RunId, LeaseId)> {
    store
        .claim(claim_of("child", now, 100))
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.lease_id.unwrap()))
        .collect()
}

fn done(output: serde_json::Value) -> Outcome {
    Outcome::Completed { output }
}

async fn kinds(store: &DynStore, run: RunId) -> Vec<String> {
    crate::conformance::events_of(store, run)
        .await
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect()
}

async fn run(store: &DynStore, id: RunId) -> Run {
    store.get_run(id).await.unwrap().unwrap()
}

/// A spawn creates the child and its step in one transaction; the same
/// step again (a replay) answers the same child and creates nothing; the
/// child carries the parent link, tenant and correlation id; a stale lease
/// spawns nothing.
pub async fn children_spawn_exactly_once(store: DynStore) {
    let (p, lease) = parent(&store).await;
    let first = store
        .spawn_children(
            lease,
            vec![
                child(&p, "a", ChildPolicy::Cancel),
                child(&p, "b", ChildPolicy::Abandon),
            ],
            T0,
        )
        .await
        .unwrap();
    assert!(first.iter().all(|s| !s.existing));
    let again = store
        .spawn_children(
            lease,
            vec![
                child(&p, "a", ChildPolicy::Cancel),
                child(&p, "c", ChildPolicy::Cancel),
            ],
            T0,
        )
        .await
        .unwrap();
    assert!(again[0].existing);
    assert_eq!(again[0].run_id, first[0].run_id);
    assert!(!again[1].existing);
    let kids = store.children(p.id, None, 0).await.unwrap();
    assert_eq!(kids.len(), 3, "a replay creates no second child");
    assert_eq!(
        kids.iter().map(|k| k.id).collect::<Vec<_>>(),
        [first[0].run_id, first[1].run_id, again[1].run_id]
    );
    let a = &kids[0];
    assert_eq!(a.parent_id, Some(p.id));
    assert_eq!(a.tenant, "acme");
    assert_eq!(a.correlation_id.as_deref(), Some("corr-9"));
    assert_eq!(a.status, RunStatus::Pending);
    assert_eq!(
        kinds(&store, a.id).await,
        ["run_triggered", "child_spawned"]
    );
    let steps = store.steps(p.id).await.unwrap();
    let a_step = steps.iter().find(|s| s.name == "spawn:a").unwrap();
    assert_eq!(
        plan::child::step_child(a_step.result.as_ref()),
        Some(first[0].run_id)
    );
    let ev = store
        .events(EventFilter {
            run_id: Some(p.id),
            ..Default::default()
        })
        .await
        .unwrap();
    let spawned: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == "child_spawned")
        .map(|e| e.data["child"].clone())
        .collect();
    assert_eq!(
        spawned,
        [
            json!(first[0].run_id),
            json!(first[1].run_id),
            json!(again[1].run_id)
        ]
    );
    let fam = store.family(p.id).await.unwrap().unwrap();
    assert_eq!((fam.parent_id, fam.children, fam.waiting), (None, 3, None));
    assert_eq!(
        store.family(a.id).await.unwrap().unwrap().parent_id,
        Some(p.id)
    );
    // Paging in spawn order.
    let page = store.children(p.id, Some(kids[0].id), 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, kids[1].id);

    // The attempt ends; its lease no longer spawns anything.
    end(&store, p.id, lease.lease_id, T0, done(json!(null))).await;
    let stale = store
        .spawn_children(lease, vec![child(&p, "d", ChildPolicy::Cancel)], T0)
        .await
        .unwrap_err();
    assert!(matches!(stale, StoreError::StaleLease { .. }), "{stale}");
    assert_eq!(store.children(p.id, None, 0).await.unwrap().len(), 3);
}

/// The join counts the open children; the parent, postponed with no time
/// of its own, is not claimable until the LAST of them is final, and then
/// at that end's time. Each child end is O(1): it decrements the count.
pub async fn children_join_waits_for_the_last_child(store: DynStore) {
    let (p, lease) = parent(&store).await;
    let kids = spawn(&store, &p, lease, &["a", "b", "c"]).await;
    let leases = claim_children(&store, T0).await;
    assert_eq!(leases.len(), 3);
    // One child is done before the join.
    end(
        &store,
        leases[0].0,
        leases[0].1,
        T0.plus_millis(1),
        done(json!(1)),
    )
    .await;
    let st = store
        .join_children(lease, kids.clone(), T0.plus_millis(2))
        .await
        .unwrap();
    assert_eq!(st, JoinState { waiting: 2, of: 3 });
    end(
        &store,
        p.id,
        lease.lease_id,
        T0.plus_millis(3),
        Outcome::AwaitingChildren { waiting: 2, of: 3 },
    )
    .await;
    let r = run(&store, p.id).await;
    assert_eq!(r.status, RunStatus::Postponed);
    assert_eq!(r.attempts_forgiven, 1, "a join spends no budget");
    assert_eq!(r.run_after, Timestamp::MAX);
    assert_eq!(
        store.family(p.id).await.unwrap().unwrap().waiting,
        Some(JoinState { waiting: 2, of: 3 })
    );
    assert_eq!(store.count_joining(None).await.unwrap(), 1);
    assert_eq!(store.count_joining(Some("other".into())).await.unwrap(), 0);
    assert!(kinds(&store, p.id)
        .await
        .contains(&"waiting_for_children".to_string()));
    let far = T0.plus_millis(86_400_000);
    assert!(store
        .claim(claim_of("parent", far, 1))
        .await
        .unwrap()
        .is_empty());

    end(
        &store,
        leases[1].0,
        leases[1].1,
        T0.plus_millis(10),
        done(json!(2)),
    )
    .await;
    assert!(store
        .claim(claim_of("parent", far, 1))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.family(p.id).await.unwrap().unwrap().waiting,
        Some(JoinState { waiting: 1, of: 3 })
    );
    // The last one fails for good: a final state all the same.
    end(
        &store,
        leases[2].0,
        leases[2].1,
        T0.plus_millis(20),
        Outcome::Failed {
            error: None,
            reason: TerminalReason::PermanentError,
            detail: "no".into(),
        },
    )
    .await;
    assert_eq!(run(&store, p.id).await.run_after, T0.plus_millis(20));
    assert_eq!(store.family(p.id).await.unwrap().unwrap().waiting, None);
    assert_eq!(store.count_joining(None).await.unwrap(), 0);
    assert!(store
        .claim(claim_of("parent", T0.plus_millis(19), 1))
        .await
        .unwrap()
        .is_empty());
    let again = store
        .claim(claim_of("parent", T0.plus_millis(20), 1))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    // A second join finds nothing open: no suspension.
    let lease2 = LeaseRef {
        run_id: p.id,
        lease_id: again[0].lease_id.unwrap(),
    };
    let st = store
        .join_children(lease2, kids, T0.plus_millis(21))
        .await
        .unwrap();
    assert_eq!(st, JoinState { waiting: 0, of: 3 });
    assert_eq!(run(&store, p.id).await.run_after, T0.plus_millis(20));
}

/// The last child may end before the parent's own end is stored, or in the
/// same `finish` call: either way the parent ends up due, never stuck.
pub async fn children_fan_in_in_any_order(store: DynStore) {
    // The child ends between the join and the parent's end.
    let (p, lease) = parent(&store).await;
    let kids = spawn(&store, &p, lease, &["a"]).await;
    let leases = claim_children(&store, T0).await;
    store.join_children(lease, kids, T0).await.unwrap();
    end(
        &store,
        leases[0].0,
        leases[0].1,
        T0.plus_millis(5),
        done(json!(1)),
    )
    .await;
    end(
        &store,
        p.id,
        lease.lease_id,
        T0.plus_millis(6),
        Outcome::AwaitingChildren { waiting: 1, of: 1 },
    )
    .await;
    let r = run(&store, p.id).await;
    assert_eq!(
        (r.status, r.run_after),
        (RunStatus::Postponed, T0.plus_millis(5))
    );
    assert_eq!(
        store
            .claim(claim_of("parent", T0.plus_millis(6), 1))
            .await
            .unwrap()
            .len(),
        1
    );

    // The parent's end and the child's end in one call (one batch).
    let (p, lease) = parent(&store).await;
    let kids = spawn(&store, &p, lease, &["a"]).await;
    let leases = claim_children(&store, T0).await;
    store.join_children(lease, kids, T0).await.unwrap();
    let res = store
        .finish(vec![
            AttemptEnd {
                run_id: p.id,
                lease_id: lease.lease_id,
                now: T0.plus_millis(7),
                outcome: Outcome::AwaitingChildren { waiting: 1, of: 1 },
            },
            AttemptEnd {
                run_id: leases[0].0,
                lease_id: leases[0].1,
                now: T0.plus_millis(7),
                outcome: done(json!(2)),
            },
        ])
        .await
        .unwrap();
    assert!(res.iter().all(|r| r.is_ok()));
    let r = run(&store, p.id).await;
    assert_eq!(
        (r.status, r.run_after),
        (RunStatus::Postponed, T0.plus_millis(7))
    );
}

/// Cancelling a parent cancels its unfinished children with policy
/// `cancel` (a running one is asked to stop), audited on each, down to
/// grandchildren; `abandon` children and finished ones are left alone. A
/// child cancelled by an operator counts as final for its parent's join.
pub async fn children_cancel_cascades_by_policy(store: DynStore) {
    let (p, lease) = parent(&store).await;
    let spawned = store
        .spawn_children(
            lease,
            vec![
                child(&p, "pending", ChildPolicy::Cancel),
                child(&p, "running", ChildPolicy::Cancel),
                child(&p, "kept", ChildPolicy::Abandon),
            ],
            T0,
        )
        .await
        .unwrap();
    let (pending, running, kept) = (spawned[0].run_id, spawned[1].run_id, spawned[2].run_id);
    // Only `running` runs: claim all three, hand the others back.
    let leases = claim_children(&store, T0).await;
    for (id, l) in &leases {
        if *id != running {
            end(&store, *id, *l, T0, Outcome::Released).await;
        }
    }
    // A grandchild under `running`.
    let run_lease = LeaseRef {
        run_id: running,
        lease_id: leases.iter().find(|(id, _)| *id == running).unwrap().1,
    };
    let running_run = run(&store, running).await;
    let grand = store
        .spawn_children(
            run_lease,
            vec![child(&running_run, "g", ChildPolicy::Cancel)],
            T0,
        )
        .await
        .unwrap()[0]
        .run_id;
    store
        .join_children(lease, vec![pending, running, kept], T0)
        .await
        .unwrap();
    end(
        &store,
        p.id,
        lease.lease_id,
        T0,
        Outcome::AwaitingChildren { waiting: 3, of: 3 },
    )
    .await;
    let r = store
        .operator(OperatorRequest {
            run_id: p.id,
            actor: "ops-alice".into(),
            comment: Some("stop it".into()),
            now: T0.plus_millis(50),
            command: OperatorCommand::Cancel,
        })
        .await
        .unwrap();
    assert_eq!(r.status, RunStatus::Cancelled);
    let pr = run(&store, pending).await;
    assert_eq!(pr.status, RunStatus::Cancelled);
    let ev = store
        .events(EventFilter {
            run_id: Some(pending),
            ..Default::default()
        })
        .await
        .unwrap();
    let last = ev.last().unwrap();
    assert_eq!(last.kind, "cancelled_with_parent");
    assert_eq!(last.data["parent"], json!(p.id));
    assert_eq!(last.actor.as_deref(), Some("ops-alice"));
    assert!(last.comment.as_deref().unwrap().contains("stop it"));
    assert_eq!(ev[ev.len() - 2].kind, "run_cancelled");
    let rr = run(&store, running).await;
    assert_eq!(rr.status, RunStatus::Running);
    assert!(
        rr.cancel_requested,
        "a running child stops at its next step"
    );
    assert_eq!(run(&store, grand).await.status, RunStatus::Cancelled);
    assert_eq!(run(&store, kept).await.status, RunStatus::Pending);
    assert!(!run(&store, kept).await.cancel_requested);

    // An operator's cancel of an awaited child fans in like any end.
    let (p, lease) = parent(&store).await;
    let kids = spawn(&store, &p, lease, &["x"]).await;
    store.join_children(lease, kids.clone(), T0).await.unwrap();
    end(
        &store,
        p.id,
        lease.lease_id,
        T0,
        Outcome::AwaitingChildren { waiting: 1, of: 1 },
    )
    .await;
    store
        .operator(OperatorRequest {
            run_id: kids[0],
            actor: "ops".into(),
            comment: None,
            now: T0.plus_millis(60),
            command: OperatorCommand::Cancel,
        })
        .await
        .unwrap();
    assert_eq!(run(&store, p.id).await.run_after, T0.plus_millis(60));
}

/// A reaped child (lease expired, failed for good) fans in too.
pub async fn children_reaped_child_fans_in(store: DynStore) {
    let (p, lease) = parent(&store).await;
    let kids = spawn(&store, &p, lease, &["a"]).await;
    let leases = claim_children(&store, T0).await;
    store.join_children(lease, kids, T0).await.unwrap();
    end(
        &store,
        p.id,
        lease.lease_id,
        T0,
        Outcome::AwaitingChildren { waiting: 1, of: 1 },
    )
    .await;
    let late = T0.plus_millis(31_000);
    let res = store
        .reap(vec![AttemptEnd {
            run_id: leases[0].0,
            lease_id: leases[0].1,
            now: late,
            outcome: Outcome::Failed {
                error: Some(ErrorInfo {
                    class: ErrorClass::LeaseExpired,
                    message: "expired".into(),
                    fingerprint: "fp".into(),
                    failure_key: "fk".into(),
                    action: None,
                }),
                reason: TerminalReason::MaxRetriesExhausted,
                detail: "expired".into(),
            },
        }])
        .await
        .unwrap();
    assert!(matches!(res[0], Ok(Some(RunStatus::Failed))));
    assert_eq!(run(&store, p.id).await.run_after, late);
}

/// How many times [`children_cancel_races_child_ends`] races its three
/// writers.
pub const RACE_ROUNDS: usize = 40;

/// A parent cancelled (cascading to its children) while its children end
/// and another operator cancels one of them, from two stores (two
/// connection pools, or two SQLite writers on one file), released together
/// by a barrier, many times. A child's end and an operator's cancel of a
/// child lock the child, then its parent (the fan-in); the parent's cancel
/// must not lock the parent, then the children, or the two deadlock on
/// PostgreSQL. Every call answers (a refused cancel of an already
/// cancelled child is `WrongState`, never a database error), and the
/// family ends consistent: the parent cancelled with no open join, the
/// ended children completed, the pending one cancelled once.
pub async fn children_cancel_races_child_ends(a: DynStore, b: DynStore) {
    use std::sync::Arc;
    for round in 0..RACE_ROUNDS {
        let (p, lease) = parent(&a).await;
        let kids = spawn(&a, &p, lease, &["r1", "r2", "pending"]).await;
        // The first two run; the third is handed back and stays pending.
        let leases = claim_children(&a, T0).await;
        let pending = kids[2];
        let mut running = Vec::new();
        for (id, l) in leases {
            if id == pending {
                end(&a, id, l, T0, Outcome::Released).await;
            } else {
                running.push((id, l));
            }
        }
        assert_eq!(running.len(), 2);
        a.join_children(lease, kids.clone(), T0).await.unwrap();
        end(
            &a,
            p.id,
            lease.lease_id,
            T0,
            Outcome::AwaitingChildren { waiting: 3, of: 3 },
        )
        .await;
        let now = T0.plus_millis(10);
        let cancel = |run_id: RunId| OperatorRequest {
            run_id,
            actor: "ops".into(),
            comment: None,
            now,
            command: OperatorCommand::Cancel,
        };
        let barrier = Arc::new(tokio::sync::Barrier::new(3));
        let ends: Vec<AttemptEnd> = running
            .iter()
            .map(|(id, l)| AttemptEnd {
                run_id: *id,
                lease_id: *l,
                now,
                outcome: done(json!(round)),
            })
            .collect();
        let t_end = {
            let (store, barrier) = (a.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.finish(ends).await
            })
        };
        let t_parent = {
            let (store, barrier, req) = (b.clone(), barrier.clone(), cancel(p.id));
            tokio::spawn(async move {
                barrier.wait().await;
                store.operator(req).await
            })
        };
        let t_child = {
            let (store, barrier, req) = (a.clone(), barrier.clone(), cancel(pending));
            tokio::spawn(async move {
                barrier.wait().await;
                store.operator(req).await
            })
        };
        for r in t_end.await.unwrap().expect("the ends are stored") {
            assert_eq!(r.expect("each end holds its lease"), RunStatus::Completed);
        }
        let pr = t_parent
            .await
            .unwrap()
            .expect("the parent's cancel answers");
        assert_eq!(pr.status, RunStatus::Cancelled);
        match t_child.await.unwrap() {
            Ok(r) => assert_eq!(r.status, RunStatus::Cancelled),
            Err(StoreError::WrongState { .. }) => {}
            Err(e) => panic!("round {round}: the child's cancel failed: {e:?}"),
        }
        let p_now = run(&a, p.id).await;
        assert_eq!(p_now.status, RunStatus::Cancelled, "round {round}");
        let parent_cancels = kinds(&a, p.id)
            .await
            .into_iter()
            .filter(|k| k == "run_cancelled")
            .count();
        assert_eq!(parent_cancels, 1, "round {round}");
        for (id, _) in &running {
            let r = run(&a, *id).await;
            assert_eq!(r.status, RunStatus::Completed, "round {round}");
        }
        assert_eq!(run(&a, pending).await.status, RunStatus::Cancelled);
        let cancelled = kinds(&a, pending)
            .await
            .into_iter()
            .filter(|k| k == "run_cancelled")
            .count();
        assert_eq!(
            cancelled, 1,
            "round {round}: the pending child is cancelled once"
        );
    }
}

/// Runs every test of the children suite against a backend (see
/// [`conformance_tests!`](crate::conformance_tests) for the two forms).
/// A third form, `race: PAIR`, runs [`children_cancel_races_child_ends`]
/// on a pair of stores over one database (`PAIR` evaluates to
/// `Option<(DynStore, DynStore)>`; `None` skips).
#[macro_export]
macro_rules! children_conformance_tests {
    (race: $pair:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn children_cancel_races_child_ends() {
            let pair: ::std::option::Option<($crate::DynStore, $crate::DynStore)> = $pair;
            if let ::std::option::Option::Some((a, b)) = pair {
                $crate::children_conformance::children_cancel_races_child_ends(a, b).await;
            }
        }
    };
    (optional: $factory:expr) => {
        $crate::children_conformance_tests!(@each @optional $factory);
    };
    ($factory:expr) => {
        $crate::children_conformance_tests!(@each @required $factory);
    };
    (@each @$kind:ident $factory:expr) => {
        $crate::children_conformance_tests!(@run @$kind $factory;
            children_spawn_exactly_once,
            children_join_waits_for_the_last_child,
            children_fan_in_in_any_order,
            children_cancel_cascades_by_policy,
            children_reaped_child_fans_in,
        );
    };
    (@run @required $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store: $crate::DynStore = $factory;
                $crate::children_conformance::$name(store).await;
            }
        )*
    };
    (@run @optional $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store: ::std::option::Option<$crate::DynStore> = $factory;
                if let ::std::option::Option::Some(store) = store {
                    $crate::children_conformance::$name(store).await;
                }
            }
        )*
    };
}
