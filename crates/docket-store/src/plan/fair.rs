//! Tenant fairness: how one claim shares its slots among the tenants that
//! have claimable runs, so that one tenant's backlog cannot delay another
//! tenant's run by more than a bounded number of claims.
//!
//! A claim reads the tenants with claimable (unkeyed) runs by a skip scan
//! of `runs_claim`, whose leading column is the tenant: one index probe per
//! tenant, however many runs each holds. It visits at most
//! [`MAX_TENANTS_PER_CLAIM`] of them, starting with the first after the
//! previous claim's cursor and wrapping around ([`visit`]). A [`Dealer`]
//! then says what to claim, one tenant at a time, as the claims answer:
//!
//! 1. round-robin shares: the first `min(limit, tenants)` visited tenants
//!    get an equal share of the slots (the first ones one more when the
//!    limit does not divide);
//! 2. slots a tenant could not use (it had fewer due runs than its share:
//!    its runs are scheduled later, belong to jobs this claimer does not
//!    run, or are paused) go to the next visited tenants not yet asked, in
//!    order;
//! 3. what is still left goes to the tenants that filled their share, in
//!    order. Fairness never leaves a slot idle while a visited tenant has
//!    due runs.
//!
//! The next claim starts after the last tenant asked in steps 1–2
//! ([`Dealer::cursor`]). So a tenant with one due run waits for at most
//! `ceil(tenants / min(limit, MAX_TENANTS_PER_CLAIM))` claims of any one
//! claimer, whatever the other tenants' backlogs. Priority orders runs
//! within a tenant, not across tenants. Keyed runs (concurrency keys) are
//! claimed before this by their keys' own order (`plan::concurrency`).

use std::collections::VecDeque;

/// The most tenants one claim reads and serves: bounds a claim's index
/// probes (and, at worst, its claim statements) when a database holds
/// thousands of tenants.
pub const MAX_TENANTS_PER_CLAIM: usize = 64;

/// The tenants a claim visits, in order: `after` (tenants sorted after the
/// cursor, as read) then `wrapped` (from the start, as read), without
/// repeats, at most [`MAX_TENANTS_PER_CLAIM`].
pub fn visit(after: Vec<String>, wrapped: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in after.into_iter().chain(wrapped) {
        if out.len() == MAX_TENANTS_PER_CLAIM {
            break;
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// Each of the first `min(limit, tenants)` tenants' round-robin share of
/// `limit` slots, in visiting order.
pub fn shares(tenants: &[String], limit: usize) -> Vec<(String, usize)> {
    let served = tenants.len().min(limit);
    if served == 0 {
        return Vec::new();
    }
    let (each, extra) = (limit / served, limit % served);
    tenants[..served]
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), each + usize::from(i < extra)))
        .collect()
}

/// Deals one claim's slots among the visited tenants (the module's steps
/// 1–3): ask [`Dealer::next`] what to claim, claim it, report how many
/// runs came back with [`Dealer::got`], until `next` says `None`.
#[derive(Debug)]
pub struct Dealer {
    /// Step 1's asks, then step 2's tenants, in order.
    ahead: VecDeque<(String, Option<usize>)>,
    /// Tenants that filled what they were asked, for step 3.
    full: VecDeque<String>,
    /// Slots not yet filled.
    left: usize,
    /// The last tenant asked in steps 1–2.
    last: Option<String>,
    /// The ask awaiting its answer.
    asked: Option<(String, usize)>,
}

impl Dealer {
    /// A dealer of `limit` slots over `tenants` (in visiting order).
    pub fn new(tenants: &[String], limit: usize) -> Dealer {
        let first = shares(tenants, limit);
        let mut ahead: VecDeque<(String, Option<usize>)> =
            first.iter().map(|(t, n)| (t.clone(), Some(*n))).collect();
        ahead.extend(tenants[first.len()..].iter().map(|t| (t.clone(), None)));
        Dealer {
            ahead,
            full: VecDeque::new(),
            left: if tenants.is_empty() { 0 } else { limit },
            last: None,
            asked: None,
        }
    }

    /// What to claim next: a tenant and at most how many of its runs.
    pub fn ask(&mut self) -> Option<(String, usize)> {
        debug_assert!(self.asked.is_none(), "each ask is answered before the next");
        if self.left == 0 {
            return None;
        }
        let ask = if let Some((t, share)) = self.ahead.pop_front() {
            // A step-1 share, capped by what is left; a step-2 tenant gets
            // what is left (there are no step-1 shares after it).
            self.last = Some(t.clone());
            let n = share.map_or(self.left, |s| s.min(self.left));
            (t, n)
        } else {
            (self.full.pop_front()?, self.left)
        };
        self.asked = Some(ask.clone());
        Some(ask)
    }

    /// The answer to the last ask: `n` runs were claimed.
    pub fn got(&mut self, n: usize) {
        let (t, asked) = self.asked.take().expect("an ask to answer");
        debug_assert!(n <= asked && n <= self.left);
        self.left -= n.min(self.left);
        if n == asked && n > 0 {
            self.full.push_back(t);
        }
    }

    /// Where the next claim starts: after the last tenant asked in steps
    /// 1–2 (`cursor` when none was).
    pub fn cursor(&self, cursor: Option<String>) -> Option<String> {
        self.last.clone().or(cursor)
    }
}

/// Where a store's next claim starts its visit of the tenants: one per
/// store (per process), kept in memory. Only a hint: losing it (a restart)
/// restarts the rotation from the first tenant.
#[derive(Debug, Default)]
pub struct Cursor(std::sync::Mutex<Option<String>>);

impl Cursor {
    /// The tenant the previous claim served last.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Moves the cursor past `tenant`, the only one a claim visited.
    pub fn served(&self, tenant: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tenant.to_string());
    }

    /// Moves the cursor past the tenants `dealer` asked.
    pub fn advance(&self, dealer: &Dealer) {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *c = dealer.cursor(c.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Runs a dealer against tenants with `due[t]` claimable runs each;
    /// returns the asks in order and the runs each tenant got.
    fn deal(tenants: &[(&str, usize)], limit: usize) -> (Vec<(String, usize)>, Vec<usize>, Dealer) {
        let names: Vec<String> = tenants.iter().map(|(t, _)| t.to_string()).collect();
        let mut due: Vec<usize> = tenants.iter().map(|(_, n)| *n).collect();
        let mut got = vec![0; tenants.len()];
        let mut d = Dealer::new(&names, limit);
        let mut asks = Vec::new();
        while let Some((t, n)) = d.ask() {
            let i = names.iter().position(|x| *x == t).unwrap();
            let k = n.min(due[i]);
            due[i] -= k;
            got[i] += k;
            asks.push((t, n));
            d.got(k);
        }
        (asks, got, d)
    }

    #[test]
    fn one_tenant_takes_the_whole_limit_in_one_ask() {
        let (asks, got, _) = deal(&[("a", 100)], 8);
        assert_eq!(asks, vec![("a".to_string(), 8)]);
        assert_eq!(got, [8]);
    }

    #[test]
    fn slots_are_dealt_round_robin() {
        assert_eq!(
            shares(&names(&["a", "b", "c"]), 8),
            vec![
                ("a".to_string(), 3),
                ("b".to_string(), 3),
                ("c".to_string(), 2)
            ]
        );
        let (_, got, d) = deal(&[("a", 100), ("b", 100), ("c", 100)], 8);
        assert_eq!(got, [3, 3, 2]);
        assert_eq!(d.cursor(None), Some("c".to_string()));
    }

    #[test]
    fn fewer_slots_than_tenants_serve_the_first_and_move_the_cursor() {
        let (_, got, d) = deal(&[("a", 5), ("b", 5), ("c", 5)], 2);
        assert_eq!(got, [1, 1, 0]);
        assert_eq!(d.cursor(None), Some("b".to_string()));
    }

    #[test]
    fn a_tenant_with_nothing_due_passes_its_slot_on() {
        // Limit 1, the first visited tenant has only runs due later: the
        // slot goes to the next tenant, and the cursor moves past both.
        let (asks, got, d) = deal(&[("g", 0), ("a", 3)], 1);
        assert_eq!(got, [0, 1]);
        assert_eq!(asks.len(), 2);
        assert_eq!(d.cursor(None), Some("a".to_string()));
    }

    #[test]
    fn unused_slots_go_to_the_tenants_that_filled_their_share() {
        // a has a backlog, b one due run: b's unused slots go to a.
        let (asks, got, _) = deal(&[("a", 100), ("b", 1)], 8);
        assert_eq!(got, [7, 1]);
        assert_eq!(
            asks,
            vec![
                ("a".to_string(), 4),
                ("b".to_string(), 4),
                ("a".to_string(), 3)
            ]
        );
    }

    #[test]
    fn the_visit_wraps_after_the_cursor_without_repeats() {
        assert_eq!(
            visit(names(&["c", "d"]), names(&["a", "b", "c", "d"])),
            names(&["c", "d", "a", "b"])
        );
        assert_eq!(visit(Vec::new(), names(&["a"])), names(&["a"]));
        let many: Vec<String> = (0..100).map(|i| format!("t{i:03}")).collect();
        assert_eq!(visit(many.clone(), many).len(), MAX_TENANTS_PER_CLAIM);
    }

    #[test]
    fn nothing_to_deal() {
        assert_eq!(deal(&[], 8).0, Vec::<(String, usize)>::new());
        assert_eq!(deal(&[("a", 3)], 0).0, Vec::<(String, usize)>::new());
    }

    proptest! {
        /// Every slot is filled while any visited tenant has due runs; no
        /// tenant is asked twice in steps 1-2; a tenant with due runs among
        /// the first `limit` visited gets at least one.
        #[test]
        fn the_dealer_fills_every_slot_it_can(
            due in proptest::collection::vec(0usize..20, 0..80),
            limit in 0usize..40,
        ) {
            let tenants: Vec<(String, usize)> =
                due.iter().enumerate().map(|(i, n)| (format!("t{i:03}"), *n)).collect();
            let refs: Vec<(&str, usize)> = tenants.iter().map(|(t, n)| (t.as_str(), *n)).collect();
            let (asks, got, _) = deal(&refs, limit);
            let total: usize = got.iter().sum();
            let available: usize = due.iter().sum();
            prop_assert_eq!(total, limit.min(available));
            prop_assert!(asks.len() <= tenants.len() * 2);
            for (i, n) in due.iter().enumerate().take(limit) {
                if *n > 0 {
                    prop_assert!(got[i] >= 1, "tenant {} was skipped", i);
                }
            }
        }

        /// Claim after claim with one slot each, every one of `n` tenants
        /// with due runs is served within `n` claims (the bound, limit 1).
        #[test]
        fn rotation_serves_every_tenant_within_n_claims(n in 1usize..200) {
            let tenants: Vec<String> = (0..n).map(|i| format!("t{i:03}")).collect();
            let mut cursor: Option<String> = None;
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..n {
                let after: Vec<String> = tenants
                    .iter()
                    .filter(|t| cursor.as_ref().is_none_or(|c| *t > c))
                    .take(MAX_TENANTS_PER_CLAIM)
                    .cloned()
                    .collect();
                let wrapped: Vec<String> =
                    tenants.iter().take(MAX_TENANTS_PER_CLAIM).cloned().collect();
                let mut d = Dealer::new(&visit(after, wrapped), 1);
                while let Some((t, k)) = d.ask() {
                    seen.insert(t);
                    d.got(k);
                }
                cursor = d.cursor(cursor);
            }
            prop_assert_eq!(seen.len(), n);
        }
    }
}
