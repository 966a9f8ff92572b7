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
    waiters: RefCell<Vec<(u64, Waker)>>,
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
            waiters.retain(|(target, w)| {
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
        all.into_iter().for_each(|(_, w)| w.wake());
    }

    /// Resolves once the mark is at least `target`.
    pub fn wait_for(&self, target: u64) -> WaitFor {
        WaitFor {
            mark: self.clone(),
            target,
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
}

impl Future for WaitFor {
    type Output = Result<u64, WaitFailed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &self.mark.inner;
        let value = inner.value.get();
        if value >= self.target {
            return Poll::Ready(Ok(value));
        }
        if let Some(f) = inner.failed.borrow().as_ref() {
            return Poll::Ready(Err(f.clone()));
        }
        let mut waiters = inner.waiters.borrow_mut();
        // Re-polls replace the stale waker instead of growing the list.
        let me = self.target;
        if let Some(slot) = waiters
            .iter_mut()
            .find(|(t, w)| *t == me && w.will_wake(cx.waker()))
        {
            slot.1 = cx.waker().clone();
        } else {
            waiters.push((me, cx.waker().clone()));
            drop(waiters);
            if let Some(d) = inner.demand.borrow_mut().take() {
                d.wake();
            }
        }
        Poll::Pending
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
}
