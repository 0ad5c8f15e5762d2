//! The proxy's listening socket: inherited from systemd socket activation,
//! or bound here so that a second proxy can share the address.
//!
//! - Socket activation (`sd_listen_fds(3)`): when `LISTEN_FDS` is set (and
//!   `LISTEN_PID` is this process, or unset), fd 3 is a listening TCP socket
//!   that systemd holds open across restarts, so connections that arrive
//!   while the proxy restarts wait in its backlog instead of being refused.
//! - Otherwise `--listen` is bound with `SO_REUSEADDR` and `SO_REUSEPORT`
//!   (Linux, `socket(7)`): a new proxy binds the address while the old one
//!   still runs, and the kernel spreads new connections over both until the
//!   old one closes its socket on SIGTERM. Only processes of the same user
//!   can join the address. The proxy's `--admin` and a dispatcher's
//!   `--metrics` address are bound the same way, or the new process could
//!   not start beside the old one.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Backlog of the bound socket: connections the kernel completes before
/// the proxy accepts them.
const BACKLOG: i32 = 1024;

/// The listening socket systemd passed (the first, fd 3), if any. Call it
/// before starting threads: like `sd_listen_fds(3)` it unsets `LISTEN_FDS`
/// and `LISTEN_PID`, so programs the proxy starts do not take it too.
///
/// Errors: fd 3 is not a TCP listening socket.
pub fn take_inherited() -> io::Result<Option<std::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 1 {
        eprintln!(
            "warning: {} sockets passed by socket activation; using the first",
            fds.len()
        );
    }
    if fds.len() == 0 {
        return Ok(None);
    }
    fds.take_tcp_listener(0)
}

/// Binds `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`, listening with a
/// backlog of 1024, non-blocking (ready for tokio).
pub fn bind_shared(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sockets_share_one_address() {
        let first = bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_shared(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        // A plain bind (no SO_REUSEPORT) is still refused.
        assert!(std::net::TcpListener::bind(addr).is_err());
    }
}
