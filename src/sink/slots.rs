//! Per-record outcomes by record number, for clients that confirm records one by one (a
//! JetStream PubAck, a Kafka delivery report): the client's side resolves a number, the
//! record's [`crate::sink::Delivery`] takes its outcome once, and a delivery dropped unread
//! (the driver gave up on it, or shut down) abandons its number so the ones behind it can go.
//!
//! Numbers are handed out in order from 1 by [`Slots::push`]; memory is one small entry per
//! number not yet taken, let go from the front as soon as the oldest is taken.

use std::collections::VecDeque;

/// See the module docs.
#[derive(Debug)]
pub struct Slots<T> {
    /// The number of `states[0]`.
    base: u64,
    states: VecDeque<Slot<T>>,
    pending: usize,
}

#[derive(Debug)]
enum Slot<T> {
    Pending,
    Done(T),
    Taken,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            base: 1,
            states: VecDeque::new(),
            pending: 0,
        }
    }
}

impl<T> Slots<T> {
    /// A new pending number.
    pub fn push(&mut self) -> u64 {
        self.states.push_back(Slot::Pending);
        self.pending += 1;
        self.base + self.states.len() as u64 - 1
    }

    /// The number the next [`Slots::push`] returns.
    pub fn next(&self) -> u64 {
        self.base + self.states.len() as u64
    }

    /// Numbers pushed and not resolved or abandoned yet.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Whether every number up to `n` has an outcome (or was let go).
    pub fn settled_through(&self, n: u64) -> bool {
        let end =
            usize::try_from(n.saturating_add(1).saturating_sub(self.base)).unwrap_or(usize::MAX);
        !self
            .states
            .iter()
            .take(end)
            .any(|s| matches!(s, Slot::Pending))
    }

    /// Give `n` its outcome; false (and `outcome` dropped) when it already had one, was
    /// abandoned, or was never pushed.
    pub fn resolve(&mut self, n: u64, outcome: T) -> bool {
        let Some(slot) = Self::slot(&mut self.states, self.base, n) else {
            return false;
        };
        if !matches!(slot, Slot::Pending) {
            return false;
        }
        *slot = Slot::Done(outcome);
        self.pending -= 1;
        true
    }

    /// Give every pending number below `end` the outcome `outcome()` makes.
    pub fn resolve_pending(&mut self, end: u64, mut outcome: impl FnMut() -> T) {
        let end = usize::try_from(end.saturating_sub(self.base)).unwrap_or(usize::MAX);
        for slot in self.states.iter_mut().take(end) {
            if matches!(slot, Slot::Pending) {
                *slot = Slot::Done(outcome());
                self.pending -= 1;
            }
        }
    }

    /// Mark `n` read without reading it; true if it was still pending (room freed).
    pub fn abandon(&mut self, n: u64) -> bool {
        let Some(slot) = Self::slot(&mut self.states, self.base, n) else {
            return false;
        };
        let was_pending = matches!(slot, Slot::Pending);
        if was_pending {
            self.pending -= 1;
        }
        *slot = Slot::Taken;
        self.pop_taken();
        was_pending
    }

    /// The outcome of `n`, once: `None` while it is pending (or was taken already).
    pub fn take(&mut self, n: u64) -> Option<T> {
        let slot = Self::slot(&mut self.states, self.base, n)?;
        if !matches!(slot, Slot::Done(_)) {
            return None;
        }
        let Slot::Done(outcome) = std::mem::replace(slot, Slot::Taken) else {
            unreachable!("checked above");
        };
        self.pop_taken();
        Some(outcome)
    }

    /// Numbers held in memory (pending, done and not taken, or taken behind an untaken one).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.states.len()
    }

    fn slot(states: &mut VecDeque<Slot<T>>, base: u64, n: u64) -> Option<&mut Slot<T>> {
        let i = usize::try_from(n.checked_sub(base)?).ok()?;
        states.get_mut(i)
    }

    fn pop_taken(&mut self) {
        while matches!(self.states.front(), Some(Slot::Taken)) {
            self.states.pop_front();
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_taken_once_in_any_order_and_memory_follows_the_oldest() {
        let mut s = Slots::<&str>::default();
        let (a, b, c) = (s.push(), s.push(), s.push());
        assert_eq!((a, b, c, s.next(), s.pending()), (1, 2, 3, 4, 3));
        assert!(s.settled_through(0));
        assert!(s.resolve(b, "b"));
        assert!(!s.settled_through(b), "a is pending");
        assert!(!s.resolve(b, "again"), "a second outcome is refused");
        assert_eq!(s.take(a), None, "pending");
        assert_eq!(s.take(b), Some("b"));
        assert_eq!(s.take(b), None, "taken once");
        assert_eq!(s.held(), 3, "b waits behind a");
        assert!(s.resolve(a, "a"));
        assert!(s.settled_through(b) && !s.settled_through(c));
        assert_eq!(s.take(a), Some("a"));
        assert_eq!(s.held(), 1, "a and b let go");
        assert!(s.abandon(c), "c was pending");
        assert_eq!((s.held(), s.pending(), s.next()), (0, 0, 4));
        assert!(
            !s.resolve(c, "late"),
            "an abandoned number takes no outcome"
        );
        assert!(!s.resolve(99, "never pushed"));
        assert_eq!(s.take(0), None);
    }

    #[test]
    fn resolving_the_pending_numbers_below_a_bound_leaves_the_rest_alone() {
        let mut s = Slots::<u8>::default();
        let (a, b, c, d) = (s.push(), s.push(), s.push(), s.push());
        s.resolve(b, 2);
        s.resolve_pending(d, || 0);
        assert_eq!(s.pending(), 1, "d is not below d");
        assert_eq!(
            [s.take(a), s.take(b), s.take(c)],
            [Some(0), Some(2), Some(0)]
        );
        assert_eq!(s.take(d), None);
        s.resolve_pending(u64::MAX, || 9);
        assert_eq!((s.take(d), s.pending(), s.held()), (Some(9), 0, 0));
    }
}
