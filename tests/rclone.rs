//! rclone as the app, against a real nginx WebDAV store through both hops
//! (`rclone -> fencegate sidecar (etcd) -> fencegate filter -> nginx`), and
//! the retrying client of issue 14 (`--rejoin`).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::*;

/// `rclone ARGS` with the remote `fg:` pointing at `url` (WebDAV, vendor
/// "other", as for nginx); panics with rclone's output when it fails.
fn rclone(url: &str, args: &[&str]) -> String {
    let out = Command::new(on_path("rclone"))
        .args(args)
        .args(["--retries", "1", "--low-level-retries", "2", "--config", "/dev/null"])
        .env("RCLONE_CONFIG_FG_TYPE", "webdav")
        .env("RCLONE_CONFIG_FG_URL", url)
        .env("RCLONE_CONFIG_FG_VENDOR", "other")
        .output()
        .expect("rclone runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "rclone {args:?} failed:\n{text}");
    text
}

/// Every file under `root`, by path relative to it, with its contents.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Issue 14, item 4 (rclone): copy (36 small files in nested directories and
/// one 20 MB file), check, sync (changed, added and deleted files), a
/// server-side move and copy (WebDAV `MOVE`/`COPY` with `Destination`), and a
/// purge, through sidecar and filter; after each, the store's disk must hold
/// exactly what rclone was asked for. It guards the two hops' WebDAV
/// behaviour (Host and `Destination` passed through, MKCOL/PROPFIND/COPY/MOVE
/// fenced or passed as they should be); a filter that mangles any of them
/// fails it (checked: without the `/moved/` rule the server-side move is
/// refused 403 `path_not_protected` and the test fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rclone_webdav_through_sidecar_and_filter() {
    let nginx = Nginx::start();
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    // Rules, not `--lock`: every path and `Destination` rclone writes is
    // decoded and matched, as for a store shared between locks.
    let rules = ["--protect", "/set/=data", "--protect", "/moved/=data", "--protect", "/copied/=data"];
    let filter = FilterProc::start(dir.path(), &nginx.url(), &dir.path().join("state"), &rules);
    let sidecar = SidecarProc::start(
        dir.path(),
        &etcd.client_url,
        "data",
        "app-1",
        &filter.url(),
        &["--fence", &filter.admin_url(), "--ttl", "5s"],
    );
    wait_holder(&[&sidecar], Duration::from_secs(10)).await;
    let url = sidecar.url();
    let disk = nginx.dir.path().join("data");

    let src: PathBuf = dir.path().join("src");
    for i in 0..36 {
        write(&src, &format!("d{}/sub{}/f{i}.txt", i % 3, i % 2), format!("file {i}\n").repeat(i + 1).as_bytes());
    }
    let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    write(&src, "big.bin", &big);

    rclone(&url, &["copy", src.to_str().unwrap(), "fg:set", "--transfers", "4"]);
    assert!(tree(&disk.join("set")) == tree(&src), "after copy, the store differs from the source");
    rclone(&url, &["check", src.to_str().unwrap(), "fg:set"]);

    // Sync: one file changed, one added, two deleted at the source.
    write(&src, "d0/sub0/f0.txt", b"changed, and longer than before\n");
    write(&src, "d9/new.txt", b"new\n");
    std::fs::remove_file(src.join("d1/sub1/f1.txt")).unwrap();
    std::fs::remove_file(src.join("d2/sub0/f2.txt")).unwrap();
    rclone(&url, &["sync", src.to_str().unwrap(), "fg:set"]);
    assert!(tree(&disk.join("set")) == tree(&src), "after sync, the store differs from the source");

    // Server-side move and copy: rclone sends MOVE and COPY with a
    // Destination (shown by --dump headers), no download and upload.
    let moved = rclone(&url, &["moveto", "fg:set/d9/new.txt", "fg:moved/new.txt", "-vv", "--dump", "headers"]);
    assert!(
        moved.contains("MOVE /set/d9/new.txt") && moved.contains("Moved (server-side)"),
        "not a server-side move:\n{moved}"
    );
    let copied = rclone(&url, &["copy", "fg:set/d0", "fg:copied", "-vv", "--dump", "headers"]);
    assert!(
        copied.contains("COPY /set/d0/") && copied.contains("(server-side copy)"),
        "not a server-side copy:\n{copied}"
    );
    assert!(!disk.join("set/d9/new.txt").exists());
    assert_eq!(std::fs::read(disk.join("moved/new.txt")).unwrap(), b"new\n");
    assert!(tree(&disk.join("copied")) == tree(&src.join("d0")), "server-side copy differs");

    rclone(&url, &["purge", "fg:set"]);
    assert!(!disk.join("set").exists(), "purge left {:?}", tree(&disk.join("set")).keys().collect::<Vec<_>>());
    assert!(disk.join("copied/sub0").exists(), "purge went beyond its directory");
    let metrics = request("GET", &format!("{}/metrics", filter.admin_url()), &[], "").await.body;
    let refused: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("fencegate_filter_writes_refused_total") && !l.ends_with(" 0"))
        .collect();
    assert!(refused.is_empty(), "the filter refused some of rclone's writes: {refused:?}");
}

/// PUTs `body` to `url` through the app's sidecar until one is answered
/// 2xx, as an app (or rclone's `--retries`) that keeps retrying a refused
/// upload does; returns the statuses it got, in order, and stops when `stop`
/// is set.
async fn retry_put(url: String, body: &'static str, stop: tokio::sync::watch::Receiver<bool>) -> Vec<u16> {
    let mut seen = Vec::new();
    while !*stop.borrow() {
        let client = fencegate::proxy::simple_client();
        let req = http::Request::builder().method("PUT").uri(&url).body(Full::new(Bytes::from(body))).unwrap();
        match fencegate::proxy::send(&client, req, Duration::from_secs(1)).await {
            Ok((s, _, _)) if s.is_success() => {
                seen.push(s.as_u16());
                return seen;
            }
            Ok((s, _, _)) => seen.push(s.as_u16()),
            Err(_) => seen.push(0), // no answer (the sidecar is frozen)
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

/// The retrying client: holder A freezes (SIGSTOP of its sidecar) during an
/// upload its app keeps retrying, B takes over and writes, A thaws (its
/// retries refused), then B steps down. Returns what the store holds at the
/// object and the statuses A's client got.
async fn retrying_client(rejoin: &str) -> (Option<String>, Vec<u16>) {
    let nginx = Nginx::start();
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let filter = FilterProc::start(dir.path(), &nginx.url(), &dir.path().join("state"), &["--lock", "data"]);
    let extra = ["--fence", &filter.admin_url(), "--rejoin", rejoin];
    let a = SidecarProc::start(dir.path(), &etcd.client_url, "data", "a", &filter.url(), &extra);
    let (_, ta, _) = wait_holder(&[&a], Duration::from_secs(10)).await;
    let b = SidecarProc::start(dir.path(), &etcd.client_url, "data", "b", &filter.url(), &extra);
    let obj = "/data/report.txt";
    assert_eq!(request("PUT", &format!("{}{obj}", a.url()), &[], "A, first").await.status / 100, 2);

    // A's pod pauses while its app uploads; the app keeps retrying.
    a.proc.signal(libc::SIGSTOP);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let client = tokio::spawn(retry_put(format!("{}{obj}", a.url()), "A, stale retry", stop_rx));
    let (_, tb, _) = wait_holder(&[&b], Duration::from_secs(10)).await;
    assert!(tb > ta);
    assert_eq!(request("PUT", &format!("{}{obj}", b.url()), &[], "B, newer").await.status / 100, 2);
    a.proc.signal(libc::SIGCONT);
    // A's sidecar learns it lost the lock; its client's retries are refused.
    let end = Instant::now() + Duration::from_secs(10);
    while a.lock().await.map(|v| v["holding"].as_bool()) != Some(Some(false)) {
        assert!(Instant::now() < end, "A never noticed its loss");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(nginx.get(obj).await.as_deref(), Some("B, newer"), "the frozen holder's upload was refused");

    // B steps down (SIGTERM revokes its lease): A may win the lock again.
    b.proc.signal(libc::SIGTERM);
    let end = Instant::now() + Duration::from_secs(6);
    while !client.is_finished() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let seen = client.await.unwrap();
    if rejoin == "manual" {
        let state = a.lock().await.unwrap();
        assert_eq!(state["state"], "awaiting_rejoin", "{state}");
    }
    (nginx.get(obj).await, seen)
}

/// Issue 14, item 4 (the retrying client): with `--rejoin manual`, an
/// instance that lost the lock does not campaign again until its app
/// rejoins, so a retry kept from the lost session never gets a new valid
/// token and the newer holder's object survives. The control, `--rejoin
/// auto` (the default), shows the hazard: A wins the lock back once B steps
/// down, its client's retry carries the new token, the filter rightly admits
/// it, and B's object is overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_client_cannot_overwrite_after_a_loss_with_rejoin_manual() {
    let (held, seen) = retrying_client("auto").await;
    assert_eq!(held.as_deref(), Some("A, stale retry"), "control: the retry overwrites B's object; {seen:?}");
    assert!(seen.iter().any(|s| *s == 409 || *s == 503), "the stale upload was refused first: {seen:?}");

    let (held, seen) = retrying_client("manual").await;
    assert_eq!(held.as_deref(), Some("B, newer"), "with --rejoin manual B's object survives; {seen:?}");
    assert!(seen.iter().all(|s| !(200..300).contains(s)), "{seen:?}");
    assert!(seen.contains(&503), "refused by A's sidecar while awaiting rejoin: {seen:?}");
}
