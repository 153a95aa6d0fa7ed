//! Upstream connections kept open from one downstream connection to the
//! next ([`IdlePool`]).
//!
//! Each HTTP/1 downstream connection owns one upstream connection
//! ([`super::ConnSlot`]). Without this pool, a client that opens a
//! connection per request (no keep-alive, or a short-lived process) had the
//! proxy open and close an upstream connection per request too: a connect,
//! an accept at the store and a close each time, 2.2x nginx's CPU per
//! request on such a hop (nginx keeps `keepalive` upstream connections).
//! When a downstream connection ends with its upstream connection idle,
//! the slot parks it here; the next downstream connection's first request
//! takes it.
//!
//! Only an idle connection is parked: hyper's `SendRequest::is_ready` is
//! true only once the request was written whole, its answer read to its
//! end, and the connection waits for a request; one given up on (an abort,
//! a cut-off, a client that left mid-answer) was closed by the slot, and one
//! taken by a write carried on after its client left is never parked. A
//! parked connection is not polled: one the store closed meanwhile is found
//! closed when a request is sent on it, and hyper hands that request back
//! unsent, so it goes out again on a new connection (never a request that
//! may have been written). A store that closes an idle connection just as a
//! request is written on it makes that request fail instead (502), as with
//! any kept-alive connection; to keep that rare, a connection is reused only
//! within [`IDLE_FOR`] of its last request's start (Node's servers close idle
//! connections after 5 s by default, nginx after 75 s), whether it waited in
//! its slot or here.
//!
//! Bounds: at most [`MAX_IDLE`] per accept loop; those past [`IDLE_FOR`] are
//! closed by [`sweep_while`] (else they would hold their sockets, half
//! closed by the store, for as long as no connection comes); and each keeps
//! its client connection's place under `--max-connections`, so the store
//! never sees more connections than the cap. An accept loop at the cap
//! closes one of its own parked connections to make room
//! ([`IdlePool::evict_oldest`]), also one parked while it waits
//! ([`IdlePool::parked`]). A leaving loop closes them all
//! ([`IdlePool::close`]).
//!
//! Two things could pass from one client to the next with a connection.
//! A store's authentication of the connection itself (NTLM, Negotiate: IIS
//! or SharePoint WebDAV then runs whatever comes on it as the user who
//! authenticated it): a connection that carried such a request is closed
//! with its client connection, never parked (`ConnSlot::bind`; over h2c,
//! whose streams use the shared pooled client, such a request is sent with
//! `Connection: close`, see `Upstream::send_via`). And, as with any proxy
//! that keeps upstream connections, bytes a misbehaving store sends after
//! an answer's end, arriving only once the next request was written, are
//! read as that request's answer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Weak;
use std::time::Duration;

use http::header::HeaderValue;
use hyper::client::conn::http1;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::body::RequestBody;
use super::slot::UpConn;

/// How long after its last request started a connection may be reused.
pub const IDLE_FOR: Duration = Duration::from_secs(4);

/// Parked connections kept per accept loop; more are closed.
pub const MAX_IDLE: usize = 64;

/// One accept loop's idle upstream connections, most recently parked last.
/// A mutex, not a thread-local: an accept loop's connection tasks run on its
/// own runtime, on one thread in the filter's and sidecar's loops but on
/// several in a multi-thread runtime; taken once per connection, never per
/// request, and uncontended on a loop of its own.
#[derive(Default)]
pub struct IdlePool {
    inner: parking_lot::Mutex<Inner>,
    /// Signalled when a connection is parked: an accept loop waiting at the
    /// cap looks again, and closes it to make room ([`IdlePool::parked`]).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    parked: VecDeque<Parked>,
    /// Set when the accept loop leaves: nothing is parked any more.
    closed: bool,
}

/// An idle connection and what it holds (dropped together: closed).
pub(super) struct Parked {
    pub(super) authority: HeaderValue,
    pub(super) sender: http1::SendRequest<RequestBody>,
    pub(super) conn: Pin<Box<UpConn>>,
    /// When its last request started: it has been idle since then at most.
    pub(super) since: Instant,
    /// Its client connection's place under `--max-connections`.
    pub(super) _place: Option<OwnedSemaphorePermit>,
}

fn fresh(p: &Parked, now: Instant) -> bool {
    now.saturating_duration_since(p.since) <= IDLE_FOR
}

impl IdlePool {
    /// Parks an idle connection (see the module docs for what counts as
    /// idle); one not idle, too old, past [`MAX_IDLE`], or offered to a
    /// closed pool is closed instead, and so are those parked for too long.
    pub(super) fn park(&self, p: Parked) {
        let now = Instant::now();
        if !p.sender.is_ready() || !fresh(&p, now) {
            return;
        }
        let mut g = self.inner.lock();
        while g.parked.front().is_some_and(|p| !fresh(p, now)) {
            g.parked.pop_front();
        }
        if !g.closed && g.parked.len() < MAX_IDLE {
            g.parked.push_back(p);
            drop(g);
            self.wake.notify_one();
        }
    }

    /// Resolves when a connection has been parked since the last time it
    /// resolved (at once if one was).
    pub async fn parked(&self) {
        self.wake.notified().await
    }

    /// The most recently parked connection to `authority` still fit to
    /// reuse, if any (its place under the cap is let go: the taker has its
    /// own).
    pub(super) fn take(&self, authority: &HeaderValue) -> Option<(http1::SendRequest<RequestBody>, Pin<Box<UpConn>>)> {
        let now = Instant::now();
        let mut g = self.inner.lock();
        while let Some(p) = g.parked.pop_back() {
            if !fresh(&p, now) {
                // Everything before it is older still.
                g.parked.clear();
                return None;
            }
            // Another upstream's (one accept loop serves one upstream, so
            // hardly ever), or closed since: dropped, so closed.
            if p.authority == *authority && p.sender.is_ready() {
                return Some((p.sender, p.conn));
            }
        }
        None
    }

    /// Closes the connections parked for longer than [`IDLE_FOR`].
    pub fn sweep(&self) {
        let now = Instant::now();
        let stale: Vec<Parked> = {
            let mut g = self.inner.lock();
            let keep = g.parked.iter().position(|p| fresh(p, now)).unwrap_or(g.parked.len());
            g.parked.drain(..keep).collect()
        };
        // Closed outside the lock.
        drop(stale);
    }

    /// Closes the oldest parked connection, if any, freeing its place under
    /// the cap; whether there was one.
    pub fn evict_oldest(&self) -> bool {
        let oldest = self.inner.lock().parked.pop_front();
        oldest.is_some()
    }

    /// Closes every parked connection, and parks none from now on.
    pub fn close(&self) {
        let all = {
            let mut g = self.inner.lock();
            g.closed = true;
            std::mem::take(&mut g.parked)
        };
        drop(all);
    }

    /// How many connections are parked now.
    pub fn len(&self) -> usize {
        self.inner.lock().parked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sweeps `pool` every half [`IDLE_FOR`] (a connection is closed at most
/// 1.5 times that after its last request) until `stop` (the accept loop's
/// shutdown) or until the pool is gone. Spawned by the accept loop, which
/// owns the pool; this task holds it only weakly.
pub async fn sweep_while(pool: Weak<IdlePool>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(IDLE_FOR / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => match pool.upgrade() {
                Some(p) => p.sweep(),
                None => return,
            },
        }
    }
}

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdlePool").field("parked", &self.len()).finish()
    }
}
