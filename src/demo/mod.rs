//! `fencegate demo`: the zombie story on one machine, in under 30 seconds.
//!
//! Everything talks real HTTP over loopback: two apps' sidecars (A and B),
//! an in-memory store with no fencing ([`store`]), and, in the second run,
//! the fencegate filter in front of it. Leases come from the embedded backend,
//! or from a real etcd with `--etcd URL`.
//!
//! The story, told twice (without, then with the filter):
//! 1. A holds the lock and writes through its sidecar; B waits.
//! 2. A freezes: its lease calls stop ([`freeze`]: no keep-alives) and a
//!    write it had just sent, token attached, is stuck in its network
//!    ([`relay`]). A's sidecar self-fences before the lease can expire and
//!    cuts the write off, but the bytes already on the wire stay there.
//! 3. A's lease expires; B takes over with a higher token (fencing the
//!    filter first) and writes.
//! 4. The network wakes up. A's stuck write arrives: without the filter it
//!    overwrites B's data; with it, it is refused with 409. A's *next* write
//!    is refused by its own sidecar (self-fenced).

pub mod freeze;
pub mod relay;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::filter::{Filter, FilterConfig, Protection};
use crate::lease::deadline::Stamp;
use crate::lease::embedded::Embedded;
use crate::lease::etcd::{EtcdBackend, EtcdOptions};
use crate::lease::keeper::KeeperConfig;
use crate::lease::LeaseBackend;
use crate::proxy::Upstream;
use crate::sidecar::{Sidecar, SidecarConfig};
use crate::token::LockName;
use freeze::Freezable;
use relay::Relay;
use store::MemStore;

const KEY: &str = "/ledger/balance";

/// Demo options.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Use a real etcd at these endpoints instead of the embedded backend.
    pub etcd: Option<Vec<String>>,
    pub ttl: Duration,
}

/// What one run ended with.
#[derive(Debug)]
pub struct RunResult {
    pub zombie_status: u16,
    pub final_value: Option<String>,
    pub b_value: String,
}

struct Clock(Instant);

impl Clock {
    fn say(&self, who: &str, what: impl AsRef<str>) {
        println!("  {:>6.2}s  {who:<6} {}", self.0.elapsed().as_secs_f64(), what.as_ref());
    }
}

async fn http(method: &str, url: &str, body: &str) -> (u16, String) {
    let client = crate::proxy::simple_client();
    match crate::proxy::call(&client, method, url, None, body.to_owned(), Duration::from_secs(60)).await {
        Ok((s, b)) => (s.as_u16(), String::from_utf8_lossy(&b).into_owned()),
        Err(e) => (0, e),
    }
}

fn describe(status: u16, body: &str) -> String {
    let code = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| {
        let e = v["error"].as_str()?.to_string();
        Some(match v["highest"].as_u64() {
            Some(h) => format!(" {e} (highest {h})"),
            None => format!(" {e}"),
        })
    });
    format!("{status}{}", code.unwrap_or_default())
}

async fn bind() -> std::io::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").await
}

struct Side {
    sc: Arc<Sidecar>,
    url: String,
}

async fn start_sidecar(
    backend: Arc<dyn LeaseBackend>,
    keeper: KeeperConfig,
    fence_urls: Vec<String>,
    upstream: SocketAddr,
    stop: &CancellationToken,
) -> Result<Side, String> {
    let mut cfg = SidecarConfig::new(keeper, format!("http://{upstream}"));
    cfg.fence_urls = fence_urls;
    let up = Upstream::new(&cfg.upstream, cfg.connect_timeout, cfg.upstream_timeout)?;
    let (l, a) = (bind().await.map_err(|e| e.to_string())?, bind().await.map_err(|e| e.to_string())?);
    let url = format!("http://{}", l.local_addr().map_err(|e| e.to_string())?);
    let sc = Sidecar::start(cfg, backend);
    tokio::spawn(crate::sidecar::serve(sc.clone(), up, l, a, None, stop.clone().cancelled_owned()));
    Ok(Side { sc, url })
}

async fn wait_holding(s: &Side, within: Duration) -> Result<u64, String> {
    let mut rx = s.sc.status();
    let r = tokio::time::timeout(within, rx.wait_for(|st| st.write_token(Stamp::now()).is_some()))
        .await
        .map_err(|_| format!("no lock after {within:?}"))?
        .map_err(|e| e.to_string())?;
    Ok(r.token.map(|t| t.get()).unwrap_or(0))
}

/// The store, and in front of it (in the second run) the filter: where the
/// sidecars write, and the filters' admin URLs to fence.
async fn stage(
    with_filter: bool,
    lock: &LockName,
    state: &std::path::Path,
    stop: &CancellationToken,
) -> Result<(Arc<MemStore>, SocketAddr, Vec<String>), String> {
    let err = |e: std::io::Error| e.to_string();
    let store = Arc::new(MemStore::default());
    let sl = bind().await.map_err(err)?;
    let store_addr = sl.local_addr().map_err(err)?;
    tokio::spawn(store::serve(store.clone(), sl, stop.clone().cancelled_owned()));
    if !with_filter {
        return Ok((store, store_addr, vec![]));
    }
    let cfg = FilterConfig::new(format!("http://{store_addr}"), state, Protection::all(lock.clone()));
    let filter = Filter::open(cfg).map_err(|e| e.to_string())?;
    let (fl, fa) = (bind().await.map_err(err)?, bind().await.map_err(err)?);
    let (faddr, fadmin) = (fl.local_addr().map_err(err)?, fa.local_addr().map_err(err)?);
    tokio::spawn(crate::filter::serve(filter, fl, Some(fa), 1, stop.clone().cancelled_owned()));
    Ok((store, faddr, vec![format!("http://{fadmin}")]))
}

/// One telling of the story.
pub async fn run_once(opts: &DemoOptions, with_filter: bool, prefix: &str) -> Result<RunResult, String> {
    let clock = Clock(Instant::now());
    let stop = CancellationToken::new();
    let lock: LockName = "ledger".parse().expect("valid");
    let backend: Arc<dyn LeaseBackend> = match &opts.etcd {
        Some(eps) => Arc::new(EtcdBackend::new(EtcdOptions {
            endpoints: eps.clone(),
            call_timeout: Duration::from_secs(2),
            ..Default::default()
        })),
        None => Arc::new(Embedded::new()),
    };

    let _state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (store, target, fence_urls) = stage(with_filter, &lock, _state.path(), &stop).await?;

    let keeper = |holder: &str| {
        let mut k = KeeperConfig::new(lock.clone(), holder, opts.ttl);
        k.key_prefix = prefix.to_string();
        k
    };
    // A's path to the store goes through a relay the demo can freeze.
    let relay = Relay::start(target).await.map_err(|e| e.to_string())?;
    // A's lease calls go through a wrapper the demo can freeze, as if A's process paused.
    let a_backend = Arc::new(Freezable::new(backend.clone()));
    let a = start_sidecar(a_backend.clone(), keeper("app-A"), fence_urls.clone(), relay.addr, &stop).await?;
    let ta = wait_holding(&a, Duration::from_secs(10)).await?;
    clock.say("A", format!("holds the lock \"ledger\" with fencing token {ta}"));
    let b = start_sidecar(backend.clone(), keeper("app-B"), fence_urls.clone(), target, &stop).await?;
    clock.say("B", "starts and waits for the lock");

    let v1 = "balance=100 (written by A)";
    let (s, body) = http("PUT", &format!("{}{KEY}", a.url), v1).await;
    clock.say("A", format!("PUT {KEY} \"{v1}\" -> {}", describe(s, &body)));

    // A freezes: keeper paused, and its next write is caught in the network.
    let freeze_for = opts.ttl * 2 + Duration::from_secs(1);
    a_backend.freeze(freeze_for);
    relay.freeze();
    let v_zombie = "balance=150 (written by A before its pause)";
    let a_url = a.url.clone();
    let delivered = relay.answer_count();
    let zombie = tokio::spawn(async move { http("PUT", &format!("{a_url}{KEY}"), v_zombie).await });
    clock.say("A", format!("sends PUT \"{v_zombie}\" with token {ta}, then FREEZES"));
    clock.say("", "         (a GC pause / SIGSTOP: no keep-alives; the write is stuck on the wire)");

    // A's own sidecar cuts the write off once the lease may be gone; the
    // bytes already on the wire are not called back by that.
    let (cs, cbody) = zombie.await.map_err(|e| e.to_string())?;
    clock.say(
        "A",
        format!("its sidecar self-fences and cuts the write off -> {} (outcome unknown)", describe(cs, &cbody)),
    );
    let tb = wait_holding(&b, opts.ttl * 3 + Duration::from_secs(5)).await?;
    clock.say(
        "B",
        format!(
            "A's lease expired: B takes over with token {tb}{}",
            if with_filter { " and fences the filter" } else { "" }
        ),
    );
    let v2 = "balance=120 (written by B)";
    let (s, body) = http("PUT", &format!("{}{KEY}", b.url), v2).await;
    clock.say("B", format!("PUT {KEY} \"{v2}\" -> {}", describe(s, &body)));
    clock.say("store", format!("holds \"{}\"", store.get(KEY).unwrap_or_default()));

    // The network wakes up and A's stuck write finally arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.thaw();
    let (zs, zbody) = relay.answer(delivered + 1, Duration::from_secs(10)).await.unwrap_or((0, "no answer".into()));
    let dest = if with_filter { "the filter" } else { "the store" };
    clock.say("A", format!("its stuck write (token {ta}) reaches {dest} -> {}", describe(zs, &zbody)));
    let (s, body) = http("PUT", &format!("{}{KEY}", a.url), "balance=999 (A, after waking)").await;
    clock.say("A", format!("tries a new write -> {} (its own sidecar has self-fenced)", describe(s, &body)));
    let final_value = store.get(KEY);
    clock.say("store", format!("holds \"{}\"", final_value.clone().unwrap_or_default()));

    stop.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(RunResult { zombie_status: zs, final_value, b_value: v2.to_string() })
}

/// Runs both halves of the story and prints the verdict. Returns whether
/// the story came out as it must: the zombie wins without the filter and
/// is refused with it.
pub async fn run(opts: DemoOptions) -> Result<bool, String> {
    let backend = if opts.etcd.is_some() { "etcd" } else { "the embedded lease backend (no etcd needed)" };
    println!("fencegate demo: a zombie lock holder, without and with fencing");
    println!("  leases from {backend}; TTL {:?}; store, sidecars and filter talk HTTP on 127.0.0.1\n", opts.ttl);
    let run_id = format!("/fencegate-demo/{}-{}", std::process::id(), rand::random::<u32>());

    println!("Run 1: the sidecars write straight to the store (no filter)");
    let r1 = run_once(&opts, false, &format!("{run_id}/1")).await?;
    let lost = r1.final_value.as_deref() != Some(r1.b_value.as_str());
    println!(
        "  => {}\n",
        if lost {
            "LOST UPDATE: the zombie's late write overwrote B's newer data"
        } else {
            "(the race did not show this time)"
        }
    );

    println!("Run 2: the same story with `fencegate filter` in front of the store");
    let r2 = run_once(&opts, true, &format!("{run_id}/2")).await?;
    let safe = r2.zombie_status == 409 && r2.final_value.as_deref() == Some(r2.b_value.as_str());
    println!(
        "  => {}\n",
        if safe {
            "SAFE: the zombie's write was refused (409) and B's data is intact"
        } else {
            "UNSAFE: the zombie's write got through"
        }
    );

    println!(
        "Verdict: {}",
        if lost && safe {
            "the lock alone let a paused holder destroy newer data; the fencing token checked by the filter stopped it."
        } else if safe {
            "the filter refused the zombie's write."
        } else {
            "something went wrong: the filter did not refuse the stale write."
        }
    );
    Ok(lost && safe)
}
