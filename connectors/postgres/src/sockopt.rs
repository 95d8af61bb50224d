//! Socket options of the replication connection: `SO_RCVLOWAT`, which
//! neither `nix` nor `socket2` wraps, and TCP keepalive (set here with the
//! same call rather than adding a crate for it).

use std::io;
use std::os::fd::AsRawFd;

/// Sets the socket's receive low-water mark: readiness and reads wait
/// until `bytes` are queued (or a timeout the caller keeps).
pub fn set_receive_low_water(socket: &impl AsRawFd, bytes: i32) -> io::Result<()> {
    set_int(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Turns TCP keepalive on: the first probe after `idle` without traffic,
/// then one every `interval`; after `retries` unanswered probes the kernel
/// drops the connection and reads fail.
pub fn set_keepalive(
    socket: &impl AsRawFd,
    idle: std::time::Duration,
    interval: std::time::Duration,
    retries: u32,
) -> io::Result<()> {
    let secs = |d: std::time::Duration| d.as_secs().clamp(1, i32::MAX as u64) as i32;
    set_int(socket, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_int(socket, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(idle))?;
    set_int(
        socket,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        secs(interval),
    )?;
    let retries = retries.clamp(1, i32::MAX as u32) as i32;
    set_int(socket, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, retries)
}

/// Sets `TCP_USER_TIMEOUT`: the connection is dropped when sent data
/// stays unacknowledged for `timeout` (a query sent into a partition), and
/// it bounds keepalive probing too.
pub fn set_user_timeout(socket: &impl AsRawFd, timeout: std::time::Duration) -> io::Result<()> {
    let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    set_int(socket, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, millis)
}

#[allow(unsafe_code)]
fn set_int(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `setsockopt` reads exactly `size_of::<c_int>()` bytes from a
    // pointer to a live, properly aligned c_int on this stack frame; the fd is
    // borrowed from a socket that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn get_int(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `getsockopt` writes at most `len` bytes into a live c_int
        // on this stack frame and updates `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        value
    }

    #[test]
    fn the_options_reach_the_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let secs = std::time::Duration::from_secs;
        set_keepalive(&socket, secs(30), secs(10), 3).unwrap();
        set_user_timeout(&socket, std::time::Duration::from_millis(4500)).unwrap();
        assert_eq!(get_int(&socket, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get_int(&socket, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
        assert_eq!(get_int(&socket, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 10);
        assert_eq!(get_int(&socket, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(
            get_int(&socket, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            4500
        );
    }
}
