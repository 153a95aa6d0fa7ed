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

/// One boto3 call (tests/support/s3_call.py): `{"status", "body", "keys"}`.
fn call(args: serde_json::Value) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/s3_call.py");
    let out = std::process::Command::new(on_path("python3"))
        .arg(script)
        .arg(args.to_string())
        .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "s3_call.py {args}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The keys SeaweedFS really holds in `bucket` (listed straight from it).
fn stored(weed: &SeaweedFs, bucket: &str) -> Vec<String> {
    let r = call(serde_json::json!({"endpoint": weed.url(), "op": "list", "bucket": bucket}));
    serde_json::from_value(r["keys"].clone()).unwrap_or_else(|_| panic!("list {bucket}: {r}"))
}

/// The error code in a refusal's JSON body ("" for a store's answer).
fn code(r: &serde_json::Value) -> String {
    let body = r["body"].as_str().unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_default()
}

/// Issue 14, item 2 (S3-aware rules, `--store s3`), with real SeaweedFS and
/// boto3, a bucket `split` shared by two locks (`/split/a/=lockA`,
/// `/split/b/=lockB`):
/// - DeleteObjects naming keys of both locks is refused 403
///   `fencing_lock_mismatch`, naming each key's lock, and the store keeps
///   both objects; one naming only lockA's keys goes through (the body is
///   forwarded unchanged: SeaweedFS checks its Content-MD5 and the
///   signature). Controls: `--store plain` refuses even the lockA-only
///   delete (`path_spans_locks`: it cannot see the keys), and a filter that
///   matches the request path alone (the test-only raw-path switch, with
///   `--allow-unprotected`) lets the cross-lock delete through: lockB's
///   object is gone.
/// - A bucket-level request (`PUT /whole`, creating the bucket) is covered
///   by the rule `/whole/=lockW`; control: `--store plain` refuses it
///   (`path_spans_locks`: `/whole` is a collection holding lockW's paths,
///   and no rule covers it).
/// - A virtual-hosted request (`Host: split.s3.test`) is matched as
///   `/split/...` with `--s3-domain s3.test`: lockA's put goes through and is
///   stored, lockB's is refused; control: without it the path `/a/...` is
///   not protected.
///
/// - Bodies it will not guess at: over 1 MiB or 1000 keys (413
///   `body_too_large`), not
///   well-formed (400 `body_malformed`), a key with `..` (400
///   `path_not_canonical`).
///
/// Fails on the old code (no `--store`): the filter refuses to start; the
/// controls show what a filter that does not read the body lets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_rules_delete_objects_bucket_level_and_virtual_hosts() {
    let weed = SeaweedFs::start();
    weed.create_bucket("split");
    let dir = tempfile::tempdir().unwrap();
    let rules = ["--protect", "/split/a/=lockA", "--protect", "/split/b/=lockB", "--protect", "/whole/=lockW"];
    let start = |name: &str, extra: &[&str]| {
        let args: Vec<&str> = rules.iter().chain(extra).copied().collect();
        FilterProc::start(dir.path(), &weed.url(), &dir.path().join(name), &args)
    };
    let s3 = start("s3", &["--store", "s3", "--s3-domain", "s3.test"]);
    let plain = start("plain", &[]);
    let raw = start("raw", &["--unsafe-raw-paths", "--allow-unprotected"]);
    let straight = |op: &str, key: &str| {
        let r = call(serde_json::json!({"endpoint": weed.url(), "op": op, "bucket": "split", "key": key}));
        assert_eq!(r["status"].as_u64().map(|s| s / 100), Some(2), "{r}");
    };
    for k in ["a/1", "a/2", "b/1"] {
        straight("put", k);
    }
    let fenced = |f: &FilterProc, op: &str, bucket: &str, lock: &str, more: serde_json::Value| {
        let mut v = serde_json::json!({"endpoint": f.url(), "op": op, "bucket": bucket, "lock": lock, "token": 1});
        v.as_object_mut().unwrap().extend(more.as_object().unwrap().clone());
        call(v)
    };
    let delete = |f: &FilterProc, keys: &[&str]| {
        fenced(f, "delete_objects", "split", "lockA", serde_json::json!({"keys": keys}))
    };

    // DeleteObjects across two locks: refused, naming each key's lock.
    let r = delete(&s3, &["a/1", "b/1"]);
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "fencing_lock_mismatch"), "{r}");
    let body: serde_json::Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["paths"], serde_json::json!({"/split/a/1": "lockA", "/split/b/1": "lockB"}), "{body}");
    assert_eq!(stored(&weed, "split"), ["a/1", "a/2", "b/1"]);
    // Within one lock: forwarded unchanged, applied.
    let r = delete(&s3, &["a/1"]);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(stored(&weed, "split"), ["a/2", "b/1"]);
    // Controls: plain cannot see the keys (refuses all); a path-only filter lets lockB's object be deleted.
    let r = delete(&plain, &["a/2"]);
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "path_spans_locks"), "{r}");
    let r = delete(&raw, &["a/2", "b/1"]);
    assert_eq!(r["status"], 200, "control: {r}");
    assert_eq!(stored(&weed, "split"), Vec::<String>::new(), "control: lockB's object deleted under lockA");

    // Bodies the filter will not guess at: too large, not XML, a key that climbs out of lockA's prefix.
    let raw_delete = |body: String| {
        let url = format!("{}/split?delete", s3.url());
        async move { request("POST", &url, &[("Fencing-Lock", "lockA"), ("Fencing-Token", "1")], &body).await }
    };
    let keys = |ks: &[&str]| {
        let objs: String = ks.iter().map(|k| format!("<Object><Key>{k}</Key></Object>")).collect();
        format!("<Delete>{objs}</Delete>")
    };
    let r = raw_delete(keys(&["a/x"; 40_000])).await;
    assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"), "over 1 MiB: {}", r.body);
    let r = raw_delete(keys(&["a/x"; 1001])).await;
    assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"), "1001 keys: {}", r.body);
    let r = raw_delete("<Delete><Object><Key>a/x</Key></Object>".into()).await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "body_malformed"), "{}", r.body);
    let r = raw_delete(keys(&["a/../b/1"])).await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "path_not_canonical"), "{}", r.body);

    // POST policy: the form's key decides; a 512 KiB upload is read whole, then forwarded. One over 1 MiB cannot be
    // read whole: in this split bucket, 413 (in one lock's bucket it goes through: see the next test).
    let post = |f: &FilterProc, key: &str, size: usize| {
        fenced(f, "post_policy", "split", "lockA", serde_json::json!({"key": key, "data": "p", "size": size}))
    };
    let r = post(&s3, "a/p1", 512 << 10);
    assert_eq!(r["status"].as_u64().map(|s| s / 100), Some(2), "{r}");
    let r = post(&s3, "a/big", 1536 << 10);
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(413), "body_too_large"), "{r}");
    let r = post(&s3, "b/p2", 10);
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "fencing_lock_mismatch"), "{r}");
    let r = post(&plain, "a/p3", 10);
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "path_spans_locks"), "control: {r}");
    assert_eq!(stored(&weed, "split"), ["a/p1"]);
    // Its size as SeaweedFS lists it (GetObject of a POST-policy object fails in this SeaweedFS version, straight
    // to it too).
    let list = call(serde_json::json!({"endpoint": weed.url(), "op": "list", "bucket": "split"}));
    assert_eq!(list["sizes"]["a/p1"], 512 << 10, "the whole upload arrived: {list}");
    straight("delete", "a/p1");

    // A bucket-level request under the rule `/whole/`.
    let r = fenced(&plain, "create_bucket", "whole", "lockW", serde_json::json!({}));
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "path_spans_locks"), "control: {r}");
    let r = fenced(&s3, "create_bucket", "whole", "lockW", serde_json::json!({}));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(stored(&weed, "whole"), Vec::<String>::new(), "the bucket exists");

    // Virtual-hosted style: `split.s3.test` through the filter as an HTTP proxy.
    let vhost = |f: &FilterProc, lock: &str, key: &str| {
        let more = serde_json::json!({"style": "virtual", "proxy": f.url(), "key": key, "data": lock});
        let mut v = more;
        v["endpoint"] = serde_json::json!(format!("http://s3.test:{}", f.addr.port()));
        fenced(f, "put", "split", lock, v)
    };
    let r = vhost(&plain, "lockA", "a/v");
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "path_not_protected"), "control: {r}");
    let r = vhost(&s3, "lockA", "a/v");
    assert_eq!(r["status"], 200, "{r}");
    let r = vhost(&s3, "lockB", "a/w");
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "fencing_lock_mismatch"), "{r}");
    // A Host the store may fold otherwise, an X-Forwarded-Host naming another bucket: 400 before anything is matched.
    for headers in [
        serde_json::json!({"Host": format!("SPLIT.s3.test:{}", s3.addr.port())}),
        serde_json::json!({"Host": format!("split.s3.test:{}", s3.addr.port()), "X-Forwarded-Host": "other.s3.test"}),
        // A port SeaweedFS cuts at the first `:`, another parser at the last.
        serde_json::json!({"Host": format!("split.s3.test:{}:1", s3.addr.port())}),
    ] {
        let more = serde_json::json!({"key": "a/h", "send_as": {"url": s3.url(), "headers": headers}});
        let mut v = more;
        v["endpoint"] = serde_json::json!(format!("http://s3.test:{}", s3.addr.port()));
        v["style"] = serde_json::json!("virtual");
        let r = fenced(&s3, "put", "split", "lockA", v);
        assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(400), "host_malformed"), "{headers}: {r}");
    }
    assert_eq!(stored(&weed, "split"), ["a/v"]);
}

/// A write's target is decided on the request as it is forwarded. Found in review: a request whose `Connection`
/// header names `Host` had its `Host` matched by the filter (`Host: split.s3.test`, so `/aaa/x` read as
/// `/split/aaa/x`, lockA's), then removed as hop-by-hop before forwarding; the store, given the upstream's own address
/// as `Host`, read it path-style as bucket `aaa`, key `x`: lockB's object, written with lockA's token. The request is
/// signed (SigV4) for exactly what the store then sees, so the store's signature check does not stop it.
///
/// Now the filter strips hop-by-hop headers first and matches what is left: `/aaa/x`, lockB's, refused 403
/// `fencing_lock_mismatch`, and bucket `aaa` stays empty. Control: what the store is handed once `Host` is dropped
/// (signed for its own address, path-style) is a request it accepts: sent straight to it, it is stored, so the
/// refusal is the filter's and not a bad signature. Fails on the old code: 200 and `aaa/x` stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_named_in_connection_cannot_move_a_write_to_another_lock() {
    let weed = SeaweedFs::start();
    for b in ["split", "aaa"] {
        weed.create_bucket(b);
    }
    let dir = tempfile::tempdir().unwrap();
    let args =
        ["--protect", "/split/aaa/=lockA", "--protect", "/aaa/=lockB", "--store", "s3", "--s3-domain", "s3.test"];
    let f = FilterProc::start(dir.path(), &weed.url(), &dir.path().join("s3"), &args);
    // Signed path-style for the store's own address, bucket `aaa`; sent to `to` with `Host` and `Connection` changed.
    let put = |to: &str, key: &str| {
        let headers = serde_json::json!({"Host": "split.s3.test", "Connection": "host"});
        call(serde_json::json!({
            "endpoint": weed.url(), "op": "put", "bucket": "aaa", "key": key, "data": "zombie",
            "lock": "lockA", "token": 1, "send_as": {"url": to, "headers": headers},
        }))
    };
    let r = put(&f.url(), "x");
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "fencing_lock_mismatch"), "{r}");
    assert_eq!(stored(&weed, "aaa"), Vec::<String>::new(), "lockB's bucket written with lockA's token");
    // Control: the request as the store was handed it (no `Host` of the client's, path-style), straight to it.
    let r = call(serde_json::json!({
        "endpoint": weed.url(), "op": "put", "bucket": "aaa", "key": "y", "data": "ok", "lock": "lockA", "token": 1,
    }));
    assert_eq!(r["status"], 200, "control: {r}");
    assert_eq!(stored(&weed, "aaa"), ["y"], "control");
}

/// A POST-policy form is read the way the store reads it, or not at all. Found in review: the filter took any
/// `--BOUNDARY` as a delimiter, even followed by more characters; Go's multipart reader (SeaweedFS's) takes
/// `--BOUNDARYQ` as data. A first field `x-ignore-pad` holding `v\r\n--BOUNDARYQ\r\n` + a `key` part (`a/evil`,
/// lockA's) + a `file` part's headers read, to the filter, as key `a/evil`; to the store as one field's value,
/// followed by the presigned `key` (`b/x`, lockB's). Now the filter refuses such a form as unreadable (a write to the
/// whole bucket, which is split between locks: 403 `path_spans_locks`), and lockB's key is not written. Control: the
/// same form straight to the store is stored under the presigned key, `b/...`. Fails on the old code: 200 and `b/x`
/// stored with lockA's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_the_store_would_read_another_way_is_not_guessed_at() {
    let weed = SeaweedFs::start();
    weed.create_bucket("split");
    let dir = tempfile::tempdir().unwrap();
    let args = ["--protect", "/split/a/=lockA", "--protect", "/split/b/=lockB", "--store", "s3"];
    let f = FilterProc::start(dir.path(), &weed.url(), &dir.path().join("s3"), &args);
    let smuggle = "--{B}\r\nContent-Disposition: form-data; name=\"x-ignore-pad\"\r\n\r\nv\r\n--{B}Q\r\n\
        Content-Disposition: form-data; name=\"key\"\r\n\r\na/evil\r\n--{B}Q\r\n\
        Content-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nx";
    let post = |endpoint: &str, key: &str| {
        call(serde_json::json!({
            "endpoint": endpoint, "op": "post_policy", "bucket": "split", "key": key, "data": "zombie",
            "size": 6, "lock": "lockA", "token": 1, "smuggle": smuggle,
        }))
    };
    let r = post(&f.url(), "b/x");
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "path_spans_locks"), "{r}");
    assert_eq!(stored(&weed, "split"), Vec::<String>::new(), "lockB's key written with lockA's token");
    // Control: the store reads the presigned key, not the smuggled one.
    let r = post(&weed.url(), "b/straight");
    assert_eq!(r["status"].as_u64().map(|s| s / 100), Some(2), "control: {r}");
    assert_eq!(stored(&weed, "split"), ["b/straight"], "control");
    // A DeleteObjects sent aws-chunked: a store that decodes it (Garage, Ceph RGW) reads the decoded body, the filter
    // would read the chunks' framing (a comment spanning two chunks hides a key): refused, nothing deleted.
    let h = [
        ("Fencing-Lock", "lockA"),
        ("Fencing-Token", "1"),
        ("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
        ("Content-Encoding", "aws-chunked"),
    ];
    let body = "30\r\n<Delete><Object><Key>b/straight</Key></Object></Delete>\r\n0\r\n\r\n";
    let r = request("POST", &format!("{}/split?delete", f.url()), &h, body).await;
    assert_eq!((r.status, r.error_code().as_str()), (415, "body_encoding_unsupported"), "{}", r.body);
    assert_eq!(stored(&weed, "split"), ["b/straight"]);
}

/// What a write changes is read wherever the store reads it: bodies at any path, headers. Found in two reviews,
/// each a write the store applied to lockB's keys under lockA's token, and each now refused (the store keeps what it
/// held):
/// - DeleteObjects below the bucket (`POST /split/a/x?delete=`): SeaweedFS deletes the body's keys; the filter
///   read the path alone (`/split/a/x`, lockA's).
/// - DeleteObjects spelled `?%64elete=` (below the bucket too): SeaweedFS's router decodes the name (it is signed as
///   `delete=`); the filter must not read the path alone either.
/// - A POST-policy form below the bucket (`POST /split/a/x`): SeaweedFS writes the form's key.
/// - A form whose first `key` part has a file name (a file to SeaweedFS, a key `a/evil` to the old filter) and
///   whose presigned fields, `key` among them, follow the file: SeaweedFS reads fields after the file.
/// - A form whose boundary the filter's strict parser does not take (`boundary = B`): Go does, and SeaweedFS
///   routes any POST with `multipart/form-dat` in its Content-Type to its form upload; now the whole bucket.
/// - DeleteObjects XML read otherwise by Go: a first root not named `Delete` (Go decodes the first root whatever
///   its name; the filter read only the `<Delete>` after it), an element inside `<Key>` (Go skips it and keeps the
///   text around it); now 400 `body_malformed`.
/// - RenameObject (`PUT /split/a/stolen?renameObject=`, `X-Amz-Rename-Source: b/victim`): the source is moved,
///   so it is a target too.
///
/// Controls: each request straight to the store does what is described (keys deleted, objects written or moved).
/// Fails on the old code: 200/204, and lockB's keys deleted, written or moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_read_wherever_the_store_reads_its_targets() {
    let weed = SeaweedFs::start();
    weed.create_bucket("split");
    let dir = tempfile::tempdir().unwrap();
    let args = ["--protect", "/split/a/=lockA", "--protect", "/split/b/=lockB", "--store", "s3"];
    let f = FilterProc::start(dir.path(), &weed.url(), &dir.path().join("s3"), &args);
    let send = |endpoint: &str, more: serde_json::Value| {
        let mut v = serde_json::json!({"endpoint": endpoint, "bucket": "split", "lock": "lockA", "token": 1});
        v.as_object_mut().unwrap().extend(more.as_object().unwrap().clone());
        call(v)
    };
    let held = ["b/v1", "b/v2", "b/victim", "b/x", "b/y"];
    for k in held {
        let r = call(serde_json::json!({"endpoint": weed.url(), "op": "put", "bucket": "split", "key": k}));
        assert_eq!(r["status"], 200, "{r}");
    }
    let smuggled_key = "--{B}\r\nContent-Disposition: form-data; name=\"key\"; filename=\"k\"\r\n\r\na/evil";
    let xml = |body: &str| serde_json::json!({"op": "raw", "method": "POST", "path": "/split?delete=", "md5": true, "body": body});
    let (spans, mismatch, malformed) =
        ((403, "path_spans_locks"), (403, "fencing_lock_mismatch"), (400, "body_malformed"));
    let cases = [
        (
            "delete below the bucket",
            mismatch,
            serde_json::json!({"op": "delete_objects", "keys": ["b/x"], "at": "/split/a/x?delete="}),
        ),
        (
            "?%64elete",
            mismatch,
            serde_json::json!({
                "op": "delete_objects", "keys": ["b/y"], "at": "/split/a/y?delete=", "send_at": "/split/a/y?%64elete=",
            }),
        ),
        (
            "form below the bucket",
            mismatch,
            serde_json::json!({"op": "post_policy", "key": "b/p", "data": "z", "size": 3, "at": "/split/a/x"}),
        ),
        (
            "key after the file",
            spans,
            serde_json::json!({
                "op": "post_policy", "key": "b/q", "data": "z", "size": 3, "smuggle": smuggled_key, "after_file": true,
            }),
        ),
        (
            "a boundary only Go reads",
            spans,
            serde_json::json!({
                "op": "post_policy", "key": "b/r", "data": "z", "size": 3, "smuggle": "", "at": "/split/a/x",
                "content_type": "multipart/form-data; boundary = fgB0undary",
            }),
        ),
        (
            "a first root not <Delete>",
            malformed,
            xml("<Foo><Object><Key>b/v1</Key></Object></Foo><Delete><Object><Key>a/x</Key></Object></Delete>"),
        ),
        (
            "an element inside <Key>",
            malformed,
            xml("<Delete><Object><Key>a/x</Key></Object><Object><Key>b/v2<x></x></Key></Object></Delete>"),
        ),
        (
            "rename another lock's object",
            mismatch,
            serde_json::json!({
                "op": "raw", "method": "PUT", "path": "/split/a/stolen?renameObject=",
                "headers": {"x-amz-rename-source": "b/victim"},
            }),
        ),
    ];
    for (what, (status, error), op) in &cases {
        let r = send(&f.url(), op.clone());
        assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(*status), *error), "{what}: {r}");
    }
    assert_eq!(stored(&weed, "split"), held, "lockB's keys changed under lockA's token");
    // Controls: straight to the store, each does what the filter refused.
    for (what, _, op) in &cases {
        let r = send(&weed.url(), op.clone());
        assert_eq!(r["status"].as_u64().map(|s| s / 100), Some(2), "control, {what}: {r}");
    }
    assert_eq!(stored(&weed, "split"), ["a/stolen", "b/p", "b/q", "b/r"], "control");
    // A form too long to read whole (over 1 MiB) into a bucket one lock holds: any key is that lock's, it goes
    // through, whole.
    let one = FilterProc::start(
        dir.path(),
        &weed.url(),
        &dir.path().join("one"),
        &["--protect", "/split/=lockS", "--store", "s3"],
    );
    let big = serde_json::json!({"op": "post_policy", "key": "big", "data": "w", "size": 1536 << 10, "lock": "lockS"});
    let r = send(&one.url(), big);
    assert_eq!(r["status"].as_u64().map(|s| s / 100), Some(2), "{r}");
    let list = call(serde_json::json!({"endpoint": weed.url(), "op": "list", "bucket": "split"}));
    assert_eq!(list["sizes"]["big"], 1536 << 10, "{list}");
}

/// SeaweedFS keeps a multipart upload's parts as ordinary keys under `/bucket/.uploads/<id>/`, open to any client.
/// Found in review: with a rule covering the bucket's root (`/split/=lockS`) beside `/split/b/=lockB`, lockS's holder
/// could write a part into lockB's upload in progress (ListParts then shows it, and a client completing from
/// ListParts stores its bytes at lockB's key). Now a target in the uploads area is a write to the whole bucket:
/// refused (`path_spans_locks`), and lockB's upload has no part. Control: the same write straight to the store is
/// taken as a part of lockB's upload. Fails on the old code: 200, and the part listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_locks_upload_in_progress_cannot_be_written() {
    let weed = SeaweedFs::start();
    weed.create_bucket("split");
    let dir = tempfile::tempdir().unwrap();
    let args = ["--protect", "/split/=lockS", "--protect", "/split/b/=lockB", "--store", "s3"];
    let f = FilterProc::start(dir.path(), &weed.url(), &dir.path().join("s3"), &args);
    let straight = |more: serde_json::Value| {
        let mut v = serde_json::json!({"endpoint": weed.url(), "bucket": "split", "key": "b/m"});
        v.as_object_mut().unwrap().extend(more.as_object().unwrap().clone());
        call(v)
    };
    let id = straight(serde_json::json!({"op": "mpu_start"}))["upload_id"].as_str().unwrap().to_owned();
    let parts = || straight(serde_json::json!({"op": "list_parts", "upload_id": id}))["parts"].clone();
    let part = |endpoint: &str| {
        call(serde_json::json!({
            "endpoint": endpoint, "bucket": "split", "op": "raw", "method": "PUT", "body": "EVIL",
            "path": format!("/split/.uploads/{id}/0001_zz.part"), "lock": "lockS", "token": 1,
        }))
    };
    let r = part(&f.url());
    assert_eq!((r["status"].as_u64(), code(&r).as_str()), (Some(403), "path_spans_locks"), "{r}");
    assert_eq!(parts(), serde_json::json!([]), "a part written into lockB's upload under lockS's token");
    // Control: straight to the store, the same write is a part of lockB's upload.
    let r = part(&weed.url());
    assert_eq!(r["status"], 200, "control: {r}");
    assert_eq!(parts(), serde_json::json!([1]), "control");
}

/// SeaweedFS's filer moves (`?mv.from=`) and copies (`?cp.from=`) the path
/// its query names onto the request's path: the source is written too (a
/// move deletes it). The filter in plain mode, rules `/a/=lockA` and
/// `/pub/=lockP`: a move from `/a/` with lockP's token is refused, and the
/// store keeps lockA's file. Before, only the path and `Destination` were
/// checked, and the move went through, as it does straight to the filer
/// (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filer_move_or_copy_named_in_the_query_needs_the_sources_lock() {
    let weed = SeaweedFs::start();
    let filer = format!("http://{}", weed.filer);
    let fenced = |lock: &str| [("Fencing-Lock", lock.to_string()), ("Fencing-Token", "1".to_string())];
    let send = |method: &'static str, url: String, headers: Vec<(&'static str, String)>, body: &'static str| async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(method, &url, &h, body).await
    };
    let held = |path: &'static str| {
        let url = format!("{filer}{path}");
        async move {
            let r = request("GET", &url, &[], "").await;
            (r.status == 200).then_some(r.body)
        }
    };
    for path in ["/a/secret", "/a/copied"] {
        let r = send("PUT", format!("{filer}{path}"), vec![], "lockA's data").await;
        assert!(r.status < 300, "PUT {path} to the filer: {} {}", r.status, r.body);
    }

    // The control: straight to the filer, the move takes lockA's file away.
    let r = send("POST", format!("{filer}/pub/moved?mv.from=/a/secret"), vec![], "").await;
    assert!(r.status < 300, "the filer's move: {} {}", r.status, r.body);
    assert_eq!(held("/a/secret").await, None, "the control: the move deleted the source");
    assert_eq!(held("/pub/moved").await.as_deref(), Some("lockA's data"));
    let r = send("PUT", format!("{filer}/a/secret"), vec![], "lockA's data").await;
    assert!(r.status < 300);

    let dir = tempfile::tempdir().unwrap();
    let f = FilterProc::start(
        dir.path(),
        &filer,
        &dir.path().join("state"),
        &["--protect", "/a/=lockA", "--protect", "/pub/=lockP"],
    );
    for query in ["mv.from=/a/secret", "MV.FROM=%2Fa%2Fsecret", "cp.from=/a/copied"] {
        let r = send("POST", format!("{}/pub/x?{query}", f.url()), fenced("lockP").to_vec(), "").await;
        assert_eq!(r.status, 403, "{query}: {}", r.body);
        assert_eq!(r.error_code(), "fencing_lock_mismatch", "{query}");
    }
    assert_eq!(held("/a/secret").await.as_deref(), Some("lockA's data"), "the store keeps lockA's file");
    let r = send("POST", format!("{}/pub/x?mv.from=a/secret", f.url()), fenced("lockP").to_vec(), "").await;
    assert_eq!((r.status, r.error_code().as_str()), (400, "destination_malformed"), "{}", r.body);
    // A move within the lock's own paths goes through.
    let r = send("POST", format!("{}/pub/y?mv.from=/pub/moved", f.url()), fenced("lockP").to_vec(), "").await;
    assert!(r.status < 300, "{} {}", r.status, r.body);
    assert_eq!(held("/pub/y").await.as_deref(), Some("lockA's data"));
}
