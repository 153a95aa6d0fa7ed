//! Issue 13: only a genuine holder's token can raise a lock's mark; nobody
//! can brick a lock. Real etcd, real nginx, the filter and sidecars as
//! processes; assertions on what the store really holds and on the filter's
//! durable mark.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const LOCK: &str = "ledger";
const MAX: u64 = i64::MAX as u64;

/// The filter's mark for `LOCK`, and its "verification" field.
async fn mark(f: &FilterProc) -> (u64, String) {
    let v = request("GET", &format!("{}/v1/locks", f.admin_url()), &[], "").await.json();
    let highest = v["locks"].as_array().unwrap().iter().find(|l| l["lock"] == LOCK).map_or(0, |l| {
        assert_eq!(l["highest"], l["durable"], "{v}");
        l["highest"].as_u64().unwrap()
    });
    (highest, v["verification"].as_str().unwrap_or_default().to_owned())
}

async fn fence(f: &FilterProc, token: u64) -> Resp {
    request("POST", &format!("{}/v1/locks/{LOCK}/fence", f.admin_url()), &[], &format!("{{\"token\": {token}}}")).await
}

/// Polls until a write through the sidecar is answered 2xx (the sidecar
/// holds the lock and has fenced); returns its token.
async fn holder_writes(s: &SidecarProc, path: &str, body: &str) -> u64 {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(t) = s.holding().await {
            let r = request("PUT", &format!("{}{path}", s.url()), &[], body).await;
            if r.status / 100 == 2 {
                return t;
            }
            assert!(Instant::now() < end, "holder's write refused: {} {}", r.status, r.body);
        }
        assert!(Instant::now() < end, "no holder");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The create revision of every key in `LOCK`'s queue, oldest first.
async fn queue(etcd: &Etcd) -> Vec<u64> {
    let mut c = etcd_client::Client::connect([etcd.client_url.as_str()], None).await.unwrap();
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_sort(etcd_client::SortTarget::Create, etcd_client::SortOrder::Ascend);
    let r = c.get(format!("/fencegate/locks/{LOCK}/"), Some(opts)).await.unwrap();
    r.kvs().iter().map(|kv| kv.create_revision() as u64).collect()
}

/// A client that bypasses the sidecar and sends huge tokens to the data port
/// and to `/fence` is refused (403 `fencing_token_unverified`), the mark does
/// not move, nothing reaches the store, and the genuine holder keeps writing.
/// Fails on the old code: its control below (a filter without `--etcd`,
/// which is how every filter worked before) admits the forged token and the
/// holder is refused from then on.
#[tokio::test]
async fn forged_tokens_are_refused_and_the_holder_keeps_writing() {
    let (etcd, nginx, d) = (Etcd::start(), Nginx::start(), tempfile::tempdir().unwrap());
    let state = d.path().join("state");
    let f = FilterProc::start(d.path(), &nginx.url(), &state, &["--lock", LOCK, "--etcd", &etcd.client_url]);
    let s = SidecarProc::start(d.path(), &etcd.client_url, LOCK, "a", &f.url(), &["--fence", &f.admin_url()]);
    let t = holder_writes(&s, "/a.txt", "genuine 1").await;
    assert_eq!(mark(&f).await, (t, "etcd".into()));
    for forged in [MAX, t + 1000] {
        let r = put(&format!("{}/a.txt", f.url()), LOCK, forged, "forged").await;
        assert_eq!((r.status, r.error_code().as_str()), (403, "fencing_token_unverified"), "{}", r.body);
        assert_eq!(r.json()["holder_token"], t);
        let r = fence(&f, forged).await;
        assert_eq!((r.status, r.error_code().as_str()), (403, "fencing_token_unverified"), "{}", r.body);
    }
    // Past int64: malformed, on both ports.
    let r = put(&format!("{}/a.txt", f.url()), LOCK, u64::MAX, "forged").await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "fencing_token_malformed"), "{}", r.body);
    let r = fence(&f, u64::MAX).await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "fencing_token_malformed"), "{}", r.body);
    assert_eq!(mark(&f).await.0, t, "the mark did not move");
    assert_eq!(nginx.get("/a.txt").await.as_deref(), Some("genuine 1"));
    assert_eq!(holder_writes(&s, "/a.txt", "genuine 2").await, t);
    assert_eq!(nginx.get("/a.txt").await.as_deref(), Some("genuine 2"));
    let m = request("GET", &format!("{}/metrics", f.admin_url()), &[], "").await.body;
    assert!(m.contains("fencegate_filter_verifications_total{outcome=\"not_holder\"} 4"), "{m}");
    assert!(m.contains("fencegate_filter_verification_latency_seconds_count"), "{m}");

    // Control: without --etcd (the old filter) the forged token is admitted
    // and bricks the lock for the genuine holder.
    let f2 = FilterProc::start(d.path(), &nginx.url(), &d.path().join("state2"), &["--lock", LOCK]);
    assert_eq!(put(&format!("{}/b.txt", f2.url()), LOCK, t, "genuine").await.status / 100, 2);
    let r = put(&format!("{}/b.txt", f2.url()), LOCK, MAX, "forged").await;
    assert_eq!(r.status / 100, 2, "control: trusted as sent: {}", r.body);
    assert_eq!(mark(&f2).await, (MAX, "off".into()));
    assert!(f2.proc.log_text().contains("verification is off"));
    assert_eq!(put(&format!("{}/b.txt", f2.url()), LOCK, t, "genuine").await.status, 409);
}

/// A queued candidate's token (its key exists but is not the lowest) cannot
/// raise the mark (403); a released holder's token, sent as a raise once a
/// newer holder exists, is refused as stale (409). Fails on the old code:
/// both raises were admitted.
#[tokio::test]
async fn queued_and_released_tokens_are_refused() {
    let (etcd, nginx, d) = (Etcd::start(), Nginx::start(), tempfile::tempdir().unwrap());
    let f = FilterProc::start(
        d.path(),
        &nginx.url(),
        &d.path().join("state"),
        &["--lock", LOCK, "--etcd", &etcd.client_url],
    );
    // Neither sidecar fences nor writes: the tokens reach the filter only as
    // the test sends them.
    let a = SidecarProc::start(d.path(), &etcd.client_url, LOCK, "a", &f.url(), &["--release-pause", "30s"]);
    let (_, ta, _) = wait_holder(&[&a], Duration::from_secs(10)).await;
    let b = SidecarProc::start(d.path(), &etcd.client_url, LOCK, "b", &f.url(), &[]);
    let end = Instant::now() + Duration::from_secs(10);
    let tb = loop {
        let q = queue(&etcd).await;
        if q.len() == 2 {
            assert_eq!(q[0], ta);
            break q[1];
        }
        assert!(Instant::now() < end, "b never queued: {q:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = put(&format!("{}/q.txt", f.url()), LOCK, tb, "queued").await;
    assert_eq!((r.status, r.error_code().as_str()), (403, "fencing_token_unverified"), "{}", r.body);
    assert_eq!(fence(&f, tb).await.status, 403);
    assert_eq!(nginx.get("/q.txt").await, None);
    assert_eq!(mark(&f).await.0, 0);
    // a lets go; b holds with tb; a's token, never admitted here, now comes.
    let r = request("POST", &format!("{}/v1/lock/release", a.admin_url()), &[], "").await;
    assert_eq!(r.status / 100, 2, "{}", r.body);
    let (_, t, _) = wait_holder(&[&b], Duration::from_secs(10)).await;
    assert_eq!(t, tb);
    let r = put(&format!("{}/q.txt", f.url()), LOCK, ta, "released").await;
    assert_eq!((r.status, r.error_code().as_str()), (409, "fencing_token_stale"), "{}", r.body);
    assert_eq!(r.json()["holder_token"], tb);
    assert_eq!(nginx.get("/q.txt").await, None);
    // The genuine holder raises.
    assert_eq!(holder_writes(&b, "/q.txt", "b").await, tb);
    assert_eq!(mark(&f).await.0, tb);
}

/// etcd stopped: raises get 503 `fencing_verify_unavailable` with
/// Retry-After and change nothing, writes at the current highest still pass;
/// etcd back: a new holder's raise passes. Fails on the old code (no
/// verification: the raise while etcd is down is admitted).
#[tokio::test]
async fn etcd_down_refuses_raises_but_not_current_writes() {
    let (mut etcd, nginx, d) = (Etcd::start(), Nginx::start(), tempfile::tempdir().unwrap());
    let f = FilterProc::start(
        d.path(),
        &nginx.url(),
        &d.path().join("state"),
        &["--lock", LOCK, "--etcd", &etcd.client_url, "--etcd-timeout", "500ms"],
    );
    let s = SidecarProc::start(d.path(), &etcd.client_url, LOCK, "a", &f.url(), &["--fence", &f.admin_url()]);
    let t = holder_writes(&s, "/e.txt", "1").await;
    etcd.stop();
    let started = Instant::now();
    let r = put(&format!("{}/e.txt", f.url()), LOCK, t + 1, "raise").await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "fencing_verify_unavailable"), "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by --etcd-timeout: {:?}", started.elapsed());
    assert_eq!(fence(&f, t + 1).await.error_code(), "fencing_verify_unavailable");
    assert_eq!(mark(&f).await.0, t);
    let r = put(&format!("{}/e.txt", f.url()), LOCK, t, "at the highest").await;
    assert_eq!(r.status / 100, 2, "{}", r.body);
    assert_eq!(nginx.get("/e.txt").await.as_deref(), Some("at the highest"));
    etcd.resume();
    // A new holder (the same sidecar, campaigning again) raises and is verified.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = request("POST", &format!("{}/v1/lock/release", s.admin_url()), &[], "").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let t2 = holder_writes(&s, "/e.txt", "after").await;
        if t2 > t {
            assert_eq!(mark(&f).await.0, t2);
            break;
        }
        assert!(Instant::now() < end, "no higher token after etcd came back");
    }
    assert_eq!(nginx.get("/e.txt").await.as_deref(), Some("after"));
}

fn set_mark(state: &std::path::Path, token: u64) -> std::process::Output {
    Command::new(fencegate_bin())
        .args(["filter", "set-mark", "--state-dir", &state.display().to_string(), "--lock", LOCK])
        .args(["--token", &token.to_string()])
        .output()
        .unwrap()
}

/// `set-mark` lowers a forged mark with the filter stopped, and refuses while
/// a filter runs on the directory. Fails on the old code (no such command).
#[tokio::test]
async fn set_mark_repairs_a_forged_mark_offline_only() {
    let (nginx, d) = (Nginx::start(), tempfile::tempdir().unwrap());
    let state = d.path().join("state");
    // A mark forged through a filter without verification.
    let mut f = FilterProc::start(d.path(), &nginx.url(), &state, &["--lock", LOCK]);
    assert_eq!(put(&format!("{}/m.txt", f.url()), LOCK, 5, "5").await.status / 100, 2);
    assert_eq!(put(&format!("{}/m.txt", f.url()), LOCK, MAX, "forged").await.status / 100, 2);
    assert_eq!(put(&format!("{}/m.txt", f.url()), LOCK, 5, "5").await.status, 409);
    let out = set_mark(&state, 5);
    assert!(!out.status.success(), "must refuse while the filter runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{out:?}");
    assert_eq!(mark(&f).await.0, MAX);
    f.proc.signal(libc::SIGTERM);
    assert_eq!(f.proc.wait_exit(Duration::from_secs(10)), Some(0));
    let out = set_mark(&state, 5);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("lock {LOCK}: high-water mark {MAX} -> 5"));
    f.restart();
    assert_eq!(mark(&f).await.0, 5);
    let r = put(&format!("{}/m.txt", f.url()), LOCK, 5, "repaired").await;
    assert_eq!(r.status / 100, 2, "{}", r.body);
    assert_eq!(nginx.get("/m.txt").await.as_deref(), Some("repaired"));
}
