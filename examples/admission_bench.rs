//! In-process cost of the filter's admission path (admit + complete of one
//! write), with one lock and with many, and the memory a lock costs.
//! Prints one JSON object. Run: cargo run --release --example admission_bench [LOCKS] [OPS]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fencegate::filter::admission::{BarrierConfig, Locks};
use fencegate::token::{LockName, Token};

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

async fn run(locks: &Locks, names: &[LockName], ops: u64) -> f64 {
    let token = Token::new(1).unwrap();
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let start = Instant::now();
    for _ in 0..ops {
        // xorshift: a cheap, repeatable spread over the locks
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let name = &names[(x % names.len() as u64) as usize];
        let e = locks.entry(name);
        let p = e.admit_write(token, far).await.expect("admitted");
        p.complete();
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let ops: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2_000_000);
    let one: Vec<LockName> = vec!["lock0".parse().unwrap()];
    let many: Vec<LockName> = (0..n).map(|i| format!("lock{i}").parse().unwrap()).collect();

    let single = Arc::new(Locks::new(None, [], BarrierConfig::default()));
    run(&single, &one, 10_000).await; // warm-up
    let ns_one = run(&single, &one, ops).await;

    let before = rss_kib();
    let spread = Arc::new(Locks::new(None, [], BarrierConfig::default()));
    // Touch every lock once (raises each to token 1) so all entries exist.
    let token = Token::new(1).unwrap();
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    for name in &many {
        spread.entry(name).admit_write(token, far).await.unwrap().complete();
    }
    let after = rss_kib();
    let ns_many = run(&spread, &many, ops).await;
    println!(
        "{{\"locks\":{n},\"ops\":{ops},\"ns_per_write_one_lock\":{ns_one:.1},\"ns_per_write_many_locks\":{ns_many:.1},\"rss_kib_for_locks\":{},\"bytes_per_lock\":{:.0}}}",
        after.saturating_sub(before),
        (after.saturating_sub(before) * 1024) as f64 / n as f64
    );
}
