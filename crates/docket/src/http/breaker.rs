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
//! The state is kept in memory, per process: with several Docket processes
//! each has its own breaker per connection, so up to `failures` transient
//! failures per process reach a failing service before all of them stop
//! sending, and each process sends its own probe. Every change of state is
//! recorded as an event on the run that caused it (`circuit_opened`,
//! `circuit_half_open`, `circuit_closed`), so the history is durable and
//! shared even though the state is not.

use docket_core::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;

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

#[derive(Debug)]
struct Inner {
    phase: BreakerPhase,
    failures: VecDeque<Timestamp>,
    opened_at: Option<Timestamp>,
    reset_at: Option<Timestamp>,
    probe_deadline: Option<Timestamp>,
    changed_at: Option<Timestamp>,
    times_opened: u64,
    deferred: u64,
    /// Runs deferred since the breaker last opened.
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
                phase: BreakerPhase::Closed,
                failures: VecDeque::new(),
                opened_at: None,
                reset_at: None,
                probe_deadline: None,
                changed_at: None,
                times_opened: 0,
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

    /// May a request go out at `now`? `probe_ms` is how long a probe may
    /// take (its request timeout, reconcile included) before it is
    /// considered lost.
    pub(crate) fn admit(&self, now: Timestamp, probe_ms: u64) -> Admission {
        if self.config.failures == 0 {
            return Admission::Send {
                probe: false,
                transition: None,
            };
        }
        let mut s = self.lock();
        match s.phase {
            BreakerPhase::Closed => Admission::Send {
                probe: false,
                transition: None,
            },
            BreakerPhase::Open => {
                let reset = s.reset_at.unwrap_or(now);
                if now < reset {
                    s.deferred += 1;
                    s.deferred_while_open += 1;
                    return Admission::Defer { until: reset };
                }
                s.phase = BreakerPhase::HalfOpen;
                s.probe_deadline = Some(now.plus_millis(probe_ms as i64));
                s.changed_at = Some(now);
                Admission::Send {
                    probe: true,
                    transition: Some(Transition::HalfOpen),
                }
            }
            BreakerPhase::HalfOpen => match s.probe_deadline {
                Some(d) if now < d => {
                    s.deferred += 1;
                    Admission::Defer { until: d }
                }
                _ => {
                    // The last probe never reported: this run probes.
                    s.probe_deadline = Some(now.plus_millis(probe_ms as i64));
                    Admission::Send {
                        probe: true,
                        transition: None,
                    }
                }
            },
        }
    }

    /// How many runs that need the connection this process should claim at
    /// `now` (`None`: no limit). While the breaker is open: one until it has
    /// deferred a run since it opened (that deferral is the recorded
    /// decision), then none until the reset time; from the reset time one
    /// (the probe); none while a half-open probe is out. Otherwise every
    /// claimed run would only be deferred again: during an outage each due
    /// run cost a claim, an attempt row and three events per open period
    /// (8,290 deferral rows for 200 runs in a 148 s outage). Runs not claimed
    /// stay pending, untouched.
    pub(crate) fn claim_limit(&self, now: Timestamp) -> Option<usize> {
        if self.config.failures == 0 {
            return None;
        }
        let s = self.lock();
        match s.phase {
            BreakerPhase::Closed => None,
            BreakerPhase::Open => {
                let reset = s.reset_at.is_none_or(|reset| now >= reset);
                Some(usize::from(reset || s.deferred_while_open == 0))
            }
            BreakerPhase::HalfOpen => Some(usize::from(s.probe_deadline.is_none_or(|d| now >= d))),
        }
    }

    /// Records the outcome of an admitted request: `transient` when it
    /// failed with a transient class.
    pub(crate) fn record(
        &self,
        now: Timestamp,
        probe: bool,
        transient: bool,
    ) -> Option<Transition> {
        if self.config.failures == 0 {
            return None;
        }
        let mut s = self.lock();
        match (s.phase, transient) {
            (BreakerPhase::HalfOpen, true) if probe => Some(self.open(&mut s, now, 1, true)),
            (BreakerPhase::HalfOpen, false) if probe => {
                s.phase = BreakerPhase::Closed;
                s.failures.clear();
                s.probe_deadline = None;
                s.reset_at = None;
                s.changed_at = Some(now);
                Some(Transition::Closed)
            }
            (BreakerPhase::Closed, true) => {
                let window_start = now.plus_millis(-(self.config.window_ms as i64));
                s.failures.push_back(now);
                while s.failures.front().is_some_and(|t| *t <= window_start) {
                    s.failures.pop_front();
                }
                let n = s.failures.len();
                (n >= self.config.failures as usize).then(|| self.open(&mut s, now, n, false))
            }
            // Requests admitted before the breaker opened, finishing now;
            // successes while closed: nothing changes.
            _ => None,
        }
    }

    /// A probe that made no request after all (e.g. its action was already
    /// committed): free the slot for the next run.
    pub(crate) fn release_probe(&self) {
        let mut s = self.lock();
        if s.phase == BreakerPhase::HalfOpen {
            s.probe_deadline = None;
        }
    }

    fn open(&self, s: &mut Inner, now: Timestamp, failures: usize, reopened: bool) -> Transition {
        let until = now.plus_millis(self.config.open_ms as i64);
        s.phase = BreakerPhase::Open;
        s.failures.clear();
        s.opened_at = Some(now);
        s.reset_at = Some(until);
        s.probe_deadline = None;
        s.changed_at = Some(now);
        s.times_opened += 1;
        s.deferred_while_open = 0;
        Transition::Opened {
            until,
            failures,
            reopened,
        }
    }

    /// The breaker as the API shows it (an open breaker past its reset time
    /// still shows `open` until a run probes).
    pub(crate) fn state(&self, now: Timestamp) -> BreakerState {
        let s = self.lock();
        let window_start = now.plus_millis(-(self.config.window_ms as i64));
        BreakerState {
            connection: self.name.clone(),
            state: s.phase,
            failures_in_window: s.failures.iter().filter(|t| **t > window_start).count(),
            config: self.config.clone(),
            opened_at: s.opened_at,
            reset_at: s.reset_at,
            probe_deadline: s.probe_deadline,
            changed_at: s.changed_at,
            times_opened: s.times_opened,
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
