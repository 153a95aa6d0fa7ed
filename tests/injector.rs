//! The injector as a real process behind real HTTPS: AdmissionReviews in,
//! base64 JSON Patches out, applied to the pod and checked.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use support::*;

struct Certs {
    ca_pem: String,
}

/// A CA and a server certificate for 127.0.0.1 signed by it, written to `dir`.
fn issue(dir: &Path, cn: &str) -> Certs {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "fencegate test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    Certs { ca_pem: ca.pem() }
}

/// POSTs over TLS, trusting only `ca_pem`; returns the status, the body and
/// the server certificate's DER.
async fn https(addr: SocketAddr, ca_pem: &str, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("TLS handshake with the injector");
    let peer_cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let b = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, b, peer_cert)
}

struct Injector {
    _proc: Proc,
    addr: SocketAddr,
    certs: Certs,
    dir: tempfile::TempDir,
}

fn start(extra: &[&str]) -> Injector {
    let dir = tempfile::tempdir().unwrap();
    let certs = issue(dir.path(), "first");
    let port = free_port();
    let mut args: Vec<String> = [
        "injector",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--tls-cert",
        &dir.path().join("tls.crt").display().to_string(),
        "--tls-key",
        &dir.path().join("tls.key").display().to_string(),
        "--tls-reload",
        "200ms",
        "--image",
        "fencegate:test",
        "--etcd-endpoints",
        "https://etcd-0:2379,https://etcd-1:2379",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let proc = spawn("injector", dir.path(), fencegate_bin(), &args, &[]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_port(addr, Duration::from_secs(10));
    Injector { _proc: proc, addr, certs, dir }
}

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/injector").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Sends a review; returns the response object and the patched pod (if patched).
async fn review(inj: &Injector, review: &Value) -> (Value, Option<Value>) {
    let (status, body, _) =
        https(inj.addr, &inj.certs.ca_pem, "POST", "/mutate", serde_json::to_vec(review).unwrap()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    let resp = v["response"].clone();
    assert_eq!(resp["uid"], review["request"]["uid"], "uid copied");
    let patched = resp["patch"].as_str().map(|b64| {
        assert_eq!(resp["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).expect("patch is base64");
        let patch: json_patch::Patch = serde_json::from_slice(&raw).expect("patch is a JSON Patch");
        let mut pod = review["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod");
        pod
    });
    (resp, patched)
}

fn env_of(c: &Value) -> Vec<(String, String)> {
    c["env"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn get_env(c: &Value, name: &str) -> Option<String> {
    env_of(c).into_iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

#[tokio::test]
async fn deployment_pod_gets_a_native_sidecar() {
    let inj = start(&["--etcd-tls-secret", "etcd-client-tls"]);
    let fx = fixture("deployment-pod.json");
    let (resp, pod) = review(&inj, &fx).await;
    assert_eq!(resp["allowed"], true);
    let pod = pod.expect("patched");
    let typed: Pod = serde_json::from_value(pod.clone()).expect("still a valid Pod");
    let spec = typed.spec.unwrap();
    let sc = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(sc.name, "fencegate-sidecar");
    assert_eq!(sc.restart_policy.as_deref(), Some("Always"), "native sidecar");
    assert_eq!(sc.image.as_deref(), Some("fencegate:test"));
    assert_eq!(sc.args.as_deref(), Some(&["sidecar".to_string()][..]));
    let sc_json = &pod["spec"]["initContainers"][0];
    // Issue 13: a lock belongs to its namespace (fails on the old code: "ledger").
    assert_eq!(get_env(sc_json, "FENCEGATE_LOCK").as_deref(), Some("payments.ledger"));
    assert_eq!(pod["metadata"]["labels"]["fencegate.io/injected"], "true", "the NetworkPolicy selects it");
    assert_eq!(get_env(sc_json, "FENCEGATE_UPSTREAM").as_deref(), Some("http://fencegate-filter.payments.svc:8080"));
    assert_eq!(get_env(sc_json, "FENCEGATE_FENCE").as_deref(), Some("http://fencegate-filter.payments.svc:9090"));
    assert_eq!(get_env(sc_json, "FENCEGATE_TTL").as_deref(), Some("15s"));
    assert_eq!(get_env(sc_json, "FENCEGATE_ETCD").as_deref(), Some("https://etcd-0:2379,https://etcd-1:2379"));
    assert_eq!(get_env(sc_json, "FENCEGATE_HOLDER").as_deref(), Some("$(POD_NAMESPACE)/$(POD_NAME)"));
    assert_eq!(get_env(sc_json, "FENCEGATE_READY_ALWAYS"), None, "ready-gate: readiness follows the lock");
    assert_eq!(get_env(sc_json, "FENCEGATE_ETCD_CA").as_deref(), Some("/etc/fencegate/etcd-tls/ca.crt"));
    // Every FENCEGATE_* variable injected is one `fencegate sidecar` reads.
    let (_, help) = {
        let o = std::process::Command::new(fencegate_bin()).args(["sidecar", "--help"]).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    for (n, _) in env_of(sc_json).iter().filter(|(n, _)| n.starts_with("FENCEGATE_")) {
        assert!(help.contains(&format!("[env: {n}=")), "`fencegate sidecar` does not read {n}");
    }
    let downward: Vec<&str> = sc_json["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
        .collect();
    assert_eq!(downward, vec!["metadata.name", "metadata.namespace"]);
    assert_eq!(sc_json["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sc_json["readinessProbe"]["httpGet"]["port"], 7852);
    assert_eq!(sc_json["resources"]["limits"]["memory"], "48Mi", "annotation overrides the default");
    assert_eq!(sc_json["resources"]["requests"]["memory"], "16Mi");
    // The `restricted` Pod Security level, field by field.
    let sec = &sc_json["securityContext"];
    assert_eq!(sec["runAsNonRoot"], true);
    assert_eq!((&sec["runAsUser"], &sec["runAsGroup"]), (&json!(65532), &json!(65532)));
    assert_eq!(sec["allowPrivilegeEscalation"], false);
    assert_eq!(sec["readOnlyRootFilesystem"], true);
    assert_eq!(sec["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sec["seccompProfile"]["type"], "RuntimeDefault");
    // The app waits for the proxy; a slow node does not get the lock holder killed.
    assert_eq!(sc_json["startupProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sc_json["livenessProbe"]["periodSeconds"], 10);
    assert_eq!(sc_json["livenessProbe"]["failureThreshold"], 6);
    assert_eq!(get_env(sc_json, "FENCEGATE_HEALTH_LISTEN").as_deref(), Some("[::]:7852"));
    // The app container keeps its env and learns where the sidecar is.
    let app = &pod["spec"]["containers"][0];
    assert_eq!(get_env(app, "LOG_LEVEL").as_deref(), Some("info"));
    assert_eq!(get_env(app, "FENCEGATE_URL").as_deref(), Some("http://127.0.0.1:7850"));
    assert_eq!(get_env(app, "FENCEGATE_ADMIN_URL").as_deref(), Some("http://127.0.0.1:7851"));
    assert_eq!(pod["spec"]["volumes"].as_array().unwrap().len(), 2, "etcd TLS secret volume added");
    assert_eq!(pod["spec"]["volumes"][1]["secret"]["secretName"], "etcd-client-tls");
    assert_eq!(pod["metadata"]["annotations"]["fencegate.io/status"], "injected");
    assert_eq!(
        pod["metadata"]["ownerReferences"], fx["request"]["object"]["metadata"]["ownerReferences"],
        "rest untouched"
    );

    // Idempotent: the injected pod goes through again unchanged.
    let mut again = fx.clone();
    again["request"]["object"] = pod;
    let (resp, pod2) = review(&inj, &again).await;
    assert_eq!(resp["allowed"], true);
    assert!(pod2.is_none(), "no second patch: {resp}");
}

#[tokio::test]
async fn pod_with_init_containers_and_legacy_mode() {
    let inj = start(&[]);
    let fx = fixture("pod-with-init.json");
    let (_, pod) = review(&inj, &fx).await;
    let pod = pod.unwrap();
    let inits: Vec<&str> =
        pod["spec"]["initContainers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(inits, vec!["fencegate-sidecar", "migrate"], "the sidecar starts before other init containers");
    let sc = &pod["spec"]["initContainers"][0];
    assert_eq!(get_env(sc, "FENCEGATE_READY_ALWAYS").as_deref(), Some("true"), "no ready-gate: always ready");
    assert_eq!(get_env(sc, "FENCEGATE_TTL").as_deref(), Some("10s"), "default TTL");
    assert_eq!(sc["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(get_env(&pod["spec"]["containers"][0], "FENCEGATE_URL").as_deref(), Some("http://127.0.0.1:7850"));
    let exporter = &pod["spec"]["containers"][1];
    assert_eq!(get_env(exporter, "FENCEGATE_URL").as_deref(), Some("http://custom:1"), "an app's own setting wins");
    assert_eq!(get_env(exporter, "FENCEGATE_ADMIN_URL").as_deref(), Some("http://127.0.0.1:7851"));
    assert!(pod["spec"].get("volumes").is_none());

    let legacy = start(&["--legacy-sidecar"]);
    let (_, pod) = review(&legacy, &fx).await;
    let pod = pod.unwrap();
    let last = pod["spec"]["containers"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["name"], "fencegate-sidecar");
    assert!(last.get("restartPolicy").is_none());
    assert_eq!(last["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    assert_eq!(pod["spec"]["initContainers"].as_array().unwrap().len(), 1);
}

/// The lock is `NAMESPACE.LOCK` (the request's namespace when the pod has
/// none yet), or the annotation as is with `--cluster-wide-locks`; a TTL
/// above 5 minutes is a bad annotation. Fails on the old code (the lock was
/// the annotation's, and any TTL passed).
#[tokio::test]
async fn locks_belong_to_their_namespace_and_ttl_is_bounded() {
    let (inj, wide) = (start(&[]), start(&["--cluster-wide-locks"]));
    let mut fx = fixture("deployment-pod.json");
    fx["request"]["object"]["metadata"].as_object_mut().unwrap().remove("namespace");
    fx["request"]["namespace"] = json!("billing");
    let lock = |pod: &Value| get_env(&pod["spec"]["initContainers"][0], "FENCEGATE_LOCK");
    let (_, pod) = review(&inj, &fx).await;
    assert_eq!(lock(&pod.unwrap()).as_deref(), Some("billing.ledger"));
    let (_, pod) = review(&wide, &fx).await;
    assert_eq!(lock(&pod.unwrap()).as_deref(), Some("ledger"));
    fx["request"]["object"]["metadata"]["annotations"]["fencegate.io/ttl"] = json!("10m");
    let (resp, pod) = review(&inj, &fx).await;
    assert!(pod.is_none());
    let w = resp["warnings"].to_string();
    assert!(w.contains("fencegate.io/ttl") && w.contains("above 5m"), "{w}");
}

#[tokio::test]
async fn bad_or_missing_annotations_admit_unchanged_with_warnings_or_deny_in_strict_mode() {
    let inj = start(&[]);
    let strict = start(&["--strict"]);
    let mut fx = fixture("pod-with-init.json");
    let ann = &mut fx["request"]["object"]["metadata"]["annotations"];
    ann["fencegate.io/lock"] = json!("bad lock!");
    ann["fencegate.io/upstream"] = json!("ftp://x");
    ann["fencegate.io/ttl"] = json!("1s");
    ann["fencegate.io/ready-gate"] = json!("maybe");
    ann["fencegate.io/cpu-limit"] = json!("lots");
    let (resp, pod) = review(&inj, &fx).await;
    assert_eq!(resp["allowed"], true);
    assert!(pod.is_none());
    let w = resp["warnings"].as_array().unwrap();
    assert_eq!(w.len(), 5, "{w:?}");
    assert!(w.iter().all(|x| x.as_str().unwrap().starts_with("fencegate: sidecar not injected")));
    let (resp, pod) = review(&strict, &fx).await;
    assert_eq!(resp["allowed"], false);
    assert!(pod.is_none());
    assert!(resp["status"]["message"].as_str().unwrap().contains("fencegate.io/lock"));

    // Required annotations missing.
    let mut fx2 = fixture("pod-with-init.json");
    fx2["request"]["object"]["metadata"]["annotations"] = json!({"fencegate.io/inject": "true"});
    let (resp, _) = review(&inj, &fx2).await;
    let w: Vec<String> = resp["warnings"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    assert!(
        w.iter().any(|x| x.contains("lock is required")) && w.iter().any(|x| x.contains("upstream is required")),
        "{w:?}"
    );

    // Not annotated, or inject != "true": untouched, no warnings.
    for a in [json!(null), json!({"fencegate.io/inject": "false"})] {
        let mut fx3 = fixture("pod-with-init.json");
        fx3["request"]["object"]["metadata"]["annotations"] = a;
        let (resp, pod) = review(&inj, &fx3).await;
        assert_eq!(resp["allowed"], true);
        assert!(pod.is_none() && resp.get("warnings").is_none());
    }

    // Garbage is a clear 400, never a crash.
    let (status, body, _) = https(inj.addr, &inj.certs.ca_pem, "POST", "/mutate", b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("bad_admission_review"));
    let (status, _, _) = https(inj.addr, &inj.certs.ca_pem, "GET", "/healthz", vec![]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn host_network_pods_are_admitted_untouched_with_a_warning_even_when_strict() {
    let mut fx = fixture("deployment-pod.json");
    fx["request"]["object"]["spec"]["hostNetwork"] = json!(true);
    for inj in [start(&[]), start(&["--strict"])] {
        let (resp, pod) = review(&inj, &fx).await;
        assert_eq!(resp["allowed"], true);
        assert!(pod.is_none(), "no patch: {resp}");
        let w = resp["warnings"].as_array().unwrap();
        assert!(w[0].as_str().unwrap().contains("hostNetwork"), "{w:?}");
    }
}

#[tokio::test]
async fn explicit_ports_are_used() {
    let inj = start(&["--proxy-port", "9101", "--admin-port", "9102", "--health-port", "9103"]);
    let (_, pod) = review(&inj, &fixture("pod-with-init.json")).await;
    let pod = pod.unwrap();
    let sc = &pod["spec"]["initContainers"][0];
    assert_eq!(get_env(sc, "FENCEGATE_LISTEN").as_deref(), Some("127.0.0.1:9101"));
    assert_eq!(sc["startupProbe"]["httpGet"]["port"], 9103);
    assert_eq!(get_env(&pod["spec"]["containers"][0], "FENCEGATE_ADMIN_URL").as_deref(), Some("http://127.0.0.1:9102"));
}

#[tokio::test]
async fn certificate_rotation_without_restart() {
    let inj = start(&[]);
    let (_, _, first) = https(inj.addr, &inj.certs.ca_pem, "GET", "/healthz", vec![]).await;
    let new = issue(inj.dir.path(), "second");
    let both = format!("{}{}", inj.certs.ca_pem, new.ca_pem);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, cert) = https(inj.addr, &both, "GET", "/healthz", vec![]).await;
        if cert != first {
            assert_eq!(status, 200);
            break;
        }
        assert!(Instant::now() < end, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken key file does not take the server down: it keeps the last good pair.
    std::fs::write(inj.dir.path().join("tls.key"), "garbage").unwrap();
    // Once it has tried the broken pair (its log says so): not a fixed wait,
    // which a slow machine would pass without the reload ever tried.
    let end = Instant::now() + Duration::from_secs(10);
    while !inj._proc.log_text().contains("new TLS files do not load") {
        assert!(Instant::now() < end, "the broken key was never tried:\n{}", inj._proc.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, _) = https(inj.addr, &new.ca_pem, "GET", "/healthz", vec![]).await;
    assert_eq!(status, 200);
}
