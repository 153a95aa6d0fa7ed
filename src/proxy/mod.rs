//! Shared hyper plumbing, one part per job:
//!
//! * [`server`]: the accept loop with limits and graceful shutdown;
//! * [`conn`]: one client connection, HTTP/1.1 or h2c by its first bytes;
//! * [`linger`]: how a client connection closes (nginx's lingering close when needed);
//! * [`loops`]: more accept loops on one socket, a thread each (nginx-style);
//! * [`upstream`]: forwarding to the store (a per-connection upstream, or a pool);
//! * [`headers`]: hop-by-hop headers and `X-Forwarded-For`;
//! * [`body`]: response bodies and JSON / text answers;
//! * [`client`]: a small client for control requests;
//! * [`signal`]: SIGTERM / Ctrl-C.
//!
//! Both proxies (sidecar and filter) and every admin server use these pieces,
//! so timeouts, limits and shutdown behave the same everywhere. The public
//! names are re-exported here, so callers say `proxy::serve`, `proxy::call`.

pub mod body;
pub mod client;
mod conn;
mod gate;
pub mod headers;
mod idle;
mod linger;
pub mod loops;
pub mod server;
pub mod signal;
pub mod upstream;

pub use body::{full, json_error, json_response, stream, text_response, Body, BoxError, RequestBody};
pub use client::{call, error_chain, send, simple_client, SimpleClient};
pub use headers::strip_hop_by_hop;
pub use server::{connection_cap, serve, serve_capped, serve_tls, ServerLimits};
pub use signal::shutdown_signal;
pub use upstream::{ConnSlot, Upstream, UpstreamError};
