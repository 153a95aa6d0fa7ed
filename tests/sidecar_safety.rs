//! The sidecar's own promise, against a real etcd with its default server
//! settings: no token after the lease could be gone, and no etcd client
//! behaviour that trips etcd's limits (issue 11). Each test names the item it
//! closes; each failed on the code before that item was fixed.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// A store that records when each request carrying a fencing token arrived,
/// and answers once it has read the whole body (as a store applying it would).
async fn timing_store() -> (SocketAddr, Arc<Mutex<Vec<Instant>>>) {
    use hyper::service::service_fn;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = l.accept().await {
            let seen = s2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    if req.headers().contains_key("fencing-token") {
                        seen.lock().unwrap().push(Instant::now());
                    }
                    async move {
                        use http_body_util::BodyExt;
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn etcdctl(url: &str, args: &[&str]) -> String {
    let out = Command::new(etcdctl_bin())
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(url)
        .args(args)
        .output()
        .expect("etcdctl is installed");
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The holder's key in etcd (the only key under the lock's queue).
fn holder_key(url: &str, lock: &str) -> String {
    let keys = etcdctl(url, &["get", "--prefix", "--keys-only", &format!("/fencegate/locks/{lock}/")]);
    keys.lines().find(|l| !l.trim().is_empty()).expect("a queued key").trim().to_string()
}

/// Writes through the sidecar every 10 ms until `stop` is set.
fn keep_writing(url: String, stop: Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = tokio::time::timeout(Duration::from_secs(1), request("PUT", &format!("{url}/w"), &[], "x")).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// A counter from the sidecar's `/metrics`.
async fn counter(a: &SidecarProc, name: &str) -> u64 {
    let body = request("GET", &format!("{}/metrics", a.admin_url()), &[], "").await.body;
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {body}"))
}

/// Waits until the counter `name` passes `from`; returns when it did.
async fn until_counter_above(a: &SidecarProc, name: &str, from: u64, within: Duration) -> Instant {
    let end = Instant::now() + within;
    loop {
        if counter(a, name).await > from {
            return Instant::now();
        }
        assert!(Instant::now() < end, "{name} stayed at {from}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Item 1: one slow keep-alive must not make self-fencing late for good.
/// etcd is stopped right after an acknowledged keep-alive, so the next one
/// times out and is cancelled (well before the self-fencing deadline); etcd
/// goes on, settles, and is stopped for good at T, again right after an
/// acknowledged keep-alive: the last token-bearing write leaves before
/// T + TTL - margin. (Before: the cancelled keep-alive's answer stayed on its
/// stream and every later keep-alive read the previous one's answer, timed
/// from its own, later send, so tokens went out until about T + 2.4 s with
/// TTL 2 s.)
#[tokio::test]
async fn a_cancelled_keepalive_does_not_make_self_fencing_late() {
    const ACKS: &str = "fencegate_sidecar_keepalives_total";
    const FAILS: &str = "fencegate_sidecar_keepalive_failures_total";
    let etcd = Etcd::start();
    let (store, seen) = timing_store().await;
    let d = tempfile::tempdir().unwrap();
    let a = SidecarProc::start(d.path(), &etcd.client_url, "late", "a", &format!("http://{store}"), &[]);
    wait_holder(&[&a], Duration::from_secs(10)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = keep_writing(a.url(), stop.clone());
    let etcd_proc = etcd.proc.as_ref().unwrap();

    // One keep-alive cancelled by its timeout: stall etcd from just after an ack until a failure is counted.
    let (acks, fails) = (counter(&a, ACKS).await, counter(&a, FAILS).await);
    until_counter_above(&a, ACKS, acks, Duration::from_secs(3)).await;
    etcd_proc.signal(libc::SIGSTOP);
    until_counter_above(&a, FAILS, fails, Duration::from_secs(3)).await;
    let acks = counter(&a, ACKS).await;
    etcd_proc.signal(libc::SIGCONT);
    let resumed = Instant::now();
    // Settled: a keep-alive acknowledged after the stall (waited for, not
    // assumed after a fixed time: CI's machine is loaded), and the rest of
    // 1.5 s for the cancelled one's answer to have come and gone.
    until_counter_above(&a, ACKS, acks, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(resumed.elapsed())).await;
    assert!(a.holding().await.is_some(), "still holding after the stall");

    // Then etcd stops for good at T, just after an acknowledged keep-alive.
    let acks = counter(&a, ACKS).await;
    until_counter_above(&a, ACKS, acks, Duration::from_secs(3)).await;
    etcd_proc.signal(libc::SIGSTOP);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = writer.await;
    etcd_proc.signal(libc::SIGCONT);

    let last = *seen.lock().unwrap().last().expect("writes went through");
    let after = last.saturating_duration_since(t);
    println!("last token-bearing write arrived {after:?} after etcd stopped (TTL 2 s, margin 200 ms)");
    // TTL - margin = 1.8 s, plus 100 ms for the request to travel on a busy machine.
    assert!(after < Duration::from_millis(1900), "a token went out {after:?} after etcd stopped");
}

/// Item 4: a write still streaming its body when `--write-deadline` passes is
/// cut off (504 `write_deadline_exceeded`), its upstream connection closed.
#[tokio::test]
async fn a_write_that_outlives_the_write_deadline_is_cut_off() {
    let etcd = Etcd::start();
    let (store, _seen) = timing_store().await;
    let d = tempfile::tempdir().unwrap();
    let a = SidecarProc::start(
        d.path(),
        &etcd.client_url,
        "slow",
        "a",
        &format!("http://{store}"),
        &["--write-deadline", "1s"],
    );
    wait_holder(&[&a], Duration::from_secs(10)).await;
    let started = Instant::now();
    let mut w = RawRequest::start(a.addr, "/big", &[], 1000, b"first part").await;
    for _ in 0..30 {
        if w.send(b"more").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_millis(1500) {
            break;
        }
    }
    let status = w.status().await;
    println!("cut off after {:?}", started.elapsed());
    assert_eq!(status, 504, "write_deadline_exceeded");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A write still streaming its body when the lease may have expired is cut
/// off then (503 `lease_not_held`), long before `--write-deadline`. etcd is
/// stopped just after an acknowledged keep-alive: nothing arrives to tell the
/// sidecar, only its clock says the self-fencing deadline (TTL 2 s, margin
/// 200 ms) has passed. The control, with self-fencing off
/// (`--unsafe-no-self-fence`), streams the same write on and the store takes
/// it whole, long after another holder could have had the lock.
#[tokio::test]
async fn a_write_streaming_past_the_self_fencing_deadline_is_cut_off() {
    const ACKS: &str = "fencegate_sidecar_keepalives_total";
    const PARTS: usize = 40;
    /// The answer's status and when it came after etcd stopped, if it came
    /// while the body was streaming.
    async fn stream(self_fence: bool) -> Option<(u16, Duration)> {
        let etcd = Etcd::start();
        let (store, seen) = timing_store().await;
        let d = tempfile::tempdir().unwrap();
        let mut args = vec!["--write-deadline", "30s"];
        if !self_fence {
            args.push("--unsafe-no-self-fence");
        }
        let a = SidecarProc::start(d.path(), &etcd.client_url, "stream", "a", &format!("http://{store}"), &args);
        wait_holder(&[&a], Duration::from_secs(10)).await;
        let acks = counter(&a, ACKS).await;
        until_counter_above(&a, ACKS, acks, Duration::from_secs(3)).await;
        let mut w = RawRequest::start(a.addr, "/stream", &[], 4 + 4 * PARTS, b"head").await;
        let etcd_proc = etcd.proc.as_ref().unwrap();
        etcd_proc.signal(libc::SIGSTOP);
        let t = Instant::now();
        let mut answered = None;
        for _ in 0..PARTS {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(status) = w.try_status() {
                answered = Some((status, t.elapsed()));
                break;
            }
            let _ = w.send(b"more").await;
        }
        etcd_proc.signal(libc::SIGCONT);
        if answered.is_none() {
            assert_eq!(w.status().await, 200, "the whole body sent: the store took it");
            assert_eq!(seen.lock().unwrap().len(), 1, "one token-bearing write reached the store");
        }
        answered
    }
    let (status, after) = stream(true).await.expect("the write was cut off while it streamed");
    println!("cut off {after:?} after etcd stopped");
    assert_eq!(status, 503, "lease_not_held");
    assert!(after > Duration::from_millis(1000) && after < Duration::from_millis(2500), "{after:?}");
    assert_eq!(stream(false).await, None, "control: without self-fencing the write streams on for 4 s");
}

/// Item 5: HTTP/2 pings every 2 s break etcd's default
/// `--grpc-keepalive-min-time` (5 s): etcd answers GOAWAY `too_many_pings`
/// and every stream on the connection breaks (the holder's watch with it).
/// With TTL 30 s (keep-alives every 10 s, so the connection is otherwise
/// quiet), 20 s of holding see no broken watch and no failed keep-alive.
#[tokio::test]
async fn pings_respect_etcds_default_keepalive_policy() {
    let etcd = Etcd::start();
    let nginx = Nginx::start();
    let d = tempfile::tempdir().unwrap();
    let a = SidecarProc::start(d.path(), &etcd.client_url, "pings", "a", &nginx.url(), &["--ttl", "30s"]);
    wait_holder(&[&a], Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(a.holding().await.is_some(), "still holding");
    let log = a.proc.log_text();
    assert!(!log.contains("watch on our key failed"), "a watch broke:\n{log}");
    assert!(!log.contains("keep-alive failed") && !log.contains("keep-alive timed out"), "a keep-alive failed:\n{log}");
    let metrics = request("GET", &format!("{}/metrics", a.admin_url()), &[], "").await.body;
    assert!(metrics.contains("fencegate_sidecar_keepalive_failures_total{lock=\"pings\"} 0"), "{metrics}");
}

/// Item 6: after a compaction, a holder whose watch must be re-created
/// (here: etcd restarted) re-watches from the revision of a fresh read, not
/// from its key's compacted create revision; so it sees its key deleted at
/// once instead of polling every 500 ms with a cancelled watch.
#[tokio::test]
async fn after_a_compaction_the_holder_still_watches_its_key() {
    let mut etcd = Etcd::start();
    let nginx = Nginx::start();
    let d = tempfile::tempdir().unwrap();
    let a = SidecarProc::start(d.path(), &etcd.client_url, "compact", "a", &nginx.url(), &["--ttl", "10s"]);
    wait_holder(&[&a], Duration::from_secs(10)).await;
    // Move the revision on, compact everything, and break the holder's watch.
    for i in 0..5 {
        etcdctl(&etcd.client_url, &["put", &format!("/other/{i}"), "x"]);
    }
    let status = etcdctl(&etcd.client_url, &["endpoint", "status", "-w", "json"]);
    let rev = serde_json::from_str::<serde_json::Value>(&status).unwrap()[0]["Status"]["header"]["revision"]
        .as_i64()
        .unwrap();
    etcdctl(&etcd.client_url, &["compact", &rev.to_string()]);
    let log_before = a.proc.log_text().len();
    etcd.stop();
    etcd.resume();
    let resumed = Instant::now();
    // The deletion below is only seen at once through the watch: wait until
    // the holder has one again (its retries back off up to 2 s, longer on a
    // loaded machine). The restarted etcd had none; the holder's is the one.
    loop {
        let m = request("GET", &format!("{}/metrics", etcd.client_url), &[], "").await.body;
        let watchers = m
            .lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if watchers.is_some_and(|w| w >= 1.0) {
            break;
        }
        assert!(resumed.elapsed() < Duration::from_secs(15), "the holder never watched its key again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(resumed.elapsed())).await;
    assert!(a.holding().await.is_some(), "still holding across the restart");
    let since = a.proc.log_text()[log_before..].to_string();
    let cancelled = since.matches("watch on our key failed").count();
    assert!(cancelled <= 2, "the holder's watch keeps failing ({cancelled} times in 3 s):\n{since}");

    // Delete the holder's key: it stops holding at once.
    let key = holder_key(&etcd.client_url, "compact");
    etcdctl(&etcd.client_url, &["del", &key]);
    let deleted = Instant::now();
    while a.holding().await.is_some() {
        assert!(deleted.elapsed() < Duration::from_secs(5), "still holding 5 s after its key was deleted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("noticed the deletion after {:?}", deleted.elapsed());
    assert!(deleted.elapsed() < Duration::from_millis(300), "{:?}", deleted.elapsed());
}

/// Item 10: leases abandoned during an etcd outage are revoked when etcd
/// answers again, so the sidecar does not queue behind its own stale key for
/// a whole TTL after etcd is back.
#[tokio::test]
async fn after_an_outage_the_sidecar_does_not_wait_behind_its_own_stale_key() {
    let mut etcd = Etcd::start();
    let nginx = Nginx::start();
    let d = tempfile::tempdir().unwrap();
    let a = SidecarProc::start(d.path(), &etcd.client_url, "outage", "a", &nginx.url(), &["--ttl", "6s"]);
    wait_holder(&[&a], Duration::from_secs(10)).await;
    etcd.stop();
    // Past the self-fencing deadline: the round is lost and its revoke fails.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(a.holding().await.is_none());
    etcd.resume();
    let back = Instant::now();
    wait_holder(&[&a], Duration::from_secs(20)).await;
    println!("holding again {:?} after etcd came back (TTL 6 s)", back.elapsed());
    // etcd renews every lease's TTL when it restarts: behind its stale key the sidecar would wait 6 s or more.
    assert!(back.elapsed() < Duration::from_secs(4), "{:?}", back.elapsed());
}
