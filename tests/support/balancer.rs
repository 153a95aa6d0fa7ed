//! A round-robin TCP balancer standing in for a Kubernetes Service in front
//! of N filter replicas: an in-test tokio task on a `127.0.0.1:0` listener
//! that hands each accepted connection to the next replica in turn.
//!
//! Two departures from kube-proxy, both on purpose:
//!
//! * **One request per connection.** Every response head gets a
//!   `Connection: close` added, so the client (a sidecar, which keeps its
//!   upstream connection alive and would otherwise stick to one replica)
//!   opens a new connection, and so lands on the next replica, for every
//!   request. Without it each sidecar's writes would all go to one replica.
//! * **A dead replica is skipped**: a refused connect tries the next one, as
//!   if the Service had already dropped the endpoint (kube-proxy would pass
//!   the failure on until readiness removes it). The workload then keeps
//!   writing through the live replicas while one is down, which is the case
//!   the shared marks must cover; only when every replica is down does the
//!   client's connection close.
//!
//! The task, and every connection it relays, ends when the balancer drops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What each replica got through the balancer.
#[derive(Debug)]
pub struct Stats {
    /// Connections relayed to replica i (one request each).
    pub conns: Vec<AtomicU64>,
    /// Of those, the ones whose request was a `PUT` (a write).
    pub puts: Vec<AtomicU64>,
    /// Connects refused (a replica down), each followed by a try of the next.
    pub refused: AtomicU64,
}

impl Stats {
    pub fn puts(&self) -> Vec<u64> {
        self.puts.iter().map(|c| c.load(Relaxed)).collect()
    }
    pub fn conns(&self) -> Vec<u64> {
        self.conns.iter().map(|c| c.load(Relaxed)).collect()
    }
}

pub struct Balancer {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Starts balancing over `targets` (called inside a tokio runtime).
    pub fn start(targets: Vec<SocketAddr>) -> Balancer {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let l = TcpListener::from_std(l).unwrap();
        let zero = || targets.iter().map(|_| AtomicU64::new(0)).collect();
        let stats = Arc::new(Stats { conns: zero(), puts: zero(), refused: AtomicU64::new(0) });
        let (s, targets) = (stats.clone(), Arc::new(targets));
        let task = tokio::spawn(async move {
            // Dropped (so every relay aborted) when this task is.
            let mut relays = tokio::task::JoinSet::new();
            for next in (0..targets.len()).cycle() {
                let Ok((client, _)) = l.accept().await else { continue };
                relays.spawn(serve(client, targets.clone(), next, s.clone()));
                while relays.try_join_next().is_some() {}
            }
        });
        Balancer { addr, stats, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays `client` to replica `first`, or the next live one.
async fn serve(client: TcpStream, targets: Arc<Vec<SocketAddr>>, first: usize, s: Arc<Stats>) {
    for k in 0..targets.len() {
        let i = (first + k) % targets.len();
        match TcpStream::connect(targets[i]).await {
            Ok(up) => {
                s.conns[i].fetch_add(1, Relaxed);
                return relay(client, up, &s.puts[i]).await;
            }
            Err(_) => {
                s.refused.fetch_add(1, Relaxed);
            }
        }
    }
}

fn find(h: &[u8], what: &[u8]) -> Option<usize> {
    h.windows(what.len()).position(|w| w == what)
}

/// Both directions; the first response head gets `Connection: close`.
async fn relay(client: TcpStream, up: TcpStream, puts: &AtomicU64) {
    let _ = (client.set_nodelay(true), up.set_nodelay(true));
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    // `move`: each half drops (shutting its side down) when its direction ends.
    let to_replica = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let n = cr.read(&mut buf).await?;
        if buf[..n].starts_with(b"PUT ") {
            puts.fetch_add(1, Relaxed);
        }
        uw.write_all(&buf[..n]).await?;
        tokio::io::copy(&mut cr, &mut uw).await?;
        uw.shutdown().await
    };
    let to_client = async move {
        let mut head = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while find(&head, b"\r\n\r\n").is_none() {
            let n = ur.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = find(&head, b"\r\n").expect("a head has a status line") + 2;
        cw.write_all(&head[..line]).await?;
        cw.write_all(b"Connection: close\r\n").await?;
        cw.write_all(&head[line..]).await?;
        tokio::io::copy(&mut ur, &mut cw).await?;
        cw.shutdown().await
    };
    let _: (std::io::Result<()>, std::io::Result<()>) = tokio::join!(to_replica, to_client);
}
