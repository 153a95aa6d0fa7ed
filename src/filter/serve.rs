//! The filter's servers and their threads: the proxy's event loops, one per
//! worker thread, and the admin server; and the order of a graceful exit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
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
    // This task owns the translation of the caller's shutdown future into a
    // token every server can watch; it ends with the shutdown.
    tokio::spawn(async move {
        shutdown.await;
        f2.shutting_down.store(true, Ordering::Relaxed);
        stop2.cancel();
    });
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %filter.upstream_base, state_dir = %filter.cfg.state_dir.display(), workers, "filter serving");
    let limits = filter.cfg.limits.clone();
    // One connection cap for every worker accepting on the proxy's socket
    // (the admin port has its own, so probes get through a full proxy).
    let cap = proxy::connection_cap(&limits);
    let std_listener = listener.into_std()?;
    let mut threads = Vec::new();
    for i in 1..workers.max(1) {
        let l = std_listener.try_clone()?;
        let (f, stop, limits, cap) = (filter.clone(), stop.clone(), limits.clone(), cap.clone());
        threads.push(std::thread::Builder::new().name(format!("fencegate-filter-{i}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a worker runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(l).expect("a listener registered with this runtime");
                let up = Arc::new(Filter::client(&f.cfg).expect("validated at open"));
                proxy::serve_capped(
                    listener,
                    None,
                    limits,
                    cap,
                    move |req, peer| f.clone().handle(up.clone(), req, peer),
                    stop.cancelled_owned(),
                )
                .await;
            });
        })?);
    }
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
    let _ = tokio::task::spawn_blocking(move || {
        threads.into_iter().for_each(|t| {
            let _ = t.join();
        })
    })
    .await;
    if let Some(sh) = &filter.shared {
        // A write cut off at the end of the grace (or still streaming on a
        // worker thread) may yet be applied by the store. Stop admitting,
        // abort what is in flight, give it `--abort-grace`, and only then let
        // the other replicas stop waiting for this one.
        sh.stop_writing();
        filter.locks.abort_all();
        filter.settle_before_leaving().await;
        sh.revoke().await;
    }
    tracing::info!("filter stopped");
    Ok(())
}
