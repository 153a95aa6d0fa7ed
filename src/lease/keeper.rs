//! The keeper: one background task per sidecar that campaigns for the lock,
//! keeps the lease alive, fences the filters on takeover, and publishes the
//! lock's state on a `tokio::sync::watch` channel.
//!
//! The task is owned by [`Keeper`]: [`Keeper::shutdown`] stops it and revokes
//! the lease; dropping the `Keeper` aborts it (and the lease then expires on
//! its own). Background fence retries live in a `JoinSet` owned by the
//! current round, so they end with it.
//!
//! # Self-fencing
//!
//! The sidecar trusts that it holds the lock only until
//! `instant the last acknowledged keep-alive was sent + TTL - margin`, on the
//! monotonic clock. etcd starts a lease's new TTL when it *receives* the
//! keep-alive, which is after we sent it, so our deadline falls at least
//! `margin` before etcd could expire the lease and let another candidate in,
//! as long as the two clocks' rates differ by less than `margin / TTL`
//! (10% with the defaults: TTL 10 s, margin 1 s).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{queue_prefix, LeaseBackend, LeaseError};
use crate::token::{LockName, Token};

/// Where the keeper stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for a lease or for its turn in the queue.
    Campaigning,
    /// Won the lock; fencing the filters before taking writes.
    Fencing,
    /// Holding the lock: writes are forwarded with the token.
    Holding,
    /// Holding in etcd, but a filter has seen a higher token than etcd gave
    /// us (etcd restored from an old snapshot?): writes are refused.
    FencedOut,
    /// Shut down; the lease was revoked.
    Stopped,
}

/// The lock's state as published to the proxy and the local API.
#[derive(Clone, Debug)]
pub struct LockStatus {
    pub phase: Phase,
    pub token: Option<Token>,
    /// The token of the last time this sidecar held the lock (kept after a loss).
    pub last_token: Option<Token>,
    pub lease_id: Option<i64>,
    /// TTL granted by the backend.
    pub ttl: Duration,
    /// Self-fencing deadline; see the module docs.
    pub valid_until: Option<Instant>,
    /// The highest token a filter reported when it refused our fence.
    pub fenced_out_highest: Option<u64>,
    pub last_error: Option<String>,
}

impl LockStatus {
    /// The token to inject in a write at `now`, if the lock is safely held.
    pub fn write_token(&self, now: Instant) -> Option<Token> {
        match (self.phase, self.token, self.valid_until) {
            (Phase::Holding, Some(t), Some(until)) if now < until => Some(t),
            _ => None,
        }
    }

    /// How much longer the lock is safely held (zero if not held).
    pub fn valid_for(&self, now: Instant) -> Duration {
        match self.write_token(now) {
            Some(_) => self.valid_until.map(|u| u.saturating_duration_since(now)).unwrap_or_default(),
            None => Duration::ZERO,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct KeeperStats {
    pub acquisitions: AtomicU64,
    pub losses: AtomicU64,
    pub keepalives: AtomicU64,
    pub keepalive_failures: AtomicU64,
    /// Microseconds of the last keep-alive round trip.
    pub last_keepalive_us: AtomicU64,
    pub keepalive_us_total: AtomicU64,
}

/// What the keeper is configured with.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    pub lock: LockName,
    pub holder: String,
    pub ttl: Duration,
    /// Self-fencing margin; must be below the TTL.
    pub margin: Duration,
    pub key_prefix: String,
    /// Filters' admin base URLs to fence on takeover.
    pub fence_urls: Vec<String>,
    /// Longest the initial fencing may take before holding anyway.
    pub fence_timeout: Duration,
    /// Hold only once every filter has confirmed the fence (retrying without
    /// bound), instead of holding after `fence_timeout` and retrying in the
    /// background. Closes the window in which a zombie could still write to a
    /// filter that was unreachable at takeover.
    pub fence_required: bool,
    /// After a voluntary release, how long to wait before campaigning again.
    pub release_pause: Duration,
}

impl KeeperConfig {
    pub fn new(lock: LockName, holder: impl Into<String>, ttl: Duration) -> Self {
        KeeperConfig {
            lock,
            holder: holder.into(),
            ttl,
            margin: default_margin(ttl),
            key_prefix: "/fencegate/locks".into(),
            fence_urls: vec![],
            fence_timeout: Duration::from_secs(5),
            fence_required: false,
            release_pause: Duration::from_secs(1),
        }
    }
}

/// The default margin: a tenth of the TTL, at least 200 ms.
pub fn default_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(200)).min(ttl / 2)
}

enum Command {
    Release,
    /// The demo's "process freeze": the keeper does nothing for a while.
    Freeze(Duration),
}

/// Handle on the keeper task.
#[derive(Debug)]
pub struct Keeper {
    status: watch::Receiver<LockStatus>,
    cmd: mpsc::UnboundedSender<Command>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    pub stats: Arc<KeeperStats>,
}

impl Keeper {
    /// Starts campaigning.
    pub fn spawn(backend: Arc<dyn LeaseBackend>, cfg: KeeperConfig) -> Keeper {
        assert!(cfg.margin < cfg.ttl, "the self-fencing margin must be below the TTL");
        let (tx, rx) = watch::channel(LockStatus {
            phase: Phase::Campaigning,
            token: None,
            last_token: None,
            lease_id: None,
            ttl: cfg.ttl,
            valid_until: None,
            fenced_out_highest: None,
            last_error: None,
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let stats = Arc::new(KeeperStats::default());
        let task = Task { backend, cfg, tx: Arc::new(tx), cmd: cmd_rx, stop: stop.clone(), stats: stats.clone() };
        let task = tokio::spawn(task.run());
        Keeper { status: rx, cmd: cmd_tx, stop, task: Some(task), stats }
    }

    /// A receiver of the lock's state.
    pub fn subscribe(&self) -> watch::Receiver<LockStatus> {
        self.status.clone()
    }

    pub fn status(&self) -> LockStatus {
        self.status.borrow().clone()
    }

    /// Steps down: revoke, then campaign again after `release_pause`.
    pub fn release(&self) {
        let _ = self.cmd.send(Command::Release);
    }

    /// The demo's freeze: keep-alives stop for `d`, as if the process paused.
    pub fn freeze(&self, d: Duration) {
        let _ = self.cmd.send(Command::Freeze(d));
    }

    /// Stops the keeper and revokes its lease, so a waiting candidate takes
    /// over at once.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Why a round (one lease) ended.
enum RoundEnd {
    Lost(String),
    Released,
    Stopped,
}

struct Task {
    backend: Arc<dyn LeaseBackend>,
    cfg: KeeperConfig,
    tx: Arc<watch::Sender<LockStatus>>,
    cmd: mpsc::UnboundedReceiver<Command>,
    stop: CancellationToken,
    stats: Arc<KeeperStats>,
}

impl Task {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            self.tx.send_modify(|s| {
                s.phase = Phase::Campaigning;
                s.token = None;
                s.lease_id = None;
                s.valid_until = None;
            });
            let sent = Instant::now();
            let granted = tokio::select! {
                g = self.backend.grant(self.cfg.ttl) => g,
                _ = self.stop.cancelled() => break,
            };
            let lease = match granted {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "could not get a lease; retrying");
                    self.tx.send_modify(|s| s.last_error = Some(e.to_string()));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let margin = self.cfg.margin.min(lease.ttl / 2);
            self.tx.send_modify(|s| {
                s.lease_id = Some(lease.id);
                s.ttl = lease.ttl;
                s.valid_until = Some(sent + lease.ttl - margin);
            });
            let end = self.round(lease.id, lease.ttl, margin).await;
            // Revoke in every case: after a loss it removes our queue key at
            // once if the lease somehow survives.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.backend.revoke(lease.id)).await;
            match end {
                RoundEnd::Stopped => break,
                RoundEnd::Released => {
                    tracing::info!(lock = %self.cfg.lock, "released the lock");
                    self.publish_lost(None);
                    tokio::select! {
                        _ = tokio::time::sleep(self.cfg.release_pause) => {}
                        _ = self.stop.cancelled() => break,
                    }
                }
                RoundEnd::Lost(why) => {
                    tracing::warn!(lock = %self.cfg.lock, reason = %why, "lost the lease");
                    self.publish_lost(Some(why));
                }
            }
        }
        self.tx.send_modify(|s| {
            s.phase = Phase::Stopped;
            s.token = None;
            s.valid_until = None;
        });
        tracing::info!(lock = %self.cfg.lock, "keeper stopped; lease revoked");
    }

    fn publish_lost(&self, why: Option<String>) {
        let was_holding = matches!(self.tx.borrow().phase, Phase::Holding | Phase::Fencing | Phase::FencedOut);
        if was_holding {
            self.stats.losses.fetch_add(1, Ordering::Relaxed);
        }
        self.tx.send_modify(|s| {
            s.phase = Phase::Campaigning;
            s.token = None;
            s.valid_until = None;
            if why.is_some() {
                s.last_error = why;
            }
        });
    }

    /// One lease's life: queue, wait, fence, hold.
    async fn round(&mut self, lease: i64, ttl: Duration, margin: Duration) -> RoundEnd {
        let prefix = queue_prefix(&self.cfg.key_prefix, self.cfg.lock.as_str());
        let key = format!("{prefix}{lease:016x}");
        let backend = self.backend.clone();
        let tx = self.tx.clone();
        let stats = self.stats.clone();
        let keep = keep_lease(backend.clone(), lease, ttl, margin, tx.clone(), stats);
        tokio::pin!(keep);

        // Queue up and wait for our turn.
        let acquire = async {
            let rev = loop {
                match backend.enqueue(&key, &self.cfg.holder, lease).await {
                    Ok(rev) => break rev,
                    Err(e @ LeaseError::Gone(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not queue for the lock; retrying");
                        self.tx.send_if_modified(|s| {
                            s.last_error = Some(format!("queueing for the lock: {e}"));
                            false
                        });
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            loop {
                match backend.wait_turn(&prefix, &key, rev).await {
                    Ok(()) => return Ok(rev),
                    Err(e @ LeaseError::Gone(_)) => return Err(e),
                    Err(e) => {
                        tracing::debug!(error = %e, "waiting for our turn failed; retrying");
                        self.tx.send_if_modified(|s| {
                            s.last_error = Some(format!("waiting for the lock: {e}"));
                            false
                        });
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        };
        tokio::pin!(acquire);
        let rev = loop {
            tokio::select! {
                r = &mut acquire => match r {
                    Ok(rev) => break rev,
                    Err(e) => return RoundEnd::Lost(e.to_string()),
                },
                why = &mut keep => return RoundEnd::Lost(why),
                _ = self.stop.cancelled() => return RoundEnd::Stopped,
                c = self.cmd.recv() => match c {
                    Some(Command::Release) => {} // not holding: nothing to release
                    Some(Command::Freeze(d)) => tokio::time::sleep(d).await,
                    None => return RoundEnd::Stopped,
                },
            }
        };
        let token = Token::new(rev as u64).expect("etcd revisions are positive");
        self.stats.acquisitions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(lock = %self.cfg.lock, token = rev, lease = format!("{lease:x}"), "won the lock; fencing filters");
        self.tx.send_modify(|s| {
            s.phase = Phase::Fencing;
            s.token = Some(token);
            s.last_token = Some(token);
            s.last_error = None;
        });

        // Fence the filters (bounded), keeping the lease alive meanwhile.
        let mut retries = JoinSet::new();
        {
            let fence = fence_all(&self.cfg, token, &mut retries, tx.clone());
            tokio::select! {
                () = fence => {}
                why = &mut keep => return RoundEnd::Lost(why),
                _ = self.stop.cancelled() => return RoundEnd::Stopped,
            }
        }
        self.tx.send_modify(|s| {
            if s.phase == Phase::Fencing {
                s.phase = Phase::Holding;
            }
        });
        if self.tx.borrow().phase == Phase::Holding {
            tracing::info!(lock = %self.cfg.lock, token = rev, "holding the lock");
        }

        // Hold until something ends it.
        let gone = watch_gone_retrying(backend.as_ref(), &key, rev);
        tokio::pin!(gone);
        loop {
            tokio::select! {
                why = &mut keep => return RoundEnd::Lost(why),
                () = &mut gone => return RoundEnd::Lost("our lock key was deleted".into()),
                _ = self.stop.cancelled() => return RoundEnd::Stopped,
                c = self.cmd.recv() => match c {
                    Some(Command::Release) => return RoundEnd::Released,
                    Some(Command::Freeze(d)) => {
                        tracing::info!(?d, "freezing (demo)");
                        tokio::time::sleep(d).await;
                    }
                    None => return RoundEnd::Stopped,
                },
                Some(_) = retries.join_next(), if !retries.is_empty() => {}
            }
        }
    }
}

/// Keeps `lease` alive until it is lost; returns why. Updates the
/// self-fencing deadline after every acknowledged keep-alive.
async fn keep_lease(
    backend: Arc<dyn LeaseBackend>,
    lease: i64,
    ttl: Duration,
    margin: Duration,
    tx: Arc<watch::Sender<LockStatus>>,
    stats: Arc<KeeperStats>,
) -> String {
    let interval = (ttl / 3).max(Duration::from_millis(100));
    let mut next = Instant::now() + interval;
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        let deadline = tx.borrow().valid_until.unwrap_or(sent);
        // Never wait on one keep-alive past the moment we would self-fence.
        let budget = deadline.saturating_duration_since(sent).clamp(Duration::from_millis(100), interval);
        match tokio::time::timeout(budget, backend.keep_alive(lease)).await {
            Ok(Ok(Some(granted))) => {
                let rtt = sent.elapsed();
                stats.keepalives.fetch_add(1, Ordering::Relaxed);
                stats.last_keepalive_us.store(rtt.as_micros() as u64, Ordering::Relaxed);
                stats.keepalive_us_total.fetch_add(rtt.as_micros() as u64, Ordering::Relaxed);
                let until = sent + granted - margin;
                tx.send_if_modified(|s| {
                    if s.lease_id == Some(lease) && s.valid_until.is_none_or(|u| u < until) {
                        s.valid_until = Some(until);
                    }
                    false // a deadline moving is not a state change worth waking watchers for
                });
                next = sent + interval;
            }
            Ok(Ok(None)) => return "the lease expired in the backend".into(),
            Ok(Err(e)) => {
                stats.keepalive_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "keep-alive failed");
                tx.send_if_modified(|s| {
                    s.last_error = Some(e.to_string());
                    false
                });
                if let LeaseError::Gone(_) = e {
                    return e.to_string();
                }
                next = Instant::now() + interval / 4;
            }
            Err(_) => {
                stats.keepalive_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(?budget, "keep-alive timed out");
                next = Instant::now() + interval / 4;
            }
        }
        if Instant::now() >= tx.borrow().valid_until.unwrap_or(sent) {
            return "no keep-alive acknowledged within the TTL (self-fenced)".into();
        }
    }
}

async fn watch_gone_retrying(backend: &dyn LeaseBackend, key: &str, rev: i64) {
    loop {
        match backend.watch_gone(key, rev).await {
            Ok(()) => return,
            Err(e) => {
                // Losing the watch is not losing the lock: keep-alives and the
                // self-fencing deadline still decide. Watch again shortly.
                tracing::debug!(error = %e, "watch on our key failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The outcome of one fence call.
enum FenceAnswer {
    Ok,
    Stale(u64),
    Failed(String),
}

async fn fence_one(url: &str, lock: &LockName, token: Token, timeout: Duration) -> FenceAnswer {
    let uri = format!("{}/v1/locks/{lock}/fence", url.trim_end_matches('/'));
    let body = serde_json::json!({ "token": token, "timeout_ms": timeout.as_millis() as u64 }).to_string();
    let client = crate::proxy::simple_client();
    let (status, body) = match crate::proxy::call(
        &client,
        "POST",
        &uri,
        Some("application/json"),
        body,
        timeout + Duration::from_secs(1),
    )
    .await
    {
        Ok(r) => r,
        Err(why) => return FenceAnswer::Failed(why),
    };
    match status.as_u16() {
        200 => FenceAnswer::Ok,
        409 => {
            let highest = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["highest"].as_u64());
            FenceAnswer::Stale(highest.unwrap_or(0))
        }
        _ => FenceAnswer::Failed(format!("{uri}: {status} {}", String::from_utf8_lossy(&body))),
    }
}

fn mark_fenced_out(tx: &watch::Sender<LockStatus>, token: Token, highest: u64, url: &str) {
    tracing::error!(
        token = token.get(),
        highest,
        filter = url,
        "FENCED OUT: a filter has admitted a higher token than etcd just gave us; etcd may have been restored \
         from an old snapshot. Writes are refused. Recover with `etcdutl snapshot restore --bump-revision`."
    );
    tx.send_modify(|s| {
        if s.token == Some(token) {
            s.phase = Phase::FencedOut;
            s.fenced_out_highest = Some(highest);
        }
    });
}

/// Fences every filter at once, waiting at most `fence_timeout`; filters that
/// fail are retried in the background (tasks in `retries`).
async fn fence_all(cfg: &KeeperConfig, token: Token, retries: &mut JoinSet<()>, tx: Arc<watch::Sender<LockStatus>>) {
    let calls = cfg.fence_urls.iter().map(|url| {
        let url = url.clone();
        let lock = cfg.lock.clone();
        let t = cfg.fence_timeout;
        async move { (fence_one(&url, &lock, token, t).await, url) }
    });
    let mut answers = match tokio::time::timeout(cfg.fence_timeout, futures_util::future::join_all(calls)).await {
        Ok(a) => a,
        Err(_) => cfg.fence_urls.iter().map(|u| (FenceAnswer::Failed("timed out".into()), u.clone())).collect(),
    };
    if cfg.fence_required {
        // Retry in the foreground until every filter has answered for sure.
        for (answer, url) in answers.iter_mut() {
            while let FenceAnswer::Failed(why) = answer {
                tracing::warn!(filter = %url, error = %why, "fence required but not confirmed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                *answer = fence_one(url, &cfg.lock, token, cfg.fence_timeout).await;
            }
        }
    }
    for (answer, url) in answers {
        match answer {
            FenceAnswer::Ok => tracing::info!(filter = %url, token = token.get(), "fenced filter"),
            FenceAnswer::Stale(highest) => mark_fenced_out(&tx, token, highest, &url),
            FenceAnswer::Failed(why) => {
                tracing::warn!(filter = %url, error = %why, "could not fence filter; retrying in the background (its first write fences it anyway)");
                let (lock, tx, t) = (cfg.lock.clone(), tx.clone(), cfg.fence_timeout);
                retries.spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        match fence_one(&url, &lock, token, t).await {
                            FenceAnswer::Ok => return tracing::info!(filter = %url, "fenced filter (retry)"),
                            FenceAnswer::Stale(h) => return mark_fenced_out(&tx, token, h, &url),
                            FenceAnswer::Failed(_) => {}
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::embedded::Embedded;

    fn cfg(holder: &str) -> KeeperConfig {
        KeeperConfig::new("l".parse().unwrap(), holder, Duration::from_secs(3))
    }

    async fn until_phase(rx: &mut watch::Receiver<LockStatus>, p: Phase) -> LockStatus {
        rx.wait_for(|s| s.phase == p).await.unwrap().clone()
    }

    /// Keeper `a` holding the lock (with its status), and keeper `c` queued behind it.
    async fn holder_and_waiter() -> (Keeper, LockStatus, Keeper, watch::Receiver<LockStatus>) {
        let b: Arc<dyn LeaseBackend> = Arc::new(Embedded::new());
        let a = Keeper::spawn(b.clone(), cfg("a"));
        let sa = until_phase(&mut a.subscribe(), Phase::Holding).await;
        let c = Keeper::spawn(b, cfg("c"));
        let rc = c.subscribe();
        tokio::time::sleep(Duration::from_millis(100)).await;
        (a, sa, c, rc)
    }

    #[tokio::test(start_paused = true)]
    async fn one_holds_the_other_waits_then_takes_over_with_a_higher_token() {
        let (a, sa, _c, mut rc) = holder_and_waiter().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(rc.borrow().phase, Phase::Campaigning, "only one holder");
        assert!(a.status().write_token(Instant::now()).is_some(), "keep-alives keep a holding");
        a.shutdown().await;
        let sc = until_phase(&mut rc, Phase::Holding).await;
        assert!(sc.token > sa.token);
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_holder_self_fences_before_its_lease_can_expire() {
        let (a, sa, _c, mut rc) = holder_and_waiter().await;
        a.freeze(Duration::from_secs(20));
        // While frozen, a's published state still says Holding, but its
        // deadline passes before the lease can expire and c can take over.
        let sc = until_phase(&mut rc, Phase::Holding).await;
        let now = Instant::now();
        let a_now = a.status();
        assert_eq!(a_now.phase, Phase::Holding, "the frozen keeper has not noticed");
        assert_eq!(a_now.write_token(now), None, "but its self-fencing deadline has passed");
        assert!(
            a_now.valid_until.unwrap() + Duration::from_millis(250) <= now,
            "deadline came at least the margin before the takeover"
        );
        assert!(sc.token > sa.token);
        // After the thaw a notices the loss and queues again.
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(a.status().phase, Phase::Campaigning);
    }

    #[tokio::test(start_paused = true)]
    async fn release_hands_over_and_campaigns_again() {
        let (a, _, _c, mut rc) = holder_and_waiter().await;
        a.release();
        until_phase(&mut rc, Phase::Holding).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(a.status().phase, Phase::Campaigning, "a queued again behind c");
        assert_eq!(a.stats.losses.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn default_margin_is_a_tenth_with_a_floor() {
        assert_eq!(default_margin(Duration::from_secs(10)), Duration::from_secs(1));
        assert_eq!(default_margin(Duration::from_secs(1)), Duration::from_millis(200));
    }
}
