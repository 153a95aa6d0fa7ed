//! Test helpers shared by the proxy's tests: stores on loopback that count
//! their connections, and a real accept loop with an upstream in front of
//! them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::server::ServerLimits;
use super::upstream::Upstream;

/// A proxy in front of `store` (the real accept loop and per-connection
/// upstream), with this response timeout; its address.
pub(crate) async fn front(store: SocketAddr, response_timeout: Duration) -> SocketAddr {
    front_with(store, response_timeout, ServerLimits::default()).await
}

/// A store that counts its connections and gives every request `answer`;
/// `close_after` each answer, it closes the connection (its idle
/// timeout, or at once after a `Connection: close` answer).
pub(crate) async fn counting_store(
    answer: &'static [u8],
    close_after: Option<Duration>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let (addr, accepted, _) = counting_store_closes(answer, close_after).await;
    (addr, accepted)
}

/// [`counting_store`], also counting the connections its client closed.
pub(crate) async fn counting_store_closes(
    answer: &'static [u8],
    close_after: Option<Duration>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>, Arc<std::sync::atomic::AtomicUsize>) {
    store(answer, close_after, None).await
}

/// The stores above: each answer waits, if `released` is given, until it
/// holds `true`.
async fn store(
    answer: &'static [u8],
    close_after: Option<Duration>,
    released: Option<tokio::sync::watch::Receiver<bool>>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let store = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = store.local_addr().unwrap();
    let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (acc, clo) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = store.accept().await.unwrap();
            acc.fetch_add(1, Relaxed);
            let (clo, mut released) = (clo.clone(), released.clone());
            tokio::spawn(async move {
                let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
                loop {
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        got.drain(..end + 4);
                        if let Some(released) = released.as_mut() {
                            if released.wait_for(|r| *r).await.is_err() {
                                return;
                            }
                        }
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                        if let Some(after) = close_after {
                            tokio::time::sleep(after).await;
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            clo.fetch_add(1, Relaxed);
                            return;
                        }
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (addr, accepted, closed)
}

pub(crate) const KEEP_ALIVE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// One request on a new connection to `front`, which closes it after
/// answering (`Connection: close`); the status line and body.
pub(crate) async fn one_request(front: SocketAddr) -> String {
    one_request_with(front, "").await
}

/// [`one_request`], with these header lines (each ending in CRLF) too.
pub(crate) async fn one_request_with(front: SocketAddr, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = TcpStream::connect(front).await.unwrap();
    let head = format!("GET /x HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n");
    c.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    let got = String::from_utf8_lossy(&got).to_string();
    format!("{} {}", &got[..got.len().min(12)], got.rsplit("\r\n\r\n").next().unwrap_or_default())
}

/// [`front`], with these server limits.
pub(crate) async fn front_with(store: SocketAddr, response_timeout: Duration, limits: ServerLimits) -> SocketAddr {
    let up = Arc::new(Upstream::new(&format!("http://{store}"), Duration::from_secs(1), response_timeout).unwrap());
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(super::server::serve(
        front,
        limits,
        move |req, _| {
            let up = up.clone();
            async move {
                match up.send(req, None).await {
                    Ok(r) => r.map(super::body::stream),
                    Err(e) => e.into_response(),
                }
            }
        },
        std::future::pending(),
    ));
    addr
}

/// A store that counts its connections and answers each request with
/// [`KEEP_ALIVE`] only once the returned sender has sent `true` (at once
/// from then on): requests held in flight until then.
pub(crate) async fn held_store() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>, tokio::sync::watch::Sender<bool>)
{
    let (release, released) = tokio::sync::watch::channel(false);
    let (addr, accepted, _) = store(KEEP_ALIVE, None, Some(released)).await;
    (addr, accepted, release)
}

/// An h2c (prior knowledge) client connection to `front`: its sender, and
/// the task driving it.
pub(crate) async fn h2c(
    front: SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>, tokio::task::JoinHandle<()>) {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(front).await.unwrap());
    let (send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    (send, tokio::spawn(async move { drop(conn.await) }))
}

/// One keep-alive GET on `c`, read until its answer ends in `ok` (the
/// answer of these stores): what was read.
pub(crate) async fn keep_alive_get(c: &mut TcpStream) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    c.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
    while !got.ends_with(b"ok") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}
