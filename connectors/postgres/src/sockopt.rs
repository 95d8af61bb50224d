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
