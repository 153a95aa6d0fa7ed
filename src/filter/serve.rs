//! The filter's servers and their threads: the proxy's event loops, one per
//! worker thread, and the admin server; and the order of a graceful exit.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Filter, FilterConfig, StartError};
use crate::proxy;

/// Runs the filter on bound listeners until `shutdown` resolves; then stops
/// accepting, lets in-flight requests finish (bounded) and returns.
/// `workers` event loops accept on the listener (see [`serve`]).
pub async fn run(
    cfg: FilterConfig,
    listener: TcpListener,
    admin: Option<TcpListener>,
    workers: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let filter = if cfg.shared.is_some() { Filter::open_shared(cfg).await? } else { Filter::open(cfg)? };
    serve(filter, listener, admin, workers, shutdown).await.map_err(|e| StartError::Config(e.to_string()))
}

/// Serves an opened filter (see [`run`]).
///
/// Threading, nginx-style: the caller's runtime runs the admin server and one
/// proxy event loop; `workers - 1` more threads each run a current-thread
/// runtime with their own accept loop on the same listening socket and their
/// own upstream pool. A request then stays on one thread from accept to
/// answer (no work stealing, no cross-thread wake-ups); only the per-lock
/// state is shared, and it is built for that (`DashMap`, per-lock mutexes).
/// The worker threads are owned here and joined before returning.
pub async fn serve(
    filter: Arc<Filter>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    workers: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let stop2 = stop.clone();
    let f2 = filter.clone();
    // When the shutdown grace ends: the writes carried on after their
    // clients left are waited for until then, as the connections are.
    let grace_end = Arc::new(OnceLock::new());
    let (grace_end2, grace) = (grace_end.clone(), filter.cfg.limits.shutdown_grace);
    // This task owns the translation of the caller's shutdown future into a
    // token every server can watch; it ends with the shutdown.
    tokio::spawn(async move {
        shutdown.await;
        let _ = grace_end2.set(Instant::now() + grace);
        f2.shutting_down.store(true, Ordering::Relaxed);
        stop2.cancel();
    });
    let grace_end = move || grace_end.get().copied().unwrap_or_else(Instant::now);
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %filter.upstream_base, state_dir = %filter.cfg.state_dir.display(), workers, "filter serving");
    let limits = filter.cfg.limits.clone();
    // One connection cap for every worker accepting on the proxy's socket
    // (the admin port has its own, so probes get through a full proxy).
    let cap = proxy::connection_cap(&limits);
    let std_listener = listener.into_std()?;
    let (f, stop2, limits2, cap2, grace_end2) =
        (filter.clone(), stop.clone(), limits.clone(), cap.clone(), grace_end.clone());
    let loops =
        proxy::loops::spawn(&std_listener, workers.max(1) - 1, "fencegate-filter", move |listener| async move {
            let up = Arc::new(Filter::client(&f.cfg).expect("validated at open"));
            let f2 = f.clone();
            let handler = move |req, peer| f2.clone().handle(up.clone(), req, peer);
            proxy::serve_capped(listener, None, limits2, cap2, handler, stop2.cancelled_owned()).await;
            // This runtime drives its own until then; they die with it.
            f.settle_orphans(grace_end2()).await;
        })?;
    let listener = TcpListener::from_std(std_listener)?;
    let up = Arc::new(Filter::client(&filter.cfg).expect("validated at open"));
    let f = filter.clone();
    let main = proxy::serve_capped(
        listener,
        None,
        limits.clone(),
        cap,
        move |req, peer| f.clone().handle(up.clone(), req, peer),
        stop.clone().cancelled_owned(),
    );
    match admin {
        Some(admin) => {
            let f = filter.clone();
            let admin = proxy::serve(admin, limits, move |req, _| f.clone().admin(req), stop.clone().cancelled_owned());
            tokio::join!(main, admin);
        }
        None => main.await,
    }
    filter.settle_orphans(grace_end()).await;
    loops.join().await;
    if let Some(sh) = &filter.shared {
        // A write cut off at the end of the grace (or still streaming on a
        // worker thread) may yet be applied by the store. Stop admitting,
        // abort what is in flight, give it `--abort-grace`, and only then let
        // the other replicas stop waiting for this one.
        sh.stop_writing();
        filter.locks.abort_all();
        // The cut reaches writes still carried on after their clients left
        // (this runtime's) at their next poll: their connections are closed
        // before the grace starts.
        filter.settle_orphans(Instant::now() + std::time::Duration::from_secs(1)).await;
        filter.settle_before_leaving().await;
        sh.revoke().await;
    }
    tracing::info!("filter stopped");
    Ok(())
}
