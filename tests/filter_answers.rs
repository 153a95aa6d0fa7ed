//! A write is over for the filter's barrier when the store's answer has
//! ended, not when its status line came; and a write given up on is cut off
//! at the store's socket, not flushed there after its permit's grace.
//!
//! The stores here are written in the test, each with the one behaviour it
//! checks, since the real stores that have it cannot run here: AWS S3 and
//! MinIO send `200 OK` for CompleteMultipartUpload and CopyObject before
//! they apply it (whitespace follows while they work, then the outcome), and
//! a store stalled in a GC or fsync storm does not read its sockets. The
//! filter runs in process (`filter::run` on port-0 listeners).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fencegate::filter::{self, FilterConfig, Protection};
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use support::request;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const LOCK: &str = "orders";

/// An answer bigger than the sockets and hyper's buffers between the
/// store and a client that does not read it.
const BIG: usize = 16 << 20;

/// What the store did, in order.
type Log = Arc<Mutex<Vec<String>>>;

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// A store that answers a write carrying `X-Slow: yes` as AWS S3 answers
/// CompleteMultipartUpload: `200 OK` at once, a space every 50 ms while it
/// works, and after `work` it applies the write and sends the outcome. The
/// work goes on when the client is gone, as S3's does. A write with
/// `X-Big: yes` gets a `BIG` answer; one with `X-Hang: yes` gets `200 OK`,
/// a space, and then nothing more (a store hung after its head); one with
/// `X-Late: yes` is applied `work` after it has been read whole, and then
/// answered (the work goes on if the client goes); any other write is
/// applied when it arrives.
async fn slow_answer_store(log: Log, work: Duration, stop: CancellationToken) -> SocketAddr {
    let (l, a) = bind().await;
    tokio::spawn(async move {
        loop {
            let (s, _) = tokio::select! {
                r = l.accept() => r.unwrap(),
                _ = stop.cancelled() => return,
            };
            let log = log.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| answer(req, log.clone(), work));
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    a
}

async fn answer(
    req: Request<Incoming>,
    log: Log,
    work: Duration,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let who = req.headers().get("x-write").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let slow = req.headers().contains_key("x-slow");
    let big = req.headers().contains_key("x-big");
    let hang = req.headers().contains_key("x-hang");
    let late = req.headers().contains_key("x-late");
    let _ = req.into_body().collect().await;
    if late {
        // Works on the whole request before it answers, and goes on if its
        // client goes.
        log.lock().unwrap().push(format!("{who} received"));
        let log = log.clone();
        let _ = tokio::spawn(async move {
            tokio::time::sleep(work).await;
            log.lock().unwrap().push(format!("{who} applied"));
        })
        .await;
        return Ok(Response::new(Full::new(Bytes::new()).boxed()));
    }
    if hang {
        log.lock().unwrap().push(format!("{who} answered 200"));
        let space = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(b" ")))]);
        return Ok(Response::new(
            StreamBody::new(futures_util::StreamExt::chain(space, futures_util::stream::pending())).boxed(),
        ));
    }
    if big {
        log.lock().unwrap().push(format!("{who} applied"));
        return Ok(Response::new(Full::new(Bytes::from(vec![b'a'; BIG])).boxed()));
    }
    if !slow {
        log.lock().unwrap().push(format!("{who} applied"));
        return Ok(Response::new(Full::new(Bytes::new()).boxed()));
    }
    log.lock().unwrap().push(format!("{who} answered 200"));
    let (done, applied) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(work).await;
        log.lock().unwrap().push(format!("{who} applied"));
        let _ = done.send(true);
    });
    let chunks = futures_util::stream::unfold((applied, false), |(applied, ended)| async move {
        if ended {
            return None;
        }
        if *applied.borrow() {
            return Some((Ok(Frame::data(Bytes::from_static(b"<CompleteMultipartUploadResult/>"))), (applied, true)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        Some((Ok(Frame::data(Bytes::from_static(b" "))), (applied, false)))
    });
    Ok(Response::new(StreamBody::new(chunks).boxed()))
}

/// The filter in process in front of `store`: its URL and admin URL.
async fn filter_on(
    store: SocketAddr,
    state: &std::path::Path,
    stop: &CancellationToken,
    tune: impl FnOnce(&mut FilterConfig),
) -> (String, String) {
    let protection = Protection::all(LOCK.parse().unwrap());
    let mut cfg = FilterConfig::new(format!("http://{store}"), state, protection);
    tune(&mut cfg);
    let ((l, a), (al, aa)) = (bind().await, bind().await);
    tokio::spawn(filter::run(cfg, l, Some(al), 1, stop.clone().cancelled_owned()));
    let admin = format!("http://{aa}");
    support::until_ready(&admin, "the in-process filter never became ready").await;
    (format!("http://{a}"), admin)
}

/// Token 2's write to `path`, which must go through.
async fn newer_write(url: &str, path: &str) {
    let h = [("Fencing-Lock", LOCK), ("Fencing-Token", "2"), ("X-Write", "2")];
    let r = request("PUT", &format!("{url}{path}"), &h, "v2").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The store's log, once it holds `n` entries (the older write's work may
/// still be going on when the newer one is answered).
async fn log_of(log: &Log, n: usize) -> Vec<String> {
    while log.lock().unwrap().len() < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let entries = log.lock().unwrap().clone();
    entries
}

/// Token 1's write gets its `200` head, then the store works on it for
/// 800 ms before it applies it; token 2's write comes meanwhile, and its
/// barrier's drain timeout (200 ms) passes before the work is done. With
/// `leaves`, token 1's client goes away once its answer has begun. Returns
/// the store's log once both are answered and the work is over.
async fn head_first(release_at_head: bool, leaves: bool) -> Vec<String> {
    let stop = CancellationToken::new();
    let log = Log::default();
    let store = slow_answer_store(log.clone(), Duration::from_millis(800), stop.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let (url, _) = filter_on(store, state.path(), &stop, |c| {
        c.unsafe_release_at_head = release_at_head;
        c.barrier.drain_timeout = Duration::from_millis(200);
        c.barrier.abort_grace = Duration::from_millis(100);
    })
    .await;
    let h = [("Fencing-Lock", LOCK), ("Fencing-Token", "1"), ("X-Write", "1"), ("X-Slow", "yes")];
    let first = tokio::spawn({
        let url = format!("{url}/big?uploadId=u1");
        async move { request("POST", &url, &h, "<CompleteMultipartUpload/>").await }
    });
    while !log.lock().unwrap().iter().any(|e| e == "1 answered 200") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if leaves {
        first.abort();
    }
    newer_write(&url, "/big").await;
    if !leaves {
        let first = first.await.unwrap();
        assert_eq!(first.status, 200, "{}", first.body);
        assert!(first.body.ends_with("<CompleteMultipartUploadResult/>"), "not cut off: {:?}", first.body);
    }
    stop.cancel();
    log_of(&log, 3).await
}

/// Closes a hole found by a hostile review: the filter released a write's
/// permit when the store's status line came, so a newer holder's write went
/// to a store still applying the older one (AWS S3's and MinIO's
/// CompleteMultipartUpload and CopyObject), which then landed last. The
/// permit is now held until the answer ends, and the barrier's abort leaves
/// an answer that has begun alone (S3 goes on after a close: cutting it off
/// would only have ended the wait). The control releases the permit at the
/// head, as before, and the older write lands last.
#[tokio::test]
async fn a_write_answered_before_it_is_applied_holds_the_barrier_until_its_answer_ends() {
    assert_eq!(head_first(false, false).await, ["1 answered 200", "1 applied", "2 applied"]);
    let control = head_first(true, false).await;
    assert_eq!(control, ["1 answered 200", "2 applied", "1 applied"], "the control: the older write lands last");
}

/// The same store, and the older holder's client goes away once its answer
/// has begun (killed, or its SDK timed out): the store goes on, so the filter
/// reads the answer on to its end on the upstream connection it had, and
/// holds the newer write until then. Before, the permit had only its grace
/// (100 ms here) and the older write landed last, as in the control.
#[tokio::test]
async fn a_write_whose_client_left_mid_answer_holds_the_barrier_until_the_store_is_done() {
    assert_eq!(head_first(false, true).await, ["1 answered 200", "1 applied", "2 applied"]);
    let control = head_first(true, true).await;
    assert_eq!(control, ["1 answered 200", "2 applied", "1 applied"], "the control: the older write lands last");
}

/// A store whose first connection stalls (accepted, never read, until the
/// test reads it); every later request is applied when it arrives. Returns
/// its address and the stalled connection, once it comes.
async fn stalling_store(log: Log) -> (SocketAddr, tokio::sync::oneshot::Receiver<tokio::net::TcpStream>) {
    let (l, a) = bind().await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (first, _) = l.accept().await.unwrap();
        let _ = tx.send(first);
        loop {
            let (s, _) = l.accept().await.unwrap();
            let log = log.clone();
            let svc = hyper::service::service_fn(move |req| answer(req, log.clone(), Duration::ZERO));
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    (a, rx)
}

/// A write the barrier aborts (its request not yet all sent: the client
/// still owes its last byte) had its upstream connection closed gracefully:
/// hyper flushed what it held, then a FIN after whatever the kernel still
/// queued, and the permit's grace started at once, so a store stalled in a
/// GC or fsync storm read the whole megabyte it had been sent whenever it
/// woke, after the newer holder's write. The socket now lingers 0 and the
/// connection is dropped at once: the close resets it and the kernel drops
/// what it still queued, so the store reads only what its own receive buffer
/// held (`--abort-grace` is for that), then the reset.
#[tokio::test]
async fn an_aborted_write_is_reset_at_the_store_not_flushed_to_it() {
    const LEN: usize = 1 << 20;
    let stop = CancellationToken::new();
    let log = Log::default();
    let (store, stalled) = stalling_store(log.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let (url, _) = filter_on(store, state.path(), &stop, |c| {
        c.barrier.drain_timeout = Duration::from_millis(300);
        c.barrier.abort_grace = Duration::from_millis(200);
    })
    .await;
    let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let h = [("Fencing-Lock", LOCK.to_owned()), ("Fencing-Token", "1".to_owned()), ("X-Write", "1".to_owned())];
    let mut zombie = support::RawRequest::start(addr, "/big", &h, LEN + 1, &[]).await;
    // Its body but the last byte: what the kernels take of it, they hold.
    let body = tokio::spawn(async move {
        let _ = zombie.send(&vec![b'z'; LEN]).await;
        zombie
    });
    let mut stalled = stalled.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = [("Fencing-Lock", LOCK), ("Fencing-Token", "2"), ("X-Write", "2")];
    let second = request("PUT", &format!("{url}/big"), &h, "v2").await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(*log.lock().unwrap(), ["2 applied"]);
    // The store wakes up and reads the older write's connection.
    let (mut got, mut buf) = (0usize, vec![0u8; 64 << 10]);
    let end = loop {
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf)).await.expect("read in time") {
            Ok(0) => break "end of stream".to_owned(),
            Ok(n) => got += n,
            Err(e) => break e.to_string(),
        }
    };
    eprintln!("the store read {got} bytes of the older write, then: {end}");
    assert!(got < LEN / 2, "the store got what was queued for it after the newer write ({got} bytes, then {end})");
    assert!(end.contains("reset"), "the connection was reset, not closed after the rest: {end} after {got} bytes");
    body.abort();
    stop.cancel();
}

/// A write whose answer the client never takes (a frozen zombie): the
/// answer's body is not asked for again once the buffers are full, so its
/// hold on the barrier, and the barrier's abort of it, wait on the client.
/// `--send-timeout` closes such a connection, and the newer holder's write
/// goes after `--abort-grace`. The control (no send timeout) shows the newer
/// holder refused (503 `fencing_barrier_timeout`) for as long as the zombie
/// stays frozen.
async fn frozen_reader(send_timeout: Duration) -> (u16, Duration) {
    let stop = CancellationToken::new();
    let log = Log::default();
    let store = slow_answer_store(log.clone(), Duration::ZERO, stop.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let (url, _) = filter_on(store, state.path(), &stop, |c| {
        c.barrier.drain_timeout = Duration::from_millis(300);
        c.barrier.abort_grace = Duration::from_millis(200);
        c.max_wait = Duration::from_millis(1500);
        c.limits.send_timeout = send_timeout;
    })
    .await;
    let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let h = [("Fencing-Lock", LOCK.to_owned()), ("Fencing-Token", "1".to_owned()), ("X-Big", "yes".to_owned())];
    let zombie = support::RawRequest::start(addr, "/big", &h, 0, &[]).await;
    while log.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    let second = request("PUT", &format!("{url}/big"), &[("Fencing-Lock", LOCK), ("Fencing-Token", "2")], "v2").await;
    let waited = sent.elapsed();
    drop(zombie);
    stop.cancel();
    (second.status, waited)
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_cut_off_after_the_send_timeout() {
    let (status, waited) = frozen_reader(Duration::from_millis(400)).await;
    assert_eq!(status, 200, "the newer holder's write went through");
    assert!(waited < Duration::from_millis(1500), "within the send timeout, its quarter and the grace: {waited:?}");
    let (status, _) = frozen_reader(Duration::from_secs(3600)).await;
    assert_eq!(status, 503, "the control: the newer holder waits on the frozen client");
}

/// Since a write holds the barrier until its answer ends, a store that hangs
/// after its head held the lock for as long as its connection stayed open:
/// every newer write got 503. Nothing more of the answer for
/// `--upstream-timeout` now ends it (the upstream connection reset, the
/// client's answer cut off), and the newer write goes after the grace.
/// Failed on the code before (503 `fencing_barrier_timeout`).
#[tokio::test]
async fn a_store_quiet_after_its_head_is_given_up_after_the_upstream_timeout() {
    let stop = CancellationToken::new();
    let log = Log::default();
    let store = slow_answer_store(log.clone(), Duration::ZERO, stop.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let (url, admin) = filter_on(store, state.path(), &stop, |c| {
        c.upstream_timeout = Duration::from_millis(400);
        c.barrier.abort_grace = Duration::from_millis(100);
        c.max_wait = Duration::from_secs(3);
    })
    .await;
    let first = tokio::spawn({
        let url = format!("{url}/k");
        async move { request("PUT", &url, &[("Fencing-Lock", LOCK), ("Fencing-Token", "1"), ("X-Hang", "yes")], "v1").await }
    });
    while log.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = Instant::now();
    let h = [("Fencing-Lock", LOCK), ("Fencing-Token", "2"), ("X-Write", "2")];
    let second = request("PUT", &format!("{url}/k"), &h, "v2").await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert!(sent.elapsed() < Duration::from_secs(2), "{:?}", sent.elapsed());
    let first = first.await.unwrap();
    assert_eq!(first.status, 200);
    let m = request("GET", &format!("{admin}/metrics"), &[], "").await.body;
    assert!(m.contains(r#"reason="upstream"} 1"#), "{m}");
    stop.cancel();
}

/// Token 1's request reaches the store whole, and the store works on it for
/// 800 ms before it answers; token 2's write comes meanwhile, and its
/// barrier's drain timeout (200 ms) passes first. With `leaves`, token 1's
/// client goes away once the store has its request. Returns the store's log.
async fn answered_late(
    method: &'static str,
    leaves: bool,
    abort_sent: bool,
    tune: impl FnOnce(&mut FilterConfig),
) -> Vec<String> {
    let stop = CancellationToken::new();
    let log = Log::default();
    let store = slow_answer_store(log.clone(), Duration::from_millis(800), stop.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let (url, _) = filter_on(store, state.path(), &stop, |c| {
        c.barrier.drain_timeout = Duration::from_millis(200);
        c.barrier.abort_grace = Duration::from_millis(100);
        c.max_wait = Duration::from_secs(3);
        c.unsafe_abort_sent = abort_sent;
        tune(c);
    })
    .await;
    let first = tokio::spawn({
        let url = format!("{url}/k");
        async move {
            let h = [("Fencing-Lock", LOCK), ("Fencing-Token", "1"), ("X-Write", "1"), ("X-Late", "yes")];
            request(method, &url, &h, "v1").await
        }
    });
    while log.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if leaves {
        first.abort();
        // The filter sees its client's connection close.
        tokio::time::sleep(Duration::from_millis(20)).await;
        newer_write(&url, "/k").await;
    } else {
        newer_write(&url, "/k").await;
        let first = first.await.unwrap();
        assert_eq!(first.status, if abort_sent { 409 } else { 200 }, "{}", first.body);
    }
    stop.cancel();
    log_of(&log, 3).await
}

/// Closes a hole found by a hostile review: the barrier aborted an older
/// write still waiting for its answer after `--drain-timeout` even when its
/// request had reached the store whole, and the newer write went after
/// `--abort-grace`; a store that goes on after a close (S3, a slow disk)
/// applied the older one last. The barrier now aborts a write only while its
/// request is still being sent, and waits for the rest. The control aborts
/// it as before.
#[tokio::test]
async fn a_write_the_store_has_whole_is_waited_for_not_aborted() {
    assert_eq!(answered_late("PUT", false, false, |_| {}).await, ["1 received", "1 applied", "2 applied"]);
    let control = answered_late("PUT", false, true, |_| {}).await;
    assert_eq!(control, ["1 received", "2 applied", "1 applied"], "the control: the older write lands last");
}

/// The same store, and the older holder's client goes away once the store
/// has its request whole, before any answer (killed, or its SDK timed out):
/// the filter carries the write on, on the upstream connection it had, to
/// the end of its answer, and holds the newer write until then. Before (the
/// control), the connection was closed and the permit had only its grace
/// (100 ms here): the store went on, and the older write landed last.
#[tokio::test]
async fn a_write_whose_client_left_before_its_answer_holds_the_barrier_until_the_store_is_done() {
    assert_eq!(answered_late("PUT", true, false, |_| {}).await, ["1 received", "1 applied", "2 applied"]);
    let control = answered_late("PUT", true, false, |c| c.unsafe_drop_orphans = true).await;
    assert_eq!(control, ["1 received", "2 applied", "1 applied"], "the control: the older write lands last");
}

/// A graceful exit waits for a write carried on after its client left (up
/// to the end of `--shutdown-grace`): the filter's `run` returns only once
/// the store has answered it. Before, the task reading its answer was not
/// waited for and died with the process, with the write still being applied.
#[tokio::test]
async fn a_graceful_exit_waits_for_a_write_carried_on_after_its_client_left() {
    let stop_store = CancellationToken::new();
    let log = Log::default();
    let store = slow_answer_store(log.clone(), Duration::from_millis(800), stop_store.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let cfg = FilterConfig::new(format!("http://{store}"), state.path(), Protection::all(LOCK.parse().unwrap()));
    let ((l, a), (al, aa)) = (bind().await, bind().await);
    let stop = CancellationToken::new();
    let run = tokio::spawn(filter::run(cfg, l, Some(al), 2, stop.clone().cancelled_owned()));
    support::until_ready(&format!("http://{aa}"), "the in-process filter never became ready").await;
    let first = tokio::spawn(async move {
        let h = [("Fencing-Lock", LOCK), ("Fencing-Token", "1"), ("X-Write", "1"), ("X-Slow", "yes")];
        request("POST", &format!("http://{a}/big?uploadId=u1"), &h, "<CompleteMultipartUpload/>").await
    });
    while !log.lock().unwrap().iter().any(|e| e == "1 answered 200") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let asked = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), run).await.expect("the filter exits").unwrap().unwrap();
    let exited = asked.elapsed();
    assert_eq!(*log.lock().unwrap(), ["1 answered 200", "1 applied"], "exited after {exited:?}");
    stop_store.cancel();
}

/// A read (`--fence-reads`) changes nothing: one whose client leaves before
/// its answer is closed, not carried on, and holds no newer write up (else a
/// client could have the filter download big objects for it, holding the
/// barrier, and leave).
#[tokio::test]
async fn a_fenced_read_whose_client_left_is_not_carried_on() {
    let log = answered_late("GET", true, false, |c| c.fence_reads = true).await;
    assert_eq!(log, ["1 received", "2 applied", "1 applied"]);
}

/// With `--max-connections` `cap`, token 1's write (applied 800 ms after the
/// store has it whole) is sent and its client leaves; then a read comes on a
/// new connection. Returns the store's log.
async fn cap_with_a_write_carried_on(cap: usize) -> Vec<String> {
    let stop = CancellationToken::new();
    let log = Log::default();
    let store = slow_answer_store(log.clone(), Duration::from_millis(800), stop.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let (url, _) = filter_on(store, state.path(), &stop, |c| c.limits.max_connections = cap).await;
    let first = tokio::spawn({
        let url = format!("{url}/k");
        async move {
            let h = [("Fencing-Lock", LOCK), ("Fencing-Token", "1"), ("X-Write", "1"), ("X-Late", "yes")];
            request("PUT", &url, &h, "v1").await
        }
    });
    while log.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let read = request("GET", &format!("{url}/k"), &[("X-Write", "read")], "").await;
    assert_eq!(read.status, 200, "{}", read.body);
    stop.cancel();
    log_of(&log, 3).await
}

/// A write carried on after its client left keeps its connection's place
/// under `--max-connections` until its answer ends (it keeps an upstream
/// connection that long): a client that sends writes and leaves, again and
/// again, cannot have the filter open more store connections than the cap.
/// Before, the place was freed when the client left: with a cap of 1 the
/// read came in while the write was still carried on, as it does here with
/// a cap of 2 (the control).
#[tokio::test]
async fn a_write_carried_on_after_its_client_left_keeps_its_place_under_the_connection_cap() {
    assert_eq!(cap_with_a_write_carried_on(1).await, ["1 received", "1 applied", "read applied"]);
    let control = cap_with_a_write_carried_on(2).await;
    assert_eq!(control, ["1 received", "read applied", "1 applied"], "the control: a place for the read");
}
