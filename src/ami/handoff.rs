//! The hand-off queue from connection tasks to one pipeline: a bounded channel of [`Stamped`]
//! records whose receiver tells held-back senders when it has made room.
//!
//! Owns: the queue (a tokio `mpsc` channel; its capacity is the bound, and what does not fit is
//! the sender's to drop, see [`crate::ami::connection`]), the *headroom* (the free slots a read
//! waits for), and the room notification.
//!
//! Must never:
//! - wake anybody on a timer: a sender waiting for room ([`Sender::room`]) is woken only by the
//!   receiver taking records while there is room, or by the receiver going away.
//! - cost the receiver more than a fence and a load per batch while nobody waits: waiters
//!   register in a counter, and the receiver looks at it before it touches the [`Notify`] (whose
//!   `notify_waiters` takes a lock every time).
//! - give slots to a waiter. The channel's semaphore is fair, so a sender waiting in
//!   `reserve_many` would collect every slot freed while it waits, and the other connections
//!   on the queue would find it full and drop records meanwhile. Here every woken sender goes
//!   back to `try_send` on an equal footing with the senders that never waited.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering, fence};

use tokio::sync::{Notify, mpsc};

use super::record::Stamped;

/// Free slots a held-back read waits for (at most half the queue): as many frames as a 64 KiB
/// read can bring if they are 64 bytes or more (AMI events are 300 to 1,500).
pub const HEADROOM: usize = 1024;

/// A bounded hand-off queue of `capacity` records (at least 1).
pub fn channel(capacity: usize) -> (Sender, Receiver) {
    let capacity = capacity.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let room = Arc::new(Room {
        notify: Notify::new(),
        waiting: AtomicUsize::new(0),
        headroom: HEADROOM.min(capacity / 2).max(1),
    });
    (
        Sender {
            tx,
            room: room.clone(),
        },
        Receiver { rx, room },
    )
}

/// Shared by the senders and the receiver of one queue.
#[derive(Debug)]
struct Room {
    notify: Notify,
    /// Senders inside [`Sender::room`].
    waiting: AtomicUsize,
    headroom: usize,
}

/// The receiver is gone: nobody will take records any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed;

/// The sending side; cheap to clone, one per connection.
#[derive(Clone, Debug)]
pub struct Sender {
    tx: mpsc::Sender<Stamped>,
    room: Arc<Room>,
}

impl Sender {
    /// Hand a record on if there is a free slot. Never waits.
    ///
    /// # Errors
    /// `Full` (the record is given back) or `Closed` (the receiver is gone).
    #[allow(
        clippy::result_large_err,
        reason = "the record is given back unboxed: a frame carries the parser's noted header \
                  slots (36 bytes) so normalization needs no second pass, and boxing every \
                  record on the hot path to shrink the error would cost more"
    )]
    pub fn try_send(&self, rec: Stamped) -> Result<(), mpsc::error::TrySendError<Stamped>> {
        self.tx.try_send(rec)
    }

    /// Take a free slot if there is one. Never waits.
    ///
    /// # Errors
    /// `Full` or `Closed`, as [`Sender::try_send`].
    pub fn try_reserve(&self) -> Result<mpsc::Permit<'_, Stamped>, mpsc::error::TrySendError<()>> {
        self.tx.try_reserve()
    }

    /// Wait for one slot (in turn with the other waiters of the channel's fair semaphore).
    /// Only for a record that must go before anything else is read (a `Gap`); a read waits
    /// with [`Sender::room`] instead.
    ///
    /// # Errors
    /// [`Closed`] if the receiver is gone.
    pub async fn reserve_owned(self) -> Result<mpsc::OwnedPermit<Stamped>, Closed> {
        self.tx.reserve_owned().await.map_err(|_| Closed)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// The queue's bound.
    pub fn max_capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    /// The free slots a read waits for: [`HEADROOM`], at most half the queue, at least 1.
    pub fn headroom(&self) -> usize {
        self.room.headroom
    }

    /// At least [`Sender::headroom`] slots are free. Never waits.
    pub fn has_room(&self) -> bool {
        self.tx.capacity() >= self.room.headroom
    }

    /// Wait until [`Sender::has_room`], without a timer: woken only when the receiver takes
    /// records and leaves the headroom free, or goes away. Takes no slot. Cancel-safe.
    ///
    /// # Errors
    /// [`Closed`] if the receiver is gone.
    pub async fn room(&self) -> Result<(), Closed> {
        let _waiting = Waiting::register(&self.room);
        loop {
            // Created before the check: a `notify_waiters` after this line wakes it, even
            // before it is first polled.
            let notified = self.room.notify.notified();
            if self.tx.is_closed() {
                return Err(Closed);
            }
            if self.has_room() {
                return Ok(());
            }
            notified.await;
        }
    }
}

/// A sender inside [`Sender::room`]; counted while it lives.
struct Waiting<'a>(&'a Room);

impl<'a> Waiting<'a> {
    fn register(room: &'a Room) -> Self {
        room.waiting.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `Receiver::made_room`: either the receiver sees this waiter
        // and notifies, or this waiter's check that follows sees the slots it freed.
        fence(Ordering::SeqCst);
        Waiting(room)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The receiving side, one per pipeline. Dropping it wakes every waiting sender.
#[derive(Debug)]
pub struct Receiver {
    rx: mpsc::Receiver<Stamped>,
    room: Arc<Room>,
}

impl Receiver {
    /// The next record; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Stamped> {
        let r = self.rx.recv().await;
        if r.is_some() {
            self.made_room();
        }
        r
    }

    /// Up to `limit` records appended to `buffer`, waiting for at least one; 0 once every
    /// sender is gone and the queue is empty (or if `limit` is 0).
    pub async fn recv_many(&mut self, buffer: &mut Vec<Stamped>, limit: usize) -> usize {
        let n = self.rx.recv_many(buffer, limit).await;
        if n > 0 {
            self.made_room();
        }
        n
    }

    /// The next record if one is queued. Never waits.
    ///
    /// # Errors
    /// `Empty`, or `Disconnected` once every sender is gone and the queue is empty.
    pub fn try_recv(&mut self) -> Result<Stamped, mpsc::error::TryRecvError> {
        let r = self.rx.try_recv();
        if r.is_ok() {
            self.made_room();
        }
        r
    }

    /// After taking records: wake the waiting senders if there is room now. A fence and a
    /// load while nobody waits. (Only the receiver frees slots, so a batch that leaves less
    /// than the headroom free can skip the wake: the batch that frees it will wake them.)
    fn made_room(&self) {
        fence(Ordering::SeqCst);
        if self.room.waiting.load(Ordering::Relaxed) > 0 && self.rx.capacity() >= self.room.headroom
        {
            self.room.notify.notify_waiters();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Closed first, so the woken senders see it.
        self.rx.close();
        self.room.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Poll, Wake, Waker};
    use std::time::Duration;

    use super::*;
    use crate::ami::record::{Record, Stamp};

    fn rec(seq: u64) -> Stamped {
        Stamped {
            stamp: Stamp {
                server: Arc::from("s"),
                epoch: 1,
                seq,
                received_at_ns: 0,
            },
            record: Record::ConnectionDown { reason: "x".into() },
        }
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Count {
        fn get(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn headroom_is_at_most_half_the_queue_and_at_least_one() {
        assert_eq!(channel(1).0.headroom(), 1);
        assert_eq!(channel(0).0.max_capacity(), 1);
        assert_eq!(channel(8).0.headroom(), 4);
        assert_eq!(channel(1 << 20).0.headroom(), HEADROOM);
    }

    #[tokio::test]
    async fn a_waiting_sender_wakes_only_when_the_receiver_makes_room() {
        let (tx, mut rx) = channel(8); // headroom 4
        for seq in 1..=8 {
            tx.try_send(rec(seq)).unwrap();
        }
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut room = pin!(tx.room());
        assert!(room.as_mut().poll(&mut cx).is_pending());
        assert_eq!(rx.room.waiting.load(Ordering::SeqCst), 1);

        // No timer: while the runtime's timer driver runs for a while, the waiter stays asleep.
        // (The poll this replaced would have been woken about 50 times.)
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(count.get(), 0, "woken without a notification");

        // Taking records that leave less than the headroom free does not wake it.
        for seq in 1..=3 {
            assert_eq!(rx.recv().await.unwrap().stamp.seq, seq);
        }
        assert_eq!(count.get(), 0, "woken while there is no room");
        // The batch that frees the headroom does, once.
        let mut batch = Vec::new();
        assert_eq!(rx.recv_many(&mut batch, 2).await, 2);
        assert_eq!(count.get(), 1);
        assert_eq!(room.as_mut().poll(&mut cx), Poll::Ready(Ok(())));
        assert_eq!(rx.room.waiting.load(Ordering::SeqCst), 0);

        // Nobody waits: taking records wakes nobody.
        rx.try_recv().unwrap();
        assert_eq!(count.get(), 1);
    }

    #[tokio::test]
    async fn a_woken_sender_that_finds_the_room_taken_waits_again() {
        let (tx, mut rx) = channel(2); // headroom 1
        tx.try_send(rec(1)).unwrap();
        tx.try_send(rec(2)).unwrap();
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut room = pin!(tx.room());
        assert!(room.as_mut().poll(&mut cx).is_pending());
        rx.recv().await.unwrap();
        assert_eq!(count.get(), 1);
        // A neighbour takes the slot before the waiter runs: no reservation kept it.
        tx.try_send(rec(3)).unwrap();
        assert!(room.as_mut().poll(&mut cx).is_pending());
        rx.recv().await.unwrap();
        assert_eq!(count.get(), 2);
        assert_eq!(room.as_mut().poll(&mut cx), Poll::Ready(Ok(())));
    }

    #[tokio::test]
    async fn dropping_the_receiver_wakes_the_waiters_with_closed() {
        let (tx, rx) = channel(2);
        tx.try_send(rec(1)).unwrap();
        tx.try_send(rec(2)).unwrap();
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut room = pin!(tx.room());
        assert!(room.as_mut().poll(&mut cx).is_pending());
        drop(rx);
        assert_eq!(count.get(), 1);
        assert_eq!(room.as_mut().poll(&mut cx), Poll::Ready(Err(Closed)));
    }
}
