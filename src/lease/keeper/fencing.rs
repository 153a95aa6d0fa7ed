//! Fencing the filters on takeover through the [`Fencer`] the keeper is given.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::settings::KeeperConfig;
use super::status::{KeeperStats, LockStatus, Phase};
use crate::lease::backoff::Backoff;
use crate::lease::{Fencer, Outcome};
use crate::token::Token;

fn mark_fenced_out(tx: &watch::Sender<LockStatus>, token: Token, highest: u64, target: &str) {
    tracing::error!(
        token = token.get(),
        highest,
        filter = target,
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

/// Fences every target at once, waiting at most the fence timeout (and a
/// second for the answer to travel); targets that fail are retried in the
/// background (tasks in `retries`), or in the foreground with `fence_required`.
pub(super) async fn fence_all(
    fencer: Arc<dyn Fencer>,
    cfg: &KeeperConfig,
    token: Token,
    retries: &mut JoinSet<()>,
    tx: Arc<watch::Sender<LockStatus>>,
    stats: Arc<KeeperStats>,
) {
    let (lock, t) = (&cfg.lock, cfg.fence_timeout);
    let targets = fencer.targets().to_vec();
    let calls = targets.iter().map(|target| {
        let fencer = fencer.clone();
        async move { fencer.fence(target, lock, token, t).await }
    });
    let bound = t + Duration::from_secs(1);
    let mut answers = match tokio::time::timeout(bound, futures_util::future::join_all(calls)).await {
        Ok(a) => a,
        Err(_) => {
            stats.fence_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(timeout = ?bound, "fencing the filters timed out");
            targets.iter().map(|_| Outcome::Failed(format!("no answer within {bound:?}"))).collect()
        }
    };
    if cfg.fence_required {
        // Retry in the foreground until every filter has answered for sure.
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        for (answer, target) in answers.iter_mut().zip(&targets) {
            while let Outcome::Failed(why) = answer {
                tracing::warn!(filter = %target, error = %why, "fence required but not confirmed; retrying");
                backoff.wait().await;
                *answer = fencer.fence(target, lock, token, t).await;
            }
        }
    }
    for (answer, target) in answers.into_iter().zip(targets) {
        match answer {
            Outcome::Fenced => tracing::info!(filter = %target, token = token.get(), "fenced filter"),
            Outcome::Stale { highest } => mark_fenced_out(&tx, token, highest, &target),
            Outcome::Failed(why) => {
                tracing::warn!(filter = %target, error = %why, "could not fence filter; retrying in the background (its first write fences it anyway)");
                let (fencer, lock, tx) = (fencer.clone(), cfg.lock.clone(), tx.clone());
                retries.spawn(async move {
                    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
                    loop {
                        backoff.wait().await;
                        match fencer.fence(&target, &lock, token, t).await {
                            Outcome::Fenced => return tracing::info!(filter = %target, "fenced filter (retry)"),
                            Outcome::Stale { highest } => return mark_fenced_out(&tx, token, highest, &target),
                            Outcome::Failed(_) => {}
                        }
                    }
                });
            }
        }
    }
}
