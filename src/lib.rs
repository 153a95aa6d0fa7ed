//! fencegate: fencing tokens for stores that have none.
//!
//! A distributed lock cannot stop a paused or partitioned holder from writing
//! after its lease expired. A fencing token can: a number that grows with
//! every new holder, sent with every write, and a store that refuses writes
//! older than the newest it has seen. fencegate adds that check from outside:
//!
//! * the **sidecar** holds an etcd lease for the app, injects the token into
//!   the app's writes and fences itself when the lease may be gone;
//! * the **filter** sits in front of the store and refuses stale writes,
//!   durably and in order.
//!
//! # Layout
//!
//! Core modules (none imports `config`, `demo` or `main`):
//!
//! * [`token`]: the wire contract (`Fencing-Lock`, `Fencing-Token`), parsing
//!   and formatting, shared by everything else.
//! * [`fence`]: the fence protocol (path, request, answer), one definition for
//!   the sidecar that calls it and the filter that answers it.
//! * [`lease`]: the lock recipe's storage ([`lease::LeaseBackend`]: etcd in
//!   production, an embedded one for the demo and unit tests), the keeper task
//!   that campaigns, keeps the lease alive and self-fences
//!   ([`lease::keeper`]), the two-clock deadline ([`lease::deadline`]),
//!   retries ([`lease::backoff`]) and the [`lease::Fencer`] it is given.
//! * [`sidecar`]: the app's proxy (tower layers in [`sidecar::layers`]), the
//!   local API, and the HTTP fencer ([`sidecar::fence`]).
//! * [`filter`]: the store-side proxy: which paths a write changes and which
//!   lock covers them ([`filter::rules`]), admission and the epoch barrier
//!   ([`filter::admission`]), durable high-water marks ([`filter::state`]),
//!   the admin API ([`filter::admin`]), metrics ([`filter::metrics`]), and
//!   the one place errors become HTTP answers ([`filter::error`]).
//! * [`proxy`]: shared hyper plumbing, in named parts: the accept loop with
//!   limits and graceful shutdown ([`proxy::server`], `proxy::idle`), the
//!   upstream client ([`proxy::upstream`]), hop-by-hop headers
//!   ([`proxy::headers`]), JSON bodies ([`proxy::body`]), the small control
//!   client ([`proxy::client`]), signals ([`proxy::signal`]).
//! * [`injector`]: the Kubernetes webhook: annotations read into settings
//!   ([`injector::annotations`]), the sidecar container
//!   ([`injector::sidecar`]), the JSON Patch ([`injector::patch`]).
//! * [`block_cache`]: the binary's allocator, `malloc` with the 8 KiB blocks
//!   of hyper's read buffers kept per event loop.
//! * [`metrics`]: Prometheus helpers. [`duration`]: the duration syntax of
//!   flags and annotations. [`listen`]: binding `[::]` with a fallback to
//!   `0.0.0.0`.
//!
//! Outer modules: [`config`] (flags and `FENCEGATE_*` environment variables,
//! turned into the core's config structs) and [`demo`] (the story on one
//! machine, with its test doubles: a freezable lease backend and a relay).
//!
//! Entry points ([`filter::run`], [`sidecar::run`], [`injector`]'s server)
//! take bound listeners and a shutdown future, so tests and the demo bind
//! `127.0.0.1:0` and run the real thing in process.
//!
//! # One write, app -> sidecar -> filter -> store
//!
//! 1. The app sends `PUT /x` to the sidecar's `--listen`.
//!    [`proxy::server`] accepts it and calls the sidecar's tower stack.
//! 2. [`sidecar::layers::StripFencing`] drops any `Fencing-*` header the app
//!    sent; [`sidecar::layers::InjectToken`] reads the keeper's published
//!    [`lease::keeper::LockStatus`] and, if the lock is safely held *now*
//!    (deadline not passed on either clock), adds the lock and token;
//!    otherwise answers 503 `lease_not_held`.
//!    [`sidecar::layers::BoundWrites`] then cuts the write off if the lock
//!    stops being safely held while it streams.
//! 3. [`proxy::upstream::Upstream::send`] carries it to the filter.
//! 4. The filter's [`filter::Filter::handle`] works out the write's targets
//!    (request path and `Destination`, decoded and checked by
//!    [`filter::rules`]), checks the named lock covers them all, parses the
//!    token ([`token::parse_headers`]), and asks the lock's
//!    [`filter::admission::LockEntry::admit_write`]: the pure decision
//!    [`filter::admission::LockState::admit`] says refuse (stale), forward,
//!    or raise (make the new mark durable in [`filter::state`], wait at the
//!    barrier for older writes), and a `Permit` is held until the store
//!    answers.
//! 5. The store's answer streams back the same way; errors on the way become
//!    JSON answers in [`filter::error`].
//!
//! # One lease acquisition
//!
//! 1. [`sidecar::Sidecar::start`] spawns the [`lease::keeper::Keeper`] with
//!    the etcd backend and an [`sidecar::fence::HttpFencer`].
//! 2. Each round grants a lease, then *acquires*: creates
//!    `<prefix>/<lock>/<lease>` bound to it (create-only transaction) and
//!    waits until no older key is queued (watching only the key just ahead).
//!    The key's create revision is the token. Meanwhile `keep_lease` sends
//!    keep-alives every TTL/3 and moves the self-fencing deadline.
//! 3. *Fence*: the key is watched from now on; every filter's fence endpoint
//!    ([`fence`]) is called with the token; the key is read once more.
//! 4. *Hold*: phase `Holding` is published; the proxy starts injecting the
//!    token. The round ends on a lost lease, a passed deadline, a deleted key,
//!    a release or a stop; the token is withdrawn first, then the lease is
//!    revoked.

pub mod block_cache;
pub mod config;
pub mod demo;
pub mod duration;
pub mod fence;
pub mod filter;
pub mod injector;
pub mod lease;
pub mod listen;
pub mod metrics;
pub mod proxy;
pub mod sidecar;
pub mod token;
