//! Two halves of one task, each with a waker of its own ([`Joined`]): a
//! downstream connection and the upstream connection it drives
//! ([`super::ConnSlot::run`]) wake each other all the time (a request handed
//! over, its answer handed back, body chunks both ways). Each half's waker
//! only marks it, and one poll of the task polls whichever is marked until
//! neither is: a wake-up between the two halves costs no trip through the
//! scheduler.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Which half of a [`Joined`] was woken, and the task to wake.
#[derive(Debug)]
struct Marks {
    serve: AtomicBool,
    drive: AtomicBool,
    /// Set while the task polls the halves: a wake-up then only marks.
    polling: AtomicBool,
    task: AtomicWaker,
}

impl Default for Marks {
    fn default() -> Self {
        Marks {
            serve: AtomicBool::new(true),
            drive: AtomicBool::new(true),
            polling: AtomicBool::new(false),
            task: AtomicWaker::new(),
        }
    }
}

impl Marks {
    fn any(&self) -> bool {
        self.serve.load(SeqCst) || self.drive.load(SeqCst)
    }
}

/// A half's waker: its [`Marks`], seen as another type per half, so that
/// each half's `wake` knows which mark to set without an allocation of its
/// own. Both wakers and the task share one allocation and its count (two
/// allocations fewer per connection than an `Arc` per waker). With one data
/// pointer, `Waker::will_wake` tells the two apart by their vtables, which
/// differ because their `wake`s store to different marks (the test checks).
#[repr(transparent)]
struct Mark<const HALF: bool>(Marks);

const SERVE: bool = true;
const DRIVE: bool = false;

impl<const HALF: bool> Mark<HALF> {
    fn waker(marks: &Arc<Marks>) -> Waker {
        let raw = Arc::into_raw(Arc::clone(marks)).cast::<Mark<HALF>>();
        // SAFETY: `Mark<HALF>` is `repr(transparent)` over `Marks`: the same
        // size and alignment, which is what `Arc::from_raw` asks of a pointer
        // that another type's `Arc::into_raw` gave. The count taken by the
        // clone above is the one the new `Arc` gives back when dropped, and
        // the last one dropped, of whichever type, drops the `Marks`.
        Waker::from(unsafe { Arc::from_raw(raw) })
    }
}

impl<const HALF: bool> Wake for Mark<HALF> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let m = &self.0;
        (if HALF == SERVE { &m.serve } else { &m.drive }).store(true, SeqCst);
        if !m.polling.load(SeqCst) {
            m.task.wake();
        }
    }
}

/// Two halves of one task: `serve`, a future, and `drive`, polled when its
/// own waker (the one its `Context` carries) fired; resolves with `serve`.
/// `serve` is polled first in each round: a request it gives up on is
/// dropped before `drive` can write more of it.
pub(super) struct Joined<F, D> {
    serve: Pin<Box<F>>,
    serve_waker: Waker,
    drive_waker: Waker,
    marks: Arc<Marks>,
    drive: D,
}

impl<F: Future, D: FnMut(&mut Context<'_>)> Joined<F, D> {
    pub(super) fn new(serve: Pin<Box<F>>, drive: D) -> Self {
        let marks = Arc::new(Marks::default());
        Joined {
            serve,
            serve_waker: Mark::<SERVE>::waker(&marks),
            drive_waker: Mark::<DRIVE>::waker(&marks),
            marks,
            drive,
        }
    }
}

/// Most rounds of polling in one poll of the task, so one busy connection
/// cannot starve the others on its thread.
const MAX_ROUNDS: usize = 32;

impl<F: Future, D: FnMut(&mut Context<'_>) + Unpin> Future for Joined<F, D> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let m = &*this.marks;
        m.task.register(cx.waker());
        m.polling.store(true, SeqCst);
        for _ in 0..MAX_ROUNDS {
            // The downstream half first: a request it gives up on (the
            // sidecar's write guard firing, a timeout) is dropped before the
            // upstream half can write more of it, and hyper then closes the
            // upstream connection instead of sending on.
            if m.serve.swap(false, SeqCst) {
                if let Poll::Ready(out) = this.serve.as_mut().poll(&mut Context::from_waker(&this.serve_waker)) {
                    m.polling.store(false, SeqCst);
                    return Poll::Ready(out);
                }
            }
            if m.drive.swap(false, SeqCst) {
                (this.drive)(&mut Context::from_waker(&this.drive_waker));
            }
            if !m.any() {
                // A wake-up from another thread after the check above sees
                // `polling` false and wakes the task; one before it is seen here.
                m.polling.store(false, SeqCst);
                if !m.any() {
                    return Poll::Pending;
                }
                m.polling.store(true, SeqCst);
            }
        }
        m.polling.store(false, SeqCst);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each half's waker sets its own mark, and wakes the task only while
    /// the halves are not being polled; clones and drops of either kind of
    /// waker count on the one `Marks` they share.
    #[test]
    fn each_half_wakes_its_own_mark_through_one_shared_count() {
        struct Task(AtomicBool);
        impl Wake for Task {
            fn wake(self: Arc<Self>) {
                self.0.store(true, SeqCst)
            }
        }
        let task = Arc::new(Task(AtomicBool::new(false)));
        let marks = Arc::new(Marks::default());
        marks.serve.store(false, SeqCst);
        marks.drive.store(false, SeqCst);
        marks.task.register(&Waker::from(task.clone()));
        let (serve, drive) = (Mark::<SERVE>::waker(&marks), Mark::<DRIVE>::waker(&marks));
        assert_eq!(Arc::strong_count(&marks), 3);

        marks.polling.store(true, SeqCst);
        serve.wake_by_ref();
        assert!(marks.serve.load(SeqCst) && !marks.drive.load(SeqCst));
        assert!(!task.0.load(SeqCst), "a wake-up while polling only marks");

        // Told apart by their vtables alone now that they share one pointer:
        // a waker slot (tokio's, hyper's) that took one for the other would
        // mark the wrong half.
        assert!(!serve.will_wake(&drive) && !drive.will_wake(&serve));

        marks.polling.store(false, SeqCst);
        marks.serve.store(false, SeqCst);
        let drive2 = drive.clone();
        assert_eq!(Arc::strong_count(&marks), 4);
        drive2.wake();
        assert_eq!(Arc::strong_count(&marks), 3);
        assert!(marks.drive.load(SeqCst) && !marks.serve.load(SeqCst));
        assert!(task.0.load(SeqCst), "a wake-up between polls wakes the task");

        drop((serve, drive));
        assert_eq!(Arc::strong_count(&marks), 1);
    }
}
