//! The idempotency memory: which request ids ran (or are running), and their results.
//!
//! Owns: [`Dedupe`], keyed by `(server, request_id)`. A request is `InFlight` from the moment
//! it is accepted until its result is known; a duplicate arriving meanwhile joins it as a
//! waiter and is answered with the same result. A finished result is kept for `window` and
//! replayed to later duplicates.
//!
//! Must never: grow without bound. Finished entries are dropped oldest first once older than
//! the window, or past `capacity` entries, or past `max_bytes` of results (each counted
//! in `evicted`). In-flight entries are bounded by the controller's in-flight limit, not here.
//! The memory itself is per process; what must survive a restart is put back from the journal
//! ([`Dedupe::restore`], see `control::journal`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Key = (String, String);

enum Slot<R, W> {
    InFlight(Vec<W>),
    Done {
        result: Arc<R>,
        generation: u64,
        bytes: usize,
    },
}

/// What [`Dedupe::begin`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Begin<R, W> {
    /// First sighting: run it, then call [`Dedupe::finish`].
    New,
    /// Already running; the waiter was added and will be handed back by `finish`.
    Joined,
    /// Already done within the window: answer the waiter (handed back) with this result.
    Done(Arc<R>, W),
}

/// See the module docs. `R` is the result, `W` a waiter (where to answer).
pub struct Dedupe<R, W> {
    window: Duration,
    capacity: usize,
    max_bytes: usize,
    map: HashMap<Key, Slot<R, W>>,
    /// Finished entries in finishing order: (finished at, key, generation).
    order: VecDeque<(Instant, Key, u64)>,
    generation: u64,
    done: usize,
    bytes: usize,
    evicted: u64,
}

impl<R, W> Dedupe<R, W> {
    pub fn new(window: Duration, capacity: usize, max_bytes: usize) -> Self {
        Dedupe {
            window,
            capacity: capacity.max(1),
            max_bytes,
            map: HashMap::new(),
            order: VecDeque::new(),
            generation: 0,
            done: 0,
            bytes: 0,
            evicted: 0,
        }
    }

    /// Record a sighting of `(server, id)`; `waiter` is kept if it is in flight.
    pub fn begin(&mut self, server: &str, id: &str, waiter: W, now: Instant) -> Begin<R, W> {
        self.expire(now);
        let key = (server.to_owned(), id.to_owned());
        match self.map.get_mut(&key) {
            Some(Slot::InFlight(waiters)) => {
                waiters.push(waiter);
                Begin::Joined
            }
            Some(Slot::Done { result, .. }) => Begin::Done(result.clone(), waiter),
            None => {
                self.map.insert(key, Slot::InFlight(vec![waiter]));
                Begin::New
            }
        }
    }

    /// The request finished: hand back every waiter (the first sighting's included). With
    /// `Some(result)` the result is remembered for the window; with `None` the id is forgotten
    /// (nothing ran, so a retry may run).
    pub fn finish(
        &mut self,
        server: &str,
        id: &str,
        result: Option<(Arc<R>, usize)>,
        now: Instant,
    ) -> Vec<W> {
        let key = (server.to_owned(), id.to_owned());
        let waiters = match self.map.remove(&key) {
            Some(Slot::InFlight(w)) => w,
            Some(done @ Slot::Done { .. }) => {
                self.map.insert(key, done);
                return Vec::new();
            }
            None => Vec::new(),
        };
        if let Some((result, bytes)) = result {
            self.generation += 1;
            self.order.push_back((now, key.clone(), self.generation));
            self.map.insert(
                key,
                Slot::Done {
                    result,
                    generation: self.generation,
                    bytes,
                },
            );
            self.done += 1;
            self.bytes += bytes;
        }
        self.expire(now);
        waiters
    }

    /// Remember a result that finished at `at` (read back from the journal at start). Call it
    /// in ascending `at` order, before any other use, so the memory keeps its finishing order.
    pub fn restore(&mut self, server: &str, id: &str, result: Arc<R>, bytes: usize, at: Instant) {
        self.map
            .entry((server.to_owned(), id.to_owned()))
            .or_insert_with(|| Slot::InFlight(Vec::new()));
        self.finish(server, id, Some((result, bytes)), at);
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.order.front() {
            let old = now.saturating_duration_since(*at) > self.window;
            let full = self.done > self.capacity || self.bytes > self.max_bytes;
            if !old && !full {
                break;
            }
            let Some((_, key, generation)) = self.order.pop_front() else {
                break;
            };
            if let Some(Slot::Done {
                generation: g,
                bytes,
                ..
            }) = self.map.get(&key)
                && *g == generation
            {
                self.done -= 1;
                self.bytes -= *bytes;
                self.map.remove(&key);
                if !old {
                    self.evicted += 1;
                }
            }
        }
    }

    /// Finished results remembered.
    pub fn len_done(&self) -> usize {
        self.done
    }

    /// Requests in flight.
    pub fn len_in_flight(&self) -> usize {
        self.map.len() - self.done
    }

    /// Results dropped before their window ended, to stay within the bounds.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_joins_while_running_and_replays_after() {
        let t0 = Instant::now();
        let mut d: Dedupe<&str, u32> = Dedupe::new(Duration::from_secs(60), 10, 1 << 20);
        assert_eq!(d.begin("pbx1", "a", 1, t0), Begin::New);
        assert_eq!(d.begin("pbx1", "a", 2, t0), Begin::Joined);
        assert_eq!(
            d.begin("pbx2", "a", 3, t0),
            Begin::New,
            "ids are per server"
        );
        assert_eq!(d.len_in_flight(), 2);
        let w = d.finish("pbx1", "a", Some((Arc::new("ok"), 10)), t0);
        assert_eq!(w, vec![1, 2]);
        assert_eq!(d.begin("pbx1", "a", 4, t0), Begin::Done(Arc::new("ok"), 4));
        assert_eq!(d.len_done(), 1);
    }

    #[test]
    fn forgetting_lets_a_retry_run() {
        let t0 = Instant::now();
        let mut d: Dedupe<&str, u32> = Dedupe::new(Duration::from_secs(60), 10, 1 << 20);
        d.begin("s", "a", 1, t0);
        assert_eq!(d.finish("s", "a", None, t0), vec![1]);
        assert_eq!(d.begin("s", "a", 2, t0), Begin::New);
    }

    #[test]
    fn results_expire_after_the_window() {
        let t0 = Instant::now();
        let mut d: Dedupe<&str, u32> = Dedupe::new(Duration::from_secs(60), 10, 1 << 20);
        d.begin("s", "a", 1, t0);
        d.finish("s", "a", Some((Arc::new("ok"), 1)), t0);
        let later = t0 + Duration::from_secs(59);
        assert!(matches!(d.begin("s", "a", 2, later), Begin::Done(..)));
        let much_later = t0 + Duration::from_secs(61);
        assert_eq!(d.begin("s", "a", 3, much_later), Begin::New);
        assert_eq!(d.evicted(), 0);
    }

    #[test]
    fn a_restored_result_replays_and_ages_from_when_it_finished() {
        let t0 = Instant::now();
        let mut d: Dedupe<&str, u32> = Dedupe::new(Duration::from_secs(60), 10, 1 << 20);
        d.restore("s", "a", Arc::new("earlier"), 1, t0);
        assert_eq!(
            d.begin("s", "a", 1, t0),
            Begin::Done(Arc::new("earlier"), 1)
        );
        assert_eq!(
            d.begin("s", "a", 2, t0 + Duration::from_secs(61)),
            Begin::New
        );
    }

    #[test]
    fn memory_is_bounded_by_count_and_bytes() {
        let t0 = Instant::now();
        let mut d: Dedupe<u32, ()> = Dedupe::new(Duration::from_secs(3600), 100, 1000);
        for i in 0..10_000u32 {
            let id = i.to_string();
            d.begin("s", &id, (), t0);
            d.finish("s", &id, Some((Arc::new(i), 5)), t0);
            assert!(d.len_done() <= 100);
        }
        assert_eq!(d.len_done(), 100);
        assert_eq!(d.evicted(), 9_900);
        // The newest are kept.
        assert!(matches!(d.begin("s", "9999", (), t0), Begin::Done(..)));
        assert_eq!(d.begin("s", "0", (), t0), Begin::New);
        let mut d: Dedupe<u32, ()> = Dedupe::new(Duration::from_secs(3600), 100, 1000);
        for i in 0..50u32 {
            let id = i.to_string();
            d.begin("s", &id, (), t0);
            d.finish("s", &id, Some((Arc::new(i), 100)), t0);
        }
        assert_eq!(d.len_done(), 10, "1000 bytes hold ten results of 100");
    }
}
