//! The `fencegate` command: a thin front over the library's entry points.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;

use fencegate::config::{self, FilterAction, FilterCmd, InjectorArgs, LogArgs, SidecarArgs};
use tokio::net::TcpListener;

// The system allocator, with the 8 KiB blocks of hyper's read buffers kept
// per event loop (`block_cache`: two per request and hop went through
// glibc's bins). mimalloc measured no clear CPU gain on this path and doubled
// the sidecar's resident memory; a third try, its arenas committed as used,
// kept the idle memory level but held 62% more memory per lock in a filter
// with 100k locks, and the wall clock still showed no gain (bench/README.md,
// an eleventh session).
#[global_allocator]
static ALLOCATOR: fencegate::block_cache::BlockCache = fencegate::block_cache::BlockCache;

#[derive(Parser, Debug)]
#[command(name = "fencegate", version, about = "Fencing tokens for stores that have none", long_about = None)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start-up: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run in front of a store: refuse writes whose fencing token is stale (`filter set-mark`: repair a mark).
    Filter(FilterCmd),
    /// Run beside an app: hold its lock in etcd and inject the fencing token into its writes.
    Sidecar(Box<SidecarArgs>),
    /// Kubernetes mutating admission webhook: add the sidecar to annotated pods.
    Injector(InjectorArgs),
    /// Watch a zombie lock holder destroy data, then watch fencegate stop it (no etcd needed).
    Demo(DemoArgs),
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Run the story against a real etcd (comma-separated endpoints) instead of the embedded backend.
    #[arg(long, env = "FENCEGATE_ETCD", value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// Lease TTL for the story.
    #[arg(long, default_value = "2s", value_parser = config::duration)]
    ttl: std::time::Duration,
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    fencegate::listen::bind(addr).await.with_context(|| format!("binding {addr}"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One thread: a current-thread runtime (no work stealing, no cross-thread
    // wake-ups). More: the multi-thread scheduler (the injector), or, for the
    // proxies, more event loops that they run themselves, a thread each
    // (nginx-style, `proxy::loops`), with a current-thread main runtime.
    // A sidecar serves one app instance: one loop unless told otherwise
    // (`cfg.workers`, below). The filter and the injector use every CPU.
    let rt = match (&cli.cmd, cli.log.worker_threads) {
        (Cmd::Filter(_) | Cmd::Sidecar(_), _) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        (_, t) => match t {
            Some(1) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
            Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n.max(1)).enable_all().build(),
            None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        },
    }
    .context("starting the runtime")?;
    // This thread runs one of the proxy's event loops until the process ends:
    // it may keep blocks (`proxy::loops` enables its own threads). Not for
    // `filter set-mark`, which runs no loop.
    let _blocks = matches!(cli.cmd, Cmd::Filter(FilterCmd { action: None, .. }) | Cmd::Sidecar(_))
        .then(fencegate::block_cache::enable);
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Demo(args) = &cli.cmd {
        // The demo prints its own timeline; keep logs to warnings unless asked.
        if std::env::var_os("RUST_LOG").is_none() {
            std::env::set_var("RUST_LOG", "warn");
        }
        config::init_logging(&cli.log);
        let opts = fencegate::demo::DemoOptions { etcd: args.etcd.clone(), ttl: args.ttl };
        let ok = fencegate::demo::run(opts).await.map_err(anyhow::Error::msg)?;
        std::process::exit(if ok { 0 } else { 1 });
    }
    config::init_logging(&cli.log);
    match cli.cmd {
        Cmd::Filter(FilterCmd { action: Some(FilterAction::SetMark(a)), .. }) => {
            let c = fencegate::filter::repair::set_mark(&a.state_dir, &a.lock, a.token)
                .context("set-mark (is a filter running on this state directory?)")?;
            let old = c.old.map_or("none".to_string(), |o| o.to_string());
            println!("lock {}: high-water mark {old} -> {}", c.lock, c.new);
        }
        Cmd::Filter(FilterCmd { run: args, .. }) => {
            let cfg = args.config().map_err(anyhow::Error::msg)?;
            let listener = bind(args.listen).await?;
            let admin = match args.admin_listen {
                Some(a) => Some(bind(a).await?),
                None => None,
            };
            let workers = cli
                .log
                .worker_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
            fencegate::filter::run(cfg, listener, admin, workers, fencegate::proxy::shutdown_signal())
                .await
                .context("the filter could not start")?;
        }
        Cmd::Demo(_) => unreachable!("handled above"),
        Cmd::Injector(args) => {
            let listener = bind(args.listen).await?;
            fencegate::injector::run(
                args.config(),
                listener,
                &args.tls_cert,
                &args.tls_key,
                args.tls_reload,
                fencegate::proxy::shutdown_signal(),
            )
            .await
            .map_err(anyhow::Error::msg)?;
        }
        Cmd::Sidecar(args) => {
            let mut cfg = args.config().map_err(anyhow::Error::msg)?;
            cfg.workers = cli.log.worker_threads.unwrap_or(1).max(1);
            let backend =
                Arc::new(fencegate::lease::etcd::EtcdBackend::new(args.etcd.options().map_err(anyhow::Error::msg)?));
            let (listener, admin) = (bind(args.listen).await?, bind(args.admin_listen).await?);
            let health = match args.health_listen {
                Some(a) => Some(bind(a).await?),
                None => None,
            };
            fencegate::sidecar::run(cfg, backend, listener, admin, health, fencegate::proxy::shutdown_signal())
                .await
                .map_err(anyhow::Error::msg)?;
        }
    }
    Ok(())
}
