//! S3 with real parts: SeaweedFS's S3 gateway (SigV4 enforced by an identity
//! config) behind `fencegate filter`, an etcd-backed `fencegate sidecar` in
//! front, and boto3 as the app (tests/support/s3_ops.py: path-style, `s3v4`).
//! Every operation also runs straight against SeaweedFS as the control.

mod support;

use std::time::Duration;

use support::*;

/// boto3's operations through `sidecar -> filter -> SeaweedFS`, by name; "ok"
/// or the error.
fn ops(endpoint: &str, bucket: &str, prefix: &str) -> serde_json::Value {
    let out = s3_ops(&[endpoint, bucket, prefix], S3_ACCESS_KEY, S3_SECRET_KEY);
    assert!(out.status.success(), "s3_ops.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn failures(r: &serde_json::Value) -> Vec<String> {
    r.as_object().unwrap().iter().filter(|(_, v)| *v != "ok").map(|(k, v)| format!("{k}: {v}")).collect()
}

/// Issue 14, item 1: signed S3 requests pass both hops, because both pass
/// the client's `Host` through (and keep it in `X-Forwarded-Host`). Fails on
/// the old code (both hops set `Host` to their upstream's, no
/// `X-Forwarded-Host`): every operation is refused, puts with
/// `SignatureDoesNotMatch` (checked by running it against that code).
/// Then the zombie: once the filter is fenced with a newer token, the same
/// client's put is refused and the store keeps its object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_through_sidecar_and_filter_like_straight_to_seaweedfs() {
    let weed = SeaweedFs::start();
    weed.create_bucket("pbkt");
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();

    let control = ops(&weed.url(), "pbkt", "direct/");
    assert!(failures(&control).is_empty(), "straight to SeaweedFS: {:?}", failures(&control));
    assert_eq!(control.as_object().unwrap().len(), 9);

    let state = dir.path().join("state");
    let filter = FilterProc::start(dir.path(), &weed.url(), &state, &["--lock", "data"]);
    let sidecar = SidecarProc::start(
        dir.path(),
        &etcd.client_url,
        "data",
        "app-1",
        &filter.url(),
        &["--fence", &filter.admin_url()],
    );
    let (_, token, _) = wait_holder(&[&sidecar], Duration::from_secs(10)).await;
    let fenced = ops(&sidecar.url(), "pbkt", "fenced/");
    assert_eq!(
        failures(&fenced),
        Vec::<String>::new(),
        "through sidecar and filter; filter log:\n{}",
        filter.proc.log_text()
    );
    let metrics = request("GET", &format!("{}/metrics", filter.admin_url()), &[], "").await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fencegate_filter_writes_admitted_total{lock=\"data\"}") && !l.ends_with(" 0")),
        "the writes went through the filter with tokens:\n{metrics}"
    );

    // `--upstream-host` on both hops (for stores that route by name): the store then gets its own address as
    // Host, and SeaweedFS verifies the signature against the X-Forwarded-Host both hops keep.
    let host = weed.s3.to_string();
    let f2 = FilterProc::start(
        dir.path(),
        &weed.url(),
        &dir.path().join("state2"),
        &["--lock", "data2", "--upstream-host", &host],
    );
    let s2 = SidecarProc::start(dir.path(), &etcd.client_url, "data2", "app-2", &f2.url(), &["--upstream-host", &host]);
    wait_holder(&[&s2], Duration::from_secs(10)).await;
    let named = ops(&s2.url(), "pbkt", "named/");
    assert_eq!(failures(&named), Vec::<String>::new(), "with --upstream-host");

    // The zombie: a newer holder fenced the filter; this instance's writes are refused by the filter.
    let r = request(
        "POST",
        &format!("{}/v1/locks/data/fence", filter.admin_url()),
        &[("content-type", "application/json")],
        &format!("{{\"token\": {}}}", token + 1000),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let zombie = s3_ops(&[&sidecar.url(), "pbkt", "fenced/", "overwrite"], S3_ACCESS_KEY, S3_SECRET_KEY);
    let zombie: serde_json::Value = serde_json::from_slice(&zombie.stdout).unwrap();
    assert!(zombie["overwrite"].as_str().unwrap().contains("409"), "the zombie's put: {zombie}");
    let still = s3_ops(&[&weed.url(), "pbkt", "fenced/", "get"], S3_ACCESS_KEY, S3_SECRET_KEY);
    assert!(
        String::from_utf8_lossy(&still.stdout).contains("\"get\": \"ok\""),
        "the store kept the newer object: {}",
        String::from_utf8_lossy(&still.stdout)
    );
}
