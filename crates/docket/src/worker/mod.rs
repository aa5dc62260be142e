//! The worker: claims due runs in batches, runs handlers with bounded
//! concurrency and a timeout, keeps leases alive with heartbeats, reaps
//! expired leases through the retry policy, and shuts down gracefully.

use crate::ctx::KeptEvent;
use crate::error::Control;
use crate::telemetry::AttemptTrace;
use crate::{Ctx, Docket, Job, JobError};
use docket_core::{Decision, FailureInput, Fingerprint, LeaseId, RunId};
use docket_store::{
    AttemptEnd, ClaimRequest, DynStore, ErrorInfo, LeaseRef, Outcome, RetryRecord, RoundHints, Run,
    StoreError,
};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

mod driver;
use driver::{
    claim_size, ends_reopen_claim, hold_ends, keyed_claim_floor, DueTracker, HeldEnds, Prefetch,
};

/// Longest error message stored on an attempt.
const MAX_MESSAGE: usize = 4096;
/// How a worker behaves.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Stored on every attempt it runs.
    pub name: String,
    /// Handlers running at once, at most.
    pub concurrency: usize,
    /// Runs claimed ahead of free handler slots (default 8, the default
    /// concurrency; set it to `concurrency` when you change that). Larger claims mean fewer, bigger transactions; the
    /// price is that a prefetched run waits here, heartbeated, instead of
    /// being free for another worker. At shutdown, prefetched runs that never
    /// started are released at once. 0 disables prefetching.
    pub prefetch: usize,
    /// Fallback poll when no wake-up arrives (other processes' triggers,
    /// runs becoming due).
    pub poll_interval: Duration,
    /// How often this worker looks for expired leases and reaps them. Every
    /// worker reaps (no leader; reaps are fenced), each round after this
    /// interval scaled by a random factor in [0.75, 1.25) so that workers
    /// do not all query at once. An expired lease is reaped within about
    /// 1.25 × this interval of its expiry while any worker runs.
    pub reap_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            name: format!(
                "worker-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            concurrency: 8,
            prefetch: 8,
            poll_interval: Duration::from_secs(1),
            reap_interval: Duration::from_secs(1),
        }
    }
}

struct InFlight {
    lease: LeaseRef,
    lease_len: Duration,
    cancelled: Arc<AtomicBool>,
    task: Option<tokio::task::AbortHandle>,
}

struct Shared {
    docket: Docket,
    config: WorkerConfig,
    wake: Arc<Notify>,
    slot_freed: Notify,
    /// Handler slots: a claimed run waits for a permit before it executes.
    slots: Arc<tokio::sync::Semaphore>,
    stopping: AtomicBool,
    /// Attempt ends handed over and not yet stored.
    finishing: AtomicUsize,
    /// Prefetched runs that their own task handed back, unstarted, because
    /// the worker was stopping (stored releases only); shutdown reports
    /// them with the runs it releases itself.
    released: AtomicUsize,
    inflight: Mutex<HashMap<RunId, InFlight>>,
    /// Ends go to the driver loop, which stores them together with the
    /// claim that refills their slots. `None` in tick mode (tests), where
    /// each task stores its own end.
    ends: Option<mpsc::UnboundedSender<EndMsg>>,
    ends_rx: Mutex<Option<mpsc::UnboundedReceiver<EndMsg>>>,
}

/// An attempt's end, the events its handler recorded while the store was
/// failing (written before the end), and where to answer.
type EndMsg = (
    AttemptEnd,
    Vec<KeptEvent>,
    oneshot::Sender<Result<(), StoreError>>,
);

/// The driver loop's phases.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Running,
    /// No more claims; store the ends of attempts still running.
    Draining,
    /// Store what is pending, then exit.
    Exit,
}

/// A worker for one [`Docket`]. Use [`Worker::start`] to run it in the
/// background, or [`Worker::tick`] to drive it step by step in tests.
pub struct Worker {
    shared: Arc<Shared>,
}

/// A running worker.
pub struct WorkerHandle {
    stop: watch::Sender<Phase>,
    main: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Worker {
    pub(crate) fn new(docket: Docket, mut config: WorkerConfig) -> Worker {
        config.concurrency = config.concurrency.max(1);
        let wake = Arc::new(Notify::new());
        docket
            .inner
            .wakers
            .lock()
            .expect("wakers lock")
            .push(wake.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let slots = Arc::new(tokio::sync::Semaphore::new(config.concurrency));
        Worker {
            shared: Arc::new(Shared {
                docket,
                config,
                wake,
                slot_freed: Notify::new(),
                slots,
                stopping: AtomicBool::new(false),
                finishing: AtomicUsize::new(0),
                released: AtomicUsize::new(0),
                inflight: Mutex::new(HashMap::new()),
                ends: Some(tx),
                ends_rx: Mutex::new(Some(rx)),
            }),
        }
    }

    /// Reaps expired leases, claims up to `concurrency` due runs, runs them
    /// all to the end and records their outcomes. Returns how many ran.
    pub async fn tick(&self) -> crate::Result<usize> {
        self.shared.docket.reap_expired().await?;
        let runs = self.shared.claim(self.shared.config.concurrency).await?;
        // A tick runs what it claimed now, whatever the slot count.
        let n = runs.len();
        let mut rates = self.shared.docket.take_job_rates(&runs).await;
        let tasks: Vec<_> = runs
            .into_iter()
            .map(|r| {
                let rate = rates.remove(&r.id);
                self.shared.clone().spawn_run(r, rate, false)
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        Ok(n)
    }

    /// Starts the worker's loops in the background.
    pub fn start(self) -> WorkerHandle {
        let (stop, stop_rx) = watch::channel(Phase::Running);
        let shared = self.shared.clone();
        let ends_rx = shared
            .ends_rx
            .lock()
            .expect("ends")
            .take()
            .expect("a worker starts once");
        let main = tokio::spawn(main_loop(shared.clone(), stop_rx, ends_rx));
        WorkerHandle { stop, main, shared }
    }
}

impl WorkerHandle {
    /// Graceful shutdown: stop claiming, let running attempts finish within
    /// `grace`, then release the rest (due at once, no attempt budget spent)
    /// so another worker takes them without waiting for lease expiry.
    ///
    /// Returns how many runs were released: those still running when the
    /// grace period ended, and the prefetched runs that had not started —
    /// whether handed back at the end of the grace period or as soon as a
    /// handler slot freed up during it.
    pub async fn shutdown(self, grace: Duration) -> usize {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.send(Phase::Draining);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.shared.slot_freed.notified();
            let idle = self.shared.inflight.lock().expect("inflight").is_empty();
            if idle && self.shared.finishing.load(Ordering::SeqCst) == 0 {
                let _ = self.stop.send(Phase::Exit);
                let _ = self.main.await;
                return self.shared.released.load(Ordering::SeqCst);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let left: Vec<(RunId, InFlight)> = self
            .shared
            .inflight
            .lock()
            .expect("inflight")
            .drain()
            .collect();
        let now = self.shared.docket.clock().now();
        let mut ends = Vec::new();
        for (_, f) in &left {
            if let Some(t) = &f.task {
                t.abort();
            }
            ends.push(AttemptEnd {
                run_id: f.lease.run_id,
                lease_id: f.lease.lease_id,
                now,
                outcome: Outcome::Released,
            });
        }
        let mut n = 0;
        match self.shared.docket.store().finish(ends).await {
            Ok(res) => {
                for (r, (id, _)) in res.iter().zip(&left) {
                    match r {
                        Ok(_) => n += 1,
                        Err(e) => {
                            tracing::warn!(run = %id, error = %e, "release at shutdown refused")
                        }
                    }
                    let _ = self.shared.docket.inner.changes.send(*id);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "could not release runs at shutdown; they return after lease expiry")
            }
        }
        let _ = self.stop.send(Phase::Exit);
        let _ = self.main.await;
        n + self.shared.released.load(Ordering::SeqCst)
    }

    /// Waits for a signal (SIGTERM or ctrl-c), then shuts down with `grace`.
    pub async fn shutdown_on_signal(self, grace: Duration) -> usize {
        wait_for_signal().await;
        // Logged after, not before: a subscriber that panics on a failed
        // write (stderr a closed pipe) must not cancel the shutdown.
        let released = self.shutdown(grace).await;
        tracing::info!(
            released,
            "stopped on a signal: running attempts finished or released"
        );
        released
    }
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The driver: the only place the running worker talks to the store on its
/// hot path. Each round stores every attempt end waiting and, when worth it,
/// claims runs for the free slots — in one round trip (one commit on SQLite).
async fn main_loop(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Phase>,
    mut ends_rx: mpsc::UnboundedReceiver<EndMsg>,
) {
    let hb = tokio::spawn(heartbeat_loop(shared.clone(), stop.clone()));
    let reaper = tokio::spawn(reap_loop(shared.clone(), stop.clone()));
    // Other processes' triggers (PostgreSQL LISTEN/NOTIFY, SQLite's
    // data_version watch). Polling stays as the fallback for a lost
    // notification or a dropped listener.
    let mut remote = match shared.docket.store().wakeups().await {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!(error = %e, "no wake-up channel; relying on polling");
            None
        }
    };
    let concurrency = shared.config.concurrency;
    let mut prefetch = Prefetch::new(shared.config.prefetch);
    let mut want_claim = true;
    let mut held: HeldEnds<EndMsg> = HeldEnds::default();
    let mut due = DueTracker::new();
    let mut flying: FuturesUnordered<futures::future::BoxFuture<'static, Landed>> =
        FuturesUnordered::new();
    // Runs asked for by the rounds in flight: in hand as far as the next
    // claim's size is concerned.
    let mut claiming = 0usize;
    // After a failed round, no new one before this.
    let mut paused_until: Option<tokio::time::Instant> = None;
    // With concurrency keys, no held ends (a keyed round's claim is sized
    // by its ends, see `keyed_claim_floor`); the store's rounds in flight
    // (PostgreSQL: two, its keyed claims take turns, `hot::KeyedTurn`).
    // With job rate limits, one round at a time: the tokens of each claim
    // are a store call of this loop, during which the other round in
    // flight is not polled (measured 0.86x).
    let hints = if shared.docket.has_job_rate_limits() {
        RoundHints::default()
    } else if shared.docket.has_concurrency_limits() {
        RoundHints {
            hold_ends: false,
            ..shared.docket.store().round_hints()
        }
    } else {
        shared.docket.store().round_hints()
    };
    let keyed = shared.docket.has_concurrency_limits();
    // The last claim came back short: with keys, a key that binds.
    let mut short = false;
    // Wake-ups taken while no round could be sent (every round slot taken):
    // a round remembers the count it was sent with, so that one taken while
    // it was in flight is not lost when its claim comes back short. (With a
    // slot free, the wake-up's own claim goes out at once.)
    let mut wakes = 0u64;
    loop {
        // A binding key turns over one slot per end: a second round in
        // flight only splits the ends into more, smaller rounds (measured
        // on PostgreSQL with a key of 8: 2.3x the commits per run, same
        // throughput); with keys that do not bind it pays (a key of 64:
        // 1.2-1.5x).
        let max_flying = if keyed && short {
            1
        } else {
            hints.in_flight.max(1)
        };
        while held.has_room() {
            match ends_rx.try_recv() {
                Ok(m) => held.push(m, tokio::time::Instant::now()),
                Err(_) => break,
            }
        }
        let phase = *stop.borrow();
        let at = tokio::time::Instant::now();
        paused_until = paused_until.filter(|t| *t > at);
        let can_send = flying.len() < max_flying && paused_until.is_none();
        if !want_claim
            && ends_reopen_claim(
                keyed,
                held.pending().iter().map(|m| &m.0),
                shared.docket.clock().now(),
            )
        {
            want_claim = true;
        }
        let held_runs = shared.inflight.lock().expect("inflight").len();
        let in_hand = held_runs + claiming;
        let capacity = prefetch.capacity(concurrency);
        let claims_ok = phase == Phase::Running && can_send;
        let free = claim_size(claims_ok, want_claim, in_hand, concurrency, capacity).or(
            keyed_claim_floor(
                keyed && short && claims_ok && want_claim,
                held.len(),
                held_runs,
                concurrency,
                capacity,
            ),
        );
        let claims = free.map_or_else(Vec::new, |n| shared.claim_requests(n));
        // Ends wait briefly for the claim the running handlers are about
        // to make worth it, to share its commit (see `hold_ends`).
        let claim_coming = hints.hold_ends
            && phase == Phase::Running
            && want_claim
            && free.is_none()
            && in_hand > 0;
        let hold = hold_ends(claim_coming, held.since(), at);
        // No claim when every job is held back (an open circuit breaker):
        // no round trip for nothing.
        if can_send && ((!held.is_empty() && hold.is_none()) || !claims.is_empty()) {
            let had_ends = !held.is_empty();
            if had_ends {
                due.mark_stale();
            }
            claiming += free.unwrap_or(0);
            let (sh, batch) = (shared.clone(), held.take());
            // Polled by this loop, not a task of its own: a task's wake-up
            // is one more hop through the scheduler behind the handlers just
            // spawned (measured: rounds 1.4x slower on SQLite).
            flying.push(
                async move {
                    Landed {
                        result: round(&sh, batch, claims).await,
                        wakes,
                        asked: free,
                        in_hand,
                        had_ends,
                    }
                }
                .boxed(),
            );
            continue;
        }
        if phase == Phase::Exit && flying.is_empty() && held.is_empty() {
            break;
        }
        let idle_wait = if phase != Phase::Running || in_hand >= capacity {
            Duration::from_secs(3600)
        } else {
            let poll = shared.config.poll_interval;
            let now = shared.docket.clock().now();
            // Not while a round is in flight: it lands soon and this loop
            // looks again; a read now would hold up the round, which this
            // loop polls (measured: PostgreSQL keyed W1 0.59x with it).
            if flying.is_empty() && due.should_read(now, tokio::time::Instant::now(), in_hand, poll)
            {
                let read = shared
                    .docket
                    .store()
                    .next_due(shared.docket.job_names())
                    .await
                    .ok();
                due.read(read, tokio::time::Instant::now());
            }
            let now = shared.docket.clock().now();
            due.idle_wait(now, tokio::time::Instant::now(), in_hand, poll)
        };
        let idle_wait = hold.map_or(idle_wait, |h| idle_wait.min(h));
        let idle_wait = paused_until.map_or(idle_wait, |t| idle_wait.min(t - at));
        let running = phase == Phase::Running;
        tokio::select! {
            Some(landed) = flying.next(), if !flying.is_empty() => {
                claiming -= landed.asked.unwrap_or(0);
                match landed.result {
                    Ok(runs) => {
                        held.stored();
                        if let Some(asked) = landed.asked {
                            // A wake-up taken while the round was in
                            // flight may be for a run its claim did not
                            // see yet: claim again.
                            want_claim = runs.len() == asked || wakes != landed.wakes;
                            short = runs.len() < asked;
                            prefetch.claimed(asked, runs.len(), landed.in_hand, concurrency);
                            let mut rates = shared.docket.take_job_rates(&runs).await;
                            for r in runs {
                                let rate = rates.remove(&r.id);
                                shared.clone().spawn_run(r, rate, true);
                            }
                        }
                        // Ends stored without a claim: what they freed
                        // (key slots, runs due again) is for the next
                        // claim. A claim that went with them saw it.
                        want_claim |= landed.had_ends && landed.asked.is_none();
                    }
                    Err((e, batch)) => {
                        let (given_up, wait) = held.failed(
                            batch,
                            e.is_transient(),
                            *stop.borrow() == Phase::Exit,
                            tokio::time::Instant::now(),
                        );
                        report_failed_round(&e, given_up, wait, held.len());
                        paused_until = Some(tokio::time::Instant::now() + wait);
                        want_claim = true;
                    }
                }
            }
            // With every round slot taken, ends wait in the channel: waking
            // this loop for each one only to find no slot slowed the rounds
            // in flight (measured: a one-end round 0.16 -> 0.6 ms on SQLite).
            m = ends_rx.recv(), if flying.len() < max_flying => {
                if let Some(m) = m { held.push(m, tokio::time::Instant::now()) }
            }
            _ = shared.wake.notified(), if running => {
                want_claim = true;
                wakes += u64::from(!can_send);
            }
            _ = remote_wakeup(&mut remote), if running => {
                want_claim = true;
                wakes += u64::from(!can_send);
            }
            _ = tokio::time::sleep(idle_wait) => want_claim = true,
            _ = stop.changed() => {}
        }
    }
    hb.abort();
    reaper.abort();
}

/// A round that came back, with what the driver asked of it.
struct Landed {
    result: Result<Vec<Run>, (StoreError, Vec<EndMsg>)>,
    /// The driver's wake-up count when it was sent.
    wakes: u64,
    /// How many runs it was to claim (`None`: no claim).
    asked: Option<usize>,
    /// Runs in hand or being claimed when it was sent.
    in_hand: usize,
    /// Whether it stored attempt ends.
    had_ends: bool,
}

/// One round trip: the kept evidence of `batch`'s attempts, then their ends
/// and the claims. Each end's waiter gets its answer. On a store error the
/// batch comes back whole (its events not yet written still in it), so that
/// it can be stored again: an end the store did not take would otherwise
/// cost its run a lease expiry and an extra attempt.
async fn round(
    shared: &Arc<Shared>,
    mut batch: Vec<EndMsg>,
    claims: Vec<ClaimRequest>,
) -> Result<Vec<Run>, (StoreError, Vec<EndMsg>)> {
    let ends: Vec<AttemptEnd> = batch.iter().map(|m| m.0.clone()).collect();
    // Evidence first, then the ends: a round that fails keeps both.
    let stored = match write_kept_events(shared.docket.store(), &mut batch).await {
        Ok(()) => shared.docket.store().finish_and_claim(ends, claims).await,
        Err(e) => Err(e),
    };
    match stored {
        Ok((results, runs)) => {
            let ended = !batch.is_empty();
            for (res, (end, _, reply)) in results.into_iter().zip(batch) {
                let _ = shared.docket.inner.changes.send(end.run_id);
                let _ = reply.send(res.map(|_| ()));
            }
            if ended && shared.docket.has_concurrency_limits() {
                // An end may have freed a concurrency key's slot: wake this
                // process's other workers and long polls (other processes
                // hear the store's own wake-up, see `plan::concurrency`).
                // This one too: its claim right after keeps its prefetch
                // topped up (measured: without it, SQLite with a key of 64
                // 0.93x; PostgreSQL with a key of 8 0.94x and 1.2x the
                // commits per run).
                shared.docket.wake_workers();
            }
            Ok(runs)
        }
        Err(e) => {
            shared.docket.note_store_error(&e);
            Err((e, batch))
        }
    }
}

/// Logs a failed round and answers the ends given up with its error (the
/// leases fence their runs, and the reaper brings them back after expiry).
fn report_failed_round(
    e: &StoreError,
    given_up: Option<Vec<EndMsg>>,
    retry_in: Duration,
    held: usize,
) {
    let msg = e.to_string();
    if let Some(batch) = given_up {
        let lost: usize = batch.iter().map(|m| m.1.len()).sum();
        if lost > 0 {
            tracing::error!(events = lost, error = %msg, "the store failed a round past retrying: events recorded during these attempts are lost with their ends");
        }
        for (_, _, reply) in batch {
            let _ = reply.send(Err(StoreError::Database(msg.clone())));
        }
    }
    if e.is_transient() {
        tracing::warn!(error = %msg, ?retry_in, held, "store unavailable; backing off");
    } else {
        // Not an outage: waiting will not fix it. Loud, with its cause, and
        // counted (docket_store_errors_total).
        tracing::error!(
            error = %msg,
            kind = ?e.db_kind(),
            cause = ?std::error::Error::source(e),
            "the store refused a round (not transient: a bug or bad data); its attempt ends were not stored and their runs return after lease expiry"
        );
    }
}

/// Writes the events that handlers recorded while the store was failing
/// (`Ctx::record_event` kept them), each under its attempt's lease, before
/// the round stores those attempts' ends. An event written is taken out of
/// `batch`, so a round that fails and is retried writes it once.
async fn write_kept_events(store: &DynStore, batch: &mut [EndMsg]) -> Result<(), StoreError> {
    for (end, kept, _) in batch.iter_mut() {
        if kept.is_empty() {
            continue;
        }
        let lease = LeaseRef {
            run_id: end.run_id,
            lease_id: end.lease_id,
        };
        write_kept(store, lease, std::mem::take(kept))
            .await
            .map_err(|(e, rest)| {
                *kept = rest;
                e
            })?;
    }
    Ok(())
}

/// Writes `kept` in order under `lease`. On a store failure, the error and
/// the events not yet written. A lost lease ends it: the store refused the
/// write and recorded it (`stale_write_refused`), and the attempt's end will
/// be refused the same way.
async fn write_kept(
    store: &DynStore,
    lease: LeaseRef,
    kept: Vec<KeptEvent>,
) -> Result<(), (StoreError, Vec<KeptEvent>)> {
    let mut rest = kept.into_iter();
    while let Some(ev) = rest.next() {
        match store
            .append_event(lease, ev.kind.clone(), ev.data.clone(), ev.at)
            .await
        {
            Ok(()) => {}
            Err(StoreError::StaleLease { .. }) => return Ok(()),
            Err(e) => {
                let mut left = vec![ev];
                left.extend(rest);
                return Err((e, left));
            }
        }
    }
    Ok(())
}

/// Resolves on the next remote wake-up; never when there is no channel.
async fn remote_wakeup(rx: &mut Option<tokio::sync::broadcast::Receiver<String>>) {
    match rx {
        Some(r) => match r.recv().await {
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                *rx = None;
            }
        },
        None => std::future::pending::<()>().await,
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, mut stop: watch::Receiver<Phase>) {
    loop {
        let interval = shared.heartbeat_interval();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => {}
        }
        // Heartbeats go on during the grace period too, until the handle
        // releases the remaining runs.
        let mut groups: BTreeMap<Duration, Vec<(LeaseRef, Arc<AtomicBool>)>> = BTreeMap::new();
        for f in shared.inflight.lock().expect("inflight").values() {
            groups
                .entry(f.lease_len)
                .or_default()
                .push((f.lease, f.cancelled.clone()));
        }
        if groups.is_empty() && *stop.borrow() != Phase::Running {
            return;
        }
        for (len, leases) in groups {
            let expires = shared.docket.clock().now().plus(len);
            match shared
                .docket
                .store()
                .heartbeat(leases.iter().map(|l| l.0).collect(), expires)
                .await
            {
                Ok(states) => {
                    for (st, (lease, cancelled)) in states.iter().zip(&leases) {
                        if !st.held {
                            tracing::warn!(run = %lease.run_id, lease = %lease.lease_id, "lease lost; its writes will be refused");
                        }
                        if !st.held || st.cancel_requested {
                            cancelled.store(true, Ordering::SeqCst);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }
}

/// Reaps expired leases on every worker, with no leader: a leader that is
/// stopped (SIGSTOP, a long pause, a frozen VM) or cut off would halt
/// recovery for everyone, whereas here any one live worker is enough.
/// `Store::reap` fences each reap on the expired lease (and skips rows
/// another transaction holds), so reapers racing for one run reap it once.
async fn reap_loop(shared: Arc<Shared>, mut stop: watch::Receiver<Phase>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(jittered(shared.config.reap_interval)) => {}
            _ = stop.changed() => return,
        }
        reap_round(&shared.docket).await;
    }
}

/// Reaps batch after batch while they come back full and this process
/// reaped some (another reaper that won them goes on instead).
async fn reap_round(docket: &Docket) {
    loop {
        match docket.reap_batch(REAP_BATCH).await {
            Ok((read, reaped)) if read == REAP_BATCH && reaped > 0 => {}
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "lease reaper failed");
                break;
            }
        }
    }
}

/// A lease reaper without a worker ([`Docket::start_reaper`]); stops when
/// [`ReaperHandle::stop`] is called or the handle is dropped.
#[derive(Debug)]
pub struct ReaperHandle {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl ReaperHandle {
    /// Stops the reaper and waits for its round in progress to end.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for ReaperHandle {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

impl Docket {
    /// Reaps expired leases every `interval` (jittered ±25 %), through the
    /// retry policy, like every worker does — for a process that runs no
    /// worker but hands out leases: `docket serve --role api` serving
    /// remote workers over the worker protocol. Without it, a remote
    /// worker that vanished would wait for some worker process to reap its
    /// runs. Reapers racing for one run reap it once (`Store::reap` is
    /// fenced on the expired lease).
    pub fn start_reaper(&self, interval: Duration) -> ReaperHandle {
        let docket = self.clone();
        let (tx, mut rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(jittered(interval)) => {}
                    _ = &mut rx => return,
                }
                reap_round(&docket).await;
            }
        });
        ReaperHandle {
            stop: Some(tx),
            task,
        }
    }
}

/// Expired leases read (and reaped, at most) per reap statement.
const REAP_BATCH: usize = 256;

/// `d` scaled by a random factor in [0.75, 1.25), so that N workers started
/// together do not all reap in the same instant, round after round.
fn jittered(d: Duration) -> Duration {
    // 16 random bits of a v4 UUID: no extra dependency for a jitter.
    let r = (uuid::Uuid::new_v4().as_u128() & 0xffff) as f64 / 65_536.0;
    d.mul_f64(0.75 + 0.5 * r)
}

impl Shared {
    fn heartbeat_interval(&self) -> Duration {
        let min_lease = self
            .inflight
            .lock()
            .expect("inflight")
            .values()
            .map(|f| f.lease_len)
            .min()
            .unwrap_or(Duration::from_secs(30));
        (min_lease / 3).max(Duration::from_millis(50))
    }

    /// One claim request per distinct lease length among the registered
    /// jobs, each for up to `limit` runs (the store shares one budget of
    /// `limit` between them).
    fn claim_requests(&self, limit: usize) -> Vec<ClaimRequest> {
        // Jobs share one request per lease length; a job behind an open
        // circuit breaker gets its own, capped by the breaker. Concurrency
        // limits are not counted here: the store enforces them per key
        // across every process at each claim (`plan::concurrency`).
        let mut by_lease: BTreeMap<Duration, Vec<String>> = BTreeMap::new();
        let mut limited: Vec<(Duration, String, usize)> = Vec::new();
        let now = self.docket.clock().now();
        for name in self.docket.job_names() {
            let Some(j) = self.docket.job(&name) else {
                continue;
            };
            // Remote workers claim these over the worker protocol.
            if j.remote {
                continue;
            }
            // An open circuit breaker holds the job's runs back (0) or lets
            // one through (a probe, or the one recorded deferral): the rest
            // stay pending, untouched, instead of each being claimed and
            // deferred again in every open period of an outage.
            match j.gate.as_ref().and_then(|g| g(now)) {
                None => by_lease.entry(j.lease).or_default().push(name),
                Some(room) => {
                    if room > 0 {
                        limited.push((j.lease, name, room.min(limit)));
                    }
                }
            }
        }
        let request = |lease: Duration, jobs: Vec<String>, limit: usize| ClaimRequest {
            tenant: None,
            jobs,
            limit,
            now,
            lease_ms: lease.as_millis() as i64,
            worker: self.config.name.clone(),
        };
        let mut out: Vec<ClaimRequest> = by_lease
            .into_iter()
            .map(|(lease, jobs)| request(lease, jobs, limit))
            .collect();
        out.extend(
            limited
                .into_iter()
                .map(|(lease, job, room)| request(lease, vec![job], room)),
        );
        out
    }

    async fn claim(&self, limit: usize) -> crate::Result<Vec<Run>> {
        let (_, runs) = self
            .docket
            .store()
            .finish_and_claim(Vec::new(), self.claim_requests(limit))
            .await?;
        Ok(runs)
    }

    /// Runs a claimed run in its own task once a handler slot is free.
    /// `via_driver`: hand the end to the driver loop (running worker) rather
    /// than storing it from the task (tick mode).
    /// `rate`: the run's job rate-limit answer, taken with its claim.
    fn spawn_run(
        self: Arc<Self>,
        run: Run,
        rate: Option<std::result::Result<(), JobError>>,
        via_driver: bool,
    ) -> JoinHandle<()> {
        let lease = LeaseRef {
            run_id: run.id,
            lease_id: run.lease_id.expect("claimed run has a lease"),
        };
        let cancelled = Arc::new(AtomicBool::new(false));
        let lease_len = self
            .docket
            .job(&run.job)
            .map(|j| j.lease)
            .unwrap_or(Duration::from_secs(30));
        self.inflight.lock().expect("inflight").insert(
            run.id,
            InFlight {
                lease,
                lease_len,
                cancelled: cancelled.clone(),
                task: None,
            },
        );
        let me = self.clone();
        let slots = self.slots.clone();
        let handle = tokio::spawn(async move {
            let permit = slots.acquire_owned().await;
            let unstarted = me.stopping.load(Ordering::SeqCst) || permit.is_err();
            let end = if unstarted {
                // Prefetched but never started: hand it back at once.
                (
                    AttemptEnd {
                        run_id: run.id,
                        lease_id: lease.lease_id,
                        now: me.docket.clock().now(),
                        outcome: Outcome::Released,
                    },
                    Vec::new(),
                )
            } else {
                me.docket.execute(run, cancelled, rate).await
            };
            let (end, kept) = end;
            drop(permit);
            let id = end.run_id;
            // The handler is done: its slot is free now, so the next claim
            // can share a commit with this attempt's end, and heartbeats stop
            // extending a lease that is about to be released.
            me.inflight.lock().expect("inflight").remove(&id);
            me.finishing.fetch_add(1, Ordering::SeqCst);
            me.slot_freed.notify_one();
            let stored = match (&me.ends, via_driver) {
                (Some(ends), true) => {
                    let (tx, rx) = oneshot::channel();
                    match ends.send((end, kept, tx)) {
                        Ok(()) => rx.await.unwrap_or_else(|_| {
                            Err(StoreError::Database("worker stopped before storing".into()))
                        }),
                        Err(_) => Err(StoreError::Database("worker stopped before storing".into())),
                    }
                }
                // Tick mode stores its end once, its kept events first.
                _ => match write_kept(me.docket.store(), lease, kept).await {
                    Err((e, _)) => Err(e),
                    Ok(()) => match me.docket.store().finish(vec![end]).await {
                        Ok(mut r) => {
                            let _ = me.docket.inner.changes.send(id);
                            r.pop().map(|r| r.map(|_| ())).unwrap_or(Ok(()))
                        }
                        Err(e) => Err(e),
                    },
                },
            };
            match stored {
                Err(e @ StoreError::StaleLease { .. }) => {
                    tracing::warn!(run = %id, error = %e, "attempt result refused")
                }
                Err(e) => {
                    tracing::error!(run = %id, error = %e, "could not record attempt; the run returns after lease expiry")
                }
                // Counted before `finishing` drops, so shutdown, which
                // waits for `finishing` to reach 0, sees it.
                Ok(()) if unstarted => {
                    me.released.fetch_add(1, Ordering::SeqCst);
                }
                Ok(()) => {}
            }
            me.finishing.fetch_sub(1, Ordering::SeqCst);
            me.slot_freed.notify_one();
        });
        if let Some(f) = self
            .inflight
            .lock()
            .expect("inflight")
            .get_mut(&lease.run_id)
        {
            f.task = Some(handle.abort_handle());
        }
        handle
    }
}

pub(crate) fn bounded(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl Docket {
    /// Takes the job rate-limit tokens of a claim's runs, all in ONE store
    /// call (one transaction): the answer per limited run, to be used when
    /// it starts (`execute`). A run whose input its job refuses takes no
    /// token (it is refused unrun); a key that cannot be rendered is the
    /// run's `invalid_input` failure. Taking at the claim rather than at
    /// the start moves a token's use earlier by the time the run waits for
    /// a handler slot (within one claim batch, docs/RATE_LIMITS.md).
    pub(crate) async fn take_job_rates(
        &self,
        runs: &[Run],
    ) -> HashMap<RunId, std::result::Result<(), JobError>> {
        let mut out = HashMap::new();
        let mut reqs = Vec::new();
        let mut buckets = Vec::new();
        let now = self.clock().now();
        for run in runs {
            let Some(job) = self.job(&run.job) else {
                continue;
            };
            let Some(spec) = &job.rate else {
                continue;
            };
            if matches!(input_check(&job, run), Some(Err(_))) {
                continue;
            }
            match spec.bucket(
                &crate::rate::job_bucket(&job.name),
                &run.tenant,
                &job.name,
                &run.input,
            ) {
                Err(e) => {
                    out.insert(
                        run.id,
                        Err(JobError::invalid_input(format!("rate_limit_key: {e}"))),
                    );
                }
                Ok(bucket) => {
                    reqs.push(docket_store::RateTakeRequest {
                        key: bucket.clone(),
                        holder: run.id.to_string(),
                        limit: spec.limit,
                        now,
                    });
                    buckets.push((run.id, bucket));
                }
            }
        }
        if reqs.is_empty() {
            return out;
        }
        match self.store().rate_take_many(reqs).await {
            Ok(answers) => {
                for ((id, bucket), a) in buckets.into_iter().zip(answers) {
                    out.insert(id, crate::rate::answer(&bucket, Ok(a)));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (id, bucket) in buckets {
                    let e = docket_store::StoreError::Database(msg.clone());
                    out.insert(id, crate::rate::answer(&bucket, Err(e)));
                }
            }
        }
        out
    }

    /// Runs one claimed run's handler and turns its result into an attempt
    /// end (not yet stored).
    /// Also returns the events the handler recorded while the store was
    /// failing, to be written before the end.
    /// `rate`: the run's answer from [`Docket::take_job_rates`] (`None`:
    /// its job has no rate limit).
    pub(crate) async fn execute(
        &self,
        run: Run,
        cancelled: Arc<AtomicBool>,
        rate: Option<std::result::Result<(), JobError>>,
    ) -> (AttemptEnd, Vec<KeptEvent>) {
        let lease_id = run.lease_id.expect("claimed run has a lease");
        let Some(job) = self.job(&run.job) else {
            let end = AttemptEnd {
                run_id: run.id,
                lease_id,
                now: self.clock().now(),
                outcome: Outcome::Released,
            };
            return (end, Vec::new());
        };
        let started = self.clock().now();
        // Traces off: one load, and the stored context passed on as is.
        let trace = match self.telemetry() {
            Some(t) => AttemptTrace::Span(t.clone(), t.attempt(&run, lease_id)),
            None => run
                .trace
                .clone()
                .map_or(AttemptTrace::None, AttemptTrace::Stored),
        };
        let ctx = Ctx {
            run_id: run.id,
            job: run.job.clone(),
            tenant: run.tenant.clone(),
            attempt: run.attempt,
            lease_id,
            idempotency_key: run.idempotency_key.clone(),
            correlation_id: run
                .correlation_id
                .clone()
                .unwrap_or_else(|| run.id.to_string()),
            deadline: started.plus(job.timeout),
            variables: run.variables.clone(),
            cancelled: cancelled.clone(),
            docket: self.clone(),
            state: Default::default(),
            kept: Default::default(),
            trace: trace.clone(),
        };
        let kept = ctx.kept.clone();
        if run.cancel_requested {
            cancelled.store(true, Ordering::SeqCst);
        }
        let checked = match input_check(&job, &run) {
            Some(Err(msg)) => Err(JobError::invalid_input(msg)),
            // The job's rate limit, taken with the claim, applies before
            // the handler: no token → deferred to the one it reserved, the
            // handler unrun.
            _ => rate.unwrap_or(Ok(())),
        };
        let result = match checked {
            Err(e) => Err(e),
            Ok(()) => {
                let fut = std::panic::AssertUnwindSafe((job.handler)(ctx, run.input.clone()))
                    .catch_unwind();
                match tokio::time::timeout(job.timeout, fut).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(panic)) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(JobError::permanent(format!("handler panicked: {msg}")))
                    }
                    Err(_) => Err(JobError::timeout(format!(
                        "handler did not finish within {:?}",
                        job.timeout
                    ))),
                }
            }
        };
        let now = self.clock().now();
        let cancel = cancelled.load(Ordering::SeqCst) && self.cancel_confirmed(&run).await;
        let outcome = attempt_outcome(&job, &run, lease_id, result, cancel, now);
        if let AttemptTrace::Span(_, cx) = &trace {
            crate::telemetry::end_attempt(cx, &outcome);
        }
        let end = AttemptEnd {
            run_id: run.id,
            lease_id,
            now,
            outcome,
        };
        let kept = std::mem::take(&mut *kept.lock().unwrap_or_else(|p| p.into_inner()));
        (end, kept)
    }

    /// The cancelled flag is also raised when a lease is lost; only a real
    /// cancel request (read from the store) ends the run `cancelled`.
    async fn cancel_confirmed(&self, run: &Run) -> bool {
        matches!(self.store().get_run(run.id).await, Ok(Some(r)) if r.cancel_requested)
    }

    /// Turns expired leases into failed attempts of class `lease_expired`,
    /// through each job's retry policy (no immediate re-dispatch). Returns
    /// how many this call reaped (at most 256). Safe on any number of nodes
    /// at once: each reap is fenced on the run, its lease and the lease's
    /// expiry (`Store::reap`), so a run two nodes reap together is reaped
    /// once and the other's write changes nothing.
    pub async fn reap_expired(&self) -> crate::Result<usize> {
        Ok(self.reap_batch(REAP_BATCH).await?.1)
    }

    /// One batch of [`reap_expired`](Docket::reap_expired): how many expired
    /// leases were read (at most `limit`) and how many of them this call
    /// reaped.
    pub(crate) async fn reap_batch(&self, limit: usize) -> crate::Result<(usize, usize)> {
        let now = self.clock().now();
        let mut expired = self.store().expired_leases(now, limit).await?;
        if expired.is_empty() {
            return Ok((0, 0));
        }
        // PostgreSQL applies a batch in run-id order (one lock order);
        // SQLite in the order given. Sorted here, both write the same
        // evidence in the same order (the simulation compares them).
        expired.sort_by_key(|r| r.id);
        let mut ends = Vec::with_capacity(expired.len());
        for run in &expired {
            let job = self
                .job(&run.job)
                .unwrap_or_else(|| Arc::new(placeholder_job(&run.job)));
            let lease_id = run.lease_id.expect("running run has a lease");
            let err =
                JobError::new(
                    docket_core::ErrorClass::LeaseExpired,
                    format!(
                    "lease {lease_id} of worker {} expired at {} before the attempt reported back",
                    run.worker.as_deref().unwrap_or("?"),
                    run.lease_expires_at.map(|t| t.to_string()).unwrap_or_default()
                ),
                );
            ends.push(AttemptEnd {
                run_id: run.id,
                lease_id,
                now,
                outcome: decide(&job, run, lease_id, err, now),
            });
        }
        // Traces on: the reaped attempts' spans, written once the reap is
        // known to be this call's (a reap lost to another node adds none).
        let traced = self.telemetry().map(|t| {
            (
                t.clone(),
                ends.iter().map(|e| e.outcome.clone()).collect::<Vec<_>>(),
            )
        });
        let results = self.store().reap(ends).await?;
        let mut n = 0;
        for (i, (r, run)) in results.iter().zip(&expired).enumerate() {
            match r {
                Ok(Some(_)) => {
                    n += 1;
                    if let (Some((t, outcomes)), Some(lease)) = (&traced, run.lease_id) {
                        t.reaped(run, lease, &outcomes[i]);
                    }
                    let _ = self.inner.changes.send(run.id);
                }
                // Reaped elsewhere, ended or extended meanwhile: nothing to do.
                Ok(None) => {}
                Err(e) => tracing::warn!(run = %run.id, error = %e, "cannot reap an expired lease"),
            }
        }
        if n > 0 {
            self.wake_workers();
        }
        Ok((expired.len(), n))
    }
}

/// The one place a handler's result becomes an attempt's outcome, for the
/// in-process worker and for remote workers (`remote.rs`) alike: a cancel
/// requested while it ran ends the run cancelled; suspensions (input,
/// postpone, a circuit breaker's or the ledger's deferral, a terminal
/// reason) become their outcomes without the policy; every other failure
/// goes through the job's retry policy ([`decide`]). Values too deep to
/// store become `content_too_large` failures first ([`storable`]).
pub(crate) fn attempt_outcome(
    job: &Job,
    run: &Run,
    lease_id: LeaseId,
    result: Result<serde_json::Value, JobError>,
    cancel_requested: bool,
    now: docket_core::Timestamp,
) -> Outcome {
    let result = storable(result);
    match result {
        // A cancel requested while running ends the run cancelled, even
        // when the handler got to the end: "no later step starts".
        _ if cancel_requested => Outcome::Cancelled,
        Ok(output) => Outcome::Completed { output },
        Err(mut e) => match e.control.take().map(|c| *c) {
            None => decide(job, run, lease_id, e, now),
            Some(Control::NeedsInput { name, request }) => Outcome::NeedsInput { name, request },
            Some(Control::Postpone { until }) => Outcome::Postponed { until },
            Some(Control::AwaitChildren { waiting, of }) => {
                Outcome::AwaitingChildren { waiting, of }
            }
            Some(Control::Cancelled) => Outcome::Cancelled,
            Some(Control::CircuitOpen { until, breaker }) => Outcome::Retry {
                error: error_info(
                    run,
                    lease_id,
                    docket_core::ErrorClass::Unavailable,
                    e.message,
                    e.action,
                    None,
                ),
                retry: RetryRecord {
                    policy: format!("circuit_breaker:{breaker}"),
                    delay_ms: until.millis_since(now).max(0),
                    eligible_at: until.max(now),
                    reason: docket_core::policy::RetryReason::CircuitOpen,
                },
            },
            Some(Control::ActionInFlight { until }) => Outcome::Retry {
                error: error_info(
                    run,
                    lease_id,
                    docket_core::ErrorClass::Unavailable,
                    e.message,
                    e.action,
                    None,
                ),
                retry: RetryRecord {
                    policy: "ledger".into(),
                    delay_ms: until.millis_since(now).max(0),
                    eligible_at: until.max(now),
                    reason: docket_core::policy::RetryReason::ActionInFlight,
                },
            },
            Some(Control::RateLimited { until, key }) => Outcome::Retry {
                error: error_info(
                    run,
                    lease_id,
                    docket_core::ErrorClass::RateLimited,
                    e.message,
                    e.action,
                    None,
                ),
                retry: RetryRecord {
                    policy: format!("rate_limit:{key}"),
                    delay_ms: until.millis_since(now).max(0),
                    eligible_at: until.max(now),
                    reason: docket_core::policy::RetryReason::RateLimited,
                },
            },
            Some(Control::Terminal { reason }) => {
                let error = error_info(run, lease_id, e.class, e.message, e.action, None);
                let detail = format!("{}: {}", reason.as_str(), error.message);
                Outcome::Failed {
                    error: Some(error),
                    reason,
                    detail,
                }
            }
        },
    }
}

/// A job definition for runs of jobs this process does not know (reaping
/// only): the default policy.
fn placeholder_job(name: &str) -> Job {
    Job::new(
        name.to_string(),
        |_ctx, _input: serde_json::Value| async move {
            Err::<serde_json::Value, _>(JobError::permanent("job not registered in this process"))
        },
    )
}

/// The job's validation of the run's input; an input that could not be
/// read back from the store (older data: the `docket_undecodable` marker)
/// is invalid, so the handler never sees the marker as its input.
pub(crate) fn input_check(job: &Job, run: &Run) -> Option<Result<(), String>> {
    if let Some(why) = docket_store::json::undecodable_reason(&run.input) {
        return Some(Err(format!(
            "the run's stored input cannot be read back: {why}"
        )));
    }
    job.validator.as_ref().map(|v| v(&run.input))
}

/// An output or input request nested deeper than the store keeps
/// ([`docket_store::MAX_JSON_DEPTH`]) becomes a `content_too_large`
/// failure naming its depth, so the attempt ends with a recorded reason
/// instead of an end the store refuses. A depth walk of the value: cheaper
/// than the serialization storing it costs anyway.
fn storable(result: Result<serde_json::Value, JobError>) -> Result<serde_json::Value, JobError> {
    let too_deep = |field: &str, v: &serde_json::Value| {
        docket_store::json::check_depth(field, v)
            .err()
            .map(|e| JobError::new(docket_core::ErrorClass::ContentTooLarge, e.to_string()))
    };
    match result {
        Ok(output) => match too_deep("output", &output) {
            Some(e) => Err(e),
            None => Ok(output),
        },
        Err(e) => match e.control.as_deref() {
            Some(Control::NeedsInput { request, .. }) => match too_deep("input_request", request) {
                Some(deep) => Err(deep),
                None => Err(e),
            },
            _ => Err(e),
        },
    }
}

/// A failure's evidence: class, bounded message, fingerprint.
fn error_info(
    run: &Run,
    lease_id: LeaseId,
    class: docket_core::ErrorClass,
    message: String,
    action: Option<String>,
    key: Option<String>,
) -> ErrorInfo {
    let fp = Fingerprint {
        job: run.job.clone(),
        action: action.clone().unwrap_or_else(|| run.job.clone()),
        error_class: class,
        run_id: run.id,
        attempt: run.attempt,
        lease_id,
        idempotency_key: key.or_else(|| run.idempotency_key.clone()),
    };
    ErrorInfo {
        class,
        message: bounded(message),
        // Stored as JSON so the forensic view reads every field back exactly.
        fingerprint: serde_json::to_string(&fp).unwrap_or_else(|_| fp.to_line()),
        failure_key: fp.failure_key(),
        action,
    }
}

/// The one place a failure becomes an outcome: the job's policy decides.
fn decide(
    job: &Job,
    run: &Run,
    lease_id: LeaseId,
    e: JobError,
    now: docket_core::Timestamp,
) -> Outcome {
    let info = error_info(run, lease_id, e.class, e.message, e.action, e.key);
    let decision = job.policy.decide(&FailureInput {
        class: e.class,
        attempt: run.policy_attempt(),
        run_id: run.id,
        now,
        retry_after: e.retry_after,
    });
    match decision {
        Decision::Retry {
            at,
            delay_ms,
            reason,
            policy,
            ..
        } => Outcome::Retry {
            error: info,
            retry: RetryRecord {
                policy,
                delay_ms: delay_ms as i64,
                eligible_at: at,
                reason,
            },
        },
        Decision::Stop { reason, detail } => Outcome::Failed {
            error: Some(info),
            reason,
            detail,
        },
        Decision::CompleteDuplicate => Outcome::Completed {
            output: serde_json::json!({ "duplicate": true, "message": info.message }),
        },
    }
}
