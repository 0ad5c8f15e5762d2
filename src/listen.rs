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
/// Sockets meant for another process (`LISTEN_PID` names another pid) are
/// left alone, with a warning.
///
/// Errors: fd 3 is not a TCP socket, or not listening (a unit with
/// `Accept=yes` passes a connection, which cannot serve as a listener).
pub(crate) fn take_inherited() -> io::Result<Option<std::net::TcpListener>> {
    if let (Ok(fds), Ok(pid)) = (std::env::var("LISTEN_FDS"), std::env::var("LISTEN_PID")) {
        if pid.trim() != std::process::id().to_string() {
            eprintln!(
                "warning: LISTEN_FDS={fds} is for process {pid}, not this one; binding --listen instead"
            );
        }
    }
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 1 {
        eprintln!(
            "warning: {} sockets passed by socket activation; using the first",
            fds.len()
        );
    }
    let Some(listener) = fds.take_tcp_listener(0)? else {
        return Ok(None);
    };
    if !socket2::SockRef::from(&listener).is_listener()? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fd 3 is a connection, not a listening socket (use Accept=no in the .socket unit)",
        ));
    }
    Ok(Some(listener))
}

/// Binds `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`, listening with a
/// backlog of 1024, non-blocking (ready for tokio). When another process
/// already serves the address, says so on stderr: expected while a new
/// version starts beside the old one, a mistake otherwise (two proxies of
/// different queues would split the traffic).
pub(crate) fn bind_shared(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = || -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        Ok(socket)
    };
    // Without SO_REUSEPORT, a bind fails only while another socket listens
    // on the address (SO_REUSEADDR lets it past connections in TIME_WAIT).
    if addr.port() != 0 {
        let probe = socket()?.bind(&addr.into());
        if probe.is_err_and(|err| err.kind() == io::ErrorKind::AddrInUse) {
            eprintln!(
                "warning: {addr} is already served by another process; sharing it (SO_REUSEPORT)"
            );
        }
    }
    let socket = socket()?;
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
