//! A future polled only when its own waker has fired.
//!
//! A connection task waits on a few rare events beside its connection (the
//! idle and header timeouts, the drain at shutdown, the end of the shutdown
//! grace). In a plain `select!` each of them is polled on every wake-up of
//! the task, that is several times per request, and the two shutdown signals
//! take a mutex shared by every connection on every such poll (about 2.5% of
//! a hop's instructions). Behind a [`Gated`], a wake-up of the connection
//! costs one flag and the waker's registration; the events' futures are
//! polled when one of them has been woken.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pin_project_lite::pin_project! {
    /// `fut`, polled on the first poll and then only after its waker fired.
    pub struct Gated<F> {
        #[pin]
        fut: F,
        mark: Arc<Mark>,
        waker: Waker,
    }
}

/// Set by the inner future's waker; wakes the task that polls the gate.
#[derive(Debug)]
struct Mark {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Mark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::SeqCst);
        self.task.wake();
    }
}

impl<F: Future> Gated<F> {
    pub fn new(fut: F) -> Self {
        let mark = Arc::new(Mark { fired: AtomicBool::new(true), task: AtomicWaker::new() });
        Gated { fut, waker: Waker::from(mark.clone()), mark }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake-up before this sees the
        // flag set, one after it wakes the task.
        this.mark.task.register(cx.waker());
        if !this.mark.fired.swap(false, Ordering::SeqCst) {
            return Poll::Pending;
        }
        this.fut.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set (and its waker woken).
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn polled_once_then_only_when_woken_and_the_task_is_woken_then() {
        let (polls, ready, waker) = Default::default();
        let probe = Probe { polls: Arc::clone(&polls), ready: Arc::clone(&ready), waker: Arc::clone(&waker) };
        let mut gate = Box::pin(Gated::new(probe));
        let task_woken = Arc::new(AtomicUsize::new(0));
        struct Count(Arc<AtomicUsize>);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let task = Waker::from(Arc::new(Count(task_woken.clone())));
        let mut cx = Context::from_waker(&task);
        assert!(gate.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "the first poll registers the inner future");
        for _ in 0..5 {
            assert!(gate.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "not polled again until woken");
        ready.store(true, Ordering::SeqCst);
        waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task_woken.load(Ordering::SeqCst), 1, "its wake-up wakes the task");
        assert!(gate.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
