//! The Helm chart, with a real `helm` (v4) and manifests validated against
//! Kubernetes' schemas offline (kubernetes-validate). scripts/install-k8s-tools.sh
//! installs both; a missing tool fails the test.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn helm() -> PathBuf {
    let p = std::env::var_os("FENCEGATE_HELM").map(PathBuf::from).unwrap_or_else(|| root().join(".tools/bin/helm"));
    assert!(p.exists(), "{} is missing: run scripts/install-k8s-tools.sh", p.display());
    p
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn chart() -> String {
    root().join("charts/fencegate").display().to_string()
}

/// `helm template` with `--set` pairs; Ok(yaml) or Err(helm's message).
fn template(sets: &[&str]) -> Result<String, String> {
    let mut c = Command::new(helm());
    c.args(["template", "fg", &chart(), "--namespace", "fencegate"]);
    for s in sets {
        c.args(["--set", s]);
    }
    let out = c.output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The rendered documents as JSON (PyYAML comes with kubernetes-validate).
fn docs(yaml: &str) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", "import sys,yaml,json; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3 with PyYAML is needed (scripts/install-k8s-tools.sh)");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"].as_str().unwrap_or("").ends_with(suffix))
        .unwrap_or_else(|| panic!("no {kind} *{suffix}"))
}

fn validate(yaml: &str, dir: &Path) {
    let f = dir.join("rendered.yaml");
    std::fs::write(&f, yaml).unwrap();
    let (ok, out) = run(Command::new("kubernetes-validate").args(["-k", "1.33", "--strict", &f.display().to_string()]));
    assert!(ok, "kubernetes-validate failed:\n{out}");
    assert!(out.contains("passed for resource mutatingwebhookconfiguration"), "{out}");
}

/// Every FENCEGATE_* variable a manifest sets must be one `fencegate <cmd> --help` lists.
fn env_names_known(cmd: &str, names: impl IntoIterator<Item = String>) {
    let (ok, help) = run(Command::new(support::fencegate_bin()).args([cmd, "--help"]));
    assert!(ok);
    for n in names.into_iter().filter(|n| n.starts_with("FENCEGATE_")) {
        assert!(help.contains(&format!("[env: {n}=")), "`fencegate {cmd}` does not read {n}");
    }
}

#[test]
fn lint_passes_with_default_and_custom_values() {
    let (ok, out) = run(Command::new(helm()).args(["lint", "--strict", &chart()]));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new(helm()).args([
        "lint",
        "--strict",
        &chart(),
        "--set",
        "filter.enabled=true",
        "--set",
        "filter.upstream=http://store:80",
        "--set",
        "filter.protect={/a/=a,/b/=b}",
        "--set",
        "tls.certManager.enabled=true",
    ]));
    assert!(ok, "{out}");
}

#[test]
fn default_render_is_valid_and_coherent() {
    let d = tempfile::tempdir().unwrap();
    let yaml = template(&[]).unwrap();
    validate(&yaml, d.path());
    let docs = docs(&yaml);
    let wh = find(&docs, "MutatingWebhookConfiguration", "injector");
    let hook = &wh["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate");
    assert_eq!(hook["namespaceSelector"]["matchLabels"]["fencegate.io/injection"], "enabled");
    assert!(hook["matchConditions"][0]["expression"].as_str().unwrap().contains("fencegate.io/inject"));
    // The CA bundle is the CA of the certificate in the Secret the injector mounts.
    let secret = find(&docs, "Secret", "injector-tls");
    assert_eq!(hook["clientConfig"]["caBundle"], secret["data"]["ca.crt"]);
    for k in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(!secret["data"][k].as_str().unwrap().is_empty(), "{k}");
    }
    let dep = find(&docs, "Deployment", "injector");
    assert_eq!(dep["spec"]["replicas"], 2);
    assert_eq!(find(&docs, "PodDisruptionBudget", "injector")["spec"]["minAvailable"], 1);
    assert_eq!(find(&docs, "ServiceAccount", "injector")["automountServiceAccountToken"], false);
    assert!(docs.iter().all(|d| d["kind"] != "Role" && d["kind"] != "ClusterRole"), "the injector needs no API access");
    assert!(docs.iter().all(|d| d["kind"] != "PersistentVolumeClaim"), "no filter by default");
    // The chart speaks the binary's language.
    let cm = find(&docs, "ConfigMap", "injector");
    env_names_known("injector", cm["data"].as_object().unwrap().keys().cloned());
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    env_names_known("injector", c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()));
    assert_eq!(cm["data"]["FENCEGATE_LEGACY_SIDECAR"], "false");
}

#[test]
fn custom_render_with_filter_cert_manager_and_legacy_sidecar_is_valid() {
    let d = tempfile::tempdir().unwrap();
    let yaml = template(&[
        "filter.enabled=true",
        "filter.upstream=http://minio.storage.svc:9000",
        "filter.protect={/orders/=orders,/users/=users}",
        "tls.certManager.enabled=true",
        "sidecar.nativeSidecar=false",
        "sidecar.etcdTlsSecret=etcd-client",
        "webhook.failurePolicy=Ignore",
        "webhook.strict=true",
        "webhook.matchAnnotation=false",
        "injector.replicas=3",
    ])
    .unwrap();
    validate(&yaml, d.path());
    let docs = docs(&yaml);
    let f = find(&docs, "Deployment", "filter");
    assert_eq!(f["spec"]["replicas"], 1, "one filter per state directory");
    assert_eq!(f["spec"]["strategy"]["type"], "Recreate");
    let c = &f["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<String> =
        c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
    env_names_known("filter", env.clone());
    assert!(env.contains(&"FENCEGATE_PROTECT".to_string()));
    let protect = c["env"].as_array().unwrap().iter().find(|e| e["name"] == "FENCEGATE_PROTECT").unwrap();
    assert_eq!(protect["value"], "/orders/=orders,/users/=users");
    assert_eq!(
        find(&docs, "PersistentVolumeClaim", "filter-state")["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    assert_eq!(find(&docs, "Service", "filter")["spec"]["ports"].as_array().unwrap().len(), 2);
    assert_eq!(find(&docs, "Certificate", "injector")["spec"]["secretName"], "fg-fencegate-injector-tls");
    assert!(docs.iter().any(|d| d["kind"] == "Issuer"));
    assert!(docs.iter().all(|d| d["kind"] != "Secret"), "cert-manager makes the secret");
    let wh = find(&docs, "MutatingWebhookConfiguration", "injector");
    assert_eq!(wh["metadata"]["annotations"]["cert-manager.io/inject-ca-from"], "fencegate/fg-fencegate-injector");
    assert_eq!(wh["webhooks"][0]["failurePolicy"], "Ignore");
    assert!(wh["webhooks"][0].get("matchConditions").is_none());
    let cm = find(&docs, "ConfigMap", "injector");
    assert_eq!(cm["data"]["FENCEGATE_LEGACY_SIDECAR"], "true");
    assert_eq!(cm["data"]["FENCEGATE_STRICT"], "true");
    assert_eq!(cm["data"]["FENCEGATE_ETCD_TLS_SECRET"], "etcd-client");
    assert_eq!(find(&docs, "Deployment", "injector")["spec"]["replicas"], 3);
}

#[test]
fn bad_values_are_refused_with_a_clear_message() {
    for (sets, want) in [
        (vec!["webhook.failurePolicy=Sometimes"], "failurePolicy"),
        (vec!["filter.lock=bad lock"], "lock"),
        (vec!["webhook.timeoutSeconds=99"], "timeoutSeconds"),
        (vec!["sidecar.defaultTtl=ten"], "defaultTtl"),
        (vec!["nonsense=1"], "nonsense"),
        (vec!["filter.enabled=true"], "filter.upstream"),
        (vec!["filter.enabled=true", "filter.upstream=http://s:1"], "filter.lock or filter.protect"),
    ] {
        let err = template(&sets).expect_err(&format!("{sets:?} must be refused"));
        assert!(err.contains(want), "{sets:?}: {err}");
    }
}
