//! A place under `--max-connections` for each h2c stream in flight (and
//! each HTTP/2 stream over TLS: the same connection type serves both).
//!
//! An HTTP/1 client connection sends one request at a time, so it needs one
//! upstream connection, and its own place under the cap covers it (the
//! connection's `ConnSlot`). An h2c connection multiplexes up to 200 streams
//! (hyper's default), and each stream in flight takes an upstream connection
//! of its own from the pooled client (HTTP/1 to the store, one request per
//! connection at a time). Counted by client connections alone, a few h2c
//! clients could have the store see 200 times the cap, and the proxy run out
//! of file descriptors. So each h2c stream takes a place of its own when it
//! comes and keeps it until its answer has ended or the stream is dropped
//! ([`PlacedBody`]). The connection's own place covers its first stream in
//! flight (as an HTTP/1 connection's covers its request), so a client that
//! sends one request at a time is never refused; each further stream in
//! flight takes a place from the cap ([`Places::take`]).
//!
//! A stream that finds no free place, after closing a parked upstream
//! connection to make room as the accept loop does, is answered at once:
//! 503 `too_many_connections` with `Retry-After`, before anything reaches the
//! handler or the store. It does not wait for a place: it would wait holding
//! its connection's place, and h2c connections at the cap, each with a stream
//! waiting, would wait on each other until their clients gave up.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::Service;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::{json_error, Body, BoxError};
use super::upstream::IdlePool;

/// Where an accept loop's h2c streams take their places: the cap its
/// connections count against, and its parked upstream connections (each of
/// which keeps a place, and can give it up).
#[derive(Clone, Debug)]
pub struct Places {
    cap: Arc<Semaphore>,
    pool: Arc<IdlePool>,
}

impl Places {
    pub fn new(cap: Arc<Semaphore>, pool: Arc<IdlePool>) -> Self {
        Places { cap, pool }
    }

    /// Places enough for any test.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Places::new(Arc::new(Semaphore::new(1000)), Arc::new(IdlePool::default()))
    }

    /// A free place, else the place of the oldest parked upstream connection
    /// (closed for it); `None` when there is neither.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.cap.clone().try_acquire_owned() {
            return Some(p);
        }
        // Another loop, or this one's accept, may take the freed place first:
        // then this stream is refused, as it would have been a moment later.
        while self.pool.evict_oldest() {
            if let Ok(p) = self.cap.clone().try_acquire_owned() {
                return Some(p);
            }
        }
        None
    }
}

/// The answer to a stream that found no place.
fn refusal() -> Response<Body> {
    let mut r = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "the server is at --max-connections, and each HTTP/2 stream in flight past a connection's first needs a place of its own: retry later",
        None,
    );
    r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// An h2c connection's service: `S`, each stream holding a place.
#[derive(Debug)]
pub struct Placing<S> {
    inner: S,
    places: Places,
    /// A place of the connection's own, for its first stream in flight: the
    /// connection's place under the cap covers it, as an HTTP/1
    /// connection's covers its one request. Without it, h2c clients sending
    /// one request at a time were refused whenever the cap was full, and
    /// the accept loop, waiting at the cap, takes each freed place first.
    own: Arc<Semaphore>,
}

impl<S> Placing<S> {
    pub fn new(inner: S, places: Places) -> Self {
        Placing { inner, places, own: Arc::new(Semaphore::new(1)) }
    }
}

impl<S, B> Service<Request<Incoming>> for Placing<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<PlacedBody<B>>;
    type Error = S::Error;
    type Future = Placed<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        match self.own.clone().try_acquire_owned().ok().or_else(|| self.places.take()) {
            Some(place) => Placed::Serving { fut: self.inner.call(req), place: Some(place) },
            None => {
                tracing::debug!("an HTTP/2 stream refused: no place under --max-connections");
                Placed::Refused { resp: Some(refusal()) }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Placing`]'s answer: the handler's, its body holding the place, or
    /// the refusal.
    #[project = PlacedProj]
    pub enum Placed<F> {
        Serving { #[pin] fut: F, place: Option<OwnedSemaphorePermit> },
        Refused { resp: Option<Response<Body>> },
    }
}

impl<F, B, E> Future for Placed<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<PlacedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            PlacedProj::Serving { fut, place } => {
                let resp = ready!(fut.poll(cx))?;
                let place = place.take();
                Poll::Ready(Ok(resp.map(|inner| PlacedBody::Served { inner, place })))
            }
            PlacedProj::Refused { resp } => {
                let resp = resp.take().expect("polled after it was ready");
                Poll::Ready(Ok(resp.map(|inner| PlacedBody::Refused { inner })))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A stream's answer body; a served one keeps the stream's place until it
    /// ends (or is dropped): the upstream connection it comes from is in use
    /// until then.
    #[project = PlacedBodyProj]
    pub enum PlacedBody<B> {
        Served { #[pin] inner: B, place: Option<OwnedSemaphorePermit> },
        Refused { #[pin] inner: Body },
    }
}

impl<B> HttpBody for PlacedBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            PlacedBodyProj::Served { inner, place } => {
                let r = ready!(inner.poll_frame(cx));
                if matches!(r, None | Some(Err(_))) {
                    place.take();
                }
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            PlacedBodyProj::Refused { inner } => inner.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PlacedBody::Served { inner, .. } => inner.is_end_stream(),
            PlacedBody::Refused { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PlacedBody::Served { inner, .. } => inner.size_hint(),
            PlacedBody::Refused { inner } => inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty};

    use super::*;
    use crate::proxy::testing::{counting_store, front_with, h2c, held_store, keep_alive_get, KEEP_ALIVE};
    use crate::proxy::ServerLimits;

    type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

    /// One GET on `send`: its status, `Retry-After` and body.
    async fn get(mut send: H2Sender) -> (StatusCode, Option<HeaderValue>, String) {
        send.ready().await.unwrap();
        let resp = send.send_request(Request::get("http://a/x").body(Empty::new()).unwrap()).await.unwrap();
        let (status, retry) = (resp.status(), resp.headers().get(http::header::RETRY_AFTER).cloned());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, retry, String::from_utf8_lossy(&body).into_owned())
    }

    /// Waits (up to 5 s) until the store has seen `n` connections.
    async fn until_accepted(accepted: &std::sync::atomic::AtomicUsize, n: usize) {
        let start = std::time::Instant::now();
        while accepted.load(Relaxed) < n {
            assert!(start.elapsed() < Duration::from_secs(5), "the store saw {} connections", accepted.load(Relaxed));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Under a cap of 3 (the accept loop holds one place for the next
    /// connection it accepts, the h2c connection one, which covers its first
    /// stream), two of four streams sent at once get places and reach the
    /// store, and the other two are answered 503 `too_many_connections` at
    /// once. Once the first two have been answered, their places are free
    /// again. Before, all four went to the store (the cap did not count
    /// streams).
    #[tokio::test]
    async fn each_h2c_stream_in_flight_takes_a_place_and_the_rest_are_refused() {
        let (store, accepted, release) = held_store().await;
        let limits = ServerLimits { max_connections: 3, ..Default::default() };
        let front = front_with(store, Duration::from_secs(5), limits).await;
        let (send, driver) = h2c(front).await;
        let streams: Vec<_> = (0..4).map(|_| tokio::spawn(get(send.clone()))).collect();
        until_accepted(&accepted, 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(accepted.load(Relaxed), 2, "two streams reached the store");
        assert_eq!(streams.iter().filter(|s| s.is_finished()).count(), 2, "two were answered without waiting");
        release.send(true).unwrap();
        let mut answers = Vec::new();
        for s in streams {
            answers.push(tokio::time::timeout(Duration::from_secs(5), s).await.unwrap().unwrap());
        }
        answers.sort_by_key(|a| a.0);
        assert_eq!(answers[0], (StatusCode::OK, None, "ok".into()));
        assert_eq!(answers[1], (StatusCode::OK, None, "ok".into()));
        for (status, retry, body) in &answers[2..] {
            assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert_eq!(retry.as_ref().map(|r| r.as_bytes()), Some(&b"1"[..]));
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"], "too_many_connections", "{body}");
        }
        // Their places came back with their answers' ends: two at once again,
        // on the two upstream connections the pool kept.
        let again = [tokio::spawn(get(send.clone())), tokio::spawn(get(send.clone()))];
        for s in again {
            assert_eq!(s.await.unwrap().0, StatusCode::OK);
        }
        assert_eq!(accepted.load(Relaxed), 2);
        driver.abort();
    }

    /// At the cap, with the accept loop waiting for a place (it takes each
    /// freed one first), an h2c client that sends one request at a time is
    /// served on its connection's own place, as an HTTP/1 client is. Without
    /// that place, each of its streams was refused.
    #[tokio::test]
    async fn an_h2c_connection_at_the_cap_is_served_one_stream_at_a_time() {
        let (store, _) = counting_store(KEEP_ALIVE, None).await;
        let limits = ServerLimits { max_connections: 2, ..Default::default() };
        let front = front_with(store, Duration::from_secs(5), limits).await;
        let (send, driver) = h2c(front).await;
        for i in 0..3 {
            let (status, _, body) = get(send.clone()).await;
            assert_eq!(status, StatusCode::OK, "stream {i}: {body}");
        }
        driver.abort();
    }

    /// A stream at the cap takes the place of a parked upstream connection
    /// (closing it), as the accept loop does for a new connection. Two
    /// HTTP/1 clients leave two parked connections (under a cap of 3, with
    /// the accept loop's place); the h2c connection's arrival has the accept
    /// loop close one; its first stream has the connection's own place, and
    /// its second, sent while the first is in flight, closes the other.
    /// Without that, the second was refused with a place held by an idle
    /// connection.
    #[tokio::test]
    async fn an_h2c_stream_at_the_cap_closes_a_parked_connection_for_its_place() {
        let (store, accepted, release) = held_store().await;
        release.send(true).unwrap();
        let limits = ServerLimits { max_connections: 3, ..Default::default() };
        let front = front_with(store, Duration::from_secs(5), limits).await;
        let mut a = tokio::net::TcpStream::connect(front).await.unwrap();
        let mut b = tokio::net::TcpStream::connect(front).await.unwrap();
        keep_alive_get(&mut a).await;
        keep_alive_get(&mut b).await;
        drop((a, b));
        // Parked when their client connections' tasks end (at once here;
        // generous for a loaded machine).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(accepted.load(Relaxed), 2, "each client had its own upstream connection");
        release.send(false).unwrap();
        let (send, driver) = h2c(front).await;
        let streams = [tokio::spawn(get(send.clone())), tokio::spawn(get(send.clone()))];
        until_accepted(&accepted, 4).await;
        release.send(true).unwrap();
        for s in streams {
            let (status, _, body) = s.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        driver.abort();
    }
}
