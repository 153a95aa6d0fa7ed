//! Writes whose client left before the store's answer ended ("orphans").
//!
//! The store may still apply such a write: S3 goes on with a
//! CompleteMultipartUpload or a CopyObject after its client is gone, and any
//! store goes on with a request it has read whole. Closing the upstream
//! connection then only ends the wait, and a newer holder's write let in
//! after `--abort-grace` could be overtaken by the older one. So a write
//! whose request has been handed on whole is carried on here, in a task of
//! its own, on the upstream connection it had (taken out of the client's
//! connection: [`proxy::upstream::detach_current`]): to its answer's head if
//! it had none yet, then the answer to its end; only then is its permit
//! released. Two moments lead here: the client goes before the head
//! ([`Sending`]'s drop) or during the answer (`held::Held`'s drop).
//!
//! A write whose client left while its request was still being sent is
//! closed at once instead (its socket is reset: `Abandon`): the store never
//! got it whole, and the permit keeps its grace.
//!
//! Each such task is bounded: `--upstream-timeout` for the head and for each
//! quiet stretch of the answer, and a replica's cut-off. The filter tracks
//! them ([`Filter::spawn_orphan`]), and a graceful exit waits for them up
//! to the end of `--shutdown-grace`. Each keeps its client connection's
//! place under `--max-connections` (the detached slot holds it), so clients
//! that send and leave cannot open store connections past the cap.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use hyper::body::Incoming;

use super::admission::Permit;
use super::Filter;
use crate::proxy::{self, UpstreamError};

/// A write's send to the store, up to its answer's head (boxed, so that it
/// can move to a task of its own when its client leaves).
pub(super) type SendFuture = Pin<Box<dyn Future<Output = Result<Response<Incoming>, UpstreamError>> + Send>>;

/// A forwarded write until its answer's head: the send and the write's
/// permit. Resolves with both. Dropped before that (its client gone, or the
/// end of the shutdown grace) with its request handed on whole, it carries
/// the write on in a task of its own ([`read_on`]); else the upstream
/// connection is closed at once, then the permit dropped (its grace starts
/// after the close).
pub(super) struct Sending<'a> {
    send: Option<SendFuture>,
    permit: Option<Permit>,
    /// Set once the request body has all been handed on (`RequestBody::marking_end`).
    sent_all: &'a AtomicBool,
    filter: &'a Arc<Filter>,
    /// The replica cut-off generation the write was forwarded under.
    cut: Option<u64>,
    /// Carried on if its client leaves: a write. A read (`--fence-reads`)
    /// changes nothing, and is closed as before (else a client could have
    /// the filter download big objects, holding the barrier, and leave).
    carry_on: bool,
}

impl<'a> Sending<'a> {
    pub(super) fn new(
        send: SendFuture,
        permit: Permit,
        sent_all: &'a AtomicBool,
        filter: &'a Arc<Filter>,
        cut: Option<u64>,
        carry_on: bool,
    ) -> Self {
        Sending { send: Some(send), permit: Some(permit), sent_all, filter, cut, carry_on }
    }

    /// The filter gives the write up (the barrier's abort, the replica's
    /// cut-off): the connection is closed first, then the permit dropped.
    pub(super) fn give_up(mut self) {
        drop(self.send.take());
        drop(self.permit.take());
    }
}

impl Future for Sending<'_> {
    type Output = (Result<Response<Incoming>, UpstreamError>, Permit);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let r = ready!(this.send.as_mut().expect("polled after its head").as_mut().poll(cx));
        this.send = None;
        Poll::Ready((r, this.permit.take().expect("held until the head")))
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        let (Some(send), Some(permit)) = (self.send.take(), self.permit.take()) else {
            return;
        };
        if !self.carry_on || !self.sent_all.load(Ordering::Acquire) || self.filter.cfg.unsafe_drop_orphans {
            // Not all sent: the store never gets it whole (reset, then grace).
            drop(send);
            drop(permit);
            return;
        }
        let conn = proxy::upstream::detach_current();
        self.filter.spawn_orphan(read_on(Left::BeforeHead(send), conn, permit, self.filter.clone(), self.cut));
    }
}

/// Where a write was when its client left.
pub(super) enum Left {
    /// Sent whole, no answer yet.
    BeforeHead(SendFuture),
    /// Its answer had begun.
    InAnswer(Incoming),
}

/// Carries on a write whose client left (see the module docs), on `conn`,
/// its upstream connection taken out of the client's (`None`: the pool's,
/// driven by its own task), until the store's answer has ended; then
/// releases the permit. An answer that fails, breaks off, sends nothing for
/// `--upstream-timeout`, or is cut off by the replica's cut-off, leaves the
/// permit its grace (after the connection is closed). This task owns the
/// permit.
pub(super) async fn read_on(
    left: Left,
    conn: Option<proxy::upstream::Detached>,
    permit: Permit,
    filter: Arc<Filter>,
    cut: Option<u64>,
) {
    use http_body_util::BodyExt;
    let quiet = filter.cfg.upstream_timeout;
    let ended = async move {
        let mut body = match left {
            Left::InAnswer(body) => body,
            // `send` has its own `--upstream-timeout` for the head.
            Left::BeforeHead(send) => match send.await {
                Ok(resp) => resp.into_body(),
                Err(_) => return false,
            },
        };
        loop {
            match tokio::time::timeout(quiet, body.frame()).await {
                Ok(None) => return super::held::ended_whole(&body),
                Ok(Some(Ok(frame))) if frame.is_trailers() => return true,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Err(_) => return false,
            }
        }
    };
    let ended = async move {
        match conn {
            Some(conn) => conn.drive_until(ended).await,
            None => ended.await,
        }
    };
    let ended = match (&filter.shared, cut) {
        (Some(shared), Some(cut)) => tokio::select! {
            // The connection (in `ended`) is dropped, so closed, before the
            // permit is.
            biased;
            _ = shared.cut_off(cut) => false,
            ended = ended => ended,
        },
        _ => ended.await,
    };
    if ended {
        permit.complete();
    } else {
        tracing::info!(lock = permit.lock().as_str(), "a write carried on after its client left did not end well");
    }
}

impl Filter {
    /// Spawns `task` (a [`read_on`]) on the current runtime, tracked so that
    /// a graceful exit waits for it. With no runtime (the process is
    /// leaving) the task is dropped, and its permit keeps its grace.
    pub(super) fn spawn_orphan(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(self.orphans.track_future(task));
        }
    }

    /// Waits for the writes being carried on after their clients left
    /// (until `deadline`: the end of the shutdown grace). Called by each
    /// runtime's loop at the exit, so each keeps driving its own.
    pub(super) async fn settle_orphans(&self, deadline: tokio::time::Instant) {
        self.orphans.close();
        if tokio::time::timeout_at(deadline, self.orphans.wait()).await.is_err() {
            tracing::warn!(
                left = self.orphans.len(),
                "writes carried on after their clients left were still unanswered at the end of the shutdown grace"
            );
        }
    }
}
