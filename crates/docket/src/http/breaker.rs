//! A circuit breaker per connection.
//!
//! - **closed**: requests go out. A transient failure (`timeout`, `network`,
//!   `rate_limited`, `unavailable`) is remembered for `window_ms`; when
//!   `failures` of them fall within the window the breaker **opens** until
//!   `now + open_ms`.
//! - **open**: no request goes out. Due runs for the connection are
//!   rescheduled to the reset time as a retry decision with reason
//!   `circuit_open`, consuming no attempt. The worker claims one such run
//!   per open period and then none until the reset time
//!   ([`Breaker::claim_limit`]), so an outage costs each run at most one
//!   deferral instead of one per open period.
//! - **half-open**: from the reset time, ONE run's request goes out as a
//!   probe; others are rescheduled until the probe's deadline. A probe that
//!   gets any answer that is not transient (2xx, but also a 4xx: the service
//!   is there) **closes** the breaker; a transient failure re-opens it for
//!   another `open_ms`. A probe that never reports (its worker died) is
//!   forgotten at its deadline and the next run probes.
//!
//! Time is the engine's injected clock, never the wall clock.
//!
//! The state is shared by every process on the database: it is stored per
//! connection (`LimitStore::breaker_update`) and every change is made by
//! the pure methods of `Shared` under the row's lock, in one transaction.
//! So failures from all processes count towards opening, a breaker opened
//! by one process stops the others' sends at their next admission, and
//! only one probe goes out when half-open, across all processes; the
//! probe's deadline is its lease, so a prober that crashed is replaced at
//! that instant. A closed breaker costs one plain read per request and a
//! success no store call at all; a deferral while open writes nothing.
//! Each process keeps a copy of the state from its last store call, which
//! its claim gate ([`Breaker::claim_limit`]) reads without a store call.
//! When the store cannot be reached the breaker decides on that copy alone,
//! except that it never probes on its own: a copy that would send the
//! half-open probe defers instead ([`Breaker::local_fallback`]), so a store
//! error never lets a second probe out beside the one another process
//! sends under the row's lock.
//! Every change of state is recorded as an event on the run that caused it
//! (`circuit_opened`, `circuit_half_open`, `circuit_closed`) and logged.

use docket_core::Timestamp;
use docket_store::{BreakerChange, BreakerWrite, DynStore};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// A connection's breaker settings (`[connections.X.breaker]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Transient failures within the window that open the breaker; 0
    /// disables the breaker.
    pub failures: u32,
    /// The window, in milliseconds.
    pub window_ms: u64,
    /// How long the breaker stays open before a probe, in milliseconds.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            window_ms: 60_000,
            open_ms: 30_000,
        }
    }
}

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerPhase {
    /// Requests go out.
    Closed,
    /// No request goes out until the reset time.
    Open,
    /// One probe request is allowed through.
    HalfOpen,
}

impl BreakerPhase {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerPhase::Closed => "closed",
            BreakerPhase::Open => "open",
            BreakerPhase::HalfOpen => "half_open",
        }
    }
}

/// What the API, the CLI and `/metrics` show about one breaker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BreakerState {
    /// The connection it guards.
    pub connection: String,
    /// Its state.
    pub state: BreakerPhase,
    /// Transient failures within the current window (closed state).
    pub failures_in_window: usize,
    /// Its settings.
    pub config: BreakerConfig,
    /// When it last opened.
    pub opened_at: Option<Timestamp>,
    /// When an open breaker lets a probe through.
    pub reset_at: Option<Timestamp>,
    /// Until when the current probe (half-open) holds the single slot.
    pub probe_deadline: Option<Timestamp>,
    /// When its state last changed.
    pub changed_at: Option<Timestamp>,
    /// How often it opened since this process started.
    pub times_opened: u64,
    /// How many runs it deferred since this process started.
    pub deferred: u64,
}

/// A change of state, to be recorded as an event on the run that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Closed → open, or half-open → open (`reopened`).
    Opened {
        until: Timestamp,
        failures: usize,
        reopened: bool,
    },
    /// Open → half-open: this run is the probe.
    HalfOpen,
    /// Half-open → closed: the probe succeeded.
    Closed,
}

/// Whether a request may go out now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Send. `probe`: this request is the half-open probe.
    Send {
        probe: bool,
        transition: Option<Transition>,
    },
    /// Do not send; reschedule the run to `until`.
    Defer { until: Timestamp },
}

/// A breaker's state, the same in every process: stored in the database
/// (`LimitStore::breaker_update`, one JSON value per connection) and
/// changed only by the pure methods below, under the row's lock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct Shared {
    phase: Phase,
    /// Transient failures within the window, oldest first (closed).
    failures: VecDeque<Timestamp>,
    opened_at: Option<Timestamp>,
    reset_at: Option<Timestamp>,
    /// Until when the current half-open probe holds the one slot: the
    /// probe's lease. A prober that crashed is replaced at this instant.
    probe_deadline: Option<Timestamp>,
    changed_at: Option<Timestamp>,
    times_opened: u64,
}

/// [`BreakerPhase`] with a default, for the stored form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl From<Phase> for BreakerPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Closed => BreakerPhase::Closed,
            Phase::Open => BreakerPhase::Open,
            Phase::HalfOpen => BreakerPhase::HalfOpen,
        }
    }
}

impl Shared {
    /// May a request go out at `now`? (See [`Breaker::admit`].)
    fn admit(&mut self, now: Timestamp, probe_ms: u64) -> Admission {
        match self.phase {
            Phase::Closed => Admission::Send {
                probe: false,
                transition: None,
            },
            Phase::Open => {
                let reset = self.reset_at.unwrap_or(now);
                if now < reset {
                    return Admission::Defer { until: reset };
                }
                self.phase = Phase::HalfOpen;
                self.probe_deadline = Some(now.plus_millis(probe_ms as i64));
                self.changed_at = Some(now);
                Admission::Send {
                    probe: true,
                    transition: Some(Transition::HalfOpen),
                }
            }
            Phase::HalfOpen => match self.probe_deadline {
                Some(d) if now < d => Admission::Defer { until: d },
                _ => {
                    // The last probe never reported: this run probes.
                    self.probe_deadline = Some(now.plus_millis(probe_ms as i64));
                    Admission::Send {
                        probe: true,
                        transition: None,
                    }
                }
            },
        }
    }

    /// Records an admitted request's outcome. (See [`Breaker::record`].)
    fn record(
        &mut self,
        config: &BreakerConfig,
        now: Timestamp,
        probe: bool,
        transient: bool,
    ) -> Option<Transition> {
        match (self.phase, transient) {
            (Phase::HalfOpen, true) if probe => Some(self.open(config, now, 1, true)),
            (Phase::HalfOpen, false) if probe => {
                self.phase = Phase::Closed;
                self.failures.clear();
                self.probe_deadline = None;
                self.reset_at = None;
                self.changed_at = Some(now);
                Some(Transition::Closed)
            }
            (Phase::Closed, true) => {
                let window_start = now.plus_millis(-(config.window_ms as i64));
                self.failures.push_back(now);
                while self.failures.front().is_some_and(|t| *t <= window_start) {
                    self.failures.pop_front();
                }
                // Failures reported late by another process (an older `now`)
                // can leave the deque unsorted: count, do not rely on order.
                self.failures.retain(|t| *t > window_start);
                let n = self.failures.len();
                (n >= config.failures as usize).then(|| self.open(config, now, n, false))
            }
            // Requests admitted before the breaker opened, finishing now;
            // successes while closed: nothing changes.
            _ => None,
        }
    }

    fn release_probe(&mut self) {
        if self.phase == Phase::HalfOpen {
            self.probe_deadline = None;
        }
    }

    fn open(
        &mut self,
        config: &BreakerConfig,
        now: Timestamp,
        failures: usize,
        reopened: bool,
    ) -> Transition {
        let until = now.plus_millis(config.open_ms as i64);
        self.phase = Phase::Open;
        self.failures.clear();
        self.opened_at = Some(now);
        self.reset_at = Some(until);
        self.probe_deadline = None;
        self.changed_at = Some(now);
        self.times_opened += 1;
        Transition::Opened {
            until,
            failures,
            reopened,
        }
    }

    /// The stored form (`null` never reads back as a state: see `decode`).
    fn encode(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// A stored state; a missing or undecodable one is a closed breaker.
    fn decode(v: Option<Value>) -> Shared {
        v.and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }
}

/// One change a breaker may make: the same for the stored state and for
/// this process's copy.
#[derive(Clone, Copy, Debug)]
enum Op {
    Admit { probe_ms: u64 },
    Record { probe: bool, transient: bool },
    ReleaseProbe,
}

/// What an [`Op`] answered.
#[derive(Clone, Debug)]
enum Answer {
    Admission(Admission),
    Transition(Option<Transition>),
}

impl Shared {
    fn run(&mut self, config: &BreakerConfig, now: Timestamp, op: Op) -> Answer {
        match op {
            Op::Admit { probe_ms } => Answer::Admission(self.admit(now, probe_ms)),
            Op::Record { probe, transient } => {
                Answer::Transition(self.record(config, now, probe, transient))
            }
            Op::ReleaseProbe => {
                self.release_probe();
                Answer::Transition(None)
            }
        }
    }
}

#[derive(Debug)]
struct Inner {
    /// This process's copy of the stored state, as of its last store call
    /// (or its own decisions while the store could not be reached).
    shared: Shared,
    /// Runs deferred by this process since it started.
    deferred: u64,
    /// Runs this process deferred since the breaker last opened.
    deferred_while_open: u64,
}

/// One connection's breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    name: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub(crate) fn new(name: &str, config: BreakerConfig) -> Breaker {
        Breaker {
            name: name.to_string(),
            config,
            inner: Mutex::new(Inner {
                shared: Shared::default(),
                deferred: 0,
                deferred_while_open: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves consistent data (every
        // update is a few assignments): keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `new` (read or written in the store) as this process's copy
    /// and counts a deferral.
    fn adopt(&self, s: &mut Inner, new: Shared, answer: &Answer) {
        if new.opened_at != s.shared.opened_at {
            s.deferred_while_open = 0;
        }
        s.shared = new;
        if let Answer::Admission(Admission::Defer { .. }) = answer {
            s.deferred += 1;
            if s.shared.phase == Phase::Open {
                s.deferred_while_open += 1;
            }
        }
    }

    /// Applies `op` to this process's copy only.
    fn local(&self, now: Timestamp, op: Op) -> Answer {
        let mut s = self.lock();
        let mut st = s.shared.clone();
        let a = st.run(&self.config, now, op);
        self.adopt(&mut s, st, &a);
        a
    }

    /// Applies `op` to the stored state under its row's lock (one
    /// transaction; nothing is written when nothing changes) and adopts the
    /// result. When the store cannot be reached, to this process's copy:
    /// the breaker then works per process until the store answers again,
    /// except that it never sends a probe on its own (see
    /// [`Breaker::local_fallback`]).
    async fn apply(&self, store: &DynStore, now: Timestamp, op: Op) -> Answer {
        let out = Arc::new(Mutex::new(None));
        let slot = out.clone();
        let config = self.config.clone();
        let change: BreakerChange = Box::new(move |old| {
            let mut st = Shared::decode(old);
            let before = st.clone();
            let a = st.run(&config, now, op);
            let changed = st != before;
            // A close releases, in its own transaction, the runs deferred
            // to the probe's deadline: the service answered, so they need
            // not wait it out.
            let release = matches!(a, Answer::Transition(Some(Transition::Closed)));
            let state = changed.then(|| st.encode());
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((a, st));
            BreakerWrite { state, release }
        });
        let res = store.breaker_change(self.name.clone(), now, change).await;
        let done = out.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (res, done) {
            (Ok(changed), Some((a, st))) => {
                if !changed.released.is_empty() {
                    // For operators; each run's `deferral_released` event
                    // is the evidence.
                    tracing::info!(connection = %self.name, runs = changed.released.len(),
                        "circuit breaker closed: the runs it deferred to the probe's deadline are due now");
                }
                let mut s = self.lock();
                self.adopt(&mut s, st, &a);
                a
            }
            (res, _) => {
                if let Err(e) = res {
                    tracing::warn!(connection = %self.name, error = %e,
                        "circuit breaker: the store did not answer; this process decides alone");
                }
                self.local_fallback(now, op)
            }
        }
    }

    /// `op` on this process's copy, when the store did not answer. A
    /// closed copy still sends and an open one defers until its reset, but
    /// a copy that would send a probe (open past its reset, or half-open
    /// with no live probe) defers for a probe's length instead, and stays
    /// as it was: another process may be probing under the stored state
    /// right now (or this process's own update may have committed before
    /// its answer was lost), and the one-probe rule holds only if nobody
    /// probes without the row's lock.
    fn local_fallback(&self, now: Timestamp, op: Op) -> Answer {
        if let Op::Admit { probe_ms } = op {
            let mut s = self.lock();
            let mut st = s.shared.clone();
            if let Answer::Admission(Admission::Send { probe: true, .. }) =
                st.run(&self.config, now, op)
            {
                s.deferred += 1;
                return Answer::Admission(Admission::Defer {
                    until: now.plus_millis(probe_ms as i64),
                });
            }
        }
        self.local(now, op)
    }

    /// May a request go out at `now`, in this process's copy? (Unit tests
    /// of the state machine; the worker uses [`Breaker::admit_shared`].)
    /// `probe_ms` is how long a probe may take (its request timeout,
    /// reconcile included) before it is considered lost.
    #[cfg(test)]
    pub(crate) fn admit(&self, now: Timestamp, probe_ms: u64) -> Admission {
        if self.config.failures == 0 {
            return Admission::Send {
                probe: false,
                transition: None,
            };
        }
        match self.local(now, Op::Admit { probe_ms }) {
            Answer::Admission(a) => a,
            Answer::Transition(_) => unreachable!("admit answers an admission"),
        }
    }

    /// May a request go out at `now`, by the state every process shares?
    /// A closed breaker is a plain read (no lock, no write); an open or
    /// half-open one is decided under the row's lock, so one probe goes out
    /// across all processes. A deferral while open writes nothing.
    pub(crate) async fn admit_shared(
        &self,
        store: &DynStore,
        now: Timestamp,
        probe_ms: u64,
    ) -> Admission {
        let send = Admission::Send {
            probe: false,
            transition: None,
        };
        if self.config.failures == 0 {
            return send;
        }
        if let Ok(row) = store.breaker_get(self.name.clone()).await {
            let st = Shared::decode(row.map(|r| r.state));
            let closed = st.phase == Phase::Closed;
            // The freshest state known: should the locked update below fail,
            // this process decides on it, not on an older copy.
            let mut s = self.lock();
            let a = Answer::Admission(send.clone());
            self.adopt(&mut s, st, &a);
            if closed {
                return send;
            }
        }
        match self.apply(store, now, Op::Admit { probe_ms }).await {
            Answer::Admission(a) => a,
            Answer::Transition(_) => unreachable!("admit answers an admission"),
        }
    }

    /// How many runs that need the connection this process should claim at
    /// `now` (`None`: no limit), by its copy of the shared state. While the
    /// breaker is open: one until this process has deferred a run since it
    /// opened (that deferral is the recorded decision), then none until the
    /// reset time; from the reset time one (the probe); none while a
    /// half-open probe is out. Otherwise every claimed run would only be
    /// deferred again: during an outage each due run cost a claim, an
    /// attempt row and three events per open period (8,290 deferral rows
    /// for 200 runs in a 148 s outage). Runs not claimed stay pending,
    /// untouched. A process learns that another opened the breaker at its
    /// next admission (each of its runs already claimed is deferred once).
    pub(crate) fn claim_limit(&self, now: Timestamp) -> Option<usize> {
        if self.config.failures == 0 {
            return None;
        }
        let s = self.lock();
        match s.shared.phase {
            Phase::Closed => None,
            Phase::Open => {
                let reset = s.shared.reset_at.is_none_or(|reset| now >= reset);
                Some(usize::from(reset || s.deferred_while_open == 0))
            }
            Phase::HalfOpen => Some(usize::from(
                s.shared.probe_deadline.is_none_or(|d| now >= d),
            )),
        }
    }

    /// Whether this process's copy says a half-open probe is out until a
    /// later time than `now`: its claim gate then holds the connection's
    /// runs until that deadline, unless it learns of the close sooner
    /// (`exec::watch_probe`).
    pub(crate) fn waits_for_probe(&self, now: Timestamp) -> bool {
        let s = self.lock();
        s.shared.phase == Phase::HalfOpen && s.shared.probe_deadline.is_some_and(|d| now < d)
    }

    /// Records the outcome of an admitted request in this process's copy:
    /// `transient` when it failed with a transient class. (Unit tests; the
    /// worker uses [`Breaker::record_shared`].)
    #[cfg(test)]
    pub(crate) fn record(
        &self,
        now: Timestamp,
        probe: bool,
        transient: bool,
    ) -> Option<Transition> {
        if self.config.failures == 0 {
            return None;
        }
        match self.local(now, Op::Record { probe, transient }) {
            Answer::Transition(t) => t,
            Answer::Admission(_) => unreachable!("record answers a transition"),
        }
    }

    /// Records the outcome of an admitted request in the shared state. A
    /// success that is not a probe changes nothing and touches no store.
    pub(crate) async fn record_shared(
        &self,
        store: &DynStore,
        now: Timestamp,
        probe: bool,
        transient: bool,
    ) -> Option<Transition> {
        if self.config.failures == 0 || !(probe || transient) {
            return None;
        }
        match self
            .apply(store, now, Op::Record { probe, transient })
            .await
        {
            Answer::Transition(t) => t,
            Answer::Admission(_) => unreachable!("record answers a transition"),
        }
    }

    /// A probe that made no request after all (e.g. its action was already
    /// committed): free the slot for the next run. (Unit tests.)
    #[cfg(test)]
    pub(crate) fn release_probe(&self) {
        self.local(Timestamp(0), Op::ReleaseProbe);
    }

    /// [`Breaker::release_probe`] in the shared state.
    pub(crate) async fn release_probe_shared(&self, store: &DynStore, now: Timestamp) {
        self.apply(store, now, Op::ReleaseProbe).await;
    }

    /// Reads the shared state into this process's copy (for the API).
    pub(crate) async fn refresh(&self, store: &DynStore) {
        if let Ok(Some(row)) = store.breaker_get(self.name.clone()).await {
            let st = Shared::decode(Some(row.state));
            let mut s = self.lock();
            self.adopt(&mut s, st, &Answer::Transition(None));
        }
    }

    /// The breaker as the API shows it (an open breaker past its reset time
    /// still shows `open` until a run probes).
    pub(crate) fn state(&self, now: Timestamp) -> BreakerState {
        let s = self.lock();
        let window_start = now.plus_millis(-(self.config.window_ms as i64));
        BreakerState {
            connection: self.name.clone(),
            state: s.shared.phase.into(),
            failures_in_window: s
                .shared
                .failures
                .iter()
                .filter(|t| **t > window_start)
                .count(),
            config: self.config.clone(),
            opened_at: s.shared.opened_at,
            reset_at: s.shared.reset_at,
            probe_deadline: s.shared.probe_deadline,
            changed_at: s.shared.changed_at,
            times_opened: s.shared.times_opened,
            deferred: s.deferred,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp(1_000_000);

    fn breaker() -> Breaker {
        Breaker::new(
            "crm",
            BreakerConfig {
                failures: 3,
                window_ms: 10_000,
                open_ms: 5_000,
            },
        )
    }

    fn send(b: &Breaker, now: Timestamp) -> bool {
        matches!(b.admit(now, 1_000), Admission::Send { .. })
    }

    #[test]
    fn opens_after_n_failures_within_the_window_only() {
        let b = breaker();
        assert!(b.record(T0, false, true).is_none());
        // The first failure falls out of the window.
        assert!(b.record(T0.plus_millis(10_000), false, true).is_none());
        assert!(b.record(T0.plus_millis(10_001), false, true).is_none());
        assert_eq!(b.state(T0.plus_millis(10_001)).failures_in_window, 2);
        let t = b.record(T0.plus_millis(10_002), false, true);
        assert_eq!(
            t,
            Some(Transition::Opened {
                until: T0.plus_millis(15_002),
                failures: 3,
                reopened: false
            })
        );
        assert_eq!(
            b.admit(T0.plus_millis(15_001), 1_000),
            Admission::Defer {
                until: T0.plus_millis(15_002)
            }
        );
        let st = b.state(T0.plus_millis(15_001));
        assert_eq!(
            (st.state, st.times_opened, st.deferred),
            (BreakerPhase::Open, 1, 1)
        );
    }

    #[test]
    fn half_open_lets_one_probe_through_then_closes_or_reopens() {
        let b = breaker();
        for i in 0..3 {
            b.record(T0.plus_millis(i), false, true);
        }
        let reset = T0.plus_millis(5_002);
        assert_eq!(
            b.admit(reset, 1_000),
            Admission::Send {
                probe: true,
                transition: Some(Transition::HalfOpen)
            }
        );
        // A second run waits for the probe's deadline.
        assert_eq!(
            b.admit(reset, 1_000),
            Admission::Defer {
                until: reset.plus_millis(1_000)
            }
        );
        // The probe fails: open again.
        assert!(matches!(
            b.record(reset, true, true),
            Some(Transition::Opened { reopened: true, .. })
        ));
        assert!(!send(&b, reset.plus_millis(4_999)));
        let reset2 = reset.plus_millis(5_000);
        assert!(send(&b, reset2));
        assert_eq!(b.record(reset2, true, false), Some(Transition::Closed));
        assert!(send(&b, reset2));
        assert_eq!(b.state(reset2).state, BreakerPhase::Closed);
    }

    #[test]
    fn a_lost_probe_is_replaced_and_a_released_one_frees_the_slot() {
        let b = breaker();
        for i in 0..3 {
            b.record(T0.plus_millis(i), false, true);
        }
        let reset = T0.plus_millis(5_002);
        assert!(send(&b, reset));
        assert!(!send(&b, reset.plus_millis(999)));
        // Its deadline passed without a report: the next run probes.
        assert_eq!(
            b.admit(reset.plus_millis(1_000), 1_000),
            Admission::Send {
                probe: true,
                transition: None
            }
        );
        b.release_probe();
        assert!(send(&b, reset.plus_millis(1_001)));
    }

    #[test]
    fn without_the_store_it_never_probes_but_a_closed_breaker_sends() {
        let b = breaker();
        let admit = |now| match b.local_fallback(now, Op::Admit { probe_ms: 1_000 }) {
            Answer::Admission(a) => a,
            Answer::Transition(_) => unreachable!(),
        };
        assert!(matches!(admit(T0), Admission::Send { probe: false, .. }));
        for i in 0..3 {
            b.record(T0.plus_millis(i), false, true);
        }
        let reset = T0.plus_millis(5_002);
        assert_eq!(
            admit(reset.plus_millis(-1)),
            Admission::Defer { until: reset }
        );
        // At and after the reset the copy would probe: it defers for a
        // probe's length instead and stays open, every time.
        for later in [0, 1, 2_000] {
            let now = reset.plus_millis(later);
            assert_eq!(
                admit(now),
                Admission::Defer {
                    until: now.plus_millis(1_000)
                }
            );
            assert_eq!(b.state(now).state, BreakerPhase::Open);
        }
        // Half-open with a lost probe: the same.
        assert!(send(&b, reset));
        let after = reset.plus_millis(1_000);
        assert_eq!(
            admit(after),
            Admission::Defer {
                until: after.plus_millis(1_000)
            }
        );
        assert_eq!(b.state(after).state, BreakerPhase::HalfOpen);
        // Recording outcomes still works on the copy.
        assert!(matches!(
            b.local_fallback(
                after,
                Op::Record {
                    probe: true,
                    transient: false
                }
            ),
            Answer::Transition(Some(Transition::Closed))
        ));
        assert!(matches!(admit(after), Admission::Send { probe: false, .. }));
    }

    #[test]
    fn zero_failures_disables_it() {
        let b = Breaker::new(
            "x",
            BreakerConfig {
                failures: 0,
                ..Default::default()
            },
        );
        for i in 0..100 {
            assert!(b.record(T0.plus_millis(i), false, true).is_none());
        }
        assert!(send(&b, T0));
    }
}
