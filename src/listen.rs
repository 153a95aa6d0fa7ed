//! Binding a listener. `[::]` is the default for addresses other pods or the
//! kubelet reach, so IPv6-only clusters work: on Linux an IPv6 wildcard
//! socket takes IPv4 too (unless `net.ipv6.bindv6only=1`). On a host with
//! IPv6 switched off that bind fails; then the IPv4 wildcard is bound
//! instead, with a log line, rather than not starting at all.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;

/// The IPv4 wildcard to try when binding `addr` failed with `err`, if that
/// is the fix: only for the IPv6 wildcard, and only when IPv6 is missing.
fn ipv4_fallback(addr: SocketAddr, err: &io::Error) -> Option<SocketAddr> {
    let ipv6_missing = matches!(err.raw_os_error(), Some(libc_codes::EAFNOSUPPORT | libc_codes::EADDRNOTAVAIL));
    (addr.is_ipv6() && addr.ip().is_unspecified() && ipv6_missing)
        .then(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))
}

/// Linux errno values (the crate does not depend on libc for two numbers).
mod libc_codes {
    pub const EAFNOSUPPORT: i32 = 97;
    pub const EADDRNOTAVAIL: i32 = 99;
}

/// Binds `addr` with `bind`, falling back from `[::]` to `0.0.0.0`.
async fn bind_with<F, Fut>(addr: SocketAddr, bind: F) -> io::Result<TcpListener>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = io::Result<TcpListener>>,
{
    match bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) => match ipv4_fallback(addr, &e) {
            Some(v4) => {
                tracing::warn!(%addr, error = %e, fallback = %v4, "IPv6 is not available here; listening on IPv4 only");
                bind(v4).await
            }
            None => Err(e),
        },
    }
}

/// Binds `addr`; `[::]:port` falls back to `0.0.0.0:port` where IPv6 is off.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_with(addr, TcpListener::bind).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ipv6_wildcard_takes_ipv4_too_where_the_host_has_ipv6() {
        let l = match bind("[::]:0".parse().unwrap()).await {
            Ok(l) => l,
            Err(e) => panic!("[::]:0 must bind (directly or by falling back): {e}"),
        };
        let port = l.local_addr().unwrap().port();
        // Whichever family was bound, IPv4 clients reach it.
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        let (accepted, connected) = tokio::join!(l.accept(), connect);
        assert!(accepted.is_ok() && connected.is_ok());
    }

    #[tokio::test]
    async fn falls_back_to_ipv4_when_ipv6_is_off() {
        // A host without IPv6, simulated: binding any IPv6 address fails as Linux does.
        let no_ipv6 = |a: SocketAddr| async move {
            if a.is_ipv6() {
                Err(io::Error::from_raw_os_error(libc_codes::EAFNOSUPPORT))
            } else {
                TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))).await
            }
        };
        let l = bind_with("[::]:0".parse().unwrap(), no_ipv6).await.unwrap();
        assert!(l.local_addr().unwrap().is_ipv4());
        // Only the wildcard falls back: an explicit IPv6 address is the user's choice.
        let err = bind_with("[::1]:0".parse().unwrap(), no_ipv6).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_codes::EAFNOSUPPORT));
        // Other errors (a port in use) are not hidden by a fallback.
        let in_use = |_: SocketAddr| async { Err::<TcpListener, _>(io::Error::from(io::ErrorKind::AddrInUse)) };
        assert_eq!(bind_with("[::]:1".parse().unwrap(), in_use).await.unwrap_err().kind(), io::ErrorKind::AddrInUse);
    }
}
