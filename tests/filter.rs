//! The filter, as a real process, in front of a real nginx WebDAV store.
//! Every safety test asserts on what nginx really holds.

mod support;

use std::time::{Duration, Instant};

use support::*;

const LOCK: &str = "orders";

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A real nginx and a filter in front of it, with its state in a temp dir.
fn filter_with(args: &[&str]) -> (Nginx, tempfile::TempDir, FilterProc) {
    let nginx = Nginx::start();
    let d = tmp();
    let f = FilterProc::start(d.path(), &nginx.url(), &d.path().join("state"), args);
    (nginx, d, f)
}

/// The two fencing headers, for raw requests.
/// A filter process on `state` in front of `upstream`, for tests that expect it to refuse to start.
fn spawn_filter(name: &str, dir: &std::path::Path, upstream: &str, state: &std::path::Path) -> Proc {
    let state = state.display().to_string();
    let args = ["filter", "--listen", "127.0.0.1:0", "--upstream", upstream, "--state-dir", &state, "--lock", LOCK];
    spawn(name, dir, fencegate_bin(), &args.map(String::from), &[])
}

fn fence_headers(token: u64) -> Vec<(&'static str, String)> {
    vec![("Fencing-Lock", LOCK.to_string()), ("Fencing-Token", token.to_string())]
}

#[tokio::test]
async fn zombie_put_is_refused_and_the_store_keeps_the_newer_content() {
    let (nginx, _d, f) = filter_with(&["--lock", LOCK]);
    let url = format!("{}/data/x", f.url());

    assert_eq!(put(&url, LOCK, 7, "from holder 7").await.status, 201);
    let r = put(&url, LOCK, 5, "from zombie 5").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.error_code(), "fencing_token_stale");
    assert_eq!(r.json()["highest"], 7);
    assert_eq!(nginx.get("/data/x").await.as_deref(), Some("from holder 7"));

    // Same token again is fine (same holder), and reads pass untouched.
    assert_eq!(put(&url, LOCK, 7, "again 7").await.status, 204);
    let r = request("GET", &url, &[], "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "again 7"));
}

#[tokio::test]
async fn a_write_straight_to_the_store_shows_what_the_filter_prevents() {
    // The control: the same two writes sent to nginx directly. The zombie wins.
    let nginx = Nginx::start();
    let url = format!("{}/data/x", nginx.url());
    assert!(put(&url, LOCK, 7, "from holder 7").await.status < 300);
    assert!(put(&url, LOCK, 5, "from zombie 5").await.status < 300);
    assert_eq!(nginx.get("/data/x").await.as_deref(), Some("from zombie 5"));
}

#[tokio::test]
async fn kill_9_after_a_new_highest_token_does_not_forget_it() {
    let nginx = Nginx::start();
    let d = tmp();
    let state = d.path().join("state");
    let mut f = FilterProc::start(d.path(), &nginx.url(), &state, &["--lock", LOCK]);
    assert_eq!(put(&format!("{}/k", f.url()), LOCK, 3, "t3").await.status, 201);
    assert_eq!(put(&format!("{}/k", f.url()), LOCK, 9, "t9").await.status, 204);
    f.proc.kill9();

    let f = FilterProc::start(d.path(), &nginx.url(), &state, &["--lock", LOCK]);
    let r = put(&format!("{}/k", f.url()), LOCK, 8, "t8 zombie").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["highest"], 9);
    assert_eq!(nginx.get("/k").await.as_deref(), Some("t9"));
    let locks = request("GET", &format!("{}/v1/locks", f.admin_url()), &[], "").await.json();
    assert_eq!(locks["locks"][0]["highest"], 9);
    assert_eq!(locks["locks"][0]["durable"], 9);
}

/// The barrier scenario: token 1's PUT is forwarded and its body trickles in;
/// token 2's PUT arrives meanwhile. Returns what the store holds at the end.
async fn trickle_race(extra: &[&str]) -> (String, Duration) {
    let nginx = Nginx::start();
    let d = tmp();
    let f = FilterProc::start(d.path(), &nginx.url(), &d.path().join("state"), &[&["--lock", LOCK], extra].concat());
    let fence = fence_headers;
    let old_body = b"OLD-OLD-OLD-OLD!";
    let mut old = RawRequest::start(f.addr, "/race", &fence(1), old_body.len(), &old_body[..4]).await;
    wait_in_flight(&f.admin_url(), LOCK, 1).await;

    let url = format!("{}/race", f.url());
    let started = Instant::now();
    let mut newer = tokio::spawn(async move {
        let r = put(&url, LOCK, 2, "NEW").await;
        (r.status, started.elapsed())
    });
    // Token 2 has arrived (waited for: on a loaded machine it may take
    // longer than any fixed time), then the old body stays unfinished a
    // while longer. Without the barrier token 2 is not held: its write is
    // answered first, so that the old one lands last for sure.
    wait_highest(&f.admin_url(), LOCK, 2).await;
    let unfinished = Instant::now();
    let mut answered = None;
    if extra.contains(&"--unsafe-no-barrier") {
        answered = Some((&mut newer).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(700).saturating_sub(unfinished.elapsed())).await;
    old.send(&old_body[4..]).await.unwrap();
    let old_status = old.status().await;
    assert!(old_status < 300, "the older write was in flight and completes: {old_status}");
    let (new_status, waited) = match answered {
        Some(a) => a,
        None => newer.await.unwrap(),
    };
    assert!(new_status < 300, "{new_status}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    (nginx.get("/race").await.unwrap(), waited)
}

#[tokio::test]
async fn barrier_orders_an_in_flight_older_write_before_the_newer_one() {
    let (held, waited) = trickle_race(&[]).await;
    assert_eq!(held, "NEW", "the newer holder's write must be the last one applied");
    assert!(waited >= Duration::from_millis(600), "token 2 waited for token 1 to drain: {waited:?}");
}

#[tokio::test]
async fn without_the_barrier_the_older_write_overtakes_the_newer_one() {
    // The same scenario with the barrier switched off (test-only flag):
    // the zombie's in-flight write lands after the newer one and wins.
    let (held, _) = trickle_race(&["--unsafe-no-barrier"]).await;
    assert_eq!(held, "OLD-OLD-OLD-OLD!");
}

#[tokio::test]
async fn an_older_write_that_never_finishes_is_aborted_after_the_drain_timeout() {
    let (nginx, _d, f) = filter_with(&["--lock", LOCK, "--drain-timeout", "1s", "--abort-grace", "300ms"]);
    let fence = fence_headers(1);
    let mut stuck = RawRequest::start(f.addr, "/stuck", &fence, 100, b"zombie").await;
    wait_in_flight(&f.admin_url(), LOCK, 1).await;
    let started = Instant::now();
    let r = put(&format!("{}/stuck", f.url()), LOCK, 2, "NEW").await;
    let waited = started.elapsed();
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(waited >= Duration::from_millis(1200), "drain timeout + abort grace: {waited:?}");
    // The zombie finishes sending: nothing of it may reach the store now.
    let _ = stuck.send(&[b'z'; 94]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(nginx.get("/stuck").await.as_deref(), Some("NEW"));
    // Counted when the zombie's handler sees the abort: polled, not assumed.
    let want = r#"fencegate_filter_writes_refused_total{lock="orders",reason="aborted"} 1"#;
    wait_metric(&f.admin_url(), want, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_write_that_cannot_wait_long_enough_gets_503_with_retry_after() {
    let (nginx, _d, f) = filter_with(&["--lock", LOCK, "--drain-timeout", "5s", "--max-wait", "300ms"]);
    let fence = fence_headers(1);
    let _stuck = RawRequest::start(f.addr, "/slow", &fence, 100, b"zz").await;
    wait_in_flight(&f.admin_url(), LOCK, 1).await;
    let r = put(&format!("{}/slow", f.url()), LOCK, 2, "NEW").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.error_code(), "fencing_barrier_timeout");
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&after), "{after}");
    assert_eq!(nginx.get("/slow").await, None, "nothing was written");
}

#[tokio::test]
async fn state_that_cannot_be_made_durable_answers_503_and_forwards_nothing() {
    let nginx = Nginx::start();
    let d = tmp();
    let state = d.path().join("state");
    let f = FilterProc::start(d.path(), &nginx.url(), &state, &["--lock", LOCK]);
    assert_eq!(put(&format!("{}/a", f.url()), LOCK, 1, "one").await.status, 201);
    // Make the record's path unwritable even for root: a non-empty directory
    // cannot be the target of rename().
    std::fs::remove_file(state.join("lock-orders.json")).unwrap();
    std::fs::create_dir_all(state.join("lock-orders.json/blocker")).unwrap();
    let r = put(&format!("{}/a", f.url()), LOCK, 2, "two").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.error_code(), "fencing_state_unavailable");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(nginx.get("/a").await.as_deref(), Some("one"));
    // Token 1 is refused too now: token 2 was seen, even if not yet durable.
    assert_eq!(put(&format!("{}/a", f.url()), LOCK, 1, "one again").await.status, 409);
}

#[tokio::test]
async fn a_corrupt_state_file_stops_the_start_up() {
    let nginx = Nginx::start();
    let d = tmp();
    let state = d.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("lock-orders.json"), "{\"lock\":\"orders\",\"highest\":12").unwrap();
    let mut p = spawn_filter("filter-corrupt", d.path(), &nginx.url(), &state);
    let code = p.wait_exit(Duration::from_secs(10));
    assert_ne!(code, Some(0));
    let log = p.log_text();
    assert!(log.contains("corrupt state record"), "{log}");
}

#[tokio::test]
async fn two_filters_cannot_share_a_state_dir() {
    let nginx = Nginx::start();
    let d = tmp();
    let state = d.path().join("state");
    let _first = FilterProc::start(d.path(), &nginx.url(), &state, &["--lock", LOCK]);
    let mut p = spawn_filter("filter-second", d.path(), &nginx.url(), &state);
    assert_ne!(p.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(p.log_text().contains("in use by another fencegate filter"), "{}", p.log_text());
}

#[tokio::test]
async fn proactive_fence_refuses_a_zombie_before_the_new_holder_writes() {
    let (nginx, _d, f) = filter_with(&["--lock", LOCK]);
    assert_eq!(put(&format!("{}/doc", f.url()), LOCK, 3, "holder 3").await.status, 201);
    let fence = |t: &str| {
        let url = format!("{}/v1/locks/{LOCK}/fence", f.admin_url());
        let body = format!("{{\"token\": {t}}}");
        async move { request("POST", &url, &[("content-type", "application/json")], &body).await }
    };
    let r = fence("10").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["highest"], 10);
    let r = put(&format!("{}/doc", f.url()), LOCK, 3, "zombie 3").await;
    assert_eq!(r.status, 409);
    assert_eq!(nginx.get("/doc").await.as_deref(), Some("holder 3"));
    let r = fence("9").await;
    assert_eq!((r.status, r.error_code().as_str()), (409, "fencing_token_stale"));
    assert_eq!(fence("10").await.status, 200, "fencing with the current token is idempotent");
    assert_eq!(fence("0").await.status, 400);
    assert_eq!(fence("\"x\"").await.status, 400);
    let r = request("POST", &format!("{}/v1/locks/other/fence", f.admin_url()), &[], "{\"token\":1}").await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "fencing_lock_unknown"));
}

#[tokio::test]
async fn many_locks_collapse_into_totals_in_metrics() {
    let (_nginx, _d, f) =
        filter_with(&["--protect", "/a/=a", "--protect", "/b/=b", "--protect", "/c/=c", "--metrics-lock-limit", "2"]);
    for (p, l, t) in [("/a/x", "a", 3), ("/b/x", "b", 9), ("/c/x", "c", 5)] {
        assert_eq!(put(&format!("{}{p}", f.url()), l, t, "v").await.status, 201);
    }
    put(&format!("{}/a/x", f.url()), "a", 1, "stale").await;
    let m = request("GET", &format!("{}/metrics", f.admin_url()), &[], "").await.body;
    for want in [
        "fencegate_filter_locks 3",
        r#"fencegate_filter_writes_admitted_total{lock="*"} 3"#,
        r#"fencegate_filter_writes_refused_total{lock="*",reason="stale"} 1"#,
        r#"fencegate_filter_highest_token{lock="*"} 9"#,
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }
    assert!(!m.contains(r#"lock="a""#), "no per-lock series above the limit:\n{m}");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    let (nginx, _d, mut f) = filter_with(&["--lock", LOCK]);
    let fence = fence_headers(1);
    let mut slow = RawRequest::start(f.addr, "/bye", &fence, 8, b"half").await;
    wait_in_flight(&f.admin_url(), LOCK, 1).await;
    f.proc.signal(libc::SIGTERM);
    // The shutdown has begun (its readiness goes) before the body ends.
    let signalled = Instant::now();
    while f.ready() {
        assert!(signalled.elapsed() < Duration::from_secs(10), "the filter never began its shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slow.send(b"done").await.unwrap();
    assert_eq!(slow.status().await, 201);
    assert_eq!(f.proc.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(nginx.get("/bye").await.as_deref(), Some("halfdone"));
}

#[tokio::test]
async fn many_clients_with_interleaved_tokens_end_on_the_highest() {
    use rand::{Rng, SeedableRng};
    let (nginx, _d, f) = filter_with(&["--lock", LOCK]);
    let seed: u64 = rand::rng().random();
    println!("seed {seed}");
    let mut tasks = Vec::new();
    for client in 0..16u64 {
        let url = format!("{}/shared", f.url());
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ client);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for seq in 0..12 {
                // Tokens interleave: every client moves through a random walk of tokens.
                let token = 1 + rng.random_range(0..40u64);
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
                let body = format!("{token}:{client}:{seq}");
                let r = put(&url, LOCK, token, &body).await;
                match r.status {
                    201 | 204 => acked.push(token),
                    409 => assert_eq!(r.error_code(), "fencing_token_stale"),
                    s => panic!("unexpected {s}: {}", r.body),
                }
            }
            acked
        }));
    }
    let mut max_acked = 0;
    for t in tasks {
        max_acked = max_acked.max(t.await.unwrap().into_iter().max().unwrap_or(0));
    }
    let held = nginx.get("/shared").await.unwrap();
    let held_token: u64 = held.split(':').next().unwrap().parse().unwrap();
    assert_eq!(held_token, max_acked, "seed {seed}: the store holds {held}, highest acknowledged token {max_acked}");
    let locks = request("GET", &format!("{}/v1/locks", f.admin_url()), &[], "").await.json();
    assert_eq!(locks["locks"][0]["highest"], max_acked);
}
