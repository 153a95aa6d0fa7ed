//! Reading a pod's `fencegate.io/` annotations into [`Settings`], or into
//! the full list of what is wrong with them (one round trip for the user,
//! not one per mistake).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::patch::InjectorConfig;
use crate::lease::keeper::Rejoin;
use crate::token::LockName;

pub const ANN: &str = "fencegate.io/";

/// What one pod asked for, validated, with the injector's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub lock: LockName,
    pub upstream: String,
    pub ttl: Duration,
    pub ready_gate: bool,
    pub fence: Option<String>,
    /// `fencegate.io/rejoin`: `--rejoin` for the sidecar (`None`: its default, `auto`).
    pub rejoin: Option<Rejoin>,
    /// `cpu`/`memory` requests and limits for the sidecar.
    pub requests: BTreeMap<String, Quantity>,
    pub limits: BTreeMap<String, Quantity>,
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

fn lock(v: Option<&str>, errors: &mut Vec<String>) -> Option<LockName> {
    match v {
        None | Some("") => {
            errors.push(format!("{ANN}lock is required"));
            None
        }
        Some(l) => l.parse::<LockName>().map_err(|e| errors.push(format!("{ANN}lock: {e}"))).ok(),
    }
}

fn upstream(v: Option<&str>, errors: &mut Vec<String>) -> Option<String> {
    match v {
        Some(u) if u.starts_with("http://") && u.len() > 7 => Some(u.to_string()),
        Some(u) => {
            errors.push(format!("{ANN}upstream: {u:?} must be an http:// URL (the filter's)"));
            None
        }
        None => {
            errors.push(format!("{ANN}upstream is required (the filter's URL)"));
            None
        }
    }
}

/// Bounds of `fencegate.io/ttl`: etcd's smallest lease, and a ceiling so a
/// crashed holder cannot keep its lock (and its writers waiting) for hours.
pub const MIN_TTL: Duration = Duration::from_secs(2);
pub const MAX_TTL: Duration = Duration::from_secs(300);

fn ttl(v: Option<&str>, default: Duration, errors: &mut Vec<String>) -> Option<Duration> {
    let Some(t) = v else { return Some(default) };
    match crate::duration::parse(t) {
        Ok(d) if (MIN_TTL..=MAX_TTL).contains(&d) => Some(d),
        Ok(d) if d < MIN_TTL => {
            errors.push(format!("{ANN}ttl: {t:?} is below etcd's smallest lease (2s)"));
            None
        }
        Ok(_) => {
            errors.push(format!("{ANN}ttl: {t:?} is above 5m (a crashed holder would keep the lock that long)"));
            None
        }
        Err(e) => {
            errors.push(format!("{ANN}ttl: {t:?}: {e}"));
            None
        }
    }
}

/// The lock a pod in `namespace` gets: `NAMESPACE.LOCK`, so pods of one
/// namespace cannot name (and hold, or raise the mark of) another
/// namespace's lock; its holder keys live under `<prefix>/NAMESPACE.`, a
/// prefix etcd roles can be scoped to. Namespace names are DNS labels (no
/// dots), so the first dot always ends the namespace. With
/// `--cluster-wide-locks` the annotation's name is used as is.
pub fn scoped_lock(lock: &LockName, namespace: Option<&str>, cfg: &InjectorConfig) -> Result<LockName, String> {
    if cfg.cluster_wide_locks {
        return Ok(lock.clone());
    }
    let ns = namespace
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{ANN}lock: the pod's namespace is unknown, so its lock cannot be scoped to it"))?;
    format!("{ns}.{lock}").parse().map_err(|e| format!("{ANN}lock: namespaced as {ns}.{lock}: {e}"))
}

/// Parses the annotations `ann` (the pod's, all keys) against `cfg`'s defaults.
pub fn parse(ann: &BTreeMap<String, String>, cfg: &InjectorConfig) -> Result<Settings, Vec<String>> {
    let get = |k: &str| ann.get(&format!("{ANN}{k}")).map(|s| s.trim());
    let mut errors = Vec::new();
    let lock = lock(get("lock"), &mut errors);
    let upstream = upstream(get("upstream"), &mut errors);
    let ttl = ttl(get("ttl"), cfg.default_ttl, &mut errors);
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
    let rejoin = match get("rejoin") {
        None => None,
        Some("auto") => Some(Rejoin::Auto),
        Some("manual") => Some(Rejoin::Manual),
        Some(v) => {
            errors.push(format!("{ANN}rejoin: {v:?} must be \"auto\" or \"manual\""));
            None
        }
    };
    let (mut requests, mut limits) = (BTreeMap::new(), BTreeMap::new());
    for (key, is_limit, kind, default) in [
        ("cpu-request", false, "cpu", Some(cfg.cpu_request.as_str())),
        ("memory-request", false, "memory", Some(cfg.memory_request.as_str())),
        ("cpu-limit", true, "cpu", cfg.cpu_limit.as_deref()),
        ("memory-limit", true, "memory", cfg.memory_limit.as_deref()),
    ] {
        if let Some(q) = get(key).or(default).and_then(|v| quantity(key, v, &mut errors)) {
            if is_limit { &mut limits } else { &mut requests }.insert(kind.to_string(), q);
        }
    }
    match (lock, upstream, ttl) {
        (Some(lock), Some(upstream), Some(ttl)) if errors.is_empty() => {
            Ok(Settings { lock, upstream, ttl, ready_gate, fence, rejoin, requests, limits })
        }
        _ => Err(errors),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    /// The pod inside one of tests/fixtures/injector's AdmissionReviews.
    pub(crate) fn fixture_pod(name: &str) -> Pod {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/injector").join(name);
        let review: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        serde_json::from_value(review["request"]["object"].clone()).unwrap()
    }

    pub(crate) fn annotations(pod: &Pod) -> BTreeMap<String, String> {
        pod.metadata.annotations.clone().unwrap_or_default()
    }

    #[test]
    fn deployment_fixture_parses_with_its_overrides() {
        let s = parse(&annotations(&fixture_pod("deployment-pod.json")), &InjectorConfig::default()).unwrap();
        assert_eq!(s.lock.as_str(), "ledger");
        assert_eq!(s.upstream, "http://fencegate-filter.payments.svc:8080");
        assert_eq!(s.ttl, Duration::from_secs(15));
        assert!(s.ready_gate);
        assert_eq!(s.fence.as_deref(), Some("http://fencegate-filter.payments.svc:9090"));
        assert_eq!(s.limits["memory"], Quantity("48Mi".into()), "annotation overrides the default");
        assert_eq!(s.requests["cpu"], Quantity("10m".into()), "default kept");
    }

    #[test]
    fn minimal_fixture_gets_the_defaults() {
        let cfg = InjectorConfig { default_ttl: Duration::from_secs(7), ..Default::default() };
        let s = parse(&annotations(&fixture_pod("pod-with-init.json")), &cfg).unwrap();
        assert_eq!((s.ttl, s.ready_gate, s.fence), (Duration::from_secs(7), false, None));
        assert!(!s.limits.contains_key("cpu"), "no CPU limit unless configured");
        assert_eq!(s.rejoin, None, "the sidecar's default");
        let mut ann = annotations(&fixture_pod("pod-with-init.json"));
        ann.insert(format!("{ANN}rejoin"), "manual".into());
        assert_eq!(parse(&ann, &cfg).unwrap().rejoin, Some(Rejoin::Manual));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut ann = annotations(&fixture_pod("pod-with-init.json"));
        for (k, v) in [
            ("lock", "bad lock!"),
            ("upstream", "ftp://x"),
            ("ttl", "1s"),
            ("ready-gate", "maybe"),
            ("cpu-limit", "lots"),
            ("fence", "x"),
            ("rejoin", "sometimes"),
        ] {
            ann.insert(format!("{ANN}{k}"), v.into());
        }
        let errors = parse(&ann, &InjectorConfig::default()).unwrap_err();
        assert_eq!(errors.len(), 7, "{errors:?}");
        for k in ["lock", "upstream", "ttl", "ready-gate", "cpu-limit", "fence", "rejoin"] {
            assert!(errors.iter().any(|e| e.starts_with(&format!("{ANN}{k}"))), "{k}: {errors:?}");
        }
        let errors = parse(&BTreeMap::new(), &InjectorConfig::default()).unwrap_err();
        assert_eq!(
            errors,
            vec![format!("{ANN}lock is required"), format!("{ANN}upstream is required (the filter's URL)")]
        );
    }
}
