//! More event loops for one listening socket, nginx-style: each on a thread
//! of its own with a current-thread runtime, accepting on its own clone of
//! the socket. A request then stays on one thread from accept to answer (no
//! work stealing, no cross-thread wake-ups); only what the caller shares
//! between its loops is shared. The caller's runtime runs one more loop.

use std::future::Future;
use std::thread::JoinHandle;

use tokio::net::TcpListener;

/// The threads of [`spawn`]: owned by its caller, which joins them
/// ([`Loops::join`]) once their loops have been told to stop.
#[derive(Debug, Default)]
pub struct Loops(Vec<JoinHandle<()>>);

/// Starts `extra` threads named `name-1`, `name-2`..., each running
/// `serve(listener)` on a current-thread runtime of its own, `listener` a
/// clone of `listening` registered with it. `serve` should end when the
/// caller's shutdown comes (it is the caller's accept loop, given the same
/// stop signal); the caller makes sure that signal also comes if it returns
/// early or is dropped (a `CancellationToken`'s drop guard), else the
/// threads serve on.
pub fn spawn<F, Fut>(listening: &std::net::TcpListener, extra: usize, name: &str, serve: F) -> std::io::Result<Loops>
where
    F: FnOnce(TcpListener) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()>,
{
    // Every clone first: a failure then starts no thread at all.
    let listeners = (0..extra).map(|_| listening.try_clone()).collect::<std::io::Result<Vec<_>>>()?;
    let mut threads = Vec::with_capacity(extra);
    for (i, l) in listeners.into_iter().enumerate() {
        let serve = serve.clone();
        threads.push(std::thread::Builder::new().name(format!("{name}-{}", i + 1)).spawn(move || {
            // The loop's thread lives as long as the loop: it may keep the
            // read buffers' blocks. The guard is taken first so that it drops
            // last, after the runtime and what it frees, unwinding too.
            let _blocks = crate::block_cache::enable();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a worker runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(l).expect("a listener registered with this runtime");
                serve(listener).await;
            });
            // Not a plain drop, which waits for every blocking task (a DNS
            // lookup that hangs, say) and would hold the caller's exit up.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        })?);
    }
    Ok(Loops(threads))
}

impl Loops {
    /// Waits for every thread to end (off the caller's runtime).
    pub async fn join(self) {
        let _ = tokio::task::spawn_blocking(move || {
            for t in self.0 {
                let name = t.thread().name().unwrap_or("a loop").to_owned();
                if t.join().is_err() {
                    tracing::error!(thread = name, "an event loop's thread panicked");
                }
            }
        })
        .await;
    }
}
