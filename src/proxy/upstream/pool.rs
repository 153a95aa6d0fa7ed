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
//! true only once the previous answer has been read to its end and the
//! connection waits for a request; one given up on (an abort, a cut-off,
//! a client that left mid-answer) was closed by the slot, and one taken by a
//! write carried on after its client left is never parked. A parked
//! connection is not polled: one the store closed meanwhile is found closed
//! when a request is sent on it, and hyper hands that request back unsent,
//! so it goes out again on a new connection (never a request that may have
//! been written). To keep the race with a store closing an idle connection
//! at the moment a request is written on it rare, a connection is reused
//! only within [`IDLE_FOR`] of being parked (Node's servers close idle
//! connections after 5 s by default, nginx after 75 s), and at most
//! [`MAX_IDLE`] are kept per accept loop.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use hyper::client::conn::http1;

use super::super::body::RequestBody;
use super::slot::UpConn;

/// How long a parked connection may be reused.
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
    idle: parking_lot::Mutex<VecDeque<Parked>>,
}

struct Parked {
    authority: HeaderValue,
    sender: http1::SendRequest<RequestBody>,
    conn: Pin<Box<UpConn>>,
    since: Instant,
}

impl IdlePool {
    /// Parks an idle connection (see the module docs for what counts as
    /// idle); one past [`MAX_IDLE`] is closed instead, and those parked for
    /// longer than [`IDLE_FOR`] are closed now.
    pub(super) fn park(&self, authority: HeaderValue, sender: http1::SendRequest<RequestBody>, conn: Pin<Box<UpConn>>) {
        if !sender.is_ready() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock();
        while idle.front().is_some_and(|p| now.duration_since(p.since) > IDLE_FOR) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Parked { authority, sender, conn, since: now });
        }
    }

    /// The most recently parked connection to `authority` still fit to
    /// reuse, if any.
    pub(super) fn take(&self, authority: &HeaderValue) -> Option<(http1::SendRequest<RequestBody>, Pin<Box<UpConn>>)> {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        while let Some(p) = idle.pop_back() {
            if now.duration_since(p.since) > IDLE_FOR {
                // Everything before it is older still.
                idle.clear();
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

    /// How many connections are parked now.
    pub fn len(&self) -> usize {
        self.idle.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdlePool").field("parked", &self.len()).finish()
    }
}
