//! `SO_RCVLOWAT`, which neither `nix` nor `socket2` wraps.

use std::io;
use std::os::fd::AsRawFd;

/// Sets the socket's receive low-water mark: readiness and reads wait
/// until `bytes` are queued (or a timeout the caller keeps).
#[allow(unsafe_code)]
pub fn set_receive_low_water(socket: &impl AsRawFd, bytes: i32) -> io::Result<()> {
    let value: libc::c_int = bytes;
    // SAFETY: `setsockopt` reads exactly `size_of::<c_int>()` bytes from a
    // pointer to a live, properly aligned c_int on this stack frame; the fd is
    // borrowed from a socket that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
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
