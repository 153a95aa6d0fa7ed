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
//! is dropped or fails before its end (the client went away: the store may
//! still apply it). While the answer streams, a newer holder's barrier abort
//! (or, for a replica, its cut-off) ends it with an error: the client's
//! connection is closed (outcome unknown, as for any abort) and so is the
//! upstream one, and the permit then has its grace.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::admission::Permit;
use super::error::FilterError;
use super::Filter;
use crate::proxy::{self, BoxError};

/// Why an answer was cut off.
type Stop = FilterError;

/// A write's answer holding its [`Permit`]; see the module docs.
pub struct Held {
    inner: Incoming,
    /// `None` once released (the answer ended, or was cut off).
    permit: Option<Permit>,
    filter: Arc<Filter>,
    /// The replica cut-off generation the write was forwarded under.
    cut: Option<u64>,
    /// What ends the answer early, made on the first wait: most answers
    /// (a PUT's `201` with an empty body) end without one, and allocate
    /// nothing for it.
    stop: Option<Pin<Box<dyn Future<Output = Stop> + Send>>>,
}

impl Held {
    pub(super) fn new(inner: Incoming, permit: Permit, filter: Arc<Filter>, cut: Option<u64>) -> Self {
        Held { inner, permit: Some(permit), filter, cut, stop: None }
    }

    fn watch(&self, permit: &Permit) -> Pin<Box<dyn Future<Output = Stop> + Send>> {
        let aborted = permit.aborted_owned();
        let lock = permit.lock().clone();
        match (self.filter.shared.clone(), self.cut) {
            (Some(shared), Some(cut)) => Box::pin(async move {
                tokio::select! {
                    biased;
                    _ = shared.cut_off(cut) => FilterError::SelfFenced(lock),
                    _ = aborted => FilterError::Aborted(lock),
                }
            }),
            _ => Box::pin(async move {
                aborted.await;
                FilterError::Aborted(lock)
            }),
        }
    }

    /// Cut off: the upstream connection is closed first, then the permit
    /// is dropped (its grace starts after the close).
    fn cut_off(&mut self, why: Stop) -> BoxError {
        proxy::upstream::abandon_current();
        let permit = self.permit.take();
        let lock = permit.as_ref().map(|p| p.lock().clone());
        drop(permit);
        self.filter.refusals.count(&self.filter.locks, lock.as_ref(), &why);
        tracing::info!(reason = why.reason(), lock = lock.as_ref().map(|l| l.as_str()), error = %why, "answer cut off");
        Box::new(why)
    }
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(permit) = this.permit.as_ref() else {
            // Released: ended (nothing more is asked) or cut off (its error
            // was given once).
            return Poll::Ready(None);
        };
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.permit.take().expect("held above").complete();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                // The store's answer broke off: it may still apply the write.
                this.permit = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                if this.stop.is_none() {
                    this.stop = Some(this.watch(permit));
                }
                match this.stop.as_mut().expect("set above").as_mut().poll(cx) {
                    Poll::Ready(why) => Poll::Ready(Some(Err(this.cut_off(why)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.permit.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Dropped at its end without being asked for it (hyper sends no
        // more once `is_end_stream`): answered. Before it: the permit's own
        // drop keeps it in flight for the grace.
        if let Some(p) = self.permit.take() {
            if self.inner.is_end_stream() {
                p.complete();
            }
        }
    }
}
