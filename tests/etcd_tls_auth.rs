//! The sidecar's etcd security options against a real etcd: mutual TLS
//! (client certificates required) and user/password authentication.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn write_pki(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "etcd test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    for (name, usages) in [
        ("server", vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth]),
        ("client", vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]),
    ] {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = usages;
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

fn start_etcd(dir: &Path, scheme: &str, extra: &[String]) -> (Proc, String) {
    let (cport, pport) = (free_port(), free_port());
    let client = format!("{scheme}://127.0.0.1:{cport}");
    let peer = format!("http://127.0.0.1:{pport}");
    let mut args: Vec<String> = [
        "--name",
        "s",
        "--data-dir",
        &dir.join("etcd").display().to_string(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("s={peer}"),
        "--log-level",
        "warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let p = spawn("etcd-sec", dir, &etcd_bin(), &args, &[]);
    wait_port(format!("127.0.0.1:{cport}").parse().unwrap(), Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(800));
    (p, client)
}

/// Polls `/v1/lock` until the sidecar holds (Some(token)) or `within` passes (None, with its last error).
async fn holds_within(s: &SidecarProc, within: Duration) -> Result<u64, String> {
    let end = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < end {
        if let Some(v) = s.lock().await {
            if v["holding"] == true {
                return Ok(v["token"].as_u64().unwrap());
            }
            last = v["last_error"].to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last)
}

#[tokio::test]
async fn mutual_tls_to_etcd() {
    let d = tempfile::tempdir().unwrap();
    write_pki(d.path());
    let f = |n: &str| d.path().join(n).display().to_string();
    let (_etcd, url) = start_etcd(
        d.path(),
        "https",
        &[
            "--cert-file",
            &f("server.crt"),
            "--key-file",
            &f("server.key"),
            "--trusted-ca-file",
            &f("ca.crt"),
            "--client-cert-auth",
        ]
        .map(String::from),
    );
    let nginx = Nginx::start();
    let ok = SidecarProc::start(
        d.path(),
        &url,
        "tls",
        "with-cert",
        &nginx.url(),
        &["--etcd-ca", &f("ca.crt"), "--etcd-cert", &f("client.crt"), "--etcd-key", &f("client.key")],
    );
    let token = holds_within(&ok, Duration::from_secs(15)).await.expect("holds over mutual TLS");
    assert!(token > 0);
    // Without a client certificate etcd refuses the connection: the sidecar never holds and says why.
    let no_cert =
        SidecarProc::start(d.path(), &url, "tls-other", "no-cert", &nginx.url(), &["--etcd-ca", &f("ca.crt")]);
    let err = holds_within(&no_cert, Duration::from_secs(4)).await.expect_err("must not hold without a client cert");
    assert!(!err.is_empty() && err != "null", "reports an error: {err}");
    // A client that does not trust etcd's CA is refused too.
    let bad_ca = SidecarProc::start(
        d.path(),
        &url,
        "tls-third",
        "bad-ca",
        &nginx.url(),
        &["--etcd-ca", &f("client.crt"), "--etcd-cert", &f("client.crt"), "--etcd-key", &f("client.key")],
    );
    assert!(holds_within(&bad_ca, Duration::from_secs(4)).await.is_err());
}

#[tokio::test]
async fn user_and_password_auth_to_etcd() {
    let d = tempfile::tempdir().unwrap();
    let (_etcd, url) = start_etcd(d.path(), "http", &[]);
    let ctl = |args: &[&str]| {
        let out = Command::new(etcdctl_bin())
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&url)
            .args(args)
            .output()
            .expect("etcdctl is installed");
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // Ready once it answers (its port opens before that; CI's machine is
    // loaded, so no fixed time is long enough).
    let started = Instant::now();
    while !Command::new(etcdctl_bin())
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &url, "endpoint", "health"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(started.elapsed() < Duration::from_secs(15), "etcd never healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    ctl(&["user", "add", "root:rootpw"]);
    ctl(&["user", "add", "app:apppw"]);
    ctl(&["role", "add", "locks"]);
    ctl(&["role", "grant-permission", "locks", "--prefix=true", "readwrite", "/fencegate/"]);
    ctl(&["user", "grant-role", "app", "locks"]);
    ctl(&["auth", "enable"]);
    let nginx = Nginx::start();
    let ok = SidecarProc::start(
        d.path(),
        &url,
        "auth",
        "app",
        &nginx.url(),
        &["--etcd-user", "app", "--etcd-password", "apppw"],
    );
    holds_within(&ok, Duration::from_secs(15)).await.expect("holds with user and password");
    let anon = SidecarProc::start(d.path(), &url, "auth2", "anon", &nginx.url(), &[]);
    let err = holds_within(&anon, Duration::from_secs(4)).await.expect_err("anonymous must not hold");
    assert!(err.contains("user name is empty") || err.contains("permission denied") || err.contains("auth"), "{err}");
    let wrong = SidecarProc::start(
        d.path(),
        &url,
        "auth3",
        "wrong",
        &nginx.url(),
        &["--etcd-user", "app", "--etcd-password", "nope"],
    );
    assert!(holds_within(&wrong, Duration::from_secs(4)).await.is_err());
}
