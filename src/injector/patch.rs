//! The injector's decision, as a pure function of the pod and the config:
//! [`patch`] returns the JSON Patch that adds the sidecar, or why not.
//! Reading the annotations is [`super::annotations`], building the container
//! [`super::sidecar`]; this module decides and emits the patch.
//!
//! Annotations on the pod (all under `fencegate.io/`):
//!
//! | annotation | meaning |
//! |---|---|
//! | `inject: "true"` | inject the sidecar (anything else: leave the pod alone) |
//! | `lock` | required: the lock the app's pods share |
//! | `upstream` | required: where writes go (the filter's URL) |
//! | `fence` | filters' admin URLs to fence on takeover, comma-separated |
//! | `ttl` | lease TTL (default from the injector's config) |
//! | `ready-gate` | `"true"`: the pod is Ready only while it holds the lock |
//! | `cpu-request`, `cpu-limit`, `memory-request`, `memory-limit` | sidecar resources |
//! | `status` | set to `injected` by the injector; a pod that has it is left alone |

use std::collections::BTreeMap;
use std::time::Duration;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, SecretVolumeSource, Volume};
use serde_json::{json, Value};

pub use super::annotations::ANN;
use super::annotations::{self, Settings};
pub use super::sidecar::SIDECAR_NAME;
use super::sidecar::{self, env, TLS_VOLUME};

/// The sidecar's default ports: outside Istio's 15000-15090 and Linkerd's
/// 4140-4191, so the sidecar lives beside a mesh's proxy.
pub const DEFAULT_PROXY_PORT: u16 = 7850;
/// The label every injected pod gets (the chart's NetworkPolicy selects it).
pub const INJECTED_LABEL: &str = "fencegate.io/injected";
pub const DEFAULT_ADMIN_PORT: u16 = 7851;
pub const DEFAULT_HEALTH_PORT: u16 = 7852;

/// Defaults for injected sidecars (set by the chart).
#[derive(Clone, Debug)]
pub struct InjectorConfig {
    pub image: String,
    pub image_pull_policy: String,
    pub etcd_endpoints: String,
    /// Secret with `ca.crt`, `tls.crt`, `tls.key` for etcd, mounted into the sidecar.
    pub etcd_tls_secret: Option<String>,
    pub default_ttl: Duration,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
    pub proxy_port: u16,
    pub admin_port: u16,
    pub health_port: u16,
    /// Inject as a native sidecar (init container with `restartPolicy: Always`,
    /// Kubernetes >= 1.29); else as a plain container.
    pub native_sidecar: bool,
    /// Deny pods with bad annotations instead of admitting them unchanged.
    pub strict: bool,
    /// Use `fencegate.io/lock` as is, instead of `NAMESPACE.LOCK`.
    pub cluster_wide_locks: bool,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        InjectorConfig {
            image: "ghcr.io/fencegate/fencegate:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            etcd_endpoints: "http://etcd:2379".into(),
            etcd_tls_secret: None,
            default_ttl: Duration::from_secs(10),
            cpu_request: "10m".into(),
            memory_request: "16Mi".into(),
            cpu_limit: None,
            memory_limit: Some("64Mi".into()),
            proxy_port: DEFAULT_PROXY_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            health_port: DEFAULT_HEALTH_PORT,
            native_sidecar: true,
            strict: false,
            cluster_wide_locks: false,
        }
    }
}

/// What to do with a pod.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Leave the pod alone, silently (not asked for, or already injected).
    Skip(&'static str),
    /// Add the sidecar.
    Patch(Patch),
    /// The annotations are wrong: admit unchanged with these warnings, or
    /// deny in strict mode.
    Invalid(Vec<String>),
    /// Asked for, but this kind of pod cannot have the sidecar: admit it
    /// unchanged with this warning, in strict mode too (the pod is not wrong,
    /// fencegate cannot serve it; Istio and Linkerd skip such pods the same way).
    Unsupported(String),
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(tokens.iter().copied()), value })
}

/// Why `spec` cannot get the sidecar under `cfg`, if it cannot.
fn unsupported(spec: &PodSpec, cfg: &InjectorConfig) -> Option<String> {
    if spec.host_network == Some(true) {
        // The sidecar's ports would be the node's: two such pods on one node collide.
        return Some("hostNetwork pods are not injected (the sidecar's ports would collide on the node)".into());
    }
    let runs_to_completion = matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure"));
    if !cfg.native_sidecar && runs_to_completion {
        // A plain-container sidecar never exits, so a Job's pod would never complete.
        return Some("with --legacy-sidecar, pods with restartPolicy Never/OnFailure (Jobs) are not injected: they would never complete".into());
    }
    None
}

/// The decision for `pod`.
pub fn patch(pod: &Pod, cfg: &InjectorConfig) -> Decision {
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    if ann.get(&format!("{ANN}inject")).map(|s| s.trim()) != Some("true") {
        return Decision::Skip("not annotated fencegate.io/inject: \"true\"");
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let has_sidecar =
        spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| c.name == SIDECAR_NAME);
    if ann.get(&format!("{ANN}status")).map(|s| s.trim()) == Some("injected") || has_sidecar {
        return Decision::Skip("already injected");
    }
    if let Some(why) = unsupported(&spec, cfg) {
        return Decision::Unsupported(why);
    }
    let settings = annotations::parse(ann, cfg).and_then(|mut s| {
        s.lock = annotations::scoped_lock(&s.lock, pod.metadata.namespace.as_deref(), cfg).map_err(|e| vec![e])?;
        Ok(s)
    });
    match settings {
        Ok(settings) => Decision::Patch(emit(&spec, pod.metadata.labels.as_ref(), &settings, cfg)),
        Err(errors) => Decision::Invalid(errors),
    }
}

/// The JSON Patch that adds the sidecar for `settings` to a pod with `spec`.
pub fn emit(
    spec: &PodSpec,
    labels: Option<&BTreeMap<String, String>>,
    settings: &Settings,
    cfg: &InjectorConfig,
) -> Patch {
    let sidecar = serde_json::to_value(sidecar::container(settings, cfg)).expect("containers serialize");
    let mut ops = Vec::new();
    if cfg.native_sidecar {
        match &spec.init_containers {
            Some(ic) if !ic.is_empty() => ops.push(add(&["spec", "initContainers", "0"], sidecar)),
            _ => ops.push(add(&["spec", "initContainers"], json!([sidecar]))),
        }
    } else {
        ops.push(add(&["spec", "containers", "-"], sidecar));
    }
    app_env(&spec.containers, cfg, &mut ops);
    if let Some(secret) = &cfg.etcd_tls_secret {
        let vol = serde_json::to_value(Volume {
            name: TLS_VOLUME.into(),
            secret: Some(SecretVolumeSource { secret_name: Some(secret.clone()), ..Default::default() }),
            ..Default::default()
        })
        .expect("volumes serialize");
        match &spec.volumes {
            Some(_) => ops.push(add(&["spec", "volumes", "-"], vol)),
            None => ops.push(add(&["spec", "volumes"], json!([vol]))),
        }
    }
    // `annotations` exists: the pod asked for injection through it.
    ops.push(add(&["metadata", "annotations", "fencegate.io/status"], json!("injected")));
    // The label lets the chart's NetworkPolicy admit injected pods (and only
    // them) to the filter's ports; a label, since policies cannot select on
    // annotations.
    match labels {
        Some(_) => ops.push(add(&["metadata", "labels", INJECTED_LABEL], json!("true"))),
        None => ops.push(add(&["metadata", "labels"], json!({ INJECTED_LABEL: "true" }))),
    }
    Patch(ops)
}

/// The app's containers learn where their sidecar is (unless they set it).
fn app_env(containers: &[Container], cfg: &InjectorConfig, ops: &mut Vec<PatchOperation>) {
    let app_env = [
        ("FENCEGATE_URL", format!("http://127.0.0.1:{}", cfg.proxy_port)),
        ("FENCEGATE_ADMIN_URL", format!("http://127.0.0.1:{}", cfg.admin_port)),
    ];
    for (i, c) in containers.iter().enumerate() {
        let idx = i.to_string();
        let existing: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        let missing: Vec<Value> = app_env
            .iter()
            .filter(|(n, _)| !existing.contains(n))
            .map(|(n, v)| serde_json::to_value(env(n, v)).expect("env serializes"))
            .collect();
        if c.env.is_none() {
            ops.push(add(&["spec", "containers", &idx, "env"], Value::Array(missing)));
        } else {
            for m in missing {
                ops.push(add(&["spec", "containers", &idx, "env", "-"], m));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::annotations::tests::fixture_pod;
    use super::*;

    fn applied(pod: &Pod, p: &Patch) -> Value {
        let mut v = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut v, p).expect("the patch applies");
        v
    }

    fn patched(pod: &Pod, cfg: &InjectorConfig) -> Value {
        match patch(pod, cfg) {
            Decision::Patch(p) => applied(pod, &p),
            other => panic!("not patched: {other:?}"),
        }
    }

    #[test]
    fn native_sidecar_goes_first_and_apps_learn_the_ports() {
        let pod = patched(&fixture_pod("pod-with-init.json"), &InjectorConfig::default());
        let inits: Vec<&str> =
            pod["spec"]["initContainers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(inits, vec![SIDECAR_NAME, "migrate"]);
        let app_env = &pod["spec"]["containers"][0]["env"];
        assert_eq!(app_env[0], json!({"name": "FENCEGATE_URL", "value": "http://127.0.0.1:7850"}));
        assert_eq!(app_env[1], json!({"name": "FENCEGATE_ADMIN_URL", "value": "http://127.0.0.1:7851"}));
        assert_eq!(pod["spec"]["containers"][1]["env"][0]["value"], "http://custom:1", "an app's own setting wins");
        assert_eq!(pod["metadata"]["annotations"]["fencegate.io/status"], "injected");
        let again: Pod = serde_json::from_value(pod).unwrap();
        assert_eq!(patch(&again, &InjectorConfig::default()), Decision::Skip("already injected"));
    }

    #[test]
    fn legacy_sidecar_is_appended_and_tls_volume_added() {
        let cfg =
            InjectorConfig { native_sidecar: false, etcd_tls_secret: Some("etcd-tls".into()), ..Default::default() };
        let pod = patched(&fixture_pod("deployment-pod.json"), &cfg);
        assert_eq!(pod["spec"]["containers"].as_array().unwrap().last().unwrap()["name"], SIDECAR_NAME);
        assert_eq!(pod["spec"]["volumes"].as_array().unwrap().last().unwrap()["secret"]["secretName"], "etcd-tls");
    }

    #[test]
    fn host_network_pods_are_admitted_unchanged_with_a_reason() {
        let mut pod = fixture_pod("deployment-pod.json");
        pod.spec.as_mut().unwrap().host_network = Some(true);
        for strict in [false, true] {
            let d = patch(&pod, &InjectorConfig { strict, ..Default::default() });
            assert!(matches!(&d, Decision::Unsupported(w) if w.contains("hostNetwork")), "{d:?}");
        }
    }

    #[test]
    fn jobs_are_not_given_a_legacy_sidecar_that_never_exits() {
        let mut pod = fixture_pod("pod-with-init.json");
        pod.spec.as_mut().unwrap().restart_policy = Some("Never".into());
        let d = patch(&pod, &InjectorConfig { native_sidecar: false, ..Default::default() });
        assert!(matches!(&d, Decision::Unsupported(w) if w.contains("never complete")), "{d:?}");
        assert!(
            matches!(patch(&pod, &InjectorConfig::default()), Decision::Patch(_)),
            "native sidecars end with the Job"
        );
    }

    #[test]
    fn not_annotated_or_bad_annotations() {
        let mut pod = fixture_pod("pod-with-init.json");
        let ann = pod.metadata.annotations.as_mut().unwrap();
        ann.insert(format!("{ANN}ttl"), "1s".into());
        assert!(matches!(patch(&pod, &InjectorConfig::default()), Decision::Invalid(e) if e.len() == 1));
        pod.metadata.annotations.as_mut().unwrap().insert(format!("{ANN}inject"), "false".into());
        assert!(matches!(patch(&pod, &InjectorConfig::default()), Decision::Skip(_)));
    }
}
