//! The engine when the store fails under it (PostgreSQL: its connections
//! are terminated at a chosen moment). Skipped, saying so, without
//! `DOCKET_TEST_POSTGRES_URL`.

use docket::{Docket, Job, JobError, RunStatus, WorkerConfig};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An attempt's end that the store could not take (the worker's connections
/// were terminated while the handler ran) is kept and stored again once the
/// store answers: the run completes on its first attempt, no lease expires,
/// the handler runs once. (Before, the end was dropped and the run came back
/// after its lease expired, as a second attempt.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_the_store_did_not_take_is_stored_again() {
    let Ok(base) = std::env::var("DOCKET_TEST_POSTGRES_URL") else {
        println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
        return;
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let app = format!("docket-faults-{tag}");
    let schema = format!("faults_{tag}");
    let sep = if base.contains('?') { '&' } else { '?' };
    let d = Docket::open(&format!(
        "{base}{sep}schema={schema}&application_name={app}"
    ))
    .await
    .unwrap();
    let admin = sqlx::PgPool::connect(&base).await.unwrap();

    let runs = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    let (r, c, a, name) = (runs.clone(), cut.clone(), admin.clone(), app.clone());
    d.register(
        Job::new("cut-off", move |_ctx, _: Value| {
            let (r, c, a, name) = (r.clone(), c.clone(), a.clone(), name.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Every connection of this Docket, hot path included:
                    // storing this attempt's end meets a dead connection.
                    let n: i64 = sqlx::query_scalar(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                         WHERE application_name = $1",
                    )
                    .bind(&name)
                    .fetch_one(&a)
                    .await
                    .unwrap();
                    c.store(n as usize, Ordering::SeqCst);
                }
                Ok::<_, JobError>(json!("done"))
            }
        })
        .timeout(Duration::from_secs(1))
        .lease(Duration::from_secs(2)),
    )
    .unwrap();
    let handle = d
        .worker(WorkerConfig {
            poll_interval: Duration::from_millis(50),
            reap_interval: Duration::from_millis(100),
            ..WorkerConfig::default()
        })
        .start();
    let id = d.trigger("cut-off", json!({})).await.unwrap().run.id;
    let run = d.wait(id, Duration::from_secs(30)).await.unwrap();
    handle.shutdown(Duration::from_secs(5)).await;

    assert!(
        cut.load(Ordering::SeqCst) >= 1,
        "the test cut connections off"
    );
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.attempt, 1, "no second attempt: {run:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    let attempts = d.store().attempts(id).await.unwrap();
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["completed"]);

    drop(d);
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
}

/// A store that fails chosen calls the way a restarting database does
/// (`StoreError::Database`), then answers again; everything else goes to
/// SQLite in memory.
mod faulty {
    use async_trait::async_trait;
    use docket_store::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    pub struct Faulty {
        pub inner: DynStore,
        /// `append_event` calls of this kind to fail.
        pub fail_events: (&'static str, AtomicUsize),
        /// `finish_and_claim` calls with ends to fail.
        pub fail_ends: AtomicUsize,
        /// Calls failed so far.
        pub failed: AtomicUsize,
        /// `signal_wait` calls to fail before they reach the store.
        pub fail_waits_before: AtomicUsize,
        /// `signal_wait` calls to fail after the store committed them (the
        /// answer is lost, as when a connection drops at commit).
        pub fail_waits_after: AtomicUsize,
        /// `trigger` calls to fail after the store committed them (the
        /// answer is lost).
        pub fail_triggers_after: AtomicUsize,
        /// `breaker_get` calls to fail before they reach the store.
        pub fail_breaker_reads: AtomicUsize,
        /// `breaker_update` calls to fail before they reach the store.
        pub fail_breaker_updates: AtomicUsize,
        /// `rate_take_many` calls to fail before they reach the store.
        pub fail_rate_batches: AtomicUsize,
        /// The size of every `rate_take_many` call, in order.
        pub rate_batches: std::sync::Mutex<Vec<usize>>,
        /// `rate_take` calls (one token each).
        pub rate_takes: AtomicUsize,
        /// Hold the next `finish_and_claim` with ends until another one
        /// is in flight beside it (at most 10 s), and say so on `held`.
        pub hold_next_end_round: std::sync::atomic::AtomicBool,
        /// Rung when a round is held.
        pub held: tokio::sync::Notify,
        /// Rung when a round starts while another is in flight.
        pub overlap: tokio::sync::Notify,
        /// `finish_and_claim` calls in flight now, and at most.
        pub in_flight: AtomicUsize,
        pub max_in_flight: AtomicUsize,
        /// Of those, the ones that claim: now, and at most.
        pub claims_in_flight: AtomicUsize,
        pub max_claims_in_flight: AtomicUsize,
        /// How long a held round waits for another one at most.
        pub hold_bound_ms: std::sync::atomic::AtomicU64,
        /// Rounds the driver may have in flight (0: as the inner store says).
        pub rounds_in_flight: AtomicUsize,
        /// Every `finish_and_claim` call that answered, in order: (ends,
        /// runs asked for, runs claimed).
        pub rounds: std::sync::Mutex<Vec<(usize, usize, usize)>>,
        /// `next_due` answers "nothing due" (the driver's due-time timer
        /// never steps in).
        pub hide_due: std::sync::atomic::AtomicBool,
        /// Hold the next `finish_and_claim` with a claim AFTER the store
        /// answered it (its claim done), until `release_claim` (at most
        /// 10 s), and say so on `claim_held`.
        pub hold_after_claim: std::sync::atomic::AtomicBool,
        pub claim_held: tokio::sync::Notify,
        pub release_claim: tokio::sync::Notify,
    }

    impl Faulty {
        fn take(&self, budget: &AtomicUsize) -> Result<()> {
            let left =
                budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if left.is_ok() {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return Err(StoreError::Database("connection reset (injected)".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Store for Faulty {
        fn backend(&self) -> &'static str {
            self.inner.backend()
        }
        fn round_hints(&self) -> RoundHints {
            match self.rounds_in_flight.load(Ordering::SeqCst) {
                0 => self.inner.round_hints(),
                n => RoundHints {
                    in_flight: n,
                    hold_ends: false,
                },
            }
        }
        async fn trigger(
            &self,
            runs: Vec<NewRun>,
            now: docket_core::Timestamp,
        ) -> Result<Vec<Triggered>> {
            let out = self.inner.trigger(runs, now).await?;
            self.take(&self.fail_triggers_after)?;
            Ok(out)
        }
        async fn claim(&self, req: ClaimRequest) -> Result<Vec<Run>> {
            self.inner.claim(req).await
        }
        async fn finish(
            &self,
            ends: Vec<AttemptEnd>,
        ) -> Result<Vec<Result<docket_core::RunStatus>>> {
            self.inner.finish(ends).await
        }
        async fn finish_and_claim(
            &self,
            ends: Vec<AttemptEnd>,
            claims: Vec<ClaimRequest>,
        ) -> Result<(Vec<Result<docket_core::RunStatus>>, Vec<Run>)> {
            if !ends.is_empty() {
                self.take(&self.fail_ends)?;
            }
            let flying = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(flying, Ordering::SeqCst);
            let claiming = !claims.is_empty();
            if claiming {
                let n = self.claims_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_claims_in_flight.fetch_max(n, Ordering::SeqCst);
            }
            if flying >= 2 {
                self.overlap.notify_one();
            }
            if !ends.is_empty() && self.hold_next_end_round.swap(false, Ordering::SeqCst) {
                self.held.notify_one();
                let bound = self.hold_bound_ms.load(Ordering::SeqCst);
                let _ = tokio::time::timeout(
                    std::time::Duration::from_millis(bound),
                    self.overlap.notified(),
                )
                .await;
            }
            let (n, asked) = (ends.len(), claims.iter().map(|c| c.limit).max());
            let out = self.inner.finish_and_claim(ends, claims).await;
            if asked.is_some() && self.hold_after_claim.swap(false, Ordering::SeqCst) {
                self.claim_held.notify_one();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    self.release_claim.notified(),
                )
                .await;
            }
            if let Ok((_, runs)) = &out {
                let round = (n, asked.unwrap_or(0), runs.len());
                self.rounds.lock().unwrap().push(round);
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if claiming {
                self.claims_in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            out
        }
        async fn heartbeat(
            &self,
            leases: Vec<LeaseRef>,
            expires_at: docket_core::Timestamp,
        ) -> Result<Vec<LeaseState>> {
            self.inner.heartbeat(leases, expires_at).await
        }
        async fn expired_leases(
            &self,
            now: docket_core::Timestamp,
            limit: usize,
        ) -> Result<Vec<Run>> {
            self.inner.expired_leases(now, limit).await
        }
        async fn concurrency_usage(
            &self,
            tenant: Option<String>,
            now: docket_core::Timestamp,
            limit: usize,
        ) -> Result<Vec<docket_store::KeyUsage>> {
            self.inner.concurrency_usage(tenant, now, limit).await
        }
        async fn next_due(&self, jobs: Vec<String>) -> Result<Option<docket_core::Timestamp>> {
            if self.hide_due.load(Ordering::SeqCst) {
                return Ok(None);
            }
            self.inner.next_due(jobs).await
        }
        async fn get_run(&self, id: docket_core::RunId) -> Result<Option<Run>> {
            self.inner.get_run(id).await
        }
        async fn list_runs(&self, filter: RunFilter) -> Result<Vec<Run>> {
            self.inner.list_runs(filter).await
        }
        async fn count_runs(&self, tenant: Option<String>) -> Result<Vec<StatusCount>> {
            self.inner.count_runs(tenant).await
        }
        async fn attempts(&self, run_id: docket_core::RunId) -> Result<Vec<AttemptRecord>> {
            self.inner.attempts(run_id).await
        }
        async fn events(&self, filter: EventFilter) -> Result<Vec<EventRecord>> {
            self.inner.events(filter).await
        }
        async fn steps(&self, run_id: docket_core::RunId) -> Result<Vec<StepRecord>> {
            self.inner.steps(run_id).await
        }
        async fn save_step(
            &self,
            lease: LeaseRef,
            name: String,
            result: serde_json::Value,
            now: docket_core::Timestamp,
        ) -> Result<LeaseState> {
            self.inner.save_step(lease, name, result, now).await
        }
        async fn fail_step(
            &self,
            lease: LeaseRef,
            name: String,
            class: docket_core::ErrorClass,
            message: String,
            now: docket_core::Timestamp,
        ) -> Result<()> {
            self.inner.fail_step(lease, name, class, message, now).await
        }
        async fn ledger_get(
            &self,
            tenant: String,
            idempotency_key: String,
        ) -> Result<Option<LedgerEntry>> {
            self.inner.ledger_get(tenant, idempotency_key).await
        }
        async fn ledger_for_run(&self, run_id: docket_core::RunId) -> Result<Vec<LedgerEntry>> {
            self.inner.ledger_for_run(run_id).await
        }
        async fn ledger_write(
            &self,
            lease: LeaseRef,
            write: LedgerWrite,
            event: docket::EventKind,
            now: docket_core::Timestamp,
        ) -> Result<()> {
            self.inner.ledger_write(lease, write, event, now).await
        }
        async fn append_event(
            &self,
            lease: LeaseRef,
            kind: docket::EventKind,
            data: serde_json::Value,
            now: docket_core::Timestamp,
        ) -> Result<()> {
            if kind == self.fail_events.0 {
                self.take(&self.fail_events.1)?;
            }
            self.inner.append_event(lease, kind, data, now).await
        }
        async fn operator(&self, req: OperatorRequest) -> Result<Run> {
            self.inner.operator(req).await
        }
        async fn prune(
            &self,
            req: docket_store::retention::PruneRequest,
        ) -> Result<docket_store::retention::PruneReport> {
            self.inner.prune(req).await
        }
        async fn set_pause(&self, change: docket_store::retention::PauseChange) -> Result<bool> {
            self.inner.set_pause(change).await
        }
        async fn pauses(
            &self,
            tenant: Option<String>,
        ) -> Result<Vec<docket_store::retention::Pause>> {
            self.inner.pauses(tenant).await
        }
        async fn queue_health(
            &self,
            q: docket_store::retention::HealthQuery,
        ) -> Result<Vec<docket_store::retention::JobHealth>> {
            self.inner.queue_health(q).await
        }
        async fn delete_run(&self, req: docket_store::retention::DeleteRequest) -> Result<Run> {
            self.inner.delete_run(req).await
        }
        async fn try_lead(
            &self,
            task: String,
            holder: String,
            now: docket_core::Timestamp,
            ttl_ms: i64,
        ) -> Result<Option<docket_store::FencingToken>> {
            self.inner.try_lead(task, holder, now, ttl_ms).await
        }
        async fn resign(
            &self,
            task: String,
            token: docket_store::FencingToken,
            now: docket_core::Timestamp,
        ) -> Result<()> {
            self.inner.resign(task, token, now).await
        }
        async fn reap(
            &self,
            ends: Vec<docket_store::AttemptEnd>,
        ) -> Result<Vec<Result<Option<docket_core::RunStatus>>>> {
            self.inner.reap(ends).await
        }
        async fn ledger_begin(
            &self,
            lease: LeaseRef,
            key: String,
            action: String,
            now: docket_core::Timestamp,
        ) -> Result<docket_store::LedgerBegin> {
            self.inner.ledger_begin(lease, key, action, now).await
        }
        async fn wakeups(&self) -> Result<Option<tokio::sync::broadcast::Receiver<String>>> {
            self.inner.wakeups().await
        }
    }

    #[async_trait]
    impl TokenStore for Faulty {
        async fn create_token(&self, token: NewToken) -> Result<TokenRecord> {
            self.inner.create_token(token).await
        }
        async fn token_by_hash(&self, hash: String) -> Result<Option<TokenRecord>> {
            self.inner.token_by_hash(hash).await
        }
        async fn list_tokens(&self, tenant: Option<String>) -> Result<Vec<TokenRecord>> {
            self.inner.list_tokens(tenant).await
        }
        async fn revoke_token(
            &self,
            id: String,
            now: docket_core::Timestamp,
        ) -> Result<Option<TokenRecord>> {
            self.inner.revoke_token(id, now).await
        }
        async fn last_event_id(&self) -> Result<Option<i64>> {
            self.inner.last_event_id().await
        }
    }

    #[async_trait]
    impl docket_store::LimitStore for Faulty {
        async fn rate_take(
            &self,
            req: docket_store::RateTakeRequest,
        ) -> Result<docket_store::RateTake> {
            self.rate_takes.fetch_add(1, Ordering::SeqCst);
            self.inner.rate_take(req).await
        }
        async fn rate_take_many(
            &self,
            reqs: Vec<docket_store::RateTakeRequest>,
        ) -> Result<Vec<docket_store::RateTake>> {
            self.rate_batches
                .lock()
                .expect("rate batches")
                .push(reqs.len());
            self.take(&self.fail_rate_batches)?;
            self.inner.rate_take_many(reqs).await
        }
        async fn rate_buckets(&self, prefix: String) -> Result<Vec<docket_store::RateBucketRow>> {
            self.inner.rate_buckets(prefix).await
        }
        async fn breaker_get(&self, name: String) -> Result<Option<docket_store::BreakerRow>> {
            self.take(&self.fail_breaker_reads)?;
            self.inner.breaker_get(name).await
        }
        async fn breaker_update(
            &self,
            name: String,
            now: docket::Timestamp,
            update: docket_store::BreakerUpdate,
        ) -> Result<Option<serde_json::Value>> {
            self.take(&self.fail_breaker_updates)?;
            self.inner.breaker_update(name, now, update).await
        }
        async fn breaker_change(
            &self,
            name: String,
            now: docket::Timestamp,
            change: docket_store::BreakerChange,
        ) -> Result<docket_store::BreakerChanged> {
            self.take(&self.fail_breaker_updates)?;
            self.inner.breaker_change(name, now, change).await
        }
        async fn debounce_windows(
            &self,
            tenant: Option<String>,
            now: docket::Timestamp,
            limit: usize,
        ) -> Result<Vec<docket_store::DebounceWindow>> {
            self.inner.debounce_windows(tenant, now, limit).await
        }
        async fn debounce_counts(
            &self,
            tenant: Option<String>,
            now: docket::Timestamp,
        ) -> Result<Vec<docket_store::DebounceCount>> {
            self.inner.debounce_counts(tenant, now).await
        }
    }

    #[async_trait]
    impl docket_store::WorkerStore for Faulty {
        async fn touch_worker(&self, seen: docket_store::WorkerSeen) -> Result<()> {
            self.inner.touch_worker(seen).await
        }
        async fn list_workers(
            &self,
            tenant: Option<String>,
        ) -> Result<Vec<docket_store::WorkerRecord>> {
            self.inner.list_workers(tenant).await
        }
        async fn forget_workers(&self, seen_before: docket_core::Timestamp) -> Result<u64> {
            self.inner.forget_workers(seen_before).await
        }
    }

    #[async_trait]
    impl ConnectionStore for Faulty {
        async fn connection_state(
            &self,
            tenant: String,
            name: String,
        ) -> Result<Option<ConnectionState>> {
            self.inner.connection_state(tenant, name).await
        }
        async fn list_connection_states(
            &self,
            tenant: Option<String>,
        ) -> Result<Vec<ConnectionState>> {
            self.inner.list_connection_states(tenant).await
        }
        async fn set_connection_status(&self, change: ConnectionChange) -> Result<ConnectionState> {
            self.inner.set_connection_status(change).await
        }
        async fn connection_audit(
            &self,
            tenant: String,
            name: String,
        ) -> Result<Vec<ConnectionAudit>> {
            self.inner.connection_audit(tenant, name).await
        }
    }

    #[async_trait]
    impl docket_store::ScheduleStore for Faulty {
        async fn put_schedule(
            &self,
            put: docket_store::SchedulePut,
        ) -> Result<(docket_store::Schedule, docket_store::PutOutcome)> {
            self.inner.put_schedule(put).await
        }
        async fn get_schedule(
            &self,
            tenant: String,
            name: String,
        ) -> Result<Option<docket_store::Schedule>> {
            self.inner.get_schedule(tenant, name).await
        }
        async fn list_schedules(
            &self,
            tenant: Option<String>,
        ) -> Result<Vec<docket_store::Schedule>> {
            self.inner.list_schedules(tenant).await
        }
        async fn set_schedule_paused(
            &self,
            tenant: String,
            name: String,
            paused: bool,
            actor: String,
            comment: Option<String>,
            now: docket_core::Timestamp,
        ) -> Result<Option<docket_store::Schedule>> {
            self.inner
                .set_schedule_paused(tenant, name, paused, actor, comment, now)
                .await
        }
        async fn delete_schedule(
            &self,
            tenant: String,
            name: String,
            actor: String,
            comment: Option<String>,
            now: docket_core::Timestamp,
        ) -> Result<bool> {
            self.inner
                .delete_schedule(tenant, name, actor, comment, now)
                .await
        }
        async fn schedule_tick(
            &self,
            tick: docket_store::ScheduleTick,
        ) -> Result<docket_store::TickOutcome> {
            self.inner.schedule_tick(tick).await
        }
        async fn schedule_history(
            &self,
            tenant: String,
            name: String,
            limit: usize,
        ) -> Result<Vec<docket_store::ScheduleHistory>> {
            self.inner.schedule_history(tenant, name, limit).await
        }
    }

    #[async_trait]
    impl docket_store::ChildStore for Faulty {
        async fn spawn_children(
            &self,
            lease: docket_store::LeaseRef,
            children: Vec<docket_store::ChildSpawn>,
            now: docket_core::Timestamp,
        ) -> Result<Vec<docket_store::Spawned>> {
            self.inner.spawn_children(lease, children, now).await
        }
        async fn join_children(
            &self,
            lease: docket_store::LeaseRef,
            children: Vec<docket_core::RunId>,
            now: docket_core::Timestamp,
        ) -> Result<docket_store::JoinState> {
            self.inner.join_children(lease, children, now).await
        }
        async fn children(
            &self,
            parent: docket_core::RunId,
            after: Option<docket_core::RunId>,
            limit: usize,
        ) -> Result<Vec<docket_store::Run>> {
            self.inner.children(parent, after, limit).await
        }
        async fn family(&self, run: docket_core::RunId) -> Result<Option<docket_store::Family>> {
            self.inner.family(run).await
        }
        async fn count_joining(&self, tenant: Option<String>) -> Result<i64> {
            self.inner.count_joining(tenant).await
        }
    }

    #[async_trait]
    impl docket_store::SignalStore for Faulty {
        async fn send_signal(&self, s: docket_store::SendSignal) -> Result<docket_store::Sent> {
            self.inner.send_signal(s).await
        }
        async fn send_keyed_signal(
            &self,
            s: docket_store::SendKeyed,
        ) -> Result<Vec<docket_store::Sent>> {
            self.inner.send_keyed_signal(s).await
        }
        async fn signal_wait(
            &self,
            lease: docket_store::LeaseRef,
            w: docket_store::WaitSignal,
        ) -> Result<docket_store::WaitOutcome> {
            self.take(&self.fail_waits_before)?;
            let out = self.inner.signal_wait(lease, w).await?;
            self.take(&self.fail_waits_after)?;
            Ok(out)
        }
        async fn signals(
            &self,
            run_id: docket_core::RunId,
        ) -> Result<Vec<docket_store::SignalRecord>> {
            self.inner.signals(run_id).await
        }
        async fn signal_waits(
            &self,
            run_id: docket_core::RunId,
        ) -> Result<Vec<docket_store::SignalWaitRecord>> {
            self.inner.signal_waits(run_id).await
        }
        async fn waiting_for_signals(&self, tenant: Option<String>) -> Result<Vec<(String, i64)>> {
            self.inner.waiting_for_signals(tenant).await
        }
        async fn count_sleeping(&self, tenant: Option<String>) -> Result<i64> {
            self.inner.count_sleeping(tenant).await
        }
    }

    #[async_trait]
    impl StatsStore for Faulty {
        async fn attention_count(&self, tenant: String) -> Result<i64> {
            self.inner.attention_count(tenant).await
        }
        async fn scan_runs(&self, scan: RunScan) -> Result<ScanPage> {
            self.inner.scan_runs(scan).await
        }
        async fn window_stats(&self, query: WindowQuery) -> Result<WindowStats> {
            self.inner.window_stats(query).await
        }
    }

    pub fn over_sqlite(fail_events: (&'static str, usize), fail_ends: usize) -> Arc<Faulty> {
        over(
            Arc::new(docket_store::sqlite::SqliteStore::open_in_memory().unwrap()),
            fail_events,
            fail_ends,
        )
    }

    pub fn over(
        inner: DynStore,
        fail_events: (&'static str, usize),
        fail_ends: usize,
    ) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner,
            fail_events: (fail_events.0, AtomicUsize::new(fail_events.1)),
            fail_ends: AtomicUsize::new(fail_ends),
            failed: AtomicUsize::new(0),
            fail_waits_before: AtomicUsize::new(0),
            fail_waits_after: AtomicUsize::new(0),
            fail_triggers_after: AtomicUsize::new(0),
            fail_breaker_reads: AtomicUsize::new(0),
            fail_breaker_updates: AtomicUsize::new(0),
            fail_rate_batches: AtomicUsize::new(0),
            rate_batches: Default::default(),
            rate_takes: AtomicUsize::new(0),
            hold_next_end_round: Default::default(),
            held: Default::default(),
            overlap: Default::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            rounds_in_flight: AtomicUsize::new(0),
            hold_bound_ms: std::sync::atomic::AtomicU64::new(10_000),
            claims_in_flight: AtomicUsize::new(0),
            max_claims_in_flight: AtomicUsize::new(0),
            rounds: Default::default(),
            hide_due: Default::default(),
            hold_after_claim: Default::default(),
            claim_held: Default::default(),
            release_claim: Default::default(),
        })
    }
}

/// Evidence of a request is not lost when the store fails between the
/// request and the attempt's end (a database restart): the `http_response`
/// event the store refused is kept and written with the end, which the
/// store also refused once and took on the next round. Exactly one
/// `http_response`, with the time it was recorded, before `run_completed`.
/// (Before: the failed write was logged and the event was gone — one of
/// 4,696 during a PostgreSQL restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_evidence_survives_a_store_failure_before_the_end() {
    let store = faulty::over_sqlite(("crm_response", 1), 1);
    let t0 = docket::Timestamp(1_767_225_600_000);
    let clock = docket::ManualClock::new(t0);
    let d = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    d.register(Job::new("call", move |ctx: docket::Ctx, _: Value| {
        let clock = clock.clone();
        async move {
            // What the HTTP executor does after each request (its `evidence`,
            // there under its built-in kind `http_response`):
            // a failure to record must not fail the request's outcome.
            let _ = ctx
                .record_event(
                    "crm_response",
                    json!({ "status": 200, "purpose": "request" }),
                )
                .await;
            // The attempt ends later than the request was recorded.
            clock.advance_millis(5);
            Ok::<_, JobError>(json!("sent"))
        }
    }))
    .unwrap();
    let handle = d.worker(WorkerConfig::default()).start();
    let id = d.trigger("call", json!({})).await.unwrap().run.id;
    let run = d.wait(id, Duration::from_secs(30)).await.unwrap();
    handle.shutdown(Duration::from_secs(5)).await;

    assert_eq!(store.failed.load(Ordering::SeqCst), 2, "both faults hit");
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.attempt, 1);
    let events = d
        .store()
        .events(docket_store::EventFilter {
            run_id: Some(id),
            ..Default::default()
        })
        .await
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "run_triggered",
            "attempt_started",
            "crm_response",
            "run_completed"
        ]
    );
    let ev = &events[2];
    assert_eq!(ev.data, json!({ "status": 200, "purpose": "request" }));
    assert_eq!(ev.attempt, Some(1));
    assert_eq!(ev.at, t0, "the time of the request, not of the end");
    assert_eq!(events[3].at, t0.plus_millis(5));
}

/// A wait for a signal whose store call fails — before it reached the
/// store, or after the store committed it and the answer was lost (the
/// consume and the wait's step are one transaction, so there is no state
/// in between) — delivers the signal exactly once: the attempt fails
/// retryably, the next one consumes it (first case) or replays the stored
/// wait (second case); one `signal_delivered`, one delivered row, the
/// handler sees the payload once.
#[tokio::test]
async fn a_signal_wait_that_fails_around_its_commit_delivers_exactly_once() {
    for after in [false, true] {
        let store = faulty::over_sqlite(("none", 0), 0);
        if after {
            store.fail_waits_after.store(1, Ordering::SeqCst);
        } else {
            store.fail_waits_before.store(1, Ordering::SeqCst);
        }
        let t0 = docket::Timestamp(1_767_225_600_000);
        let clock = docket::ManualClock::new(t0);
        let d = Docket::with_store(store.clone(), Arc::new(clock.clone()));
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        d.register(
            Job::new("wait", move |ctx, _: Value| {
                let s = s.clone();
                async move {
                    let got = ctx
                        .wait_for_signal("paid", Duration::from_secs(3600))
                        .await?;
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, JobError>(got.into_signal().map(|g| g.data).unwrap_or_default())
                }
            })
            .retry(docket::RetryPolicy {
                base_delay_ms: 100,
                jitter_ms: 0,
                ..Default::default()
            }),
        )
        .unwrap();
        let id = d.trigger("wait", json!({})).await.unwrap().run.id;
        d.signal(id, "paid", json!("once"), Default::default())
            .await
            .unwrap();
        let w = d.worker(docket::WorkerConfig::default());
        w.tick().await.unwrap();
        assert_eq!(
            store.failed.load(Ordering::SeqCst),
            1,
            "the fault was injected"
        );
        let run = d.get_run(id).await.unwrap();
        assert_eq!(run.status, RunStatus::Pending, "a retry: {run:?}");
        clock.advance_millis(60_000);
        w.tick().await.unwrap();
        let run = d.get_run(id).await.unwrap();
        assert_eq!(run.status, RunStatus::Completed, "after={after}: {run:?}");
        assert_eq!(run.output, Some(json!("once")));
        assert_eq!(seen.load(Ordering::SeqCst), 1, "the handler saw it once");
        let signals = d.signals(id).await.unwrap();
        assert_eq!(signals.len(), 1);
        assert_eq!(signals[0].delivered_to.as_deref(), Some("signal:paid:1"));
        let delivered = d
            .history(id)
            .await
            .unwrap()
            .events
            .iter()
            .filter(|e| e.kind == "signal_delivered")
            .count();
        assert_eq!(delivered, 1, "after={after}");
    }
}

/// A debounced trigger whose store call committed but whose answer was lost
/// (the caller sees an error and triggers again): the retry finds the
/// window the lost call opened and is collapsed into its run, so the key
/// still has exactly one run for the window; a lost collapse's retry is
/// collapsed again (the count counts trigger requests) and the run's input
/// is the retried one. The run then runs once, with the last input.
#[tokio::test]
async fn a_debounced_trigger_whose_answer_is_lost_still_makes_one_run() {
    let store = faulty::over_sqlite(("none", 0), 0);
    let t0 = docket::Timestamp(1_767_225_600_000);
    let clock = docket::ManualClock::new(t0);
    let d = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    d.register(
        Job::new("sync", move |_ctx, input: Value| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(input);
                Ok::<_, JobError>(json!({}))
            }
        })
        .debounce(docket::Debounce::last(
            "{{ input.c }}",
            Duration::from_secs(10),
        )),
    )
    .unwrap();
    store.fail_triggers_after.store(1, Ordering::SeqCst);
    assert!(d.trigger("sync", json!({ "c": 1, "v": 1 })).await.is_err());
    assert_eq!(
        store.failed.load(Ordering::SeqCst),
        1,
        "the fault was injected"
    );
    let retry = d.trigger("sync", json!({ "c": 1, "v": 1 })).await.unwrap();
    assert!(retry.collapsed, "the lost call's window holds: {retry:?}");
    let id = retry.run.id;
    clock.advance_millis(1_000);
    store.fail_triggers_after.store(1, Ordering::SeqCst);
    assert!(d.trigger("sync", json!({ "c": 1, "v": 2 })).await.is_err());
    let again = d.trigger("sync", json!({ "c": 1, "v": 2 })).await.unwrap();
    assert!(again.collapsed);
    assert_eq!(again.run.id, id);
    let runs = d.store().list_runs(Default::default()).await.unwrap();
    assert_eq!(runs.len(), 1, "one run for the window");
    assert_eq!(runs[0].debounce.as_ref().unwrap().collapsed, 3);
    clock.advance_millis(9_000);
    let w = d.worker(WorkerConfig::default());
    assert_eq!(w.tick().await.unwrap(), 1);
    assert_eq!(seen.lock().unwrap().clone(), [json!({ "c": 1, "v": 2 })]);
    assert_eq!(d.get_run(id).await.unwrap().status, RunStatus::Completed);
}

/// A local HTTP service for the breaker test: answers from a script (a
/// status, or 200 once released), then 200; counts requests and signals
/// each arrival.
mod service {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Notify;

    #[derive(Clone, Copy)]
    pub enum Reply {
        Status(u16),
        /// 200 once [`Service::release`] is called.
        Held,
    }

    #[derive(Default)]
    pub struct State {
        script: Mutex<VecDeque<Reply>>,
        seen: Mutex<usize>,
        arrived: Notify,
        release: Notify,
    }

    pub struct Service {
        pub base: String,
        state: Arc<State>,
        accept: tokio::task::JoinHandle<()>,
    }

    impl Drop for Service {
        fn drop(&mut self) {
            self.accept.abort();
        }
    }

    impl Service {
        pub async fn start(script: Vec<Reply>) -> Service {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let state = Arc::new(State::default());
            *state.script.lock().unwrap() = script.into();
            let st = state.clone();
            let accept = tokio::spawn(async move {
                while let Ok((sock, _)) = listener.accept().await {
                    tokio::spawn(serve(sock, st.clone()));
                }
            });
            Service {
                base,
                state,
                accept,
            }
        }

        pub fn seen(&self) -> usize {
            *self.state.seen.lock().unwrap()
        }

        /// Waits (at most 10 s) until `n` requests have arrived.
        pub async fn wait_for(&self, n: usize) {
            while self.seen() < n {
                tokio::time::timeout(Duration::from_secs(10), self.state.arrived.notified())
                    .await
                    .unwrap_or_else(|_| panic!("{} requests arrived, not {n}", self.seen()));
            }
        }

        pub fn release(&self) {
            self.state.release.notify_one();
        }
    }

    async fn serve(mut sock: TcpStream, st: Arc<State>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Ok(n) = sock.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
        }
        *st.seen.lock().unwrap() += 1;
        st.arrived.notify_one();
        let reply = st.script.lock().unwrap().pop_front();
        let code = match reply {
            None => 200,
            Some(Reply::Status(c)) => c,
            Some(Reply::Held) => {
                // Answered when the test releases it; a bounded wait (the
                // request's own timeout is shorter).
                match tokio::time::timeout(Duration::from_secs(30), st.release.notified()).await {
                    Ok(()) => 200,
                    Err(_) => return,
                }
            }
        };
        let body = "{}";
        let out = format!(
            "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = sock.write_all(out.as_bytes()).await;
        let _ = sock.shutdown().await;
    }
}

/// A shared circuit breaker whose store fails while it is half-open never
/// lets a second probe out. Two "processes" (two Docket instances, each
/// with its own breaker copies) on one store; B's breaker calls fail. A's
/// failure opens the breaker and B learns it; at the reset A probes and the
/// service holds the probe's answer. Meanwhile B claims two runs: for the
/// first its breaker read and update both fail (its copy says "open, reset
/// passed", which used to send a probe of its own), for the second its
/// update fails after it read the stored half-open state. Both runs are
/// deferred without a request. The probe's success closes the breaker and
/// B's runs then send.
#[tokio::test]
async fn a_store_error_while_half_open_never_sends_a_second_probe() {
    use docket::http::{BreakerPhase, HttpJobs};
    use service::{Reply, Service};

    let svc = Service::start(vec![Reply::Status(503), Reply::Held]).await;
    let store = faulty::over_sqlite(("none", 0), 0);
    let dir = std::env::temp_dir().join(format!("docket-faults-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "[connections.crm]\nbase_url = \"{}\"\nbreaker = {{ failures = 1, window_ms = 60000, open_ms = 30000 }}\n\n\
         [jobs.sync]\nconnection = \"crm\"\npath = \"/sync\"\n\
         retry = {{ base_delay_ms = 600000, max_delay_ms = 600000, jitter_ms = 0, max_attempts = 5 }}\n",
        svc.base
    );
    let t0 = docket::Timestamp(1_767_225_600_000);
    let clock = docket::ManualClock::new(t0);
    let a = Docket::with_store(store.inner.clone(), Arc::new(clock.clone()));
    let http_a = HttpJobs::from_toml(&text, &dir).unwrap();
    http_a.install(&a).unwrap();
    let b = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    let http_b = HttpJobs::from_toml(&text, &dir).unwrap();
    http_b.install(&b).unwrap();
    let tick = |d: &Docket| {
        let w = d.worker(WorkerConfig {
            concurrency: 1,
            prefetch: 0,
            ..Default::default()
        });
        async move { w.tick().await.unwrap() }
    };

    // A's request fails: the breaker opens.
    a.trigger("sync", json!({"n": 1})).await.unwrap();
    assert_eq!(tick(&a).await, 1);
    assert_eq!(http_a.breakers()[0].state, BreakerPhase::Open);
    // B learns it at its next run (deferred to the reset, no request).
    b.trigger("sync", json!({"n": 2})).await.unwrap();
    assert_eq!(tick(&b).await, 1);
    assert_eq!(svc.seen(), 1);
    assert_eq!(http_b.breakers()[0].state, BreakerPhase::Open);

    // At the reset A claims the deferred run and probes; the answer waits.
    let reset = t0.plus_millis(30_000);
    clock.set(reset);
    let probe = tokio::spawn(tick(&a));
    svc.wait_for(2).await;

    // B's breaker read and update fail: its copy (open, reset passed)
    // would probe; it defers instead.
    store.fail_breaker_reads.store(1, Ordering::SeqCst);
    store.fail_breaker_updates.store(1, Ordering::SeqCst);
    let r3 = b.trigger("sync", json!({"n": 3})).await.unwrap().run.id;
    assert_eq!(tick(&b).await, 1);
    assert_eq!(store.failed.load(Ordering::SeqCst), 2, "both faults hit");
    assert_eq!(svc.seen(), 2, "no second probe");
    // B reads the stored half-open state, its update fails: it defers.
    store.fail_breaker_updates.store(1, Ordering::SeqCst);
    let r4 = b.trigger("sync", json!({"n": 4})).await.unwrap().run.id;
    assert_eq!(tick(&b).await, 1);
    assert_eq!(
        store.failed.load(Ordering::SeqCst),
        3,
        "the third fault hit"
    );
    assert_eq!(svc.seen(), 2, "no second probe");
    let mut due = reset;
    for id in [r3, r4] {
        let run = b.get_run(id).await.unwrap();
        assert_eq!(run.status, RunStatus::Pending, "{run:?}");
        assert!(run.run_after > reset, "deferred past the reset: {run:?}");
        let h = b.history(id).await.unwrap();
        assert_eq!(h.attempts.len(), 1);
        assert_eq!(
            h.attempts[0].retry_reason,
            Some(docket::RetryReason::CircuitOpen)
        );
        due = due.max(run.run_after);
    }

    // The probe succeeds: closed for both; B's runs send.
    svc.release();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), probe)
            .await
            .expect("the probe ends once answered")
            .unwrap(),
        1
    );
    assert_eq!(http_a.breakers()[0].state, BreakerPhase::Closed);
    clock.set(due);
    assert_eq!(tick(&b).await, 1);
    assert_eq!(tick(&b).await, 1);
    assert_eq!(svc.seen(), 4);
    for id in [r3, r4] {
        assert_eq!(b.get_run(id).await.unwrap().status, RunStatus::Completed);
    }
    assert_eq!(http_b.breakers()[0].state, BreakerPhase::Closed);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A job's rate-limit tokens are taken for all the runs of a claim in ONE
/// store call (not one transaction per run). When that call fails, no
/// handler runs: each run's attempt is a retryable `unavailable` failure
/// (nothing was sent), and at its retry the next claim takes the tokens
/// again, in one call, and the handlers run.
#[tokio::test]
async fn a_claims_rate_tokens_are_one_store_call_and_its_failure_runs_nothing() {
    let store = faulty::over_sqlite(("none", 0), 0);
    let t0 = docket::Timestamp(1_767_225_600_000);
    let clock = docket::ManualClock::new(t0);
    let d = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    d.register(
        Job::new("limited", move |_ctx, _: Value| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, JobError>(json!({}))
            }
        })
        .rate_limit(1_000.0, 1_000),
    )
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            d.trigger("limited", json!({ "i": i }))
                .await
                .unwrap()
                .run
                .id,
        );
    }
    let w = d.worker(WorkerConfig {
        concurrency: 8,
        ..Default::default()
    });
    store.fail_rate_batches.store(1, Ordering::SeqCst);
    assert_eq!(w.tick().await.unwrap(), 6);
    assert_eq!(ran.load(Ordering::SeqCst), 0, "no token, no handler");
    let mut due = t0;
    for id in &ids {
        let run = d.get_run(*id).await.unwrap();
        assert_eq!(run.status, RunStatus::Pending, "{run:?}");
        let attempts = d.store().attempts(*id).await.unwrap();
        assert_eq!(attempts.len(), 1);
        assert_eq!(
            attempts[0].error_class,
            Some(docket::ErrorClass::Unavailable)
        );
        assert!(
            attempts[0]
                .error_message
                .as_deref()
                .is_some_and(|m| m.contains("rate limit limited: the bucket could not be read")),
            "{attempts:?}"
        );
        due = due.max(run.run_after);
    }
    clock.set(due);
    assert_eq!(w.tick().await.unwrap(), 6);
    assert_eq!(ran.load(Ordering::SeqCst), 6);
    for id in &ids {
        assert_eq!(d.get_run(*id).await.unwrap().status, RunStatus::Completed);
    }
    assert_eq!(*store.rate_batches.lock().unwrap(), vec![6, 6]);
    assert_eq!(
        store.rate_takes.load(Ordering::SeqCst),
        0,
        "no take per run"
    );
}

/// With a store that takes two rounds in flight (`RoundHints`, as
/// PostgreSQL does: one per hot connection), the driver sends a second
/// round while one waits for the store (on PostgreSQL: for its commit's
/// flush): a round storing ends is held in the store until another round
/// starts beside it, which the handlers that end meanwhile bring. One round
/// at a time, the held round would wait out its 10 s bound alone and the
/// test fails. Every run still completes once, on its first attempt: two
/// rounds never carry one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_round_goes_out_while_one_waits_for_the_store() {
    let store = faulty::over_sqlite(("none", 0), 0);
    store.rounds_in_flight.store(2, Ordering::SeqCst);
    let store = two_rounds_in_flight(store, Limits::None).await;
    assert_eq!(store.max_in_flight.load(Ordering::SeqCst), 2);
    assert_eq!(store.max_claims_in_flight.load(Ordering::SeqCst), 2);
}

/// The same on PostgreSQL with its own hints (two rounds, held ends): the
/// two rounds run on the store's two hot connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_round_goes_out_while_one_waits_for_postgres() {
    let Some(inner) = fresh_pg("rounds").await else {
        return;
    };
    let store = two_rounds_in_flight(faulty::over(inner, ("none", 0), 0), Limits::None).await;
    assert_eq!(store.max_in_flight.load(Ordering::SeqCst), 2);
    assert_eq!(store.max_claims_in_flight.load(Ordering::SeqCst), 2);
}

/// A deep backlog drained on PostgreSQL with two rounds in flight (claims
/// racing on one store, `SKIP LOCKED` between its two hot connections):
/// every run runs once, on its first attempt, with one attempt row and no
/// refused write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drained_with_two_rounds_in_flight_runs_each_run_once_postgres() {
    let Some(store) = fresh_pg("drain").await else {
        return;
    };
    assert_eq!(store.round_hints().in_flight, 2);
    let d = Docket::with_store(store.clone(), Arc::new(docket::SystemClock));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let s = seen.clone();
    d.register(Job::new("drain", move |ctx, _: Value| {
        let s = s.clone();
        async move {
            *s.lock().unwrap().entry(ctx.run_id()).or_insert(0usize) += 1;
            Ok::<_, JobError>(json!({}))
        }
    }))
    .unwrap();
    let runs = (0..400)
        .map(|i| ("drain".to_string(), json!({ "i": i }), Default::default()))
        .collect();
    let ids: Vec<_> = d
        .trigger_batch(runs)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.run.id)
        .collect();
    let handle = d.worker(WorkerConfig::default()).start();
    for id in &ids {
        let run = d.wait(*id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(
            (run.status, run.attempt),
            (RunStatus::Completed, 1),
            "{run:?}"
        );
    }
    handle.shutdown(Duration::from_secs(5)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), ids.len());
    assert!(seen.values().all(|n| *n == 1), "a handler ran twice");
    for id in ids.iter().step_by(37) {
        assert_eq!(d.store().attempts(*id).await.unwrap().len(), 1);
    }
    let refused: Vec<_> = d
        .store()
        .events(docket::EventFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == docket::EventKind::StaleWriteRefused)
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
}

/// A fresh PostgreSQL store in a schema of its own (`None`, saying so,
/// without `DOCKET_TEST_POSTGRES_URL` outside CI).
async fn fresh_pg(tag: &str) -> Option<docket_store::DynStore> {
    let Ok(base) = std::env::var("DOCKET_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: DOCKET_TEST_POSTGRES_URL must be set"
        );
        println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
        return None;
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}schema={tag}_{}", uuid::Uuid::new_v4().simple());
    Some(docket_store::open(&url).await.unwrap())
}

/// With job rate limits, one round at a time even where the store takes
/// two: the tokens of each claim are a call of the driver's loop, during
/// which a second round in flight would not be polled. The held round
/// waits 300 ms for a second one that must not come, then goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_job_rate_limits_one_round_at_a_time() {
    let store = faulty::over_sqlite(("none", 0), 0);
    store.rounds_in_flight.store(2, Ordering::SeqCst);
    let store = two_rounds_in_flight(store, Limits::Rate).await;
    assert_eq!(store.max_in_flight.load(Ordering::SeqCst), 1);
}

/// With a concurrency key, PostgreSQL's two rounds in flight all the same:
/// the second round's keyed claim waits for the first one's commit in this
/// process (`KeyedTurn`) instead of finding the key locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_concurrency_keys_two_rounds_in_flight_postgres() {
    let Some(inner) = fresh_pg("keyed_rounds").await else {
        return;
    };
    let store = two_rounds_in_flight(faulty::over(inner, ("none", 0), 0), Limits::Key).await;
    assert_eq!(store.max_in_flight.load(Ordering::SeqCst), 2);
}

/// A binding job-wide key of 3 shared by two workers of one process on
/// PostgreSQL (4 handler slots each, claims from both loops taking turns in
/// the store, `KeyedTurn`, and up to two rounds in flight each while the key
/// does not bind): never more than 3 handlers run at once, and every run
/// runs once, on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_key_shared_by_two_workers_is_never_exceeded_postgres() {
    let Some(inner) = fresh_pg("keyed_drain").await else {
        return;
    };
    let store = faulty::over(inner, ("none", 0), 0);
    let d = Docket::with_store(store.clone(), Arc::new(docket::SystemClock));
    let max = Arc::new(AtomicUsize::new(0));
    // Handlers running now; each waits (bounded, 100 ms) for a 4th to run
    // beside it, which the limit must never let happen: runs claimed beyond
    // it would be seen running together.
    let running = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let (r, m) = (running.clone(), max.clone());
    let job = Job::new("three", move |_ctx, _input: Value| {
        let (r, m) = (r.clone(), m.clone());
        async move {
            let mut seen = r.subscribe();
            r.send_modify(|n| *n += 1);
            m.fetch_max(*r.borrow(), Ordering::SeqCst);
            let _ =
                tokio::time::timeout(Duration::from_millis(100), seen.wait_for(|n| *n > 3)).await;
            r.send_modify(|n| *n -= 1);
            Ok::<_, JobError>(json!({}))
        }
    });
    d.register(job.concurrency_limit(3)).unwrap();
    let runs: Vec<_> = (0..30)
        .map(|i| ("three".to_string(), json!({ "i": i }), Default::default()))
        .collect();
    let ids: Vec<_> = d
        .trigger_batch(runs)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.run.id)
        .collect();
    let config = || WorkerConfig {
        concurrency: 4,
        ..WorkerConfig::default()
    };
    let (a, b) = (d.worker(config()).start(), d.worker(config()).start());
    for id in &ids {
        let run = d.wait(*id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        assert_eq!(run.attempt, 1, "{run:?}");
    }
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
    let most = max.load(Ordering::SeqCst);
    assert_eq!(most, 3, "{most} handlers ran at once");
}

/// A trigger whose wake-up arrives while a round is in flight, after that
/// round's claim has read the store, is claimed when the round lands, even
/// though the round's claim came back short: the wake-up is not lost to the
/// claim's answer. The due-time timer is out of the way (`next_due` says
/// nothing is due, the poll is an hour), so only the wake-up can claim it.
/// Whether the driver takes the wake-up before or after the round lands is
/// up to its `select!` (both are ready once the round is released), so the
/// scenario runs 20 times: a lost wake-up loses about every other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_during_a_round_is_not_lost_when_its_claim_comes_back_short() {
    for _ in 0..20 {
        let store = faulty::over_sqlite(("none", 0), 0);
        store.hide_due.store(true, Ordering::SeqCst);
        store.hold_after_claim.store(true, Ordering::SeqCst);
        let d = Docket::with_store(store.clone(), Arc::new(docket::SystemClock));
        d.register(Job::new("late", |_ctx, _input: Value| async move {
            Ok::<_, JobError>(json!({}))
        }))
        .unwrap();
        let handle = d
            .worker(WorkerConfig {
                concurrency: 1,
                prefetch: 0,
                poll_interval: Duration::from_secs(3600),
                ..WorkerConfig::default()
            })
            .start();
        // The worker's first claim found nothing and is held before it
        // lands; the trigger's wake-up reaches the worker meanwhile.
        tokio::time::timeout(Duration::from_secs(10), store.claim_held.notified())
            .await
            .expect("the first claim reached the store");
        let run = d.trigger("late", json!({})).await.unwrap().run.id;
        store.release_claim.notify_one();
        let done = d.wait(run, Duration::from_secs(10)).await.unwrap();
        assert_eq!(done.status, RunStatus::Completed, "{done:?}");
        handle.shutdown(Duration::from_secs(5)).await;
    }
}

/// A binding concurrency key turns over in the round of the end that frees
/// its slot: with a key of 1 and one handler slot, every round that stores
/// an end also claims, and while runs wait it gets the next one. (The
/// driver used to store such an end alone, its claim having come back
/// short, then claim in a round of its own: two rounds per run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_key_turns_over_in_the_round_of_the_end() {
    let store = faulty::over_sqlite(("none", 0), 0);
    turns_over_with_its_end(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_key_turns_over_in_the_round_of_the_end_postgres() {
    let Some(inner) = fresh_pg("key_turnover").await else {
        return;
    };
    turns_over_with_its_end(faulty::over(inner, ("none", 0), 0)).await;
}

async fn turns_over_with_its_end(store: Arc<faulty::Faulty>) {
    const RUNS: usize = 20;
    let d = Docket::with_store(store.clone(), Arc::new(docket::SystemClock));
    let job = Job::new("one_at_a_time", |_ctx, _input: Value| async move {
        Ok::<_, JobError>(json!({}))
    });
    d.register(job.concurrency_limit(1)).unwrap();
    let mut ids = Vec::new();
    for i in 0..RUNS {
        ids.push(
            d.trigger("one_at_a_time", json!({ "i": i }))
                .await
                .unwrap()
                .run
                .id,
        );
    }
    let handle = d
        .worker(WorkerConfig {
            concurrency: 1,
            ..WorkerConfig::default()
        })
        .start();
    for id in &ids {
        let run = d.wait(*id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        assert_eq!(run.attempt, 1, "{run:?}");
    }
    handle.shutdown(Duration::from_secs(5)).await;
    let rounds = store.rounds.lock().unwrap().clone();
    let with_ends: Vec<_> = rounds.iter().filter(|r| r.0 > 0).collect();
    assert_eq!(
        with_ends.iter().map(|r| r.0).sum::<usize>(),
        RUNS,
        "every end stored once: {rounds:?}"
    );
    // One end per round (one slot); all but the last claim the next run.
    // Claim-only rounds in between (the driver's due-time recheck) find the
    // key full and change nothing here.
    assert_eq!(with_ends.len(), RUNS, "{rounds:?}");
    for (i, r) in with_ends.iter().enumerate() {
        assert!(
            r.1 > 0,
            "round {i} stored an end without a claim: {rounds:?}"
        );
        let expect = usize::from(i + 1 < RUNS);
        assert_eq!(r.2, expect, "round {i} claimed {} runs: {rounds:?}", r.2);
    }
}

/// The flow control of `two_rounds_in_flight`'s job.
#[derive(Clone, Copy, PartialEq)]
enum Limits {
    None,
    /// A job-wide concurrency limit that never binds: keyed claims.
    Key,
    /// A job rate limit that never binds: a token per run.
    Rate,
}

async fn two_rounds_in_flight(store: Arc<faulty::Faulty>, limits: Limits) -> Arc<faulty::Faulty> {
    if limits == Limits::Rate {
        store.hold_bound_ms.store(300, Ordering::SeqCst);
    }
    let d = Docket::with_store(store.clone(), Arc::new(docket::SystemClock));
    let ran = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let (r, gate) = (ran.clone(), release.clone());
    let job = Job::new("mixed", move |_ctx, input: Value| {
        let (r, gate) = (r.clone(), gate.clone());
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            if input["slow"] == json!(true) {
                // Ends only once the test lets it, while a round is held.
                let _ = gate.acquire().await.unwrap();
            }
            Ok::<_, JobError>(json!({}))
        }
    });
    d.register(match limits {
        Limits::None => job,
        Limits::Key => job.concurrency_limit(100),
        Limits::Rate => job.rate_limit(1_000_000.0, 1_000_000),
    })
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..8 {
        let slow = i < 2;
        let opts = docket::TriggerOptions {
            // The slow ones are claimed in the first round.
            priority: if slow { 10 } else { 0 },
            ..Default::default()
        };
        ids.push(
            d.trigger_with("mixed", json!({ "slow": slow }), opts)
                .await
                .unwrap()
                .run
                .id,
        );
    }
    store.hold_next_end_round.store(true, Ordering::SeqCst);
    let handle = d
        .worker(WorkerConfig {
            concurrency: 4,
            prefetch: 0,
            ..WorkerConfig::default()
        })
        .start();
    // The first fast ends' round is held in the store...
    tokio::time::timeout(Duration::from_secs(10), store.held.notified())
        .await
        .expect("a round with ends reached the store");
    // ...and the slow handlers end now: their ends go out beside it.
    release.add_permits(2);
    for id in &ids {
        let run = d.wait(*id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(run.status, RunStatus::Completed, "{run:?}");
        assert_eq!(run.attempt, 1, "{run:?}");
    }
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(ran.load(Ordering::SeqCst), 8, "each handler ran once");
    store
}
