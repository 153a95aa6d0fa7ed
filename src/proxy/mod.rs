//! Shared hyper plumbing, one part per job:
//!
//! * [`server`]: the accept loop with limits and graceful shutdown;
//! * [`conn`]: one client connection, HTTP/1.1 or h2c by its first bytes;
//! * [`streams`]: a place under the connection cap for each h2c stream in flight;
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

/// Inside an `AsyncWrite` impl for a stream wrapper: its writes and flushes
/// go to its field `$io` as they are (vectored writes too: hyper asks
/// `is_write_vectored` to choose `writev`). `poll_shutdown` is each
/// wrapper's own.
macro_rules! forward_writes {
    ($io:ident) => {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            data: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.$io).poll_write(cx, data)
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.$io).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            self.$io.is_write_vectored()
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.$io).poll_flush(cx)
        }
    };
}
use forward_writes;

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
mod streams;
#[cfg(test)]
mod testing;
pub mod upstream;

pub use body::{full, json_error, json_response, stream, text_response, Body, BoxError, RequestBody};
pub use client::{call, error_chain, send, simple_client, SimpleClient};
pub use headers::strip_hop_by_hop;
pub use server::{connection_cap, serve, serve_capped, serve_tls, ServerLimits};
pub use signal::shutdown_signal;
pub use upstream::{ConnSlot, Upstream, UpstreamError};
