//! A forwarded write's answer, which holds the write's permit until the
//! answer has ended.
//!
//! Some stores send a write's status line before they have applied it: AWS
//! S3 and MinIO answer CompleteMultipartUpload and CopyObject with `200 OK`
//! at once, send whitespace while they work (minutes, for a big object), and
//! put the outcome in the body. A permit released at the head let a newer
//! holder's write go while the older one was still being applied, and the
//! older one landed last. So the permit is released when the answer's body
//! ends (at once: the store has answered), or after `abort_grace` when it
//! fails before its end. An answer whose client goes away first (or is
//! closed by `--send-timeout`) is read on to its end by a task of its own,
//! on its upstream connection taken out of the client's ([`orphan`]): the
//! store is still at work on the write, and a close would not stop S3.
//!
//! The barrier does not abort a write whose answer has begun (nor one sent
//! whole: `route`): the store has the whole request and is working on it,
//! and S3 goes on when its client is gone, so cutting the answer off would
//! only end the wait, and let the newer write go before the older one is
//! applied. The newer holder waits for the end instead (503
//! `fencing_barrier_timeout` with `Retry-After` past `--max-wait`). A
//! replica that self-fences still cuts its answers off (`shared::cutoff`):
//! the other replicas stop waiting for it at its registration's expiry
//! whatever it does, and a store that stops on a close then stops.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::admission::Permit;
use super::error::FilterError;
use super::shared::Shared;
use super::{orphan, Filter};
use crate::proxy::{self, BoxError, UpstreamError};
use crate::token::LockName;

/// A replica's cut-off, watched while an answer streams.
type CutOff = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A write's answer holding its [`Permit`]; see the module docs.
pub struct Held {
    /// `None` only once dropped (handed to [`orphan::read_on`]).
    inner: Option<Incoming>,
    /// `None` once released (the answer ended, or was cut off).
    permit: Option<Permit>,
    filter: Arc<Filter>,
    /// The replica cut-off generation the write was forwarded under (shared
    /// marks only).
    cut: Option<u64>,
    /// The cut-off, made on the first wait: most answers (a PUT's `201`
    /// with an empty body) end without one, and allocate nothing for it.
    stop: Option<CutOff>,
    /// `--upstream-timeout` between two parts of the answer, armed on the
    /// first wait: a store that hangs after its head would otherwise hold
    /// the lock for as long as its connection stays open.
    quiet: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Held {
    pub(super) fn new(inner: Incoming, permit: Permit, filter: Arc<Filter>, cut: Option<u64>) -> Self {
        Held { inner: Some(inner), permit: Some(permit), filter, cut, stop: None, quiet: None }
    }

    fn cut_off_future(shared: Arc<Shared>, cut: u64) -> CutOff {
        Box::pin(async move { shared.cut_off(cut).await })
    }

    /// Cut off (a replica that self-fenced, or a store quiet for
    /// `--upstream-timeout`): the upstream connection is closed first, then
    /// the permit is dropped (its grace starts after the close). For an h2c
    /// client's write, sent through the shared pool, there is no slot to
    /// close: its connection closes when the answer is dropped, at the pooled
    /// connection's next poll in its own task, moments into the grace.
    fn cut_off(&mut self, why: impl FnOnce(LockName) -> FilterError) -> BoxError {
        proxy::upstream::abandon_current();
        let permit = self.permit.take().expect("held while streaming");
        let lock = permit.lock().clone();
        drop(permit);
        let why = why(lock.clone());
        self.filter.refusals.count(&self.filter.locks, Some(&lock), &why);
        tracing::info!(reason = why.reason(), lock = lock.as_str(), error = %why, "answer cut off");
        Box::new(why)
    }

    /// The answer has ended: the store is done with the write.
    fn ended(&mut self) {
        if let Some(p) = self.permit.take() {
            p.complete();
        }
    }
}

/// Whether an answer that has given its last frame really ended: a body
/// whose sender went away early ends too, and with bytes still due it is
/// not over for the store.
pub(super) fn ended_whole(body: &Incoming) -> bool {
    body.size_hint().lower() == 0
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.permit.is_none() {
            // Released: ended (nothing more is asked) or cut off (its error
            // was given once).
            return Poll::Ready(None);
        }
        let inner = this.inner.as_mut().expect("taken only when dropped");
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(None) => {
                if !ended_whole(inner) {
                    this.permit = None;
                    return Poll::Ready(Some(Err("the store's answer ended early".into())));
                }
                this.ended();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers come after the last data, and hyper may ask no
                // more once it has them.
                if frame.is_trailers() {
                    this.ended();
                } else if let Some(q) = this.quiet.as_mut() {
                    q.as_mut().reset(crate::duration::after(this.filter.cfg.upstream_timeout));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The store's answer broke off: it may still apply the write.
                this.permit = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                if let (None, Some(shared), Some(cut)) = (&this.stop, &this.filter.shared, this.cut) {
                    this.stop = Some(Self::cut_off_future(shared.clone(), cut));
                }
                if let Some(Poll::Ready(())) = this.stop.as_mut().map(|s| s.as_mut().poll(cx)) {
                    return Poll::Ready(Some(Err(this.cut_off(FilterError::SelfFenced))));
                }
                let t = this.filter.cfg.upstream_timeout;
                let quiet = this.quiet.get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
                match quiet.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(this.cut_off(|_| UpstreamError::Quiet(t).into())))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.permit.is_none() || self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let (Some(permit), Some(body)) = (self.permit.take(), self.inner.take()) else {
            return;
        };
        // Dropped at its end without being asked for it (hyper asks no more
        // once `is_end_stream`): answered.
        if body.is_end_stream() {
            permit.complete();
            return;
        }
        // Before it: the client is gone (or was closed), and the store is
        // still at work on the write.
        let conn = proxy::upstream::detach_current();
        let left = orphan::Left::InAnswer(body);
        self.filter.spawn_orphan(orphan::read_on(left, conn, permit, self.filter.clone(), self.cut));
    }
}
