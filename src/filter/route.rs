//! The filter's request path: what a write changes (its targets), the
//! admission of its token, and the forward to the store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use futures_util::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;

use super::error::FilterError;
use super::held::Held;
use super::orphan::{SendFuture, Sending};
use super::rules::{self, Targets};
use super::{admission, form, query, s3, Filter, Store};
use crate::proxy::{self, Body, RequestBody, Upstream};
use crate::token::{self, LockName};

impl Filter {
    /// The proxy's request handler. A read that needs no fencing is sent
    /// from here, one future fewer to go through on each of its wake-ups
    /// than `route`'s.
    pub async fn handle(
        self: Arc<Self>,
        up: Arc<Upstream>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        // Hop-by-hop headers go before anything is matched: the target is
        // decided on the request as it will be forwarded. A `Connection:
        // host` would otherwise have its `Host` matched here (an S3 virtual
        // host naming one lock's bucket) and then dropped on the way out, so
        // that the store read the path as another bucket, another lock's.
        proxy::strip_hop_by_hop(req.headers_mut());
        let is_write = self.cfg.read_methods.is_write(req.method());
        let routed = if !is_write && !self.cfg.fence_reads {
            self.pass(&up, req.map(RequestBody::stream), peer).await.map_err(|e| (None, e))
        } else {
            self.clone().route(&up, req, peer, is_write).await
        };
        match routed {
            Ok(r) => r,
            Err((lock, e)) => {
                self.refusals.count(&self.locks, lock.as_ref(), &e);
                tracing::info!(reason = e.reason(), lock = lock.as_ref().map(|l| l.as_str()), error = %e, "refused");
                e.into_response()
            }
        }
    }

    /// The write's targets (request path, `Destination`), checked against
    /// the rules; see [`rules`]. With `--store s3` the body may name more:
    /// [`s3_targets`](Self::s3_targets). Every other store's targets are
    /// decided on the head alone, in a plain function: an `async fn` would
    /// move the request into its future and out again on every write.
    fn head_targets(&self, req: &Request<Incoming>) -> Result<Targets<'_>, FilterError> {
        let path = req.uri().path();
        if self.cfg.unsafe_raw_paths {
            let lock = self.cfg.protection.lock_for(path);
            return Ok(Targets { paths: smallvec::smallvec![(path.to_owned(), lock)] });
        }
        let (protection, allow) = (&self.cfg.protection, self.cfg.allow_path_params);
        let dest = rules::destination(req.headers())?;
        // Sources named in the query (SeaweedFS's filer): rare, so their
        // vector is empty and allocates nothing, and the path and a
        // `Destination` fit inline.
        let moved = query::moved_sources(req.uri().query()).map_err(FilterError::DestinationMalformed)?;
        let raw: smallvec::SmallVec<[&str; 2]> =
            std::iter::once(path).chain(dest.as_deref()).chain(moved.iter().map(String::as_str)).collect();
        Targets::resolve(protection, &raw, allow)
    }

    /// The write's targets with `--store s3`: the head's, and what the body
    /// names. Returns the request to forward, its body unchanged (whatever
    /// was read of it goes first). The two bodies read here
    /// (DeleteObjects, a form POST) are read in boxed futures: rare requests,
    /// whose futures would otherwise make every request's future bigger.
    async fn s3_targets(&self, req: Request<Incoming>) -> Result<(Targets<'_>, Request<RequestBody>), FilterError> {
        let path = s3::request_path(
            req.uri().path(),
            req.headers(),
            req.uri().authority().map(|a| a.as_str()),
            self.cfg.s3_domain.as_deref(),
        )
        .map_err(FilterError::HostMalformed)?;
        // Every target, from wherever it was read, in SeaweedFS's uploads
        // area is a write to its whole bucket too (see `s3::uploads_area`).
        let resolve = |raw: &[&str]| {
            let whole: Vec<String> = raw.iter().filter_map(|p| s3::uploads_area(p)).collect();
            let all: Vec<&str> = raw.iter().copied().chain(whole.iter().map(String::as_str)).collect();
            Targets::resolve(&self.cfg.protection, &all, self.cfg.allow_path_params)
        };
        // Targets named outside the path, of any request: RenameObject's source.
        let bucket = s3::post_bucket(&path);
        let renamed = s3::rename_sources(req.headers(), bucket).map_err(FilterError::RenameSourceMalformed)?;
        let renamed = renamed.iter().map(String::as_str);
        if let (&http::Method::POST, Some(bucket)) = (req.method(), bucket) {
            // A POST below the bucket changes its path too, if the store
            // reads it as an object's.
            let object = s3::bucket_of(&path).is_none().then_some(path.as_str());
            let timeout = self.cfg.limits.header_read_timeout;
            // The two bodies that name targets: decided once, read below.
            let delete = s3::is_delete_objects(req.uri().query());
            let boundary = if delete { None } else { form::form_boundary(req.headers()) };
            if (delete || boundary.is_some()) && s3::is_aws_chunked(req.headers()) {
                return Err(FilterError::BodyEncoded(
                    "this body names what the write changes, and it is sent aws-chunked: the store reads the decoded \
                     body, and the filter does not decode it; send it unchunked (a DeleteObjects or a POST-policy form \
                     is small)"
                        .into(),
                ));
            }
            if delete {
                let (body, complete, req) = Box::pin(read_body(req, timeout)).await?;
                if !complete {
                    return Err(FilterError::BodyTooLarge(format!(
                        "the filter reads at most {} bytes of a DeleteObjects to see what it deletes",
                        s3::MAX_BODY
                    )));
                }
                let keys = s3::delete_keys(&body).map_err(|e| match e {
                    s3::KeysError::TooMany => {
                        FilterError::BodyTooLarge(format!("a DeleteObjects names more than {} keys", s3::MAX_KEYS))
                    }
                    s3::KeysError::Malformed(why) => FilterError::BodyMalformed(why),
                })?;
                let raw: Vec<String> = keys.iter().map(|k| s3::key_path(bucket, k)).collect();
                let raw: Vec<&str> = raw.iter().map(String::as_str).chain(object).chain(renamed).collect();
                return Ok((resolve(&raw)?, req));
            }
            if let Some(boundary) = boundary {
                let (body, complete, req) = Box::pin(read_body(req, timeout)).await?;
                // Unreadable, or too long to read whole: checked as a write
                // to the whole bucket, which goes through when one lock
                // holds the bucket and is refused when it is split.
                let key = match complete.then(|| form::form_key(&body, &boundary)) {
                    Some(form::FormKey::Found(key)) => s3::key_path(bucket, &key),
                    _ => s3::whole_bucket(bucket),
                };
                let raw: Vec<&str> = std::iter::once(key.as_str()).chain(object).chain(renamed).collect();
                return match (resolve(&raw), complete) {
                    (Err(_), false) => Err(FilterError::BodyTooLarge(format!(
                        "a POST-policy form into a bucket split between locks is read whole to find its key, and \
                         this one is longer than the {} bytes the filter reads",
                        s3::MAX_BODY
                    ))),
                    (t, _) => Ok((t?, req)),
                };
            }
            // Any other POST but the known object-level ones: the whole
            // bucket (see `s3::is_object_post`).
            if object.is_none() || !s3::is_object_post(req.uri().query(), req.headers()) {
                let whole = s3::whole_bucket(bucket);
                let raw: Vec<&str> = std::iter::once(whole.as_str()).chain(object).chain(renamed).collect();
                return Ok((resolve(&raw)?, req.map(RequestBody::stream)));
            }
        }
        // An upload the store unpacks into keys of its own choosing (MinIO's
        // snowball archives): a write to its whole bucket.
        let unpacked = s3::unpacks_archive(req.headers()).then(|| bucket.map(s3::whole_bucket)).flatten();
        // A bucket-level request is a write to the collection `/bucket/`.
        let path = if s3::bucket_level(&path).is_some() { format!("{path}/") } else { path };
        let dest = rules::destination(req.headers())?;
        let raw: Vec<&str> =
            std::iter::once(path.as_str()).chain(dest.as_deref()).chain(renamed).chain(unpacked.as_deref()).collect();
        Ok((resolve(&raw)?, req.map(RequestBody::stream)))
    }

    /// A write, or a read with `--fence-reads`; its hop-by-hop headers were
    /// stripped by [`handle`](Self::handle).
    async fn route(
        self: Arc<Self>,
        up: &Arc<Upstream>,
        req: Request<Incoming>,
        peer: SocketAddr,
        is_write: bool,
    ) -> Result<Response<Body>, (Option<LockName>, FilterError)> {
        let (targets, req) = if self.cfg.store == Store::S3 && !self.cfg.unsafe_raw_paths {
            self.s3_targets(req).await
        } else {
            self.head_targets(&req).map(|t| (t, req.map(RequestBody::stream)))
        }
        .map_err(|e| (None, e))?;
        let Some(named) = targets.lock() else {
            return if self.cfg.allow_unprotected || !is_write {
                self.pass(up, req, peer).await.map_err(|e| (None, e))
            } else {
                let path = targets.unprotected().unwrap_or(req.uri().path()).to_owned();
                Err((None, FilterError::Unprotected(path)))
            };
        };
        if let (Some(path), false) = (targets.unprotected(), self.cfg.allow_unprotected) {
            return Err((None, FilterError::Unprotected(path.to_owned())));
        }
        let fence = token::parse_headers(req.headers()).map_err(|e| (None, e.into()))?;
        // Borrowed, cloned only for an error: a write's own path does not
        // write to the name's reference count.
        let lock = named.name();
        targets.check_lock(fence.lock).map_err(|e| (Some(lock.clone()), e))?;
        let entry = self.locks.entry_of(named);
        let deadline = crate::duration::after(self.cfg.max_wait);
        self.check_shared().map_err(|e| (Some(lock.clone()), e))?;
        let permit = entry.admit_write(fence.token, deadline).await.map_err(|e| (Some(lock.clone()), e.into()))?;
        // Checked again right before forwarding: the admission may have
        // waited past the moment this replica had to self-fence. A replica
        // that self-fences later cuts the write off (`shared::cutoff`).
        let cut = self.shared.as_ref().map(|s| s.cut_generation());
        self.check_shared().map_err(|e| (Some(lock.clone()), e))?;
        entry.stats.admitted.fetch_add(1, Ordering::Relaxed);
        let started = StdInstant::now();
        // The barrier's abort stops a write only while its request is still
        // being sent: closing the connection then leaves the store with a
        // request it never got whole. Once all of it is handed on, the store
        // has it, or soon will, and may apply it whatever the filter closes
        // (S3 goes on after a close): the write is waited for instead, up to
        // `--upstream-timeout`.
        let sent_all = Arc::new(AtomicBool::new(false));
        let req = req.map(|b| b.marking_end(sent_all.clone()));
        let aborted = {
            let (aborted, sent_all, abort_sent) = (permit.aborted(), &sent_all, self.cfg.unsafe_abort_sent);
            async move {
                aborted.await;
                if sent_all.load(Ordering::Acquire) && !abort_sent {
                    std::future::pending::<()>().await;
                }
            }
        };
        // The send is boxed so that it can move to a task of its own if the
        // client leaves once the store has the request whole (`orphan`).
        let send: SendFuture = match (&self.shared, cut) {
            (Some(shared), Some(cut)) => {
                let halt = super::shared::CutCheck::halt(shared, cut);
                Box::pin(up.clone().send_body_owned(req.map(|b| b.halted_by(halt)), Some(peer)))
            }
            _ => Box::pin(up.clone().send_body_owned(req, Some(peer))),
        };
        let carry_on = is_write && !self.cfg.unsafe_release_at_head;
        let mut sending = Sending::new(send, permit, &sent_all, &self, cut, carry_on);
        let (sent, permit) = match (&self.shared, cut) {
            (Some(shared), Some(cut)) => tokio::select! {
                // The cut-off first: polled before the send, it stops a write
                // at its next poll after the deadline; its body stops at its
                // next chunk.
                biased;
                _ = shared.cut_off(cut) => {
                    sending.give_up();
                    return Err((Some(lock.clone()), FilterError::SelfFenced(lock.clone())));
                }
                _ = aborted => {
                    sending.give_up();
                    return Err((Some(lock.clone()), FilterError::Aborted(lock.clone())));
                }
                r = &mut sending => r,
            },
            _ => tokio::select! {
                r = &mut sending => r,
                _ = aborted => {
                    sending.give_up();
                    return Err((Some(lock.clone()), FilterError::Aborted(lock.clone())));
                }
            },
        };
        self.upstream_latency.observe(started.elapsed());
        match sent {
            // A read (`--fence-reads`) changes nothing: released at the head.
            Ok(resp) if !is_write || self.cfg.unsafe_release_at_head => {
                permit.complete();
                Ok(resp.map(proxy::stream))
            }
            // The write holds the barrier until the store's answer has ended.
            Ok(resp) => Ok(resp.map(|b| Body::new(Held::new(b, permit, self.clone(), cut)))),
            // Dropping the permit without complete() keeps it in flight for
            // abort_grace: the store may still apply a write we gave up on.
            Err(e) => {
                drop(permit);
                Err((Some(lock.clone()), e.into()))
            }
        }
    }

    /// With shared marks: refuses (503 `fencing_state_unavailable`) while
    /// this replica is self-fenced. Reads never come here.
    pub(super) fn check_shared(&self) -> Result<(), FilterError> {
        match &self.shared {
            Some(s) if !s.writable() => Err(FilterError::Admit(admission::AdmitError::State(s.unavailable()))),
            _ => Ok(()),
        }
    }

    /// A request that needs no admission, sent on. A plain function
    /// returning the send's future mapped, not an `async fn`: that would
    /// keep the request in its state beside the send's future (which holds
    /// it too), and move it in once more, on every read.
    fn pass<'a>(
        &'a self,
        up: &'a Upstream,
        req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> impl Future<Output = Result<Response<Body>, FilterError>> + Send + 'a {
        let started = StdInstant::now();
        up.send_body(req, Some(peer)).map(move |resp| {
            let resp = resp?;
            self.upstream_latency.observe(started.elapsed());
            Ok(resp.map(proxy::stream))
        })
    }
}

/// Reads a request's body whole, or its first [`s3::MAX_BODY`] bytes and a
/// little more (`false`: there is more), and gives back the bytes read and
/// the request with its body whole again (those bytes, then the rest as the
/// client sends it). All of it within `within` (the header timeout: this
/// body decides the write as its head does elsewhere), else 408: a client
/// that sends a head and then no body would otherwise hold its connection
/// for ever.
async fn read_body(
    req: Request<Incoming>,
    within: Duration,
) -> Result<(bytes::Bytes, bool, Request<RequestBody>), FilterError> {
    use http_body_util::BodyExt;
    let (parts, mut body) = req.into_parts();
    let mut buf = bytes::BytesMut::new();
    let (mut complete, mut trailers) = (false, None);
    let deadline = crate::duration::after(within);
    while !complete && buf.len() <= s3::MAX_BODY {
        let frame = tokio::time::timeout_at(deadline, body.frame()).await.map_err(|_| {
            FilterError::BodyTimeout(format!(
                "the filter reads this body to see what the write changes, and it did not arrive within {within:?} \
                 (--header-timeout)"
            ))
        })?;
        match frame {
            None => complete = true,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => buf.extend_from_slice(&data),
                Err(frame) => (trailers, complete) = (frame.into_trailers().ok(), true),
            },
            Some(Err(e)) => return Err(FilterError::BadRequest(format!("the request body could not be read: {e}"))),
        }
    }
    let buf = buf.freeze();
    let rest = (!complete).then_some(body);
    Ok((buf.clone(), complete, Request::from_parts(parts, RequestBody::prefixed(buf, rest, trailers))))
}
