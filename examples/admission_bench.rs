//! In-process cost of the filter's admission path (admit + complete of one
//! write), with one lock and with many, and the memory a lock costs; and of
//! matching a write's path against the rules (`--protect`), with one rule
//! and with one per lock, the paths the bench's many-locks part writes; and
//! of both in a row, as the filter's write path does them (the path's rule,
//! its lock's entry, admit + complete).
//! Prints one JSON object. Run: cargo run --release --example admission_bench [LOCKS] [OPS]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fencegate::filter::admission::{BarrierConfig, Locks};
use fencegate::filter::rules::{Protection, Targets};
use fencegate::token::{LockName, Token};

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// `ops` indexes below `len`, spread by a xorshift: cheap and repeatable.
fn spread(len: usize, ops: u64) -> impl Iterator<Item = usize> {
    let mut x: u64 = 0x9E3779B97F4A7C15;
    (0..ops).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % len as u64) as usize
    })
}

async fn run(locks: &Locks, names: &[LockName], ops: u64) -> f64 {
    let token = Token::new(1).unwrap();
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let start = Instant::now();
    for i in spread(names.len(), ops) {
        let e = locks.entry(&names[i]);
        let p = e.admit_write(token, far).await.expect("admitted");
        p.complete();
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

/// ns per write to decide its targets (`Targets::resolve`) over `paths`.
fn match_rules(protection: &Protection, paths: &[String], ops: u64) -> f64 {
    let start = Instant::now();
    for i in spread(paths.len(), ops) {
        let t = Targets::resolve(protection, &[paths[i].as_str()], false).expect("resolved");
        std::hint::black_box(t);
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

/// ns per write from its path to its admission: the rules, the lock's entry
/// (the rule's own, [`Locks::entry_of`]), admit + complete.
async fn write_via_rules(locks: &Locks, protection: &Protection, paths: &[String], ops: u64) -> f64 {
    let token = Token::new(1).unwrap();
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let start = Instant::now();
    for i in spread(paths.len(), ops) {
        let t = Targets::resolve(protection, &[paths[i].as_str()], false).expect("resolved");
        let e = locks.entry_of(t.lock().expect("protected"));
        e.admit_write(token, far).await.expect("admitted").complete();
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

fn rules(n: usize) -> Protection {
    let rule = |i: usize| Protection::parse_rule(&format!("/k/{i}/=lock{i}")).unwrap();
    Protection::rules((0..n).map(rule))
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

    // The paths the bench's wrk script writes: `/k/{i}/obj`, lock `lock{i}`.
    let paths: Vec<String> = (0..n).map(|i| format!("/k/{i}/obj")).collect();
    let one_rule = rules(1);
    let rss_before_rules = rss_kib();
    let all_rules = rules(n);
    let rule_bytes = (rss_kib().saturating_sub(rss_before_rules) * 1024) as f64 / n as f64;
    match_rules(&one_rule, &paths[..1], 10_000); // warm-up
    let ns_rules_one = match_rules(&one_rule, &paths[..1], ops);
    let ns_rules_many = match_rules(&all_rules, &paths, ops);
    // The same registries, now through the rules (the one rule's lock is
    // `lock0`, the one lock's registry's).
    write_via_rules(&single, &one_rule, &paths[..1], 10_000).await; // warm-up
    let ns_path_one = write_via_rules(&single, &one_rule, &paths[..1], ops).await;
    let ns_path_many = write_via_rules(&spread, &all_rules, &paths, ops).await;
    println!(
        "{{\"locks\":{n},\"ops\":{ops},\"ns_per_write_one_lock\":{ns_one:.1},\"ns_per_write_many_locks\":{ns_many:.1},\"rss_kib_for_locks\":{},\"bytes_per_lock\":{:.0},\"ns_per_match_one_rule\":{ns_rules_one:.1},\"ns_per_match_many_rules\":{ns_rules_many:.1},\"bytes_per_rule\":{rule_bytes:.0},\"ns_per_write_via_rules_one\":{ns_path_one:.1},\"ns_per_write_via_rules_many\":{ns_path_many:.1}}}",
        after.saturating_sub(before),
        (after.saturating_sub(before) * 1024) as f64 / n as f64
    );
}
