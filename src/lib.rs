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
//! * [`token`]: the wire contract (`Fencing-Lock`, `Fencing-Token`), parsing
//!   and formatting, shared by everything else.
//! * [`filter`]: the store-side proxy: admission and the epoch barrier
//!   ([`filter::admission`]), durable high-water marks ([`filter::state`]),
//!   and the one place errors become HTTP answers ([`filter::error`]).
//! * [`proxy`]: shared hyper plumbing: accept loop with graceful shutdown,
//!   pooled upstream client, hop-by-hop headers, JSON errors.
//! * [`metrics`]: Prometheus helpers.
//! * [`duration`]: the duration syntax of flags and annotations.
//! * [`listen`]: binding listeners, `[::]` with a fallback to `0.0.0.0`.
//! * [`config`]: flags and `FENCEGATE_*` environment variables.
//!
//! Entry points take bound listeners and a shutdown future, so tests bind
//! `127.0.0.1:0` and run the real thing.

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
