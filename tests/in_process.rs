//! Headers, status codes and admin answers need no real store or lease: the
//! real filter and sidecar run here in process, through `filter::run` and
//! `sidecar::run` on port-0 listeners (mini-redis's `server::run(listener,
//! shutdown)`), with the demo's in-memory store and the embedded lease
//! backend. Real processes stay for what needs them (kill -9, SIGTERM,
//! partitions, nginx's and etcd's own behaviour).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fencegate::demo::store::{self, MemStore};
use fencegate::filter::{self, FilterConfig, Protection};
use fencegate::lease::embedded::Embedded;
use fencegate::lease::keeper::KeeperConfig;
use fencegate::sidecar::{self, SidecarConfig};
use support::{put, request};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// An in-memory store on a port-0 listener.
async fn mem_store(stop: &CancellationToken) -> (Arc<MemStore>, SocketAddr) {
    let s = Arc::new(MemStore::default());
    let (l, a) = bind().await;
    tokio::spawn(store::serve(s.clone(), l, stop.clone().cancelled_owned()));
    (s, a)
}

/// The filter in process: its data and admin URLs.
struct InProc {
    url: String,
    admin: String,
    store: Arc<MemStore>,
    stop: CancellationToken,
    _state: tempfile::TempDir,
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn filter(protection: Protection) -> InProc {
    let stop = CancellationToken::new();
    let (store, store_addr) = mem_store(&stop).await;
    let state = tempfile::tempdir().unwrap();
    let cfg = FilterConfig::new(format!("http://{store_addr}"), state.path(), protection);
    let ((l, a), (al, aa)) = (bind().await, bind().await);
    tokio::spawn(filter::run(cfg, l, Some(al), 1, stop.clone().cancelled_owned()));
    let f = InProc { url: format!("http://{a}"), admin: format!("http://{aa}"), store, stop, _state: state };
    // Ready once the start-up barrier has passed.
    support::until_ready(&f.admin, "the in-process filter never became ready").await;
    f
}

fn rules(r: &[(&str, &str)]) -> Protection {
    Protection::Rules(r.iter().map(|(p, l)| (p.to_string(), l.parse().unwrap())).collect())
}

#[tokio::test]
async fn every_malformed_input_gets_its_status_and_code() {
    let f = filter(rules(&[("/orders/", "orders"), ("/users/", "users")])).await;
    let u = |p: &str| format!("{}{p}", f.url);
    let long = "a".repeat(129);
    // (method, path, headers, status, error code)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let lock_token = |l: &'static str, t: &'static str| vec![("Fencing-Lock", l), ("Fencing-Token", t)];
    let cases: Vec<Case> = vec![
        ("PUT", "/orders/1", vec![], 428, "fencing_token_missing"),
        ("PUT", "/orders/1", vec![("Fencing-Lock", "orders")], 428, "fencing_token_missing"),
        ("DELETE", "/orders/1", vec![("Fencing-Token", "3")], 428, "fencing_token_missing"),
        ("PUT", "/orders/1", lock_token("orders", "abc"), 400, "fencing_token_malformed"),
        ("PUT", "/orders/1", lock_token("orders", "0"), 400, "fencing_token_malformed"),
        ("PUT", "/orders/1", lock_token("orders", "-4"), 400, "fencing_token_malformed"),
        ("PUT", "/orders/1", lock_token("orders", "18446744073709551616"), 400, "fencing_token_malformed"),
        (
            "PUT",
            "/orders/1",
            vec![("Fencing-Lock", "orders"), ("Fencing-Token", "1"), ("Fencing-Token", "2")],
            400,
            "fencing_token_malformed",
        ),
        ("PUT", "/orders/1", lock_token("ord ers", "1"), 400, "fencing_token_malformed"),
        ("PUT", "/orders/1", vec![("Fencing-Lock", &long), ("Fencing-Token", "1")], 400, "fencing_token_malformed"),
        ("PUT", "/orders/1", lock_token("users", "1"), 403, "fencing_lock_mismatch"),
        ("PUT", "/elsewhere/1", lock_token("orders", "1"), 403, "path_not_protected"),
        ("PUT", "/users/../orders/1", lock_token("users", "1"), 400, "path_not_canonical"),
        ("PUT", "//orders/1", lock_token("orders", "1"), 400, "path_not_canonical"),
        ("PUT", "/%6frders/1", lock_token("users", "1"), 403, "fencing_lock_mismatch"),
        ("MKCOL", "/orders/dir/", vec![], 428, "fencing_token_missing"),
    ];
    for (method, path, headers, status, code) in cases {
        let r = request(method, &u(path), &headers, "body").await;
        assert_eq!(r.status, status, "{method} {path} {headers:?}: {}", r.body);
        assert_eq!(r.error_code(), code, "{method} {path} {headers:?}");
        assert!(!r.json()["message"].as_str().unwrap().is_empty());
    }
    // None of them reached the store.
    assert_eq!(f.store.get("/orders/1"), None);
    assert_eq!(f.store.get("/elsewhere/1"), None);

    // The stale case, with the highest token in the body.
    assert!(put(&u("/orders/1"), "orders", 5, "v5").await.status < 300);
    let r = put(&u("/orders/1"), "orders", 4, "v4").await;
    assert_eq!((r.status, r.error_code().as_str()), (409, "fencing_token_stale"));
    assert_eq!(r.json()["highest"], 5);
    assert_eq!(f.store.get("/orders/1").as_deref(), Some("v5"));
    // Locks are independent: a low token on another lock is fine.
    assert!(put(&u("/users/1"), "users", 1, "u1").await.status < 300);
    // Reads pass without headers.
    assert_eq!(request("GET", &u("/orders/1"), &[], "").await.body, "v5");
}

#[tokio::test]
async fn admin_endpoints_fence_and_metrics() {
    let f = filter(Protection::all("orders".parse().unwrap())).await;
    put(&format!("{}/m", f.url), "orders", 4, "x").await;
    put(&format!("{}/m", f.url), "orders", 2, "x").await;
    put(&format!("{}/m", f.url), "orders", 0, "x").await;
    let a = |p: &str| format!("{}{p}", f.admin);
    assert_eq!(request("GET", &a("/healthz"), &[], "").await.status, 200);
    assert_eq!(request("GET", &a("/readyz"), &[], "").await.status, 200);
    let r = request("GET", &a("/nope"), &[], "").await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    // The fence protocol's answers.
    let r = request("POST", &a("/v1/locks/fence"), &[], r#"{"token": 9}"#).await;
    assert_eq!(r.status, 404, "a fence path that names no lock: {}", r.body);
    let r = request("POST", &a("/v1/locks/other/fence"), &[], r#"{"token": 9}"#).await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "fencing_lock_unknown"));
    let r = request("POST", &a("/v1/locks/orders/fence"), &[], "not json").await;
    assert_eq!(r.status, 400);
    let r = request("POST", &a("/v1/locks/orders/fence"), &[], r#"{"token": 3}"#).await;
    assert_eq!(
        (r.status, r.error_code().as_str(), r.json()["highest"].as_u64()),
        (409, "fencing_token_stale", Some(4))
    );
    let r = request("POST", &a("/v1/locks/orders/fence"), &[], r#"{"token": 7}"#).await;
    assert_eq!((r.status, r.json()["highest"].as_u64()), (200, Some(7)));
    let locks = request("GET", &a("/v1/locks"), &[], "").await.json();
    assert_eq!(locks["locks"][0]["lock"], "orders");
    assert_eq!(locks["locks"][0]["highest"], 7);

    let m = request("GET", &a("/metrics"), &[], "").await.body;
    for want in [
        r#"fencegate_filter_writes_admitted_total{lock="orders"} 1"#,
        // The stale write and the stale fence.
        r#"fencegate_filter_writes_refused_total{lock="orders",reason="stale"} 2"#,
        r#"fencegate_filter_writes_refused_total{lock="",reason="malformed"} 1"#,
        r#"fencegate_filter_highest_token{lock="orders"} 7"#,
        "fencegate_filter_upstream_latency_seconds_count",
        "fencegate_filter_barrier_waits_total",
        "fencegate_filter_locks 1",
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }
}

/// The sidecar in process over the embedded lease backend, in front of the
/// in-memory store: its data and admin URLs.
async fn sidecar_in_process(stop: &CancellationToken, store: SocketAddr) -> (String, String) {
    let backend = Arc::new(Embedded::new());
    let mut keeper = KeeperConfig::new("jobs".parse().unwrap(), "a", Duration::from_secs(2));
    keeper.release_pause = Duration::from_millis(300);
    let cfg = SidecarConfig::new(keeper, format!("http://{store}"));
    let ((l, a), (al, aa)) = (bind().await, bind().await);
    tokio::spawn(sidecar::run(cfg, backend, l, al, None, stop.clone().cancelled_owned()));
    let admin = format!("http://{aa}");
    support::until_ready(&admin, "the in-process sidecar never held the lock").await;
    (format!("http://{a}"), admin)
}

/// Held by each test that counts the sidecar's loop threads: tests run side
/// by side in this process, and would count each other's.
static LOOP_THREADS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits (up to 5 s: a thread names itself once it runs) until this process
/// has `n` threads whose name starts with `prefix` (Linux shows the first 15
/// bytes of a thread's name); the last count seen.
async fn threads_named(prefix: &str, n: usize) -> usize {
    let count = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with(prefix))
            .count()
    };
    for _ in 0..250 {
        if count() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    count()
}

/// `--worker-threads 3`: the sidecar's proxy runs three event loops (two
/// threads of its own), all accepting on the one socket, each write given
/// the token and each loop refusing writes once the lock is released; at
/// shutdown its threads are joined before `run` returns (the lease is
/// revoked only after every loop's writes are over).
#[tokio::test]
async fn the_sidecar_serves_its_app_on_several_event_loops() {
    let _one_at_a_time = LOOP_THREADS.lock().await;
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let f = filter(Protection::all("jobs".parse().unwrap())).await;
    let mut keeper = KeeperConfig::new("jobs".parse().unwrap(), "a", Duration::from_secs(2));
    keeper.release_pause = Duration::from_secs(30);
    let mut cfg = SidecarConfig::new(keeper, f.url.clone());
    cfg.workers = 3;
    let ((l, a), (al, aa)) = (bind().await, bind().await);
    let run = tokio::spawn(sidecar::run(cfg, Arc::new(Embedded::new()), l, al, None, stop.clone().cancelled_owned()));
    let (url, admin) = (format!("http://{a}"), format!("http://{aa}"));
    support::until_ready(&admin, "the in-process sidecar never held the lock").await;
    assert_eq!(threads_named("fencegate-sidec", 2).await, 2, "two loops of the sidecar's own");
    let token = request("GET", &format!("{admin}/v1/lock"), &[], "").await.json()["token"].as_u64().unwrap();

    // Each on a connection of its own: the kernel hands them to the loops.
    let writes = (0..24).map(|i| {
        let url = format!("{url}/obj{i}");
        tokio::spawn(async move { request("PUT", &url, &[], &format!("v{i}")).await.status })
    });
    for (i, w) in writes.enumerate() {
        assert!(w.await.unwrap() < 300, "write {i}");
        assert_eq!(f.store.get(&format!("/obj{i}")), Some(format!("v{i}")));
    }
    let locks = request("GET", &format!("{}/v1/locks", f.admin), &[], "").await.json();
    assert_eq!(locks["locks"][0]["highest"].as_u64(), Some(token));

    let r = request("POST", &format!("{admin}/v1/lock/release"), &[], "").await;
    assert_eq!(r.status, 202, "{}", r.body);
    let refused = (0..12).map(|i| {
        let url = format!("{url}/late{i}");
        tokio::spawn(async move { request("PUT", &url, &[], "late").await })
    });
    for r in refused {
        let r = r.await.unwrap();
        assert_eq!((r.status, r.error_code().as_str()), (503, "lease_not_held"));
    }
    assert!((0..12).all(|i| f.store.get(&format!("/late{i}")).is_none()));

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), run).await.expect("the sidecar stops").unwrap().unwrap();
    assert_eq!(threads_named("fencegate-sidec", 0).await, 0, "its loops' threads are joined");
}

#[tokio::test]
async fn the_sidecar_injects_its_token_strips_forged_ones_and_answers_its_local_api() {
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    // A filter in front of the store tells us what token reached it.
    let f = filter(Protection::all("jobs".parse().unwrap())).await;
    let filter_addr: SocketAddr = f.url.trim_start_matches("http://").parse().unwrap();
    let (url, admin) = sidecar_in_process(&stop, filter_addr).await;

    let lock = request("GET", &format!("{admin}/v1/lock"), &[], "").await.json();
    for k in ["lock", "holder", "holding", "state", "token", "lease_id", "ttl_ms", "valid_for_ms", "last_error"] {
        assert!(lock.get(k).is_some(), "{k} in {lock}");
    }
    assert_eq!((lock["holding"].as_bool(), lock["state"].as_str()), (Some(true), Some("holding")));
    let token = lock["token"].as_u64().unwrap();

    // Forged headers are stripped, the real ones injected: the filter admits the write at the sidecar's token.
    let forged = [("Fencing-Token", "999999999"), ("Fencing-Lock", "other")];
    assert!(request("PUT", &format!("{url}/obj"), &forged, "data").await.status < 300);
    assert_eq!(f.store.get("/obj").as_deref(), Some("data"));
    let locks = request("GET", &format!("{}/v1/locks", f.admin), &[], "").await.json();
    assert_eq!(locks["locks"][0]["highest"].as_u64(), Some(token), "the forged token never reached the filter");

    let m = request("GET", &format!("{admin}/metrics"), &[], "").await.body;
    assert!(m.contains(r#"fencegate_sidecar_holding{lock="jobs"} 1"#), "{m}");
    assert!(m.contains(r#"fencegate_sidecar_writes_forwarded_total{lock="jobs"} 1"#), "{m}");
    assert!(m.contains(r#"fencegate_sidecar_fence_timeouts_total{lock="jobs"} 0"#), "{m}");

    // Release: the token is withdrawn at once; writes are refused until the lock is held again.
    let r = request("POST", &format!("{admin}/v1/lock/release"), &[], "").await;
    assert_eq!(
        (r.status, r.json()["released"].as_bool(), r.json()["withdrawn"].as_bool()),
        (202, Some(true), Some(true))
    );
    let r = request("PUT", &format!("{url}/obj"), &[], "late").await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "lease_not_held"));
    assert_eq!(f.store.get("/obj").as_deref(), Some("data"));
    let r = request("GET", &format!("{admin}/nope"), &[], "").await;
    assert_eq!(r.status, 404);
}

/// A release asked for while the sidecar is still fencing (its filter takes
/// the fence's connection and never answers) ends the fence and is answered
/// once the token is withdrawn: straight after the answer the token is gone.
/// Before, the answer came at once with the token still set; then, after the
/// wait, a fence that never ends (`fence_required`) kept the release queued
/// and the answer said `withdrawn: false` after 2 s.
#[tokio::test]
async fn a_release_asked_for_while_fencing_ends_the_fence_and_is_answered_once_the_token_is_withdrawn() {
    for required in [false, true] {
        let stop = CancellationToken::new();
        let _guard = stop.clone().drop_guard();
        // Listening, never accepting: the fence's request is sent and never answered.
        let (_silent, silent) = bind().await;
        let mut keeper = KeeperConfig::new("jobs".parse().unwrap(), "a", Duration::from_secs(2));
        // Long enough to be seen fencing on a loaded machine; the release
        // ends the fence, not the timeout.
        keeper.fence_timeout = Duration::from_secs(5);
        keeper.fence_required = required;
        keeper.release_pause = Duration::from_secs(30);
        let mut cfg = SidecarConfig::new(keeper, format!("http://{silent}"));
        cfg.fence_urls = vec![format!("http://{silent}")];
        let ((l, _), (al, aa)) = (bind().await, bind().await);
        tokio::spawn(sidecar::run(cfg, Arc::new(Embedded::new()), l, al, None, stop.clone().cancelled_owned()));
        let admin = format!("http://{aa}");
        let state = || async { request("GET", &format!("{admin}/v1/lock"), &[], "").await.json() };
        let started = tokio::time::Instant::now();
        while state().await["state"] != "fencing" {
            assert!(started.elapsed() < Duration::from_secs(10), "never fencing: {}", state().await);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = request("POST", &format!("{admin}/v1/lock/release"), &[], "").await;
        assert_eq!(
            (r.status, r.json()["released"].as_bool(), r.json()["withdrawn"].as_bool()),
            (202, Some(true), Some(true)),
            "fence required: {required}"
        );
        assert!(r.json()["token"].is_null(), "{}", r.body);
        let after = state().await;
        assert!(after["token"].is_null() && after["holding"] == false, "the token outlived the answer: {after}");
        assert_eq!(after["state"], "campaigning", "{after}");
    }
}

/// Found by a hostile review of the event loops: a write streaming on one of
/// the sidecar's own loops was cut off only when a task on the main thread
/// woke it. With the main thread stalled (a blocking write to a full log
/// pipe, say), the lease ran out unrenewed and the write streamed on under
/// the old token. Each loop now watches the token itself. Here the main
/// thread (this test's runtime: keeper, first loop) blocks for 4 s while
/// writes stream through the two other loops: each is cut off at the lease's
/// deadline (2 s TTL), long before the main thread runs again. Checked once
/// to fail with the watch on the main runtime only: the answers came after
/// 4 s, once it ran.
#[tokio::test]
async fn writes_on_the_sidecars_own_loops_are_cut_off_while_its_main_thread_is_stalled() {
    let _one_at_a_time = LOOP_THREADS.lock().await;
    use std::io::Write;
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    // A store that takes every connection and reads it, never answering.
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in sink.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(support::read_retrying(&mut s, &mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    let keeper = KeeperConfig::new("jobs".parse().unwrap(), "a", Duration::from_secs(2));
    let mut cfg = SidecarConfig::new(keeper, format!("http://{sink_addr}"));
    cfg.workers = 3;
    let ((l, a), (al, aa)) = (bind().await, bind().await);
    tokio::spawn(sidecar::run(cfg, Arc::new(Embedded::new()), l, al, None, stop.clone().cancelled_owned()));
    support::until_ready(&format!("http://{aa}"), "the in-process sidecar never held the lock").await;
    assert_eq!(threads_named("fencegate-sidec", 2).await, 2);

    // Four writes that send their head and a first chunk, then nothing: only
    // the two other loops can take them while the main thread is blocked.
    let blocked = std::time::Instant::now();
    let clients = std::thread::spawn(move || {
        let streams: Vec<_> = (0..4)
            .map(|i| {
                let mut s = std::net::TcpStream::connect(a).unwrap();
                write!(s, "PUT /slow{i} HTTP/1.1\r\nHost: app\r\nContent-Length: 100000\r\n\r\nfirst chunk").unwrap();
                s
            })
            .collect();
        streams
            .into_iter()
            .map(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
                let mut buf = [0u8; 4096];
                let n = support::read_retrying(&mut s, &mut buf).unwrap_or(0);
                (String::from_utf8_lossy(&buf[..n]).into_owned(), blocked.elapsed())
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_secs(4));
    let answers = clients.join().unwrap();
    for (answer, at) in answers {
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("lease_not_held"), "{answer:?}");
        assert!(at < Duration::from_millis(3500), "cut off only after the main thread ran again: {at:?}");
    }
}
