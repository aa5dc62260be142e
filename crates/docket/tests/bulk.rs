//! Bulk operator actions: by filter with a cursor, by id list, dry runs,
//! per-run refusals, each run audited as if done alone.

use docket::bulk::{BulkAction, BulkRequest, BulkTarget};
use docket::{
    Actor, Docket, EventFilter, Job, JobError, ManualClock, RunFilter, RunId, RunStatus, Timestamp,
    TriggerOptions, WorkerConfig,
};
use docket_store::sqlite::SqliteStore;
use serde_json::{json, Value};
use std::sync::Arc;

const T0: Timestamp = Timestamp(1_767_225_600_000);

async fn engine() -> Docket {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let d = Docket::with_store(store, Arc::new(ManualClock::new(T0)));
    d.register(Job::new("fail", |_ctx, _v: Value| async move {
        Err::<Value, _>(JobError::permanent("no"))
    }))
    .unwrap();
    d.register(Job::new("ok", |_ctx, v: Value| async move {
        Ok::<_, JobError>(v)
    }))
    .unwrap();
    d
}

async fn run_all(d: &Docket) {
    let w = d.worker(WorkerConfig {
        concurrency: 64,
        ..Default::default()
    });
    while w.tick().await.unwrap() > 0 {}
}

fn req(action: BulkAction, target: BulkTarget, limit: usize) -> BulkRequest {
    BulkRequest {
        tenant: "default".into(),
        action,
        target,
        by: Actor::new("ops-alice", Some("vendor fixed".into())),
        limit,
        cursor: None,
        dry_run: false,
    }
}

fn failed_of(job: &str) -> BulkTarget {
    BulkTarget::Filter(RunFilter {
        job: Some(job.into()),
        statuses: vec![RunStatus::Failed],
        ..Default::default()
    })
}

/// A filter is walked page by page with a cursor; a dry run counts first;
/// every run's retry is its own audited operation; runs outside the filter
/// are untouched.
#[tokio::test]
async fn bulk_retry_by_filter_in_pages_with_a_dry_run_first() {
    let d = engine().await;
    let mut failed = Vec::new();
    for i in 0..7 {
        failed.push(d.trigger("fail", json!(i)).await.unwrap().run.id);
    }
    let done = d.trigger("ok", json!(1)).await.unwrap().run.id;
    run_all(&d).await;
    let mut r = req(
        BulkAction::Retry {
            updated_variables: Some(json!({"v": 2})),
        },
        failed_of("fail"),
        3,
    );
    r.dry_run = true;
    let dry = d.bulk(r.clone()).await.unwrap();
    assert_eq!(dry.matched, Some(7));
    assert!(dry.results.is_empty());
    assert_eq!(
        d.get_run(failed[0]).await.unwrap().status,
        RunStatus::Failed,
        "a dry run changes nothing"
    );
    r.dry_run = false;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = d.bulk(r.clone()).await.unwrap();
        pages += 1;
        assert!(page.results.len() <= 3);
        assert_eq!(page.failed, 0, "{page:?}");
        seen.extend(page.results.iter().map(|i| i.run_id));
        match page.next_cursor {
            Some(c) => r.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    seen.sort();
    let mut want = failed.clone();
    want.sort();
    assert_eq!(seen, want, "each failed run exactly once");
    for id in &failed {
        let run = d.get_run(*id).await.unwrap();
        assert_eq!(run.status, RunStatus::Pending);
        assert_eq!(run.variables, json!({"v": 2}));
        let ev = d
            .store()
            .events(EventFilter {
                run_id: Some(*id),
                ..Default::default()
            })
            .await
            .unwrap();
        let retry: Vec<_> = ev.iter().filter(|e| e.kind == "operator_retry").collect();
        assert_eq!(retry.len(), 1);
        assert_eq!(retry[0].actor.as_deref(), Some("ops-alice"));
        assert_eq!(retry[0].comment.as_deref(), Some("vendor fixed"));
    }
    assert_eq!(d.get_run(done).await.unwrap().status, RunStatus::Completed);
    // Nothing matches any more: a clear, empty answer.
    r.cursor = None;
    r.dry_run = true;
    assert_eq!(d.bulk(r.clone()).await.unwrap().matched, Some(0));
    r.dry_run = false;
    let page = d.bulk(r).await.unwrap();
    assert!(page.results.is_empty() && page.next_cursor.is_none());
}

/// By id list: refusals are reported per run (wrong state, another
/// tenant's run, an unknown id), the rest applied; retrigger names the new
/// runs; delete removes final runs only.
#[tokio::test]
async fn bulk_by_ids_reports_each_refusal() {
    let d = engine().await;
    let a = d.trigger("fail", json!(1)).await.unwrap().run.id;
    let b = d.trigger("fail", json!(2)).await.unwrap().run.id;
    let done = d.trigger("ok", json!(3)).await.unwrap().run.id;
    let foreign = d
        .trigger_with(
            "fail",
            json!(4),
            TriggerOptions {
                tenant: Some("globex".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .run
        .id;
    run_all(&d).await;
    let unknown = RunId::new();
    let ids = vec![a, done, foreign, unknown, b];
    let page = d
        .bulk(req(BulkAction::Retrigger, BulkTarget::Ids(ids.clone()), 10))
        .await
        .unwrap();
    let got: Vec<(bool, Option<&str>)> = page
        .results
        .iter()
        .map(|i| (i.ok, i.error.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            (true, None),
            (true, None),
            (false, Some("not_found")),
            (false, Some("not_found")),
            (true, None)
        ]
    );
    let fresh = page.results[0].new_run_id.expect("the retriggered run");
    assert_eq!(d.get_run(foreign).await.unwrap().status, RunStatus::Failed);
    // Retry: the completed run is refused, naming its state.
    let page = d
        .bulk(req(
            BulkAction::Retry {
                updated_variables: None,
            },
            BulkTarget::Ids(vec![a, done]),
            10,
        ))
        .await
        .unwrap();
    assert!(page.results[0].ok);
    assert_eq!(page.results[1].error.as_deref(), Some("wrong_state"));
    assert_eq!(page.results[1].status.as_deref(), Some("completed"));
    assert_eq!((page.succeeded, page.failed), (1, 1));
    // Ids in pages: the cursor is the last id handled.
    let mut r = req(BulkAction::Cancel, BulkTarget::Ids(vec![a, b]), 1);
    let p1 = d.bulk(r.clone()).await.unwrap();
    assert_eq!(p1.next_cursor, Some(a));
    r.cursor = p1.next_cursor;
    let p2 = d.bulk(r).await.unwrap();
    assert_eq!(p2.results[0].run_id, b);
    assert_eq!(
        p2.results[0].error.as_deref(),
        Some("wrong_state"),
        "b is failed: not cancellable"
    );
    assert!(p2.next_cursor.is_none());
    // Delete: only final runs.
    let page = d
        .bulk(req(
            BulkAction::Delete,
            BulkTarget::Ids(vec![done, fresh]),
            10,
        ))
        .await
        .unwrap();
    assert!(page.results[0].ok);
    assert_eq!(
        page.results[1].error.as_deref(),
        Some("wrong_state"),
        "{page:?}"
    );
    assert!(d.store().get_run(done).await.unwrap().is_none());
    // Bad input.
    assert!(d
        .bulk(req(BulkAction::Cancel, BulkTarget::Ids(vec![]), 10))
        .await
        .is_err());
    assert!(d
        .bulk(req(BulkAction::Cancel, BulkTarget::Ids(vec![a]), 0))
        .await
        .is_err());
}
