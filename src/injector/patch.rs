//! The injector's decision, as a pure function of the pod and the config:
//! [`patch`] returns the JSON Patch that adds the sidecar, or why not.
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
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, LifecycleHandler, ObjectFieldSelector, Pod, Probe,
    ResourceRequirements, SecretVolumeSource, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use crate::token::LockName;

pub const ANN: &str = "fencegate.io/";
pub const SIDECAR_NAME: &str = "fencegate-sidecar";
const TLS_VOLUME: &str = "fencegate-etcd-tls";
const TLS_DIR: &str = "/etc/fencegate/etcd-tls";

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
            proxy_port: 15001,
            admin_port: 15000,
            health_port: 15020,
            native_sidecar: true,
            strict: false,
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
}

fn ptr(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: ptr(tokens), value })
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn quantity(what: &str, v: &str, errors: &mut Vec<String>) -> Option<Quantity> {
    let ok = !v.is_empty()
        && v.trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse::<f64>().is_ok_and(|n| n >= 0.0)
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"]
            .contains(&v.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.'));
    if ok {
        Some(Quantity(v.into()))
    } else {
        errors.push(format!("{ANN}{what}: {v:?} is not a resource quantity (e.g. 100m, 64Mi)"));
        None
    }
}

/// The decision for `pod`.
pub fn patch(pod: &Pod, cfg: &InjectorConfig) -> Decision {
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let get = |k: &str| ann.get(&format!("{ANN}{k}")).map(|s| s.trim());
    match get("inject") {
        Some("true") => {}
        Some(_) | None => return Decision::Skip("not annotated fencegate.io/inject: \"true\""),
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let has_sidecar =
        spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| c.name == SIDECAR_NAME);
    if get("status") == Some("injected") || has_sidecar {
        return Decision::Skip("already injected");
    }

    // Validate every annotation, collecting all problems at once.
    let mut errors = Vec::new();
    let lock = match get("lock") {
        None | Some("") => {
            errors.push(format!("{ANN}lock is required"));
            None
        }
        Some(l) => l.parse::<LockName>().map_err(|e| errors.push(format!("{ANN}lock: {e}"))).ok(),
    };
    let upstream = match get("upstream") {
        Some(u) if u.starts_with("http://") && u.len() > 7 => Some(u.to_string()),
        Some(u) => {
            errors.push(format!("{ANN}upstream: {u:?} must be an http:// URL (the filter's)"));
            None
        }
        None => {
            errors.push(format!("{ANN}upstream is required (the filter's URL)"));
            None
        }
    };
    let ttl = match get("ttl") {
        None => Some(cfg.default_ttl),
        Some(t) => match crate::config::duration(t) {
            Ok(d) if d >= Duration::from_secs(2) => Some(d),
            Ok(_) => {
                errors.push(format!("{ANN}ttl: {t:?} is below etcd's smallest lease (2s)"));
                None
            }
            Err(e) => {
                errors.push(format!("{ANN}ttl: {t:?}: {e}"));
                None
            }
        },
    };
    let ready_gate = match get("ready-gate") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            errors.push(format!("{ANN}ready-gate: {v:?} must be \"true\" or \"false\""));
            false
        }
    };
    let fence = get("fence").map(str::to_string);
    if let Some(f) = &fence {
        if f.split(',').any(|u| !u.trim().starts_with("http://")) {
            errors.push(format!("{ANN}fence: {f:?} must be comma-separated http:// URLs"));
        }
    }
    let mut res_req = BTreeMap::new();
    let mut res_lim = BTreeMap::new();
    for (key, is_limit, kind, default) in [
        ("cpu-request", false, "cpu", Some(cfg.cpu_request.as_str())),
        ("memory-request", false, "memory", Some(cfg.memory_request.as_str())),
        ("cpu-limit", true, "cpu", cfg.cpu_limit.as_deref()),
        ("memory-limit", true, "memory", cfg.memory_limit.as_deref()),
    ] {
        if let Some(q) = get(key).or(default).and_then(|v| quantity(key, v, &mut errors)) {
            if is_limit { &mut res_lim } else { &mut res_req }.insert(kind.to_string(), q);
        }
    }
    if !errors.is_empty() {
        return Decision::Invalid(errors);
    }
    let (lock, upstream, ttl) = (lock.expect("validated"), upstream.expect("validated"), ttl.expect("validated"));

    // The sidecar container.
    let mut envs = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        env("FENCEGATE_HOLDER", "$(POD_NAMESPACE)/$(POD_NAME)"),
        env("FENCEGATE_ETCD", &cfg.etcd_endpoints),
        env("FENCEGATE_LOCK", lock.as_str()),
        env("FENCEGATE_UPSTREAM", &upstream),
        env("FENCEGATE_TTL", humantime::format_duration(ttl).to_string()),
        env("FENCEGATE_LISTEN", format!("127.0.0.1:{}", cfg.proxy_port)),
        env("FENCEGATE_ADMIN_LISTEN", format!("127.0.0.1:{}", cfg.admin_port)),
        env("FENCEGATE_HEALTH_LISTEN", format!("0.0.0.0:{}", cfg.health_port)),
        env("FENCEGATE_LOG_FORMAT", "json"),
    ];
    if let Some(f) = &fence {
        envs.push(env("FENCEGATE_FENCE", f));
    }
    if !ready_gate {
        envs.push(env("FENCEGATE_READY_ALWAYS", "true"));
    }
    let mut mounts = None;
    if cfg.etcd_tls_secret.is_some() {
        envs.push(env("FENCEGATE_ETCD_CA", format!("{TLS_DIR}/ca.crt")));
        envs.push(env("FENCEGATE_ETCD_CERT", format!("{TLS_DIR}/tls.crt")));
        envs.push(env("FENCEGATE_ETCD_KEY", format!("{TLS_DIR}/tls.key")));
        mounts = Some(vec![VolumeMount {
            name: TLS_VOLUME.into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]);
    }
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(cfg.health_port.into()),
            ..Default::default()
        }),
        period_seconds: Some(2),
        failure_threshold: Some(if path == "/readyz" { 1 } else { 3 }),
        ..Default::default()
    };
    let sidecar = Container {
        name: SIDECAR_NAME.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(vec!["sidecar".into()]),
        env: Some(envs),
        ports: Some(vec![ContainerPort {
            name: Some("fg-health".into()),
            container_port: cfg.health_port.into(),
            ..Default::default()
        }]),
        readiness_probe: Some(probe(if ready_gate { "/readyz" } else { "/healthz" })),
        liveness_probe: Some(probe("/healthz")),
        resources: Some(ResourceRequirements {
            requests: (!res_req.is_empty()).then_some(res_req),
            limits: (!res_lim.is_empty()).then_some(res_lim),
            ..Default::default()
        }),
        volume_mounts: mounts,
        // Native sidecar: started before the app, stopped after it.
        restart_policy: cfg.native_sidecar.then(|| "Always".to_string()),
        // As a plain container it gets SIGTERM together with the app: wait a
        // little so the app's last writes still go through.
        lifecycle: (!cfg.native_sidecar).then(|| k8s_openapi::api::core::v1::Lifecycle {
            pre_stop: Some(LifecycleHandler { sleep: Some(SleepAction { seconds: 5 }), ..Default::default() }),
            ..Default::default()
        }),
        security_context: Some(k8s_openapi::api::core::v1::SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sidecar = serde_json::to_value(&sidecar).expect("containers serialize");

    let mut ops = Vec::new();
    if cfg.native_sidecar {
        match &spec.init_containers {
            Some(ic) if !ic.is_empty() => ops.push(add(&["spec", "initContainers", "0"], sidecar)),
            _ => ops.push(add(&["spec", "initContainers"], json!([sidecar]))),
        }
    } else {
        ops.push(add(&["spec", "containers", "-"], sidecar));
    }
    // The app's containers learn where their sidecar is (unless they set it).
    let app_env = [
        ("FENCEGATE_URL", format!("http://127.0.0.1:{}", cfg.proxy_port)),
        ("FENCEGATE_ADMIN_URL", format!("http://127.0.0.1:{}", cfg.admin_port)),
    ];
    for (i, c) in spec.containers.iter().enumerate() {
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
    Decision::Patch(Patch(ops))
}
