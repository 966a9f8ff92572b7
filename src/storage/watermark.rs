//! A monotonically advancing `u64` that tasks can wait on, without any runtime.
//!
//! Partitions publish their written and durable offsets through watermarks; a
//! producer waiting for its acknowledgement awaits `wait_for(last_offset + 1)`. The
//! futures are plain `std::task` futures, so they work under glommio, under a
//! `block_on`, or in a deterministic test. Single-threaded by design (`Rc`): one
//! core owns a partition and everything waiting on it.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Why a wait ended without reaching its target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WaitFailed(pub Rc<str>);

#[derive(Debug, Default)]
struct Inner {
    value: Cell<u64>,
    failed: RefCell<Option<WaitFailed>>,
    /// `(id, target, waker)` of every pending [`WaitFor`]; a future removes its own
    /// entry when dropped, so the count is exactly the waits in progress.
    waiters: RefCell<Vec<(u64, u64, Waker)>>,
    next_id: Cell<u64>,
    /// Woken when a waiter registers (see [`Watermark::wait_for_waiters`]).
    demand: RefCell<Option<Waker>>,
}

/// Cloning shares the same watermark.
#[derive(Debug, Clone, Default)]
pub struct Watermark {
    inner: Rc<Inner>,
}

impl Watermark {
    pub fn new(value: u64) -> Watermark {
        let w = Watermark::default();
        w.inner.value.set(value);
        w
    }

    pub fn get(&self) -> u64 {
        self.inner.value.get()
    }

    /// Advances the mark and wakes every waiter whose target is now reached.
    /// Panics if `value` goes backwards: watermarks only advance.
    pub fn advance(&self, value: u64) {
        let old = self.inner.value.get();
        assert!(value >= old, "watermark moved back from {old} to {value}");
        if value == old {
            return;
        }
        self.inner.value.set(value);
        let ready: Vec<Waker> = {
            let mut waiters = self.inner.waiters.borrow_mut();
            let mut ready = Vec::new();
            waiters.retain(|(_, target, w)| {
                if *target <= value {
                    ready.push(w.clone());
                    false
                } else {
                    true
                }
            });
            ready
        };
        ready.into_iter().for_each(Waker::wake);
    }

    /// Fails every current and future wait that is not already satisfied.
    pub fn fail(&self, reason: WaitFailed) {
        *self.inner.failed.borrow_mut() = Some(reason);
        let all: Vec<_> = self.inner.waiters.borrow_mut().drain(..).collect();
        all.into_iter().for_each(|(_, _, w)| w.wake());
    }

    /// Resolves once the mark is at least `target`.
    pub fn wait_for(&self, target: u64) -> WaitFor {
        WaitFor {
            mark: self.clone(),
            target,
            id: None,
        }
    }

    /// Number of registered waiters (for tests and metrics).
    pub fn waiter_count(&self) -> usize {
        self.inner.waiters.borrow().len()
    }

    /// Resolves once somebody waits on this mark: lets a driver do work (an
    /// fdatasync) only when a waiter needs it. One driver at a time.
    pub fn wait_for_waiters(&self) -> WaitForWaiters {
        WaitForWaiters { mark: self.clone() }
    }
}

/// The future returned by [`Watermark::wait_for_waiters`].
#[derive(Debug)]
pub struct WaitForWaiters {
    mark: Watermark,
}

impl Future for WaitForWaiters {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &self.mark.inner;
        if !inner.waiters.borrow().is_empty() {
            return Poll::Ready(());
        }
        *inner.demand.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// The future returned by [`Watermark::wait_for`].
#[derive(Debug)]
pub struct WaitFor {
    mark: Watermark,
    target: u64,
    /// Our entry in the waiter list, once registered.
    id: Option<u64>,
}

impl Future for WaitFor {
    type Output = Result<u64, WaitFailed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let inner = &this.mark.inner;
        let value = inner.value.get();
        if value >= this.target {
            return Poll::Ready(Ok(value));
        }
        if let Some(f) = inner.failed.borrow().as_ref() {
            return Poll::Ready(Err(f.clone()));
        }
        let mut waiters = inner.waiters.borrow_mut();
        // Re-polls replace the stale waker instead of growing the list.
        if let Some(slot) = this
            .id
            .and_then(|id| waiters.iter_mut().find(|(i, _, _)| *i == id))
        {
            slot.2 = cx.waker().clone();
        } else {
            let id = inner.next_id.get();
            inner.next_id.set(id + 1);
            waiters.push((id, this.target, cx.waker().clone()));
            this.id = Some(id);
            drop(waiters);
            if let Some(d) = inner.demand.borrow_mut().take() {
                d.wake();
            }
        }
        Poll::Pending
    }
}

impl Drop for WaitFor {
    fn drop(&mut self) {
        // A wait given up (the loser of a select, a cancelled request) must not
        // count as a waiter: the syncer reads the count as demand for an fdatasync.
        if let Some(id) = self.id {
            self.mark
                .inner
                .waiters
                .borrow_mut()
                .retain(|(i, _, _)| *i != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future;

    #[test]
    fn waiters_wake_in_order_of_targets() {
        let w = Watermark::new(0);
        let mut a = Box::pin(w.wait_for(5));
        let mut b = Box::pin(w.wait_for(10));
        assert!(future::block_on(future::poll_once(&mut a)).is_none());
        assert!(future::block_on(future::poll_once(&mut b)).is_none());
        assert_eq!(w.waiter_count(), 2);
        w.advance(7);
        assert_eq!(future::block_on(future::poll_once(&mut a)), Some(Ok(7)));
        assert!(future::block_on(future::poll_once(&mut b)).is_none());
        w.fail(WaitFailed("disk gone".into()));
        assert!(matches!(
            future::block_on(future::poll_once(&mut b)),
            Some(Err(_))
        ));
    }

    #[test]
    fn an_abandoned_wait_is_no_longer_a_waiter() {
        let w = Watermark::new(0);
        let mut a = Box::pin(w.wait_for(5));
        let mut b = Box::pin(w.wait_for(6));
        assert!(future::block_on(future::poll_once(&mut a)).is_none());
        assert!(future::block_on(future::poll_once(&mut a)).is_none());
        assert!(future::block_on(future::poll_once(&mut b)).is_none());
        assert_eq!(w.waiter_count(), 2, "a re-poll does not add an entry");
        drop(a);
        assert_eq!(w.waiter_count(), 1, "a dropped wait leaves the list");
        w.advance(6);
        assert_eq!(future::block_on(future::poll_once(&mut b)), Some(Ok(6)));
        assert_eq!(w.waiter_count(), 0);
    }
}
