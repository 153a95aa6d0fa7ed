//! The sidecar container the injector adds, built from a pod's [`Settings`]
//! and the injector's [`InjectorConfig`].

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, Probe, ResourceRequirements, SeccompProfile, SecurityContext, SleepAction, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::annotations::Settings;
use super::patch::InjectorConfig;
use crate::lease::keeper::Rejoin;

pub const SIDECAR_NAME: &str = "fencegate-sidecar";
pub const TLS_VOLUME: &str = "fencegate-etcd-tls";
const TLS_DIR: &str = "/etc/fencegate/etcd-tls";
/// The distroless `nonroot` user the image runs as (Dockerfile: `USER 65532:65532`).
/// Set explicitly so the `restricted` Pod Security level admits the pod
/// whatever the image says.
pub const NONROOT_ID: i64 = 65532;

pub fn env(name: &str, value: impl Into<String>) -> EnvVar {
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

fn envs(s: &Settings, cfg: &InjectorConfig) -> Vec<EnvVar> {
    let mut envs = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        env("FENCEGATE_HOLDER", "$(POD_NAMESPACE)/$(POD_NAME)"),
        env("FENCEGATE_ETCD", &cfg.etcd_endpoints),
        env("FENCEGATE_LOCK", s.lock.as_str()),
        env("FENCEGATE_UPSTREAM", &s.upstream),
        env("FENCEGATE_TTL", humantime::format_duration(s.ttl).to_string()),
        // The app's side stays on loopback: a mesh does not capture it, and
        // nothing outside the pod can write through the sidecar.
        env("FENCEGATE_LISTEN", format!("127.0.0.1:{}", cfg.proxy_port)),
        env("FENCEGATE_ADMIN_LISTEN", format!("127.0.0.1:{}", cfg.admin_port)),
        // Both families: on an IPv6-only cluster the kubelet probes over IPv6.
        env("FENCEGATE_HEALTH_LISTEN", format!("[::]:{}", cfg.health_port)),
        env("FENCEGATE_LOG_FORMAT", "json"),
    ];
    if let Some(f) = &s.fence {
        envs.push(env("FENCEGATE_FENCE", f));
    }
    if let Some(r) = s.rejoin {
        envs.push(env("FENCEGATE_REJOIN", if r == Rejoin::Manual { "manual" } else { "auto" }));
    }
    if !s.ready_gate {
        envs.push(env("FENCEGATE_READY_ALWAYS", "true"));
    }
    if cfg.etcd_tls_secret.is_some() {
        envs.push(env("FENCEGATE_ETCD_CA", format!("{TLS_DIR}/ca.crt")));
        envs.push(env("FENCEGATE_ETCD_CERT", format!("{TLS_DIR}/tls.crt")));
        envs.push(env("FENCEGATE_ETCD_KEY", format!("{TLS_DIR}/tls.key")));
    }
    envs
}

fn probe(path: &str, port: u16, period: i32, failures: i32, timeout: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(timeout),
        ..Default::default()
    }
}

/// Everything the `restricted` Pod Security Standard asks of a container.
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NONROOT_ID),
        run_as_group: Some(NONROOT_ID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// The sidecar container for a pod that asked for `s`.
pub fn container(s: &Settings, cfg: &InjectorConfig) -> Container {
    let port = cfg.health_port;
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(vec!["sidecar".into()]),
        env: Some(envs(s, cfg)),
        ports: Some(vec![ContainerPort {
            name: Some("fg-health".into()),
            container_port: port.into(),
            ..Default::default()
        }]),
        // A native sidecar's startupProbe holds the app back until the proxy
        // answers, so the app's first write never meets a closed port.
        startup_probe: Some(probe("/healthz", port, 1, 120, 3)),
        // With the ready gate, Ready follows the lock at once (one failure).
        readiness_probe: Some(if s.ready_gate {
            probe("/readyz", port, 2, 1, 3)
        } else {
            probe("/healthz", port, 2, 3, 3)
        }),
        // Lenient: restarting a lock holder because a busy node answered a
        // probe late costs a takeover. One minute of silence, not six seconds.
        liveness_probe: Some(probe("/healthz", port, 10, 6, 3)),
        resources: Some(ResourceRequirements {
            requests: (!s.requests.is_empty()).then(|| s.requests.clone()),
            limits: (!s.limits.is_empty()).then(|| s.limits.clone()),
            ..Default::default()
        }),
        volume_mounts: cfg.etcd_tls_secret.is_some().then(|| {
            vec![VolumeMount {
                name: TLS_VOLUME.into(),
                mount_path: TLS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }]
        }),
        // Native sidecar: started before the app, stopped after it.
        restart_policy: cfg.native_sidecar.then(|| "Always".to_string()),
        // As a plain container it gets SIGTERM together with the app: wait a
        // little so the app's last writes still go through.
        lifecycle: (!cfg.native_sidecar).then(|| Lifecycle {
            pre_stop: Some(LifecycleHandler { sleep: Some(SleepAction { seconds: 5 }), ..Default::default() }),
            ..Default::default()
        }),
        security_context: Some(restricted_security_context()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::annotations::{self, tests::*};
    use super::*;

    fn built(fixture: &str, cfg: &InjectorConfig) -> Container {
        let s = annotations::parse(&annotations(&fixture_pod(fixture)), cfg).unwrap();
        container(&s, cfg)
    }

    fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
        c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.as_deref())
    }

    #[test]
    fn passes_the_restricted_pod_security_level() {
        let c = built("deployment-pod.json", &InjectorConfig::default());
        let sc = c.security_context.unwrap();
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!((sc.run_as_user, sc.run_as_group, sc.run_as_non_root), (Some(65532), Some(65532), Some(true)));
        assert_eq!((sc.allow_privilege_escalation, sc.read_only_root_filesystem), (Some(false), Some(true)));
        let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
        assert!(dockerfile.contains(&format!("USER {NONROOT_ID}:{NONROOT_ID}")), "the image runs as the same user");
    }

    #[test]
    fn probes_gate_startup_and_spare_a_busy_lock_holder() {
        let c = built("deployment-pod.json", &InjectorConfig::default());
        let startup = c.startup_probe.unwrap();
        assert_eq!(startup.http_get.unwrap().path.as_deref(), Some("/healthz"));
        let live = c.liveness_probe.unwrap();
        assert_eq!((live.period_seconds, live.failure_threshold, live.timeout_seconds), (Some(10), Some(6), Some(3)));
        assert_eq!(c.readiness_probe.unwrap().http_get.unwrap().path.as_deref(), Some("/readyz"), "ready-gate");
        let c = built("pod-with-init.json", &InjectorConfig::default());
        assert_eq!(env_value(&c, "FENCEGATE_READY_ALWAYS"), Some("true"));
        assert_eq!(c.readiness_probe.unwrap().http_get.unwrap().path.as_deref(), Some("/healthz"));
    }

    #[test]
    fn ports_and_listen_addresses_follow_the_config() {
        let cfg = InjectorConfig { proxy_port: 1001, admin_port: 1002, health_port: 1003, ..Default::default() };
        let c = built("pod-with-init.json", &cfg);
        assert_eq!(env_value(&c, "FENCEGATE_LISTEN"), Some("127.0.0.1:1001"));
        assert_eq!(env_value(&c, "FENCEGATE_ADMIN_LISTEN"), Some("127.0.0.1:1002"));
        assert_eq!(env_value(&c, "FENCEGATE_HEALTH_LISTEN"), Some("[::]:1003"), "dual-stack");
        assert_eq!(c.ports.unwrap()[0].container_port, 1003);
    }

    #[test]
    fn legacy_mode_is_a_plain_container_that_waits_on_stop() {
        let native = built("pod-with-init.json", &InjectorConfig::default());
        assert_eq!(native.restart_policy.as_deref(), Some("Always"));
        assert!(native.lifecycle.is_none());
        let legacy = built("pod-with-init.json", &InjectorConfig { native_sidecar: false, ..Default::default() });
        assert!(legacy.restart_policy.is_none());
        assert_eq!(legacy.lifecycle.unwrap().pre_stop.unwrap().sleep.unwrap().seconds, 5);
        let tls =
            built("pod-with-init.json", &InjectorConfig { etcd_tls_secret: Some("s".into()), ..Default::default() });
        assert_eq!(env_value(&tls, "FENCEGATE_ETCD_KEY"), Some("/etc/fencegate/etcd-tls/tls.key"));
        assert_eq!(tls.volume_mounts.unwrap()[0].name, TLS_VOLUME);
    }
}
