//! `fencegate injector`: a mutating admission webhook that adds the sidecar
//! to annotated pods.
//!
//! The decision is the pure [`patch::patch`] (reading the annotations:
//! [`annotations`]; the container: [`sidecar`]); this module is the HTTPS
//! plumbing around it: `POST /mutate` (an `admission.k8s.io/v1`
//! `AdmissionReview`), `GET /healthz`, and a TLS certificate that is reloaded
//! when its files change, so cert-manager or the chart can rotate it
//! without a restart.

pub mod annotations;
pub mod patch;
pub mod sidecar;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::Pod;
use kube_core::admission::{AdmissionRequest, AdmissionReview};
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::proxy::{self, json_response, Body, ServerLimits};
pub use patch::{Decision, InjectorConfig};

/// Largest AdmissionReview accepted (the API server's objects are < 3 MiB).
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// The served pair, with the files' modification times it was read at.
type Loaded = (Arc<CertifiedKey>, Option<(SystemTime, SystemTime)>);

/// A certificate and key read from PEM files, swapped in place on change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| format!("{}: {e}", key.display()))?;
    let ck = CertifiedKey::new(certs, signer);
    // A rotation writes two files; reading between the writes must not pair
    // a new certificate with the old key.
    ck.keys_match().map_err(|e| format!("{} and {} do not belong together: {e}", cert.display(), key.display()))?;
    Ok(ck)
}

fn mtimes(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    Some((std::fs::metadata(cert).ok()?.modified().ok()?, std::fs::metadata(key).ok()?.modified().ok()?))
}

impl ReloadingCert {
    pub fn open(cert: &Path, key: &Path) -> Result<Arc<Self>, String> {
        let ck = load(cert, key)?;
        Ok(Arc::new(ReloadingCert {
            cert: cert.into(),
            key: key.into(),
            current: RwLock::new((Arc::new(ck), mtimes(cert, key))),
        }))
    }

    /// Reloads if either file changed; a bad new pair keeps the old one.
    pub fn refresh(&self) {
        let now = mtimes(&self.cert, &self.key);
        if now.is_none() || now == self.current.read().1 {
            return;
        }
        match load(&self.cert, &self.key) {
            Ok(ck) => {
                *self.current.write() = (Arc::new(ck), now);
                tracing::info!(cert = %self.cert.display(), "reloaded the TLS certificate");
            }
            Err(e) => {
                tracing::warn!(error = %e, "new TLS files do not load; keeping the old certificate")
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().0.clone())
    }
}

/// The AdmissionReview answer for `decision`, with the patch base64-encoded
/// as the API server expects. (kube-core's `AdmissionResponse` serializes its
/// patch bytes as a JSON array of numbers, so the answer is written here.)
pub fn review_response(uid: &str, decision: &Decision, strict: bool) -> Value {
    let mut resp = json!({ "uid": uid, "allowed": true });
    match decision {
        Decision::Skip(_) => {}
        Decision::Patch(p) => {
            let bytes = serde_json::to_vec(p).expect("patches serialize");
            resp["patchType"] = json!("JSONPatch");
            resp["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        Decision::Invalid(errors) if strict => {
            resp["allowed"] = json!(false);
            resp["status"] = json!({ "code": 400, "message": format!("fencegate: {}", errors.join("; ")) });
        }
        Decision::Unsupported(why) => {
            resp["warnings"] = json!([format!("fencegate: sidecar not injected: {why}")]);
        }
        Decision::Invalid(errors) => {
            let mut w: Vec<String> = errors.iter().map(|e| format!("fencegate: sidecar not injected: {e}")).collect();
            w.truncate(10);
            resp["warnings"] = json!(w);
        }
    }
    json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp })
}

async fn mutate(cfg: &InjectorConfig, req: Request<Incoming>) -> Response<Body> {
    let bad = |m: String| proxy::json_error(StatusCode::BAD_REQUEST, "bad_admission_review", &m, None);
    let bytes = match Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad(format!("could not read the body: {e}")),
    };
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return bad(format!("not an AdmissionReview of a Pod: {e}")),
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return bad(format!("AdmissionReview without a request: {e}")),
    };
    let decision = match &request.object {
        Some(pod) if pod.metadata.namespace.is_none() => {
            // Pods created by controllers often carry no namespace yet: the
            // request's is the one the pod will live in.
            let mut pod = pod.clone();
            pod.metadata.namespace = request.namespace.clone();
            patch::patch(&pod, cfg)
        }
        Some(pod) => patch::patch(pod, cfg),
        None => Decision::Skip("no object"),
    };
    let name = request.name.clone();
    match &decision {
        Decision::Patch(p) => {
            tracing::info!(namespace = ?request.namespace, %name, ops = p.0.len(), "injected")
        }
        Decision::Invalid(e) => {
            tracing::warn!(namespace = ?request.namespace, %name, errors = ?e, strict = cfg.strict, "bad annotations")
        }
        Decision::Unsupported(why) => {
            tracing::warn!(namespace = ?request.namespace, %name, why, "not injected")
        }
        Decision::Skip(why) => tracing::debug!(%name, why, "skipped"),
    }
    json_response(StatusCode::OK, &review_response(&request.uid, &decision, cfg.strict))
}

/// Serves the webhook on `listener` with TLS from `cert`/`key` (re-read every
/// `reload_every`) until `shutdown` resolves.
pub async fn run(
    cfg: InjectorConfig,
    listener: TcpListener,
    cert: &Path,
    key: &Path,
    reload_every: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let certs = ReloadingCert::open(cert, key)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    // The reloader task lives as long as the server: it is aborted on return.
    let reloader = tokio::spawn(async move {
        let mut tick = tokio::time::interval(reload_every);
        loop {
            tick.tick().await;
            certs.refresh();
        }
    });
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "injector serving");
    let cfg = Arc::new(cfg);
    proxy::serve_tls(
        listener,
        Some(acceptor),
        ServerLimits::default(),
        move |req: Request<Incoming>, _| {
            let cfg = cfg.clone();
            async move {
                match (req.method(), req.uri().path()) {
                    (&Method::POST, "/mutate") => mutate(&cfg, req).await,
                    (&Method::GET, "/healthz") => proxy::text_response(StatusCode::OK, "text/plain", "ok\n"),
                    (m, p) => proxy::json_error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        &format!("no such endpoint: {m} {p}"),
                        None,
                    ),
                }
            }
        },
        shutdown,
    )
    .await;
    reloader.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_core_would_not_base64_the_patch_so_we_do() {
        // Why review_response exists: the API server wants a base64 string.
        let req: AdmissionReview<Pod> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": { "uid": "u1", "kind": {"group":"","version":"v1","kind":"Pod"},
              "resource": {"group":"","version":"v1","resource":"pods"}, "operation": "CREATE",
              "userInfo": {}, "object": {"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"}} }
        }))
        .unwrap();
        let req: AdmissionRequest<Pod> = req.try_into().unwrap();
        let p = json_patch::Patch(vec![]);
        let theirs =
            serde_json::to_value(kube_core::admission::AdmissionResponse::from(&req).with_patch(p.clone()).unwrap())
                .unwrap();
        assert!(theirs["patch"].is_array(), "kube-core emits bytes as an array: {theirs}");
        let ours = review_response("u1", &Decision::Patch(p), false);
        assert_eq!(ours["response"]["patch"], json!("W10="), "base64 of []");
        assert_eq!(ours["response"]["patchType"], "JSONPatch");
        assert_eq!(ours["response"]["uid"], "u1");
    }

    #[test]
    fn unsupported_pods_are_admitted_with_a_warning_even_when_strict() {
        let ours = review_response("u2", &Decision::Unsupported("hostNetwork".into()), true);
        assert_eq!(ours["response"]["allowed"], true);
        assert!(ours["response"].get("patch").is_none());
        assert_eq!(ours["response"]["warnings"], json!(["fencegate: sidecar not injected: hostNetwork"]));
    }
}
