//! A TCP relay that can be frozen: while frozen, bytes from the client side
//! are held back (not lost) and delivered after the thaw, even if the client
//! has closed its end meanwhile, as bytes already on the wire are. The demo
//! puts one between a sidecar and its upstream to model a network pause that
//! catches a write after its token was attached. The relay records what the
//! far side answered to each request it delivered ([`Relay::answer`]), since
//! the sender may no longer be there to hear it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Handle on a running relay; the accept task ends when this is dropped.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    frozen: watch::Sender<bool>,
    /// The first bytes of every answer the far side sent (one entry per read that starts with `HTTP/`).
    answers: Arc<parking_lot::Mutex<Vec<String>>>,
    answered: watch::Sender<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (frozen, rx) = watch::channel(false);
        let answers = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let answered = watch::Sender::new(0);
        let (log, count) = (answers.clone(), answered.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = rx.clone();
                let (log, count) = (log.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut rx = rx;
                        loop {
                            // A client that went away (reset) has still sent what we read.
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                // Not passed on, and the write half is handed back rather than
                                // dropped (dropping it would send FIN): a server that saw the
                                // close could drop the request it is answering.
                                return Ok::<_, std::io::Error>(sw);
                            }
                            // Hold the bytes while frozen.
                            let _ = rx.wait_for(|f| !*f).await;
                            sw.write_all(&buf[..n]).await?;
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut client_gone = false;
                        while let Ok(n) = sr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if buf.starts_with(b"HTTP/") {
                                log.lock().push(String::from_utf8_lossy(&buf[..n]).into_owned());
                                count.send_modify(|c| *c += 1);
                            }
                            // Keep reading after the client is gone: the answer is recorded all the same.
                            client_gone = client_gone || cw.write_all(&buf[..n]).await.is_err();
                        }
                    };
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Ok(Relay { addr, frozen, answers, answered, task })
    }

    /// How many answers the far side has sent so far.
    pub fn answer_count(&self) -> usize {
        *self.answered.borrow()
    }

    /// Waits (at most `within`) for answer number `n` (counting from 1) and
    /// returns its status and body.
    pub async fn answer(&self, n: usize, within: std::time::Duration) -> Option<(u16, String)> {
        let mut rx = self.answered.subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| *c >= n)).await.ok()?.ok()?;
        let raw = self.answers.lock().get(n - 1)?.clone();
        let status = raw.split_whitespace().nth(1)?.parse().ok()?;
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    }

    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
