//! `fencegate demo`, run as a user would, with the embedded backend and with a real etcd.

mod support;

use std::process::Command;
use std::time::Instant;

fn run_demo(extra: &[&str]) -> String {
    let started = Instant::now();
    let out = Command::new(support::fencegate_bin()).arg("demo").args(extra).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{text}");
    assert!(started.elapsed().as_secs() < 30, "the demo must finish within 30 s");
    for want in [
        "LOST UPDATE: the zombie's late write overwrote B's newer data",
        "409 fencing_token_stale",
        "SAFE: the zombie's write was refused (409) and B's data is intact",
        "503 lease_not_held",
        "Verdict:",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    text
}

#[test]
fn demo_tells_the_story_without_etcd() {
    let t = run_demo(&[]);
    assert!(t.contains("embedded lease backend"));
}

#[test]
fn demo_tells_the_same_story_against_a_real_etcd() {
    let etcd = support::Etcd::start();
    let t = run_demo(&["--etcd", &etcd.client_url]);
    assert!(t.contains("leases from etcd"), "{t}");
}
