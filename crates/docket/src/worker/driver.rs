//! The driver loop's decisions, apart from its I/O so that each can be
//! tested on its own (`main_loop` in `mod.rs` wires them to the store, the
//! clock and the channels):
//!
//! - [`claim_size`]: whether a round claims, and how many runs;
//! - [`Prefetch`]: how far ahead it claims, grown while a deep backlog
//!   keeps handler slots waiting for the store;
//! - [`DueTracker`]: when the earliest due run is read again, and how long
//!   an idle driver sleeps before it claims on its own;
//! - [`HeldEnds`]: attempt ends waiting for a round, kept across a failed
//!   round within a window, with the backoff between rounds;
//! - [`hold_ends`]: whether ends wait a moment for a claim round to share
//!   its commit instead of taking a round of their own;
//! - [`ends_reopen_claim`]: whether ends take a claim along after a claim
//!   came back short, and [`keyed_claim_floor`]: how many with keys.

use docket_core::Timestamp;
use docket_store::AttemptEnd;
use std::time::Duration;
use tokio::time::Instant;

/// While runs are in hand the driver turns once per batch of attempt ends;
/// it re-reads the earliest due run at most this often.
pub(super) const DUE_RECHECK: Duration = Duration::from_millis(50);
/// How long attempt ends that could not be stored (the store answered an
/// error) are kept and stored again; past it they are given up and their
/// runs come back after lease expiry, as a `lease_expired` retry.
pub(super) const END_RETRY_WINDOW: Duration = Duration::from_secs(30);
/// While attempts run, how long after a run becomes due the driver waits
/// for an attempt end to claim it before claiming on its own.
pub(super) const BUSY_SLACK: Duration = Duration::from_millis(5);
/// How soon an idle worker claims again when a run is already due but the
/// last claim did not get it (a concurrency limit held elsewhere, or a run
/// that became due just after the claim).
pub(super) const DUE_BLOCKED_RECHECK: Duration = Duration::from_millis(100);
/// The first backoff after a failed round, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At most this many ends are taken from the channel per round.
pub(super) const MAX_ROUND_ENDS: usize = 512;
/// How long attempt ends may wait for the claim round that the handlers
/// still running are about to make worth it (see [`hold_ends`]). Short
/// against a round trip with a commit (a few ms on PostgreSQL), long
/// against the time a just-spawned no-op handler needs to end.
pub(super) const END_HOLD: Duration = Duration::from_millis(2);

/// Whether the ends held now wait (`Some(for how long at most)`) instead
/// of being stored in a round of their own.
///
/// Why: right after a full claim the driver finds the one or two ends that
/// arrived during that round, while the runs it just claimed are about to
/// end too. Storing those one or two in a round of their own cost half of
/// PostgreSQL's write commits in W1 (median one end per such round); on a
/// store whose commits are no flush (SQLite) the driver never holds them
/// (`RoundHints::hold_ends`). They wait only while a claim is coming
/// (`claim_coming`, decided by the caller: the worker is running, the
/// backlog was not drained by the last claim, and no claim is worth making
/// yet because handlers are running, so their ends will free slots). And
/// only briefly: the first of them waits at most [`END_HOLD`] from its
/// arrival (`since`). Ends kept across a failed round have no `since` and
/// never wait.
pub(super) fn hold_ends(
    claim_coming: bool,
    since: Option<Instant>,
    now: Instant,
) -> Option<Duration> {
    let waited = now.saturating_duration_since(since?);
    let left = END_HOLD.saturating_sub(waited);
    (claim_coming && !left.is_zero()).then_some(left)
}

/// Whether the ends about to be stored reopen the claim that a short claim
/// closed (`want_claim`), so that their round carries a claim.
///
/// Why: a claim that comes back short means nothing more was claimable
/// then; ends can change that in two ways only: each frees its run's
/// concurrency-key slot (`keyed`: the worker runs jobs with limits), and an
/// end may make its own run due again (`AttemptEnd::frees_by`). The claim
/// in the ends' round comes after them in one transaction and sees what
/// they freed. Before, such ends went alone and the claim followed in a
/// round of its own (measured with a job-wide key of 8: an ends-only round
/// and a claim-only round per turnover, plus an empty claim).
pub(super) fn ends_reopen_claim<'a>(
    keyed: bool,
    ends: impl IntoIterator<Item = &'a AttemptEnd>,
    now: Timestamp,
) -> bool {
    let mut ends = ends.into_iter().peekable();
    ends.peek().is_some() && (keyed || ends.any(|e| e.frees_by(now)))
}

/// With concurrency keys, the claim a round of `ends` makes when
/// [`claim_size`] makes none: as many runs as it ends (each end frees a
/// key slot and a handler slot), within the capacity left by the runs held
/// (`held_runs`, not counting the claims in flight), and only while those
/// leave handler slots idle (fewer than `concurrency`): with runs in hand
/// for every slot, [`claim_size`]'s fewer, larger claims stand (measured:
/// a keyed claim per round of ends cost 0.93x on SQLite with a key of 64).
///
/// Why: a keyed claim usually comes back short (its key is full), so the
/// runs asked for by the claims in flight overstate what they will bring;
/// counted in full, they left the next round no claim at all, and its ends
/// went alone (a commit of their own) while their slots stayed empty until
/// a later round. The floor keeps what is held and asked within twice the
/// capacity at worst, and within it whenever the claims in flight come back
/// short by at least these ends.
pub(super) fn keyed_claim_floor(
    keyed: bool,
    ends: usize,
    held_runs: usize,
    concurrency: usize,
    capacity: usize,
) -> Option<usize> {
    let n = ends.min(capacity.saturating_sub(held_runs));
    (keyed && held_runs < concurrency && n > 0).then_some(n)
}

/// How many runs a round claims: `None` for no claim. With runs in hand,
/// claim only once half the capacity (`concurrency + prefetch`) is free:
/// fewer, larger claims; the prefetched runs keep the slots busy.
pub(super) fn claim_size(
    running: bool,
    want_claim: bool,
    in_hand: usize,
    concurrency: usize,
    capacity: usize,
) -> Option<usize> {
    let free = capacity.saturating_sub(in_hand);
    let worth =
        running && want_claim && free > 0 && (in_hand < concurrency || free * 2 >= capacity);
    worth.then_some(free)
}

/// How many times the configured prefetch the adaptive prefetch may grow
/// to (see [`Prefetch`]).
pub(super) const PREFETCH_GROWTH: usize = 8;

/// How far ahead of its handler slots the driver claims: the configured
/// `WorkerConfig::prefetch`, grown while the backlog is deep and the store
/// is the bottleneck.
///
/// Why: each round is one commit (a WAL flush on PostgreSQL), and with
/// fast handlers the slots empty before the round that refills them
/// returns, so they wait for the store. Larger claims then mean fewer
/// commits per run. The prefetch doubles after a claim that came back
/// full (the backlog held at least that many) while a slot was idle (the
/// prefetched runs did not cover the round trip), up to
/// [`PREFETCH_GROWTH`] × the configured value; a claim that comes back
/// short (the backlog is drained) drops it back at once. So a short queue
/// keeps the configured prefetch (low latency, runs left for other
/// workers), and slow handlers never grow it (their slots do not wait for
/// the store). A prefetch of 0 stays 0.
#[derive(Debug, Clone, Copy)]
pub(super) struct Prefetch {
    base: usize,
    now: usize,
}

impl Prefetch {
    /// The configured prefetch.
    pub(super) fn new(base: usize) -> Prefetch {
        Prefetch { base, now: base }
    }

    /// Runs in hand at most: handler slots plus the current prefetch.
    pub(super) fn capacity(&self, concurrency: usize) -> usize {
        concurrency + self.now
    }

    /// A claim of `asked` runs returned `got`, made while `in_hand` runs
    /// were held by `concurrency` slots.
    pub(super) fn claimed(&mut self, asked: usize, got: usize, in_hand: usize, concurrency: usize) {
        if got < asked {
            self.now = self.base;
        } else if asked > 0 && in_hand < concurrency {
            self.now = (self.now * 2).min(self.base * PREFETCH_GROWTH);
        }
    }
}

/// What the driver does with a round's attempt ends after the store failed
/// the round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FailedRound {
    /// Keep them and store them again after the backoff.
    StoreAgain,
    /// Answer them with the error: their runs come back after lease expiry.
    GiveUp,
}

/// Only a transient failure (a lost connection, a busy or restarting
/// database) is worth waiting out, and only within the window and while
/// the worker is not exiting. A statement the database rejects fails the
/// same way again: holding its ends for the whole window would only delay
/// their runs and hide the bug.
pub(super) fn on_failed_round(
    transient: bool,
    exiting: bool,
    now: Instant,
    deadline: Instant,
) -> FailedRound {
    if transient && !exiting && now < deadline {
        FailedRound::StoreAgain
    } else {
        FailedRound::GiveUp
    }
}

/// Attempt ends waiting to be stored, kept across failed rounds.
#[derive(Debug)]
pub(super) struct HeldEnds<T> {
    pending: Vec<T>,
    /// When the first of `pending` arrived, if it arrived fresh (not kept
    /// from a failed round): see [`hold_ends`].
    since: Option<Instant>,
    /// Set at the first failed round of a streak: past it, give up.
    hold_until: Option<Instant>,
    backoff: Duration,
}

impl<T> Default for HeldEnds<T> {
    fn default() -> Self {
        HeldEnds {
            pending: Vec::new(),
            since: None,
            hold_until: None,
            backoff: BACKOFF_MIN,
        }
    }
}

impl<T> HeldEnds<T> {
    /// Adds an end that arrived at `at`.
    pub(super) fn push(&mut self, end: T, at: Instant) {
        if self.pending.is_empty() {
            self.since = Some(at);
        }
        self.pending.push(end);
    }

    /// When the first end held arrived (`None` if none, or if the ends
    /// were kept from a failed round).
    pub(super) fn since(&self) -> Option<Instant> {
        self.since
    }

    /// Whether a round may take more from the channel.
    pub(super) fn has_room(&self) -> bool {
        self.pending.len() < MAX_ROUND_ENDS
    }

    /// Whether any end waits.
    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// How many ends wait.
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// The ends that wait, in arrival order.
    pub(super) fn pending(&self) -> &[T] {
        &self.pending
    }

    /// Takes every end for a round.
    pub(super) fn take(&mut self) -> Vec<T> {
        self.since = None;
        std::mem::take(&mut self.pending)
    }

    /// The round stored: the next failure starts a new window and backoff.
    pub(super) fn stored(&mut self) {
        self.hold_until = None;
        self.backoff = BACKOFF_MIN;
    }

    /// The round failed at `now`: keeps `batch` to store again (ahead of
    /// ends that arrived meanwhile), or hands it back to be answered with
    /// the error. Either way, answers how long to wait before the next
    /// round (the backoff doubles, up to a limit).
    pub(super) fn failed(
        &mut self,
        mut batch: Vec<T>,
        transient: bool,
        exiting: bool,
        now: Instant,
    ) -> (Option<Vec<T>>, Duration) {
        let deadline = *self.hold_until.get_or_insert(now + END_RETRY_WINDOW);
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        match on_failed_round(transient, exiting, now, deadline) {
            FailedRound::StoreAgain => {
                batch.append(&mut self.pending);
                self.pending = batch;
                self.since = None;
                (None, wait)
            }
            FailedRound::GiveUp => {
                self.hold_until = None;
                (Some(batch), wait)
            }
        }
    }
}

/// The earliest due run as last read (`Store::next_due`), so that a retry
/// becomes a claim at its eligible time, not at the next poll, also while
/// other attempts are running.
#[derive(Debug, Default)]
pub(super) struct DueTracker {
    due: Option<Timestamp>,
    read_at: Option<Instant>,
    stale: bool,
}

impl DueTracker {
    /// A tracker that reads before its first wait.
    pub(super) fn new() -> DueTracker {
        DueTracker {
            stale: true,
            ..DueTracker::default()
        }
    }

    /// An end was stored: it may have scheduled a retry earlier than the
    /// due time last read.
    pub(super) fn mark_stale(&mut self) {
        self.stale = true;
    }

    /// Whether to read the earliest due run now. It must when idle, stale,
    /// past the time read, or older than a poll interval; and it may at
    /// most every [`DUE_RECHECK`] while runs are in hand (busy turns come
    /// once per batch of ends: a query each would tax the hot path).
    pub(super) fn should_read(
        &self,
        now: Timestamp,
        at: Instant,
        in_hand: usize,
        poll: Duration,
    ) -> bool {
        let since = self.read_at.map(|t| at.saturating_duration_since(t));
        let due_passed = self.due.is_some_and(|d| d <= now);
        let must = in_hand == 0 || self.stale || due_passed || since.is_none_or(|s| s >= poll);
        let may = in_hand == 0 || since.is_none_or(|s| s >= DUE_RECHECK);
        must && may
    }

    /// Records what was read at `at` (`None` after a failed read keeps the
    /// previous answer).
    pub(super) fn read(&mut self, due: Option<Option<Timestamp>>, at: Instant) {
        if let Some(d) = due {
            self.due = d;
        }
        self.read_at = Some(at);
        self.stale = false;
    }

    /// How long an idle driver with free slots sleeps before claiming on
    /// its own (a wake-up or an end comes sooner).
    pub(super) fn idle_wait(
        &self,
        now: Timestamp,
        at: Instant,
        in_hand: usize,
        poll: Duration,
    ) -> Duration {
        let mut wait = match self.due {
            // While attempts run, their ends usually claim the due run
            // first (in the same round trip); the timer only steps in
            // when none comes, so it does not cost a round of its own.
            Some(d) if d > now => {
                let until = Duration::from_millis(d.millis_since(now) as u64);
                poll.min(if in_hand > 0 {
                    until + BUSY_SLACK
                } else {
                    until
                })
            }
            // Due already, yet the claim before this turn did not get
            // it: held back by a concurrency limit (claiming again at
            // once would spin), or due just after that claim.
            Some(_) if in_hand == 0 => poll.min(DUE_BLOCKED_RECHECK),
            _ => poll,
        };
        if self.stale {
            if let Some(t) = self.read_at {
                wait = wait.min(DUE_RECHECK.saturating_sub(at.saturating_duration_since(t)));
            }
        }
        wait.max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use docket_core::{LeaseId, RunId};
    use docket_store::Outcome;

    fn end(now: i64, outcome: Outcome) -> AttemptEnd {
        AttemptEnd {
            run_id: RunId::new(),
            lease_id: LeaseId::new(),
            now: Timestamp(now),
            outcome,
        }
    }

    #[test]
    fn a_keyed_round_claims_at_least_for_its_ends_within_the_capacity() {
        // 3 ends, 4 runs held, concurrency 8, capacity 16: claim 3.
        assert_eq!(keyed_claim_floor(true, 3, 4, 8, 16), Some(3));
        // Only what the capacity leaves.
        assert_eq!(keyed_claim_floor(true, 5, 7, 8, 8), Some(1));
        // Runs in hand for every handler slot: no floor.
        assert_eq!(keyed_claim_floor(true, 5, 8, 8, 16), None);
        // No ends, or no keys: no floor.
        assert_eq!(keyed_claim_floor(true, 0, 0, 8, 16), None);
        assert_eq!(keyed_claim_floor(false, 3, 4, 8, 16), None);
    }

    #[test]
    fn ends_reopen_the_claim_when_they_free_a_key_slot_or_a_run() {
        let now = Timestamp(10);
        let done = end(
            10,
            Outcome::Completed {
                output: serde_json::Value::Null,
            },
        );
        let released = end(10, Outcome::Released);
        let later = end(
            10,
            Outcome::Postponed {
                until: Timestamp(11),
            },
        );
        // No ends: nothing freed.
        assert!(!ends_reopen_claim(true, [], now));
        // Any end of a keyed worker frees its key's slot.
        assert!(ends_reopen_claim(true, [&done], now));
        // Unkeyed: only a run due again by now reopens the claim.
        assert!(!ends_reopen_claim(false, [&done, &later], now));
        assert!(ends_reopen_claim(false, [&done, &released], now));
        assert!(!ends_reopen_claim(false, [&released], Timestamp(9)));
    }

    const POLL: Duration = Duration::from_secs(1);

    #[test]
    fn only_transient_failures_are_waited_out_within_the_window() {
        let now = tokio::time::Instant::now();
        let later = now + END_RETRY_WINDOW;
        assert_eq!(
            on_failed_round(true, false, now, later),
            FailedRound::StoreAgain
        );
        // A bug or bad data: given up at once, not held for 30 s.
        assert_eq!(
            on_failed_round(false, false, now, later),
            FailedRound::GiveUp
        );
        // The window is over, or the worker is exiting.
        assert_eq!(
            on_failed_round(true, false, later, later),
            FailedRound::GiveUp
        );
        assert_eq!(on_failed_round(true, true, now, later), FailedRound::GiveUp);
    }

    #[test]
    fn a_busy_worker_claims_only_once_half_its_capacity_is_free() {
        // concurrency 4, prefetch 4: capacity 8.
        assert_eq!(claim_size(true, true, 0, 4, 8), Some(8));
        assert_eq!(claim_size(true, true, 3, 4, 8), Some(5)); // a slot idle
        assert_eq!(claim_size(true, true, 5, 4, 8), None); // busy, 3 free
        assert_eq!(claim_size(true, true, 4, 4, 8), Some(4)); // half free
        assert_eq!(claim_size(true, true, 8, 4, 8), None); // full
        assert_eq!(claim_size(false, true, 0, 4, 8), None); // draining
        assert_eq!(claim_size(true, false, 0, 4, 8), None); // nothing new
    }

    #[test]
    fn the_prefetch_grows_only_while_full_claims_leave_slots_idle() {
        let mut p = Prefetch::new(8);
        assert_eq!(p.capacity(8), 16);
        // Full claim, slots idle (fast handlers, deep backlog): doubles.
        p.claimed(16, 16, 0, 8);
        assert_eq!(p.capacity(8), 24);
        for _ in 0..10 {
            let cap = p.capacity(8);
            p.claimed(cap, cap, 2, 8);
        }
        assert_eq!(p.capacity(8), 8 + 8 * PREFETCH_GROWTH, "bounded");
        // A short claim (the queue is drained): back to the configured one.
        p.claimed(72, 5, 0, 8);
        assert_eq!(p.capacity(8), 16);
        // Full, but every slot busy (slow handlers): the prefetch covers
        // the round trip, no growth.
        p.claimed(8, 8, 8, 8);
        assert_eq!(p.capacity(8), 16);
        // Prefetching disabled stays disabled.
        let mut off = Prefetch::new(0);
        off.claimed(8, 8, 0, 8);
        assert_eq!(off.capacity(8), 8);
    }

    #[test]
    fn held_ends_are_stored_again_within_the_window_then_given_up() {
        let t0 = Instant::now();
        let mut h = HeldEnds::default();
        h.push(1, t0);
        let batch = h.take();
        h.push(2, t0); // arrived during the failed round
        let (back, wait) = h.failed(batch, true, false, t0);
        assert_eq!((back, wait), (None, BACKOFF_MIN));
        assert_eq!(h.take(), vec![1, 2], "the failed batch goes first");
        // The backoff doubles, up to its limit.
        let (_, w2) = h.failed(vec![1], true, false, t0 + Duration::from_secs(1));
        assert_eq!(w2, BACKOFF_MIN * 2);
        h.take();
        for _ in 0..20 {
            h.failed(Vec::new(), true, false, t0);
        }
        let (_, w) = h.failed(Vec::new(), true, false, t0);
        assert_eq!(w, BACKOFF_MAX);
        // Past the window (from the first failure of the streak): given up.
        let (back, _) = h.failed(vec![3], true, false, t0 + END_RETRY_WINDOW);
        assert_eq!(back, Some(vec![3]));
        assert!(h.is_empty());
        // A stored round resets both.
        h.stored();
        let (_, w) = h.failed(vec![4], true, false, t0 + END_RETRY_WINDOW * 3);
        assert_eq!(w, BACKOFF_MIN);
    }

    #[test]
    fn fresh_ends_wait_briefly_for_a_coming_claim_and_kept_ones_never() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut h = HeldEnds::default();
        assert_eq!(h.since(), None);
        assert_eq!(hold_ends(true, h.since(), t0), None, "nothing held");
        h.push(1, t0);
        h.push(2, t0 + ms(1));
        assert_eq!(h.since(), Some(t0), "the first end's arrival");
        // A claim is coming: wait, from the first end's arrival, at most END_HOLD.
        assert_eq!(hold_ends(true, h.since(), t0), Some(END_HOLD));
        assert_eq!(
            hold_ends(true, h.since(), t0 + ms(1)),
            Some(END_HOLD - ms(1))
        );
        assert_eq!(
            hold_ends(true, h.since(), t0 + END_HOLD),
            None,
            "waited enough"
        );
        // No claim coming (drained backlog, exiting, nothing running): store now.
        assert_eq!(hold_ends(false, h.since(), t0), None);
        // Ends kept from a failed round are late already: never held.
        let batch = h.take();
        assert_eq!(h.since(), None);
        h.push(3, t0 + ms(1));
        h.failed(batch, true, false, t0 + ms(1));
        assert_eq!(h.since(), None);
        assert_eq!(hold_ends(true, h.since(), t0 + ms(1)), None);
        h.push(4, t0 + ms(2));
        assert_eq!(h.since(), None, "joins the kept ones");
        // After a round took them, the next fresh end starts a new wait.
        h.take();
        h.push(5, t0 + ms(3));
        assert_eq!(hold_ends(true, h.since(), t0 + ms(3)), Some(END_HOLD));
    }

    #[test]
    fn a_non_transient_failure_or_an_exit_gives_up_at_once() {
        let t0 = Instant::now();
        let mut h = HeldEnds::default();
        assert_eq!(h.failed(vec![1], false, false, t0).0, Some(vec![1]));
        assert_eq!(h.failed(vec![2], true, true, t0).0, Some(vec![2]));
        assert!(h.is_empty());
    }

    #[test]
    fn the_due_time_is_read_when_idle_stale_or_passed_but_rarely_when_busy() {
        let t0 = Instant::now();
        let now = Timestamp(10_000);
        let mut d = DueTracker::new();
        assert!(d.should_read(now, t0, 3, POLL), "never read yet");
        d.read(Some(Some(Timestamp(20_000))), t0);
        // Busy, fresh, not due: no read.
        assert!(!d.should_read(now, t0 + Duration::from_millis(10), 3, POLL));
        // Idle: always.
        assert!(d.should_read(now, t0 + Duration::from_millis(10), 0, POLL));
        // Stale (an end was stored), busy: only after DUE_RECHECK.
        d.mark_stale();
        assert!(!d.should_read(now, t0 + Duration::from_millis(10), 3, POLL));
        assert!(d.should_read(now, t0 + DUE_RECHECK, 3, POLL));
        // Past the due time read: read again (after DUE_RECHECK when busy).
        let mut d = DueTracker::new();
        d.read(Some(Some(Timestamp(5_000))), t0);
        assert!(d.should_read(now, t0 + DUE_RECHECK, 3, POLL));
        // A failed read keeps the previous answer.
        d.read(None, t0);
        assert_eq!(d.due, Some(Timestamp(5_000)));
    }

    #[test]
    fn an_idle_driver_sleeps_until_the_next_due_run_at_most_a_poll() {
        let t0 = Instant::now();
        let now = Timestamp(10_000);
        let mut d = DueTracker::new();
        d.read(Some(Some(Timestamp(10_300))), t0);
        assert_eq!(d.idle_wait(now, t0, 0, POLL), Duration::from_millis(300));
        // Busy: a little slack for an end to claim it first.
        assert_eq!(
            d.idle_wait(now, t0, 2, POLL),
            Duration::from_millis(300) + BUSY_SLACK
        );
        d.read(Some(Some(Timestamp(99_000))), t0);
        assert_eq!(d.idle_wait(now, t0, 0, POLL), POLL);
        // Due already but not claimed: held back; look again soon, no spin.
        d.read(Some(Some(Timestamp(9_000))), t0);
        assert_eq!(d.idle_wait(now, t0, 0, POLL), DUE_BLOCKED_RECHECK);
        // Nothing due: the poll.
        d.read(Some(None), t0);
        assert_eq!(d.idle_wait(now, t0, 0, POLL), POLL);
        // Stale: read again within DUE_RECHECK of the last read.
        d.mark_stale();
        assert_eq!(
            d.idle_wait(now, t0 + Duration::from_millis(20), 0, POLL),
            DUE_RECHECK - Duration::from_millis(20)
        );
    }
}
