//! The filter as a server: the start-up barrier after a restart, the admin
//! API's edges, idle connections and the connection cap. Real processes,
//! real nginx.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::*;

const LOCK: &str = "orders";

/// Closes issue 12 hole 4: a filter restarted after `kill -9` forwarded a
/// newer token's write at once, while the store could still apply an older
/// write whose connection died with the old process. Writes now wait out
/// `--abort-grace` from start-up (they are not refused), and `/readyz`
/// answers 503 with the reason until then.
#[tokio::test]
async fn a_restarted_filter_holds_writes_for_abort_grace() {
    let nginx = Nginx::start();
    let d = tempfile::tempdir().unwrap();
    let mut f =
        FilterProc::start(d.path(), &nginx.url(), &d.path().join("state"), &["--lock", LOCK, "--abort-grace", "2s"]);
    assert_eq!(put(&format!("{}/k", f.url()), LOCK, 1, "t1").await.status, 201);
    f.proc.kill9();

    let spawned = Instant::now();
    f.proc = spawn("filter-restarted", d.path(), fencegate_bin(), &f.args, &[]);
    wait_port(f.admin, Duration::from_secs(10));
    let r = request("GET", &format!("{}/readyz", f.admin_url()), &[], "").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("abort-grace"), "{}", r.body);
    let r = put(&format!("{}/k", f.url()), LOCK, 2, "t2").await;
    assert_eq!(r.status, 204, "the write waited, it was not refused: {}", r.body);
    assert!(spawned.elapsed() >= Duration::from_secs(2), "forwarded before the grace passed: {:?}", spawned.elapsed());
    assert_eq!(request("GET", &format!("{}/readyz", f.admin_url()), &[], "").await.status, 200);
    assert_eq!(nginx.get("/k").await.as_deref(), Some("t2"));
}

/// `POST /v1/locks/fence` (no lock name) panicked the connection task (a
/// slice out of range): the client saw its connection reset. Now 404 JSON.
#[tokio::test]
async fn a_fence_without_a_lock_name_is_404() {
    let nginx = Nginx::start();
    let d = tempfile::tempdir().unwrap();
    let f = FilterProc::start(d.path(), &nginx.url(), &d.path().join("state"), &["--lock", LOCK]);
    for path in ["/v1/locks/fence", "/v1/locks//fence", "/v1/locks/x/y"] {
        let r = request("POST", &format!("{}{path}", f.admin_url()), &[], "{\"token\":1}").await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert_eq!(r.error_code(), "not_found", "{path}");
    }
}

/// Reads until the peer closes; how long that took, or `None` if it did not
/// close within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match support::read_retrying(s, &mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) if start.elapsed() < within => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(start.elapsed()),
            _ => return None,
        }
    }
}

/// Idle connections that send nothing were never closed (HTTP/1 and h2c), so
/// idle clients could hold sockets forever. `--idle-timeout` closes them.
#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let nginx = Nginx::start();
    let d = tempfile::tempdir().unwrap();
    let f = FilterProc::start(
        d.path(),
        &nginx.url(),
        &d.path().join("state"),
        &["--lock", LOCK, "--idle-timeout", "500ms"],
    );
    // HTTP/1: silent from the start.
    let mut silent = TcpStream::connect(f.addr).unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(5)).expect("a silent HTTP/1 connection is closed");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    // HTTP/1: idle after one keep-alive request.
    let mut kept = TcpStream::connect(f.addr).unwrap();
    kept.write_all(format!("GET /nothing HTTP/1.1\r\nHost: {}\r\n\r\n", f.addr).as_bytes()).unwrap();
    assert!(closed_within(&mut kept, Duration::from_secs(5)).is_some(), "an idle keep-alive connection is closed");
    // h2c: the preface and an empty SETTINGS frame, then nothing.
    let mut h2 = TcpStream::connect(f.addr).unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").unwrap();
    assert!(closed_within(&mut h2, Duration::from_secs(5)).is_some(), "an idle h2c connection is closed");
}

fn get_status(addr: SocketAddr, s: &mut TcpStream, within: Duration) -> Option<String> {
    s.write_all(format!("GET /x HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    let n = support::read_retrying(s, &mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string())
}

/// With `--max-connections 2`, a third connection is not served while two
/// are open, and is served as soon as one closes.
#[tokio::test]
async fn over_the_connection_cap_the_filter_waits_for_a_connection_to_close() {
    let nginx = Nginx::start();
    let d = tempfile::tempdir().unwrap();
    let f =
        FilterProc::start(d.path(), &nginx.url(), &d.path().join("state"), &["--lock", LOCK, "--max-connections", "2"]);
    let first = TcpStream::connect(f.addr).unwrap();
    let _second = TcpStream::connect(f.addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = TcpStream::connect(f.addr).unwrap();
    assert_eq!(get_status(f.addr, &mut third, Duration::from_millis(700)), None, "served over the cap");
    drop(first);
    let status = get_status(f.addr, &mut third, Duration::from_secs(5)).expect("served once a place is free");
    assert!(status.contains(" 404 "), "{status}");
    // The admin port has a cap of its own: probes still get through.
    assert_eq!(request("GET", &format!("{}/healthz", f.admin_url()), &[], "").await.status, 200);
}

/// Found in review: with `--store s3` the filter reads the start of some bodies (DeleteObjects, a POST-policy form)
/// to see what the write changes, and a client that sent the head and then no body held its connection for ever: the
/// header timeout only counts while no request is in flight. That read is now bounded by `--header-timeout`, and
/// answered 408 `body_timeout`. Control: with the default 30 s the same request has no answer after 3 s (what every
/// header timeout did before).
#[tokio::test]
async fn a_body_the_filter_must_read_that_never_comes_is_answered_408() {
    let nginx = Nginx::start();
    let d = tempfile::tempdir().unwrap();
    let start = |name: &str, extra: &[&str]| {
        let args: Vec<&str> = ["--lock", LOCK, "--store", "s3"].iter().chain(extra).copied().collect();
        FilterProc::start(d.path(), &nginx.url(), &d.path().join(name), &args)
    };
    let head = |f: &FilterProc| {
        let mut s = TcpStream::connect(f.addr).unwrap();
        let h = format!(
            "POST /bkt?delete HTTP/1.1\r\nHost: {}\r\nFencing-Lock: {LOCK}\r\nFencing-Token: 1\r\nContent-Length: 100\r\n\r\n",
            f.addr
        );
        s.write_all(h.as_bytes()).unwrap();
        s
    };
    let answer = |s: &mut TcpStream, within: Duration| {
        s.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        let at = Instant::now();
        match support::read_retrying(s, &mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            // The read timeout (no answer) reads as no answer; anything else
            // (a reset) is a failure worth its own message.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                String::new()
            }
            Err(e) => panic!("reading the answer failed after {:?}: {e}", at.elapsed()),
        }
    };
    let f = start("short", &["--header-timeout", "1s"]);
    let mut s = head(&f);
    let sent = Instant::now();
    let r = answer(&mut s, Duration::from_secs(10));
    assert!(r.starts_with("HTTP/1.1 408"), "after {:?}: {r:?}\nfilter log:\n{}", sent.elapsed(), f.proc.log_text());
    assert!(r.contains("\"body_timeout\""), "{r}");
    assert!(sent.elapsed() >= Duration::from_millis(900), "{:?}", sent.elapsed());
    let control = start("default", &[]);
    let mut s = head(&control);
    assert_eq!(answer(&mut s, Duration::from_secs(3)), "", "control: answered before the body came");
}

/// A stale write with a large body, from a client that sends all of its
/// body before it reads (Python's `http.client`): the filter answers 409
/// on the head and reads the rest of the body away as it closes (a
/// lingering close), so the client gets the 409 and its reason. It got
/// "connection reset" before: the close, with the body unread, reset the
/// connection. The store holds nothing of it.
#[tokio::test]
async fn a_stale_write_still_uploading_gets_its_409_not_a_reset() {
    let nginx = Nginx::start();
    let d = tempfile::tempdir().unwrap();
    let f = FilterProc::start(d.path(), &nginx.url(), &d.path().join("state"), &["--lock", LOCK]);
    assert_eq!(put(&format!("{}/k", f.url()), LOCK, 5, "t5").await.status, 201);
    const BODY: usize = 32 << 20;
    let addr = f.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let head = format!(
            "PUT /big HTTP/1.1\r\nhost: x\r\nfencing-lock: {LOCK}\r\nfencing-token: 1\r\ncontent-length: {BODY}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&vec![b'x'; BODY]).expect("the whole body written: the filter read it away");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut got).unwrap();
        String::from_utf8_lossy(&got).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 409"), "{answer}");
    assert!(answer.contains("\"error\":\"fencing_token_stale\""), "{answer}");
    assert_eq!(nginx.get("/big").await, None, "the store holds nothing of the stale write");
    assert_eq!(nginx.get("/k").await.as_deref(), Some("t5"));
}
