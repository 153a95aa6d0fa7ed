//! End to end, with real parts only: etcd, nginx (WebDAV), one filter (or
//! three replicas behind in-test round-robin balancers, issue 15) and
//! several sidecars as processes, and app workers (examples/append_worker)
//! that talk only to their sidecar. Every scenario asserts on the log the
//! store really holds, and each has a control run showing the same scenario
//! breaking without the defence it tests.

mod support;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};
use support::balancer::Balancer;
use support::history::{self, Attempt, Record};
use support::*;

const LOCK: &str = "ledger";
const TTL: Duration = Duration::from_secs(2);

#[derive(Clone, Copy)]
struct Opts {
    /// Sidecars write through the filter (else straight to nginx).
    filter: bool,
    /// With `filter`: this many filter replicas (each its own state dir)
    /// behind two round-robin balancers, one for the proxy ports (the
    /// sidecars' `--upstream`), one for the admin ports (their `--fence`);
    /// 0 is the single filter.
    replicas: usize,
    /// The replicas share every lock's mark in etcd (`--shared-marks`); else each keeps its own.
    shared_marks: bool,
    /// Sidecars fence the filter on takeover.
    fence: bool,
    fence_required: bool,
    /// Sidecars keep injecting their last token (test-only): the filter is the only defence.
    unsafe_no_self_fence: bool,
    n: usize,
    /// Workers re-check `/v1/lock` every this many iterations.
    check_every: u64,
    worker_secs: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            filter: true,
            replicas: 0,
            shared_marks: false,
            fence: true,
            fence_required: false,
            unsafe_no_self_fence: false,
            n: 3,
            check_every: 1000,
            worker_secs: 120,
        }
    }
}

struct Cluster {
    o: Opts,
    etcd: Etcd,
    nginx: Nginx,
    filter: Option<FilterProc>,
    replicas: Vec<FilterProc>,
    /// With replicas: the proxy ports' balancer, then the admin ports'.
    lbs: Vec<Balancer>,
    sidecars: Vec<SidecarProc>,
    workers: Vec<Proc>,
    names: Vec<String>,
    dir: tempfile::TempDir,
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// A filter's flags. Verification on (issue 13): every raise is checked
/// with etcd (tokens are the sidecars' real leases, never trusted), so these
/// runs also show it keeps up with takeovers, etcd restarts and zombies.
fn filter_args(o: &Opts, etcd: &Etcd, replica_id: &str) -> Vec<String> {
    let mut a: Vec<String> =
        ["--lock", LOCK, "--etcd", &etcd.client_url, "--etcd-timeout", "1s"].map(String::from).into();
    if o.shared_marks {
        // A short TTL (a killed replica holds raises for it), so a short
        // --abort-grace: a replica stops writing that long before its TTL too.
        a.extend(
            ["--shared-marks", "--replica-id", replica_id, "--replica-ttl", "2s", "--abort-grace", "500ms"]
                .map(String::from),
        );
    }
    a
}

/// Starts filter `id` with its own directory (log, state dir) under `dir`.
fn start_filter(o: &Opts, etcd: &Etcd, nginx: &Nginx, dir: &Path, id: &str) -> FilterProc {
    let d = dir.join(id);
    std::fs::create_dir_all(&d).unwrap();
    let args = filter_args(o, etcd, id);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    FilterProc::start(&d, &nginx.url(), &d.join("state"), &args)
}

impl Cluster {
    fn start(o: Opts) -> Cluster {
        let etcd = Etcd::start();
        let nginx = Nginx::start();
        let dir = tempfile::tempdir().unwrap();
        let filter = (o.filter && o.replicas == 0).then(|| start_filter(&o, &etcd, &nginx, dir.path(), "filter"));
        let n_replicas = if o.filter { o.replicas } else { 0 };
        let replicas: Vec<FilterProc> =
            (1..=n_replicas).map(|i| start_filter(&o, &etcd, &nginx, dir.path(), &format!("r{i}"))).collect();
        let lbs: Vec<Balancer> = if replicas.is_empty() {
            vec![]
        } else {
            vec![
                Balancer::start(replicas.iter().map(|f| f.addr).collect()),
                Balancer::start(replicas.iter().map(|f| f.admin).collect()),
            ]
        };
        let (upstream, fence) = match (&filter, lbs.as_slice()) {
            (Some(f), _) => (f.url(), Some(f.admin_url())),
            (None, [proxy, admin]) => (proxy.url(), Some(admin.url())),
            _ => (nginx.url(), None),
        };
        let mut extra: Vec<String> = vec![];
        if let (Some(f), true) = (fence, o.fence) {
            extra.extend(["--fence".into(), f]);
        }
        if o.fence_required {
            extra.push("--fence-required".into());
        }
        if o.unsafe_no_self_fence {
            extra.push("--unsafe-no-self-fence".into());
        }
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        let names: Vec<String> = (0..o.n).map(|i| format!("w{i}")).collect();
        let sidecars: Vec<SidecarProc> = names
            .iter()
            .map(|n| SidecarProc::start(dir.path(), &etcd.client_url, LOCK, n, &upstream, &extra))
            .collect();
        let mut c = Cluster { o, etcd, nginx, filter, replicas, lbs, sidecars, workers: vec![], names, dir };
        for i in 0..o.n {
            let w = c.spawn_worker(i);
            c.workers.push(w);
        }
        c
    }

    fn spawn_worker(&self, i: usize) -> Proc {
        let s = &self.sidecars[i];
        let journal = self.dir.path().join(format!("journal-{}", self.names[i]));
        spawn(
            &format!("worker-{}", self.names[i]),
            self.dir.path(),
            &example_bin("append_worker"),
            &[
                self.names[i].clone(),
                s.url(),
                s.admin_url(),
                journal.display().to_string(),
                "/log".into(),
                self.o.check_every.to_string(),
                self.o.worker_secs.to_string(),
            ],
            &[],
        )
    }

    async fn holder(&self) -> Option<(usize, u64)> {
        for (i, s) in self.sidecars.iter().enumerate() {
            if let Some(t) = s.holding().await {
                return Some((i, t));
            }
        }
        None
    }

    async fn wait_holder_other_than(&self, not: Option<usize>, within: Duration) -> (usize, u64) {
        let end = Instant::now() + within;
        loop {
            for (i, s) in self.sidecars.iter().enumerate() {
                if Some(i) != not && proc_state(s.proc.pid()) != Some('T') {
                    if let Some(t) = s.holding().await {
                        return (i, t);
                    }
                }
            }
            assert!(Instant::now() < end, "no new holder within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn log(&self) -> Vec<Record> {
        history::parse_log(&self.nginx.get("/log").await.unwrap_or_default())
    }

    async fn wait_log(&self, what: &str, within: Duration, f: impl Fn(&[Record]) -> bool) {
        let end = Instant::now() + within;
        while !f(&self.log().await) {
            assert!(Instant::now() < end, "log never showed {what}: {:?}", self.log().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Freezes worker `i` between its read and its write (it stops itself on
    /// SIGUSR1), then its sidecar: the whole pod pauses.
    async fn freeze(&self, i: usize) {
        self.run_to_next_read(i).await;
        self.sidecars[i].proc.signal(libc::SIGSTOP);
    }

    /// Lets worker `i` run (continued if stopped) until right after its next
    /// read, where it stops itself (SIGUSR1).
    async fn run_to_next_read(&self, i: usize) {
        let w = &self.workers[i];
        w.signal(libc::SIGUSR1);
        w.signal(libc::SIGCONT);
        let end = Instant::now() + Duration::from_secs(3);
        while proc_state(w.pid()) != Some('T') {
            if Instant::now() > end {
                w.signal(libc::SIGSTOP); // not writing: stop it wherever it is
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn thaw(&self, i: usize) {
        self.sidecars[i].proc.signal(libc::SIGCONT);
        self.workers[i].signal(libc::SIGCONT);
    }

    fn stop_workers(&mut self) {
        for w in &mut self.workers {
            w.signal(libc::SIGCONT);
            w.kill9();
        }
    }

    fn journals(&self) -> Vec<Attempt> {
        (0..self.names.len()).flat_map(|i| self.journal(i)).collect()
    }

    /// Worker `i`'s journal, its complete lines only: a worker may be in the
    /// middle of writing one (`writeln!` on a `File` is several writes).
    fn journal(&self, i: usize) -> Vec<Attempt> {
        let n = &self.names[i];
        let text = std::fs::read_to_string(self.dir.path().join(format!("journal-{n}"))).unwrap_or_default();
        history::parse_journal(n, &text[..text.rfind('\n').map_or(0, |end| end + 1)])
    }

    /// Waits until worker `i` has journaled a write with `token` answered at
    /// or after `since_ms`: a woken zombie's write, waited for, not assumed
    /// done after a fixed time (CI's machine is loaded).
    async fn wait_attempt(&self, i: usize, token: u64, since_ms: u128, within: Duration) {
        let end = Instant::now() + within;
        while !self.journal(i).iter().any(|a| a.at_ms >= since_ms && a.token == token) {
            assert!(Instant::now() < end, "{} journaled no write with token {token} in {within:?}", self.names[i]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn verdict(&mut self) -> (Vec<Record>, Vec<Attempt>, Vec<String>) {
        self.stop_workers();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = self.log().await;
        let atts = self.journals();
        let v = history::check(&log, &atts);
        println!("{}", history::summary(&log, &atts));
        (log, atts, v)
    }
}

/// The zombie: the holder pauses past its TTL between a read and a write,
/// another takes over and writes, then the zombie wakes and writes.
/// Returns the zombie's attempts after the thaw and the checker's violations.
async fn zombie_scenario(o: Opts) -> (Vec<Attempt>, Vec<String>, Vec<Record>, String, u64) {
    let mut c = Cluster::start(o);
    let (h0, t0) = c.wait_holder_other_than(None, Duration::from_secs(15)).await;
    c.wait_log("three records", Duration::from_secs(15), |l| l.len() >= 3).await;
    c.freeze(h0).await;
    let (_h1, t1) = c.wait_holder_other_than(Some(h0), Duration::from_secs(10)).await;
    assert!(t1 > t0);
    c.wait_log("a record from the new holder", Duration::from_secs(10), |l| l.iter().any(|r| r.token == t1)).await;
    let thawed = now_ms();
    c.thaw(h0);
    c.wait_attempt(h0, t0, thawed, Duration::from_secs(15)).await;
    let zombie = c.names[h0].clone();
    let (log, atts, v) = c.verdict().await;
    let after: Vec<Attempt> =
        atts.into_iter().filter(|a| a.worker == zombie && a.at_ms >= thawed && a.token == t0).collect();
    (after, v, log, zombie, t1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_after_sigstop_is_refused_and_the_log_stays_clean() {
    let (after, v, log, zombie, t1) = zombie_scenario(Opts::default()).await;
    assert!(v.is_empty(), "violations: {v:#?}");
    assert!(!after.is_empty(), "the zombie wrote after waking up");
    assert!(after.iter().all(|a| !a.acked()), "every write of the zombie was refused: {after:?}");
    let first_new = log.iter().position(|r| r.token == t1).unwrap();
    assert!(
        log[first_new..].iter().all(|r| r.worker != zombie || r.token > t1),
        "no zombie record after the new holder's first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_zombie_without_filter_or_self_fencing_destroys_data() {
    let o = Opts { filter: false, fence: false, unsafe_no_self_fence: true, ..Opts::default() };
    let (after, v, _, _, _) = zombie_scenario(o).await;
    assert!(after.iter().any(|a| a.acked()), "the zombie's write was accepted: {after:?}");
    assert!(!v.is_empty(), "the checker must see the damage");
    println!("control violations (expected): {v:#?}");
}

/// The quiet takeover: the zombie wakes and writes before the new holder
/// has written anything. Sidecars do not self-fence here (test-only flag),
/// so only the filter stands between the zombie and the store.
async fn quiet_takeover(fence: bool) -> (Vec<Attempt>, Vec<String>) {
    let o = Opts { fence, unsafe_no_self_fence: true, n: 2, ..Opts::default() };
    let mut c = Cluster::start(o);
    let (h0, t0) = c.wait_holder_other_than(None, Duration::from_secs(15)).await;
    c.wait_log("two records", Duration::from_secs(15), |l| l.len() >= 2).await;
    let other = 1 - h0;
    c.workers[other].signal(libc::SIGSTOP); // the new holder's app stays quiet
    c.freeze(h0).await;
    let (h1, t1) = c.wait_holder_other_than(Some(h0), Duration::from_secs(10)).await;
    assert_eq!(h1, other);
    assert!(t1 > t0);
    let thawed = now_ms();
    c.thaw(h0);
    c.wait_attempt(h0, t0, thawed, Duration::from_secs(15)).await;
    assert!(c.log().await.iter().all(|r| r.token != t1), "the new holder has not written yet");
    c.workers[other].signal(libc::SIGCONT);
    c.wait_log("a record from the new holder", Duration::from_secs(10), |l| l.iter().any(|r| r.token == t1)).await;
    let zombie = c.names[h0].clone();
    let (_, atts, v) = c.verdict().await;
    (atts.into_iter().filter(|a| a.worker == zombie && a.at_ms >= thawed && a.token == t0).collect(), v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_takeover_zombie_is_refused_because_the_new_holder_fenced_the_filter() {
    let (after, v) = quiet_takeover(true).await;
    assert!(!after.is_empty(), "the zombie wrote after waking up");
    assert!(after.iter().all(|a| a.status == 409), "refused by the fenced filter: {after:?}");
    assert!(v.is_empty(), "{v:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_quiet_takeover_without_the_fence_lets_the_zombie_write() {
    let (after, _) = quiet_takeover(false).await;
    assert!(after.iter().any(|a| a.acked()), "without the fence the filter still admits the zombie's token: {after:?}");
}

/// A network namespace with two veth pairs back to the host: one to reach
/// etcd, one to reach the filter. Removed on drop.
struct TestNet {
    ns: String,
    links: Vec<String>,
    /// host-side addresses of the etcd link and the store link; the namespace's address on the store link.
    etcd_host: String,
    store_host: String,
    ns_store: String,
}

fn ip(args: &str) {
    let out =
        std::process::Command::new("ip").args(args.split_whitespace()).output().expect("ip (iproute2) is installed");
    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestNet {
    fn create() -> TestNet {
        let id = std::process::id() % 10000;
        let ns = format!("fgtest{id}");
        let net = 200 + (id % 50); // 10.213.{net}.0/24 is ours: assigned here, removed on drop
        let (he, ne, hs, nss) = (format!("fge{id}h"), format!("fge{id}n"), format!("fgs{id}h"), format!("fgs{id}n"));
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&format!("netns add {ns}"));
        ip(&format!("netns exec {ns} ip link set lo up"));
        let t = TestNet {
            ns: ns.clone(),
            links: vec![he.clone(), hs.clone()],
            etcd_host: format!("10.213.{net}.1"),
            store_host: format!("10.213.{net}.5"),
            ns_store: format!("10.213.{net}.6"),
        };
        for (h, n, host_ip, ns_ip) in [
            (&he, &ne, format!("10.213.{net}.1"), format!("10.213.{net}.2")),
            (&hs, &nss, t.store_host.clone(), t.ns_store.clone()),
        ] {
            ip(&format!("link add {h} type veth peer name {n}"));
            ip(&format!("link set {n} netns {ns}"));
            ip(&format!("addr add {host_ip}/30 dev {h}"));
            ip(&format!("link set {h} up"));
            ip(&format!("netns exec {ns} ip addr add {ns_ip}/30 dev {n}"));
            ip(&format!("netns exec {ns} ip link set {n} up"));
        }
        t
    }

    fn cut_etcd(&self) {
        ip(&format!("link set {} down", self.links[0]));
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = std::process::Command::new("ip").args(["link", "del", l]).output();
        }
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_from_etcd_only_the_holder_self_fences_in_time() {
    let net = TestNet::create();
    // etcd also listens on the host end of the etcd link.
    let d = tempfile::tempdir().unwrap();
    let (cport, pport) = (free_port(), free_port());
    let client = format!("http://127.0.0.1:{cport},http://{}:{cport}", net.etcd_host);
    let peer = format!("http://127.0.0.1:{pport}");
    let mut etcd = spawn(
        "etcd-part",
        d.path(),
        &etcd_bin(),
        &[
            "--name",
            "p",
            "--data-dir",
            &d.path().join("etcd").display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{cport}"),
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("p={peer}"),
            "--log-level",
            "warn",
        ]
        .map(String::from),
        &[],
    );
    wait_port(format!("127.0.0.1:{cport}").parse().unwrap(), Duration::from_secs(15));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let nginx = Nginx::start();
    let f = FilterProc::start_on("0.0.0.0", d.path(), &nginx.url(), &d.path().join("state"), &["--lock", LOCK]);
    let fport = f.addr.port();

    // Sidecar A inside the namespace: etcd via one link, the filter via the other.
    let (ap, aap) = (free_port(), free_port());
    let args: Vec<String> = [
        "netns",
        "exec",
        &net.ns,
        fencegate_bin(),
        "sidecar",
        "--etcd",
        &format!("http://{}:{cport}", net.etcd_host),
        "--lock",
        LOCK,
        "--holder",
        "inside",
        "--ttl",
        "2s",
        "--etcd-timeout",
        "500ms",
        "--listen",
        &format!("{}:{ap}", net.ns_store),
        "--admin-listen",
        &format!("{}:{aap}", net.ns_store),
        "--upstream",
        &format!("http://{}:{fport}", net.store_host),
        "--fence",
        &f.admin_url().replace("127.0.0.1", &net.store_host),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _a = spawn("sidecar-inside", d.path(), "ip", &args, &[("RUST_LOG", "info,fencegate=debug")]);
    let a_admin = format!("http://{}:{aap}", net.ns_store);
    let a_proxy = format!("http://{}:{ap}", net.ns_store);
    wait_port(format!("{}:{aap}", net.ns_store).parse().unwrap(), Duration::from_secs(10));
    let end = Instant::now() + Duration::from_secs(15);
    let t0 = loop {
        let r = request("GET", &format!("{a_admin}/v1/lock"), &[], "").await;
        if r.status == 200 && r.json()["holding"] == true {
            break r.json()["token"].as_u64().unwrap();
        }
        assert!(Instant::now() < end, "the namespaced sidecar never held: {}", _a.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let b = SidecarProc::start(
        d.path(),
        &format!("http://127.0.0.1:{cport}"),
        LOCK,
        "outside",
        &f.url(),
        &["--fence", &f.admin_url()],
    );
    assert!(request("PUT", &format!("{a_proxy}/p"), &[], "before the cut").await.status < 300);

    net.cut_etcd();
    let cut = Instant::now();
    let mut last_acked = "before the cut".to_string();
    let fenced_after = loop {
        let body = format!("during {}", cut.elapsed().as_millis());
        let r = request("PUT", &format!("{a_proxy}/p"), &[], &body).await;
        if r.status < 300 {
            last_acked = body;
        } else {
            assert_eq!(r.error_code(), "lease_not_held", "{}", r.body);
            break cut.elapsed();
        }
        assert!(cut.elapsed() < Duration::from_secs(5), "still writing {:?} after the cut", cut.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("self-fenced {fenced_after:?} after the partition (TTL 2s)");
    assert!(fenced_after <= TTL, "{fenced_after:?}");
    // The holder can still reach the store: reads pass through it.
    assert_eq!(request("GET", &format!("{a_proxy}/p"), &[], "").await.status, 200);
    let (_, t1, _) = wait_holder(&[&b], Duration::from_secs(10)).await;
    assert!(t1 > t0);
    assert_eq!(request("PUT", &format!("{}/p", b.url()), &[], "from b").await.status, 204);
    for _ in 0..5 {
        assert_eq!(request("PUT", &format!("{a_proxy}/p"), &[], "zombie").await.status, 503);
    }
    assert_eq!(nginx.get("/p").await.as_deref(), Some("from b"));
    let _ = last_acked;
    etcd.kill9();
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Pause {
        extra_ms: u64,
    },
    /// A pause during which the other apps are stopped too; see [`staged_takeover`].
    QuietTakeover {
        extra_ms: u64,
    },
    KillSidecar {
        which: usize,
        down_ms: u64,
    },
    RestartEtcd {
        down_ms: u64,
    },
    RestartFilter {
        down_ms: u64,
    },
    /// kill -9 of a filter replica, restarted (same id, same state dir) after `down_ms`.
    KillReplica {
        which: usize,
        down_ms: u64,
    },
}

/// The seeded fault plan. With replicas (`replicas > 0`) the filter restart
/// becomes a replica kill, drawn twice as often, and the first fault is a
/// quiet takeover; without, the plan for a seed is what it always was.
fn schedule(seed: u64, n: usize, replicas: usize, total: Duration) -> Vec<(u64, Fault)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = 0u64;
    let mut out = vec![];
    let mut first = true;
    let kinds = if replicas > 0 { 6 } else { 5 };
    while t < total.as_millis() as u64 {
        let gap = rng.random_range(800..2000);
        let f = match (if first { 0 } else { rng.random_range(0..kinds) }, replicas) {
            (0 | 1, 0) | (1, _) => Fault::Pause { extra_ms: rng.random_range(300..1500) },
            (0, _) => Fault::QuietTakeover { extra_ms: rng.random_range(300..1500) },
            (2, _) => Fault::KillSidecar { which: rng.random_range(0..n), down_ms: rng.random_range(200..1500) },
            (3, _) => Fault::RestartEtcd { down_ms: rng.random_range(300..2500) },
            (_, 0) => Fault::RestartFilter { down_ms: rng.random_range(200..1000) },
            _ => Fault::KillReplica { which: rng.random_range(0..replicas), down_ms: rng.random_range(200..1500) },
        };
        first = false;
        out.push((gap, f));
        t += gap + 3000;
    }
    out
}

async fn pause_holder(c: &Cluster, extra_ms: u64) {
    if let Some((h, _)) = c.holder().await {
        c.freeze(h).await;
        tokio::time::sleep(TTL + Duration::from_millis(extra_ms)).await;
        c.thaw(h);
    }
}

/// The holder pauses past its TTL while the other apps are stopped too
/// (their sidecars run: one takes over and fences, through the admin
/// balancer, so at one replica). The new holder's app then writes exactly
/// once and stops before its next write; the zombie wakes and writes (its
/// first write from a read taken before the pause) for 500 ms; then all go
/// on. Replicas reached by neither the fence nor that one write keep the old
/// mark unless the marks are shared.
async fn staged_takeover(c: &Cluster, extra_ms: u64) {
    let Some((h, _)) = c.holder().await else { return };
    c.freeze(h).await;
    let others: Vec<usize> = (0..c.o.n).filter(|&i| i != h).collect();
    for &i in &others {
        c.workers[i].signal(libc::SIGSTOP);
    }
    tokio::time::sleep(TTL + Duration::from_millis(extra_ms)).await;
    let end = Instant::now() + Duration::from_secs(5);
    let mut h1 = None;
    while h1.is_none() && Instant::now() < end {
        for &i in &others {
            if h1.is_none() && c.sidecars[i].holding().await.is_some() {
                h1 = Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(h1) = h1 {
        c.run_to_next_read(h1).await; // its first read
        c.run_to_next_read(h1).await; // its first write, then its second read
    }
    c.thaw(h);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for &i in &others {
        c.workers[i].signal(libc::SIGCONT);
    }
}

async fn inject(c: &mut Cluster, f: Fault) {
    let down = |ms| tokio::time::sleep(Duration::from_millis(ms));
    match f {
        Fault::Pause { extra_ms } => pause_holder(c, extra_ms).await,
        Fault::QuietTakeover { extra_ms } => staged_takeover(c, extra_ms).await,
        Fault::KillSidecar { which, down_ms } => {
            c.sidecars[which].proc.kill9();
            down(down_ms).await;
            c.sidecars[which].restart();
        }
        Fault::RestartEtcd { down_ms } => {
            c.etcd.stop();
            down(down_ms).await;
            c.etcd.resume();
        }
        Fault::RestartFilter { down_ms } => {
            if let Some(f) = c.filter.as_mut() {
                f.proc.kill9();
                down(down_ms).await;
                f.restart();
            }
        }
        Fault::KillReplica { which, down_ms } => {
            c.replicas[which].proc.kill9();
            down(down_ms).await;
            c.replicas[which].restart();
        }
    }
}

/// Prints how the balancers spread the work over the replicas; every replica must have taken writes.
fn spread(c: &Cluster) {
    let [proxy, admin] = c.lbs.as_slice() else { return };
    let (p, a) = (&proxy.stats, &admin.stats);
    println!(
        "  spread over replicas r1..r{}: writes (PUT) {:?}, requests {:?}, admin calls (fences) {:?}, connects refused (replica down) {}",
        c.replicas.len(),
        p.puts(),
        p.conns(),
        a.conns(),
        p.refused.load(std::sync::atomic::Ordering::Relaxed) + a.refused.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert!(p.puts().iter().all(|&w| w > 0), "a replica saw no write: {:?}", p.puts());
}

/// Runs the workload under a fault schedule; returns the checker's violations.
async fn history_run(o: Opts, seed: u64, total: Duration) -> Vec<String> {
    let started = Instant::now();
    let mut c = Cluster::start(o);
    c.wait_holder_other_than(None, Duration::from_secs(15)).await;
    let plan = schedule(seed, o.n, c.replicas.len(), total);
    let deadline = Instant::now() + total + Duration::from_secs(30);
    for (gap, f) in plan {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(gap)).await;
        println!("  fault: {f:?}");
        inject(&mut c, f).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, atts, v) = c.verdict().await;
    spread(&c);
    let refused = atts.iter().filter(|a| a.status == 409).count();
    println!("  run took {:?}: {refused} writes refused as stale (409), {} violations", started.elapsed(), v.len());
    v
}

/// `FENCEGATE_SOAK_SECS` (default 25) and `FENCEGATE_SEED` (default random), printed.
fn soak_params(what: &str) -> (u64, Duration) {
    let secs: u64 = std::env::var("FENCEGATE_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(25);
    let seed: u64 =
        std::env::var("FENCEGATE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    println!("{what}: seed {seed}, {secs}s of faults (FENCEGATE_SEED / FENCEGATE_SOAK_SECS to change)");
    (seed, Duration::from_secs(secs))
}

/// The strictest setting: sidecars do not self-fence, so every stale write
/// reaches the filter; the filter and the fence on takeover must hold alone.
fn guarded(total: Duration) -> Opts {
    Opts {
        fence_required: true,
        unsafe_no_self_fence: true,
        check_every: 5,
        worker_secs: total.as_secs() + 90,
        ..Opts::default()
    }
}

/// A control must show violations: the same schedule first, then up to two other seeds.
async fn control_must_fail(control: Opts, seed: u64, total: Duration) {
    let mut s = seed;
    for attempt in 1..=3 {
        let v = history_run(control, s, total).await;
        if !v.is_empty() {
            println!("control run (seed {s}) found {} violations, as it must; first: {}", v.len(), v[0]);
            return;
        }
        println!("control run {attempt} with seed {s} produced no violation; retrying with another seed");
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    }
    panic!("the control run never showed a violation: this test could not prove it can fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_checker_under_random_faults_with_a_control_run() {
    let (seed, total) = soak_params("history check");
    println!("schedule: {:?}", schedule(seed, 3, 0, total));
    let v = history_run(guarded(total), seed, total).await;
    assert!(v.is_empty(), "seed {seed}: violations with the filter:\n{v:#?}");
    // The control: the same schedule, sidecars straight to the store.
    control_must_fail(Opts { filter: false, fence: false, ..guarded(total) }, seed, total).await;
}

/// Issue 15: three filter replicas with shared marks behind round-robin
/// balancers (every request to the next replica; fences reach one replica,
/// whichever the connection lands on), under the seeded faults plus replica
/// kills. The control keeps each replica's marks local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_checker_over_three_shared_mark_replicas_with_replica_kills_and_a_local_marks_control() {
    let (seed, total) = soak_params("history check over 3 replicas");
    println!("schedule: {:?}", schedule(seed, 3, 3, total));
    let o = Opts { replicas: 3, shared_marks: true, ..guarded(total) };
    let v = history_run(o, seed, total).await;
    assert!(v.is_empty(), "seed {seed}: violations with shared marks over 3 replicas:\n{v:#?}");
    control_must_fail(Opts { shared_marks: false, ..o }, seed, total).await;
}
