//! An app worker for the end-to-end tests: while it believes it holds the
//! lock, it appends `worker token seq` lines to a log file in the store by
//! read-modify-write, talking only to its sidecar, and journals every
//! attempt and answer (`unix_ms seq token status token_changed`).
//!
//! Belief: it asks its sidecar's `GET /v1/lock` every `--check-every`
//! iterations, like an app that caches its leadership. On SIGUSR1 it stops
//! itself (SIGSTOP) right after its next read and before its write: the
//! classic pause that turns a holder into a zombie.
//!
//! Usage: append_worker NAME PROXY_URL ADMIN_URL JOURNAL [PATH] [CHECK_EVERY] [MAX_SECS]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fencegate::proxy::{call as send, simple_client, SimpleClient as C};

async fn call(c: &C, method: &str, url: &str, body: String) -> (u16, String) {
    match send(c, method, url, None, body, Duration::from_secs(10)).await {
        Ok((s, b)) => (s.as_u16(), String::from_utf8_lossy(&b).into_owned()),
        Err(_) => (0, String::new()),
    }
}

async fn lock_state(c: &C, admin: &str) -> Option<(bool, u64)> {
    let (s, b) = call(c, "GET", &format!("{admin}/v1/lock"), String::new()).await;
    if s != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&b).ok()?;
    Some((v["holding"].as_bool()?, v["token"].as_u64().or(v["last_token"].as_u64()).unwrap_or(0)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (name, proxy, admin, journal) = (a[1].clone(), a[2].clone(), a[3].clone(), a[4].clone());
    let path = a.get(5).cloned().unwrap_or_else(|| "/log".into());
    let check_every: u64 = a.get(6).and_then(|s| s.parse().ok()).unwrap_or(3);
    let max_secs: u64 = a.get(7).and_then(|s| s.parse().ok()).unwrap_or(600);

    let freeze = Arc::new(AtomicBool::new(false));
    let f2 = freeze.clone();
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).unwrap();
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            f2.store(true, Ordering::SeqCst);
        }
    });

    let c: C = simple_client();
    let mut j = std::fs::OpenOptions::new().create(true).append(true).open(&journal).unwrap();
    let started = Instant::now();
    let mut belief: Option<u64> = None;
    let mut seq = 0u64;
    let mut iter = 0u64;
    while started.elapsed() < Duration::from_secs(max_secs) {
        if iter.is_multiple_of(check_every) || belief.is_none() {
            belief = match lock_state(&c, &admin).await {
                Some((true, t)) => Some(t),
                _ => None,
            };
        }
        iter += 1;
        let Some(token) = belief else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        seq += 1;
        let url = format!("{proxy}{path}");
        let (rs, content) = call(&c, "GET", &url, String::new()).await;
        let content = match rs {
            200 => content,
            404 => String::new(),
            _ => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if freeze.swap(false, Ordering::SeqCst) {
            // Paused between the read and the write.
            unsafe {
                libc::raise(libc::SIGSTOP);
            }
        }
        let (ws, _) = call(&c, "PUT", &url, format!("{content}{name} {token} {seq}\n")).await;
        // Did the sidecar hold a different token than the one we wrote?
        let changed = if (200..300).contains(&ws) {
            matches!(lock_state(&c, &admin).await, Some((_, t)) if t != token)
        } else {
            false
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
        writeln!(j, "{now} {seq} {token} {ws} {}", changed as u8).unwrap();
        j.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
