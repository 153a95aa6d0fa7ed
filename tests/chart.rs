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
    template_in("fencegate", sets)
}

/// `helm template` into `namespace`.
fn template_in(namespace: &str, sets: &[&str]) -> Result<String, String> {
    let mut c = Command::new(helm());
    c.args(["template", "fg", &chart(), "--namespace", namespace]);
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
    let out = validate_only(yaml, dir);
    assert!(out.contains("passed for resource mutatingwebhookconfiguration"), "{out}");
}

/// Validates every rendered manifest; returns kubernetes-validate's report.
fn validate_only(yaml: &str, dir: &Path) -> String {
    let f = dir.join("rendered.yaml");
    std::fs::write(&f, yaml).unwrap();
    let (ok, out) = run(Command::new("kubernetes-validate").args(["-k", "1.33", "--strict", &f.display().to_string()]));
    assert!(ok, "kubernetes-validate failed:\n{out}");
    out
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
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.grafanaDashboard.enabled=true",
    ]));
    assert!(ok, "{out}");
}

#[test]
fn default_render_is_valid_and_coherent() {
    let d = tempfile::tempdir().unwrap();
    let yaml = template(&[]).unwrap();
    validate(&yaml, d.path());
    let docs = docs(&yaml);
    let wh = find(&docs, "MutatingWebhookConfiguration", "injector-fencegate");
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
        "filter.sharedMarks=false",
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
    let wh = find(&docs, "MutatingWebhookConfiguration", "injector-fencegate");
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
        (vec!["tls.existingSecret=mine"], "tls.caBundle"),
        (vec!["tls.existingSecret=mine", "tls.caBundle=Q0E=", "tls.certManager.enabled=true"], "exclude each other"),
        (vec!["filter.persistence.accessMode=ReadWriteMany"], "accessMode"),
    ] {
        let err = template(&sets).expect_err(&format!("{sets:?} must be refused"));
        assert!(err.contains(want), "{sets:?}: {err}");
    }
}

/// Values that turn every optional part on, for the tests that look at all pods.
const EVERYTHING: &[&str] =
    &["filter.enabled=true", "filter.upstream=http://minio.storage.svc:9000", "filter.lock=payments.ledger"];

fn env_value<'a>(c: &'a Value, name: &str) -> &'a str {
    let e = c["env"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no {name}"));
    e["value"].as_str().unwrap()
}

/// The pod specs of every Deployment and bare Pod rendered.
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter_map(|d| match d["kind"].as_str() {
            Some("Deployment") => Some((d["metadata"]["name"].to_string(), &d["spec"]["template"]["spec"])),
            Some("Pod") => Some((d["metadata"]["name"].to_string(), &d["spec"])),
            _ => None,
        })
        .collect()
}

#[test]
fn every_pod_passes_the_restricted_pod_security_level() {
    let docs = docs(&template(EVERYTHING).unwrap());
    let specs = pod_specs(&docs);
    assert_eq!(specs.len(), 3, "injector, filter and the test pod");
    for (name, spec) in specs {
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        for c in spec["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]), "{name}");
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
            assert_eq!(
                (&sc["runAsUser"], &sc["runAsGroup"], &sc["runAsNonRoot"]),
                (&65532.into(), &65532.into(), &true.into()),
                "{name}"
            );
        }
    }
}

#[test]
fn sidecar_ports_stay_clear_of_istio_and_linkerd_and_listeners_take_ipv6() {
    let docs = docs(&template(EVERYTHING).unwrap());
    let cm = find(&docs, "ConfigMap", "injector");
    for key in ["FENCEGATE_PROXY_PORT", "FENCEGATE_ADMIN_PORT", "FENCEGATE_HEALTH_PORT"] {
        let port: u16 = cm["data"][key].as_str().unwrap().parse().unwrap();
        assert!(
            !(15000..=15090).contains(&port) && !(4140..=4191).contains(&port),
            "{key}={port} collides with a mesh"
        );
    }
    assert_eq!(cm["data"]["FENCEGATE_PROXY_PORT"], "7850");
    let injector = &find(&docs, "Deployment", "injector")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(injector, "FENCEGATE_LISTEN"), "[::]:8443");
    let filter = &find(&docs, "Deployment", "filter")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(filter, "FENCEGATE_LISTEN"), "[::]:8080");
    assert_eq!(env_value(filter, "FENCEGATE_ADMIN_LISTEN"), "[::]:9090");
}

#[test]
fn one_replica_has_no_budget_that_blocks_drain() {
    let d = tempfile::tempdir().unwrap();
    let yaml = template(&["injector.replicas=1"]).unwrap();
    validate(&yaml, d.path());
    let docs = docs(&yaml);
    assert_eq!(find(&docs, "Deployment", "injector")["spec"]["replicas"], 1);
    assert!(docs.iter().all(|d| d["kind"] != "PodDisruptionBudget"), "a budget at one replica blocks kubectl drain");
    let docs = docs_of(&["injector.replicas=2"]);
    assert_eq!(find(&docs, "PodDisruptionBudget", "injector")["spec"]["minAvailable"], 1, "two replicas keep one up");
}

fn docs_of(sets: &[&str]) -> Vec<Value> {
    docs(&template(sets).unwrap())
}

/// Issue 13: the filter verifies raises with the sidecars' etcd by default
/// (its own endpoints and TLS when given; off with filter.verify=false), a
/// NetworkPolicy lets only injected pods reach it (the admin port) and named
/// consumers the proxy port, and the injector namespaces locks unless told
/// otherwise. Fails on the old chart (no FENCEGATE_ETCD, no NetworkPolicy).
#[test]
fn filter_verifies_with_etcd_and_only_injected_pods_reach_it() {
    let d = tempfile::tempdir().unwrap();
    let filter_env = |docs: &[Value], name: &str| {
        let c = &find(docs, "Deployment", "filter")["spec"]["template"]["spec"]["containers"][0];
        c["env"].as_array().unwrap().iter().find(|e| e["name"] == name).map(|e| e["value"].as_str().unwrap().to_owned())
    };
    let docs = docs_of(EVERYTHING);
    assert_eq!(filter_env(&docs, "FENCEGATE_LOCK").as_deref(), Some("payments.ledger"));
    assert_eq!(filter_env(&docs, "FENCEGATE_ETCD").as_deref(), Some("http://etcd.etcd.svc:2379"), "the sidecars' etcd");
    assert_eq!(find(&docs, "ConfigMap", "injector")["data"]["FENCEGATE_CLUSTER_WIDE_LOCKS"], "false");
    let np = &find(&docs, "NetworkPolicy", "filter")["spec"];
    assert_eq!(np["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "filter");
    assert_eq!(np["ingress"].as_array().unwrap().len(), 1);
    assert_eq!(np["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["fencegate.io/injected"], "true");
    assert_eq!(np["ingress"][0]["from"][0]["namespaceSelector"], serde_json::json!({}));
    let mut sets = EVERYTHING.to_vec();
    sets.extend([
        "filter.etcdEndpoints=https://etcd-0:2379",
        "filter.etcdTlsSecret=etcd-client",
        "filter.networkPolicy.extraFrom[0].namespaceSelector.matchLabels.team=reports",
        "webhook.clusterWideLocks=true",
    ]);
    let yaml = template(&sets).unwrap();
    validate(&yaml, d.path());
    let docs = self::docs(&yaml);
    assert_eq!(filter_env(&docs, "FENCEGATE_ETCD").as_deref(), Some("https://etcd-0:2379"));
    assert_eq!(filter_env(&docs, "FENCEGATE_ETCD_CA").as_deref(), Some("/etc/fencegate/etcd/ca.crt"));
    let c = &find(&docs, "Deployment", "filter")["spec"]["template"]["spec"]["containers"][0];
    env_names_known("filter", c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()));
    let np = &find(&docs, "NetworkPolicy", "filter")["spec"];
    assert_eq!(np["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]["team"], "reports");
    assert_eq!(np["ingress"][1]["ports"], serde_json::json!([{"port": "http"}]), "not the admin port");
    assert_eq!(find(&docs, "ConfigMap", "injector")["data"]["FENCEGATE_CLUSTER_WIDE_LOCKS"], "true");
    let mut sets = EVERYTHING.to_vec();
    sets.extend(["filter.verify=false", "filter.networkPolicy.enabled=false"]);
    let docs = docs_of(&sets);
    assert_eq!(filter_env(&docs, "FENCEGATE_ETCD"), None);
    assert!(docs.iter().all(|d| d["kind"] != "NetworkPolicy"));
}

#[test]
fn filter_without_the_injector() {
    let d = tempfile::tempdir().unwrap();
    let mut sets = EVERYTHING.to_vec();
    sets.push("injector.enabled=false");
    let yaml = template(&sets).unwrap();
    let report = validate_only(&yaml, d.path());
    assert!(report.contains("passed for resource deployment/fg-fencegate-filter"), "{report}");
    let docs = docs(&yaml);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["NetworkPolicy", "PodDisruptionBudget", "Service", "Deployment"], "only the filter");
    assert!(docs.iter().all(|d| !d["metadata"]["name"].as_str().unwrap().contains("injector")));
}

#[test]
fn two_namespaces_do_not_share_cluster_scoped_names() {
    let names = |ns: &str| -> Vec<String> {
        let docs = docs(&template_in(ns, &[]).unwrap());
        // Cluster-scoped objects are the ones without a namespace.
        docs.iter()
            .filter(|d| d["metadata"]["namespace"].is_null())
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (a, b) = (names("team-a"), names("team-b"));
    assert_eq!(a, vec!["fg-fencegate-injector-team-a"], "the webhook configuration is the only cluster-scoped object");
    assert!(a.iter().all(|n| !b.contains(n)), "{a:?} vs {b:?}");
}

#[test]
fn usable_as_a_dependency_with_global_values_and_a_condition() {
    let d = tempfile::tempdir().unwrap();
    let umbrella = d.path().join("umbrella");
    std::fs::create_dir(&umbrella).unwrap();
    std::fs::write(
        umbrella.join("Chart.yaml"),
        format!(
            "apiVersion: v2\nname: umbrella\nversion: 1.0.0\nkubeVersion: \">=1.29.0-0\"\ndependencies:\n  - name: fencegate\n    version: 0.1.0\n    repository: \"file://{}\"\n    condition: fencegate.enabled\n",
            chart()
        ),
    )
    .unwrap();
    std::fs::write(
        umbrella.join("values.yaml"),
        "global:\n  imageRegistry: registry.example.com\nfencegate:\n  enabled: true\n",
    )
    .unwrap();
    let (ok, out) = run(Command::new(helm()).args(["dependency", "update", &umbrella.display().to_string()]));
    assert!(ok, "{out}");
    let (ok, out) =
        run(Command::new(helm()).args(["template", "app", &umbrella.display().to_string(), "--namespace", "apps"]));
    assert!(ok, "global and enabled must pass the schema: {out}");
    assert!(docs(&out).iter().any(|d| d["kind"] == "MutatingWebhookConfiguration"));
    let (ok, out) = run(Command::new(helm()).args([
        "template",
        "app",
        &umbrella.display().to_string(),
        "--set",
        "fencegate.enabled=false",
    ]));
    assert!(ok, "{out}");
    assert!(docs(&out).is_empty(), "the condition switches the whole chart off");
}

#[test]
fn tls_can_be_stable_under_helm_template() {
    // The chart's own CA is made at render time: `helm template` (Argo CD,
    // Flux) gets a new one each time, which is why the other two ways exist.
    let ca = |sets: &[&str]| {
        find(&docs_of(sets), "MutatingWebhookConfiguration", "injector-fencegate")["webhooks"][0]["clientConfig"]
            ["caBundle"]
            .clone()
    };
    assert_ne!(ca(&[]), ca(&[]), "the chart-made CA is not stable under helm template");
    let mine = ["tls.existingSecret=webhook-tls", "tls.caBundle=Q0EgUEVN"];
    assert_eq!(template(&mine).unwrap(), template(&mine).unwrap(), "an existing secret renders the same every time");
    let docs = docs_of(&mine);
    assert_eq!(ca(&mine), "Q0EgUEVN");
    assert!(docs.iter().all(|d| d["kind"] != "Secret"), "the secret is the user's");
    let vols = &find(&docs, "Deployment", "injector")["spec"]["template"]["spec"]["volumes"];
    assert_eq!(vols[0]["secret"]["secretName"], "webhook-tls");
    let cm = find(&docs, "ConfigMap", "injector-test-ca");
    assert_eq!(cm["data"]["ca.crt"], "CA PEM", "helm test trusts the given CA");
    let cm_sets = ["tls.certManager.enabled=true"];
    assert_eq!(template(&cm_sets).unwrap(), template(&cm_sets).unwrap(), "cert-manager renders the same every time");
}

#[test]
fn helm_test_checks_the_webhook_over_https() {
    let docs = docs_of(&[]);
    let pod = find(&docs, "Pod", "injector-test");
    assert_eq!(pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    let c = &pod["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args.last(), Some(&"https://fg-fencegate-injector.fencegate.svc:443/healthz"));
    let cacert = args.iter().position(|a| *a == "--cacert").expect("the CA is checked");
    assert_eq!(args[cacert + 1], "/etc/fencegate/tls/ca.crt");
    assert_eq!(pod["spec"]["volumes"][0]["secret"]["secretName"], "fg-fencegate-injector-tls");
    assert!(docs_of(&["tests.enabled=false"]).iter().all(|d| d["kind"] != "Pod"));
}

#[test]
fn custom_namespace_expressions_replace_the_default_label() {
    let sel = |sets: &[&str]| {
        find(&docs_of(sets), "MutatingWebhookConfiguration", "injector-fencegate")["webhooks"][0]["namespaceSelector"]
            .clone()
    };
    let custom = sel(&[
        "webhook.namespaceSelector.matchExpressions[0].key=team",
        "webhook.namespaceSelector.matchExpressions[0].operator=Exists",
    ]);
    assert_eq!(custom, serde_json::json!({"matchExpressions": [{"key": "team", "operator": "Exists"}]}));
    assert_eq!(sel(&[]), serde_json::json!({"matchLabels": {"fencegate.io/injection": "enabled"}}));
}

#[test]
fn injector_scheduling_and_filter_volume_options() {
    let d = tempfile::tempdir().unwrap();
    let mut sets = EVERYTHING.to_vec();
    sets.extend([
        "injector.priorityClassName=system-cluster-critical",
        "injector.topologySpreadConstraints[0].maxSkew=1",
        "injector.topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
        "injector.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
        "filter.persistence.accessMode=ReadWriteOncePod",
        "filter.sharedMarks=false",
    ]);
    let yaml = template(&sets).unwrap();
    validate(&yaml, d.path());
    let docs = docs(&yaml);
    let spec = &find(&docs, "Deployment", "injector")["spec"]["template"]["spec"];
    assert_eq!(spec["priorityClassName"], "system-cluster-critical");
    let tsc = &spec["topologySpreadConstraints"][0];
    assert_eq!(
        tsc["labelSelector"]["matchLabels"]["app.kubernetes.io/component"], "injector",
        "defaults to the injector's pods"
    );
    assert_eq!(
        find(&docs, "PersistentVolumeClaim", "filter-state")["spec"]["accessModes"],
        serde_json::json!(["ReadWriteOncePod"])
    );
    let mut one = EVERYTHING.to_vec();
    one.push("filter.sharedMarks=false");
    assert_eq!(
        find(&docs_of(&one), "PersistentVolumeClaim", "filter-state")["spec"]["accessModes"],
        serde_json::json!(["ReadWriteOnce"])
    );
}

/// The labels `sel` (a matchLabels map) must all be among `labels`.
fn selects(sel: &Value, labels: &Value) -> bool {
    let sel = sel.as_object().unwrap();
    !sel.is_empty() && sel.iter().all(|(k, v)| &labels[k] == v)
}

fn filter_env<'a>(docs: &'a [Value], name: &str) -> Option<&'a Value> {
    let c = &find(docs, "Deployment", "filter")["spec"]["template"]["spec"]["containers"][0];
    c["env"].as_array().unwrap().iter().find(|e| e["name"] == name)
}

/// Issue 15: with etcd (the default: the filter verifies with the sidecars'
/// etcd) the filter is 3 replicas sharing their marks through etcd, rolled
/// one at a time with no replica short, a budget, spread across nodes, each
/// registered under its pod's name, and no state volume. Without etcd (or
/// filter.sharedMarks=false) it stays one replica, Recreate, with its PVC.
#[test]
fn filter_replicas_share_their_marks_through_etcd() {
    let d = tempfile::tempdir().unwrap();
    let yaml = template(EVERYTHING).unwrap();
    validate(&yaml, d.path());
    let docs = docs(&yaml);
    let dep = find(&docs, "Deployment", "filter");
    assert_eq!(dep["spec"]["replicas"], 3);
    assert_eq!(
        dep["spec"]["strategy"],
        serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}),
        "a rollout never has fewer ready replicas than asked for"
    );
    let pod = &dep["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(&dep["spec"]["selector"]["matchLabels"], labels));
    let pdb = find(&docs, "PodDisruptionBudget", "filter");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels), "the budget covers the filter's pods");
    assert!(!selects(
        &pdb["spec"]["selector"]["matchLabels"],
        &find(&docs, "Deployment", "injector")["spec"]["template"]["metadata"]["labels"]
    ));
    let anti = &pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname");
    assert!(selects(&anti["podAffinityTerm"]["labelSelector"]["matchLabels"], labels));
    assert_eq!(filter_env(&docs, "FENCEGATE_SHARED_MARKS").unwrap()["value"], "true");
    assert_eq!(filter_env(&docs, "FENCEGATE_ETCD").unwrap()["value"], "http://etcd.etcd.svc:2379");
    assert_eq!(
        filter_env(&docs, "FENCEGATE_REPLICA_ID").unwrap()["valueFrom"],
        serde_json::json!({"fieldRef": {"fieldPath": "metadata.name"}}),
        "the replica id is the pod's name"
    );
    assert_eq!(filter_env(&docs, "FENCEGATE_REPLICA_TTL").unwrap()["value"], "10s");
    assert_eq!(filter_env(&docs, "FENCEGATE_MARKS_PREFIX").unwrap()["value"], "/fencegate/filter");
    let c = &pod["spec"]["containers"][0];
    env_names_known("filter", c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()));
    assert_eq!(c["readinessProbe"]["httpGet"], serde_json::json!({"path": "/readyz", "port": "admin"}));
    assert!(docs.iter().all(|d| d["kind"] != "PersistentVolumeClaim"), "etcd replaces the state file");
    assert!(pod["spec"].get("volumes").is_none() && c.get("volumeMounts").is_none());
    // etcd TLS still mounts; more replicas, an affinity of one's own.
    let mut sets = EVERYTHING.to_vec();
    sets.extend([
        "filter.replicas=5",
        "filter.etcdTlsSecret=etcd-client",
        "filter.replicaTtl=6s",
        "filter.marksPrefix=/fg/store-a",
        "filter.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=pool",
        "filter.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
    ]);
    let yaml = template(&sets).unwrap();
    validate(&yaml, d.path());
    let docs = self::docs(&yaml);
    let spec = &find(&docs, "Deployment", "filter")["spec"];
    assert_eq!(spec["replicas"], 5);
    assert!(spec["template"]["spec"]["affinity"].get("podAntiAffinity").is_none(), "the given affinity replaces it");
    assert!(spec["template"]["spec"]["affinity"]["nodeAffinity"].is_object());
    assert_eq!(spec["template"]["spec"]["volumes"][0]["name"], "etcd-tls");
    assert_eq!(filter_env(&docs, "FENCEGATE_REPLICA_TTL").unwrap()["value"], "6s");
    assert_eq!(filter_env(&docs, "FENCEGATE_MARKS_PREFIX").unwrap()["value"], "/fg/store-a");
    // One shared replica: no budget (it would block drain), still rolling.
    let mut sets = EVERYTHING.to_vec();
    sets.push("filter.replicas=1");
    let docs = docs_of(&sets);
    assert_eq!(find(&docs, "Deployment", "filter")["spec"]["strategy"]["type"], "RollingUpdate");
    assert!(docs
        .iter()
        .all(|d| !(d["kind"] == "PodDisruptionBudget" && d["metadata"]["name"] == "fg-fencegate-filter")));
    // Without etcd, or without shared marks: today's single filter on a PVC.
    for off in ["filter.verify=false", "filter.sharedMarks=false"] {
        let mut sets = EVERYTHING.to_vec();
        sets.push(off);
        let yaml = template(&sets).unwrap();
        validate(&yaml, d.path());
        let docs = self::docs(&yaml);
        let dep = find(&docs, "Deployment", "filter");
        assert_eq!(dep["spec"]["replicas"], 1, "{off}");
        assert_eq!(dep["spec"]["strategy"], serde_json::json!({"type": "Recreate"}), "{off}");
        assert!(filter_env(&docs, "FENCEGATE_SHARED_MARKS").is_none(), "{off}");
        assert!(filter_env(&docs, "FENCEGATE_REPLICA_ID").is_none(), "{off}");
        assert_eq!(
            dep["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "fg-fencegate-filter-state"
        );
        find(&docs, "PersistentVolumeClaim", "filter-state");
        assert!(docs
            .iter()
            .all(|d| d["kind"] != "PodDisruptionBudget" || d["metadata"]["name"] != "fg-fencegate-filter"));
    }
}

/// Replicas with their own marks would each admit a zombie's writes another
/// one refused: more than one needs shared marks.
#[test]
fn filter_replicas_without_shared_marks_are_refused() {
    for off in ["filter.verify=false", "filter.sharedMarks=false"] {
        let mut sets = EVERYTHING.to_vec();
        sets.extend([off, "filter.replicas=2"]);
        let err = template(&sets).expect_err(off);
        assert!(err.contains("filter.replicas=2 needs shared marks through etcd"), "{off}: {err}");
        assert!(err.contains("Set filter.replicas=1"), "{err}");
    }
    let mut sets = EVERYTHING.to_vec();
    sets.push("filter.replicas=0");
    assert!(template(&sets).unwrap_err().contains("replicas"));
}

/// Every `"fencegate_..."` string literal in src/: the metric families the code registers.
fn metric_names_in_src() -> std::collections::BTreeSet<String> {
    fn walk(dir: &Path, out: &mut std::collections::BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for (i, _) in text.match_indices("\"fencegate_") {
                    let rest = &text[i + 1..];
                    if let Some(end) = rest.find('"') {
                        out.insert(rest[..end].to_string());
                    }
                }
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&root().join("src"), &mut out);
    out
}

/// Every `fencegate_*` name in a query.
fn metric_names_in(expr: &str) -> Vec<String> {
    expr.match_indices("fencegate_")
        .map(|(i, _)| {
            let rest = &expr[i..];
            let end = rest.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(rest.len());
            rest[..end].to_string()
        })
        .collect()
}

#[test]
fn grafana_dashboard_is_valid_json_and_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("charts/fencegate/dashboards/fencegate.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    // Not tied to one Prometheus: a datasource variable, used by every panel and query.
    let vars = dash["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["type"] == "datasource").expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let want_ds = serde_json::json!({"type": "prometheus", "uid": format!("${{{}}}", ds["name"].as_str().unwrap())});
    let mut exprs: Vec<String> = vars.iter().filter_map(|v| v["definition"].as_str().map(String::from)).collect();
    let panels = dash["panels"].as_array().unwrap();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"], want_ds, "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"], want_ds, "{}", p["title"]);
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(!text.contains("\"uid\": \"prometheus\"") && !text.contains("${DS_"), "no fixed data source");
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    // Exported names: counters get _total, histograms _bucket/_sum/_count.
    let src = metric_names_in_src();
    let known = |name: &str| {
        let bases = [name, name.strip_suffix("_total").unwrap_or(name)]
            .into_iter()
            .chain(["_bucket", "_sum", "_count"].iter().filter_map(|s| name.strip_suffix(s)));
        bases.into_iter().any(|b| src.contains(b))
    };
    let mut seen = std::collections::BTreeSet::new();
    for e in &exprs {
        for n in metric_names_in(e) {
            assert!(known(&n), "the dashboard queries {n}, which nothing in src/ exports: {e}");
            seen.insert(n);
        }
    }
    for must in [
        "fencegate_sidecar_holding",
        "fencegate_sidecar_token",
        "fencegate_filter_highest_token",
        "fencegate_filter_writes_refused_total",
        "fencegate_sidecar_writes_refused_total",
        "fencegate_filter_barrier_waits_total",
        "fencegate_filter_barrier_wait_microseconds_total",
        "fencegate_filter_mark_raise_seconds_bucket",
        "fencegate_filter_replica_acked_token",
        "fencegate_filter_mark_raises_waiting_on",
        "fencegate_filter_replica_writable",
    ] {
        assert!(seen.contains(must), "the dashboard shows {must}");
    }
    // The test's own check bites: a made-up name is not accepted.
    assert!(!known("fencegate_filter_made_up_total"));
    assert!(src.contains("fencegate_filter_highest_token"), "src/ is where the names are read from");
}

#[test]
fn service_monitor_pod_monitor_and_dashboard_only_when_enabled() {
    let d = tempfile::tempdir().unwrap();
    let docs = docs_of(EVERYTHING);
    assert!(docs.iter().all(|d| d["kind"] != "ServiceMonitor" && d["kind"] != "PodMonitor"));
    assert!(docs.iter().all(|d| !d["metadata"]["name"].as_str().unwrap().ends_with("dashboard")), "off by default");
    let mut sets = EVERYTHING.to_vec();
    sets.extend([
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.interval=15s",
        "metrics.serviceMonitor.labels.release=kps",
        "metrics.podMonitor.enabled=true",
        "metrics.grafanaDashboard.enabled=true",
        "metrics.grafanaDashboard.annotations.grafana_folder=fencegate",
        "filter.networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring",
    ]);
    let yaml = template(&sets).unwrap();
    // kubernetes-validate has no schema for the Prometheus Operator's CRDs:
    // it warns and passes them; everything else is validated as before.
    let report = validate_only(&yaml, d.path());
    for line in report.lines().filter(|l| l.contains("Couldn't find schema")) {
        assert!(line.contains("kind ServiceMonitor") || line.contains("kind PodMonitor"), "{line}");
    }
    assert!(report.contains("passed for resource configmap/fg-fencegate-dashboard"), "{report}");
    let docs = self::docs(&yaml);
    let svc = find(&docs, "Service", "filter");
    let sm = find(&docs, "ServiceMonitor", "filter");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "kps");
    assert!(
        selects(&sm["spec"]["selector"]["matchLabels"], &svc["metadata"]["labels"]),
        "it selects the filter's Service"
    );
    assert_eq!(sm["spec"]["namespaceSelector"]["matchNames"], serde_json::json!(["fencegate"]));
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!((&ep["port"], &ep["path"], &ep["interval"]), (&"admin".into(), &"/metrics".into(), &"15s".into()));
    assert!(svc["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == "admin"), "a named admin port");
    let pm = find(&docs, "PodMonitor", "sidecars");
    assert_eq!(pm["spec"]["selector"]["matchLabels"]["fencegate.io/injected"], "true");
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "fg-health", "the port the injector names");
    let cm = find(&docs, "ConfigMap", "dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "fencegate");
    let json: Value = serde_json::from_str(cm["data"]["fencegate.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("charts/fencegate/dashboards/fencegate.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json, file, "the ConfigMap carries dashboards/fencegate.json");
    let np = &find(&docs, "NetworkPolicy", "filter")["spec"];
    let scrape = np["ingress"].as_array().unwrap().last().unwrap();
    assert_eq!(scrape["from"][0]["namespaceSelector"]["matchLabels"]["team"], "monitoring");
    assert_eq!(scrape["ports"], serde_json::json!([{"port": "admin"}]));
    // Label and namespace of one's own Grafana; no ServiceMonitor without a filter.
    let docs = docs_of(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.grafanaDashboard.enabled=true",
        "metrics.grafanaDashboard.labelKey=dashboards",
        "metrics.grafanaDashboard.labelValue=fencegate",
        "metrics.grafanaDashboard.namespace=grafana",
    ]);
    let cm = find(&docs, "ConfigMap", "dashboard");
    assert_eq!(cm["metadata"]["labels"]["dashboards"], "fencegate");
    assert!(cm["metadata"]["labels"].get("grafana_dashboard").is_none());
    assert_eq!(cm["metadata"]["namespace"], "grafana");
    assert!(docs.iter().all(|d| d["kind"] != "ServiceMonitor"), "the injector has no metrics to scrape");
}
