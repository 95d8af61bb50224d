//! Loopback ports: finding a free one, and seeing which addresses a port is
//! listened on (to prove a server is reachable from this machine only).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before this returns, so another process can take it
/// in between: the starters in this crate retry with a new port when the
/// server they start reports the port as taken.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Whether `port` can be bound on 127.0.0.1 right now.
pub(crate) fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Every local address on which some process of this network namespace
/// listens for TCP connections on `port`, read from `/proc/net/tcp` and
/// `/proc/net/tcp6`.
///
/// A server bound to loopback only yields `[127.0.0.1:port]`; one bound to
/// every interface yields `0.0.0.0:port` or `[::]:port`.
pub fn listening_addresses(port: u16) -> Result<Vec<SocketAddr>> {
    let mut found = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            // No IPv6 in this kernel or namespace: nothing listens there.
            Err(err) if v6 && err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("reading {file}")),
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // fields: sl, local_address, rem_address, st, ...; st 0A is LISTEN.
            let (Some(local), Some("0A")) = (fields.get(1), fields.get(3).copied()) else {
                continue;
            };
            let addr = parse_proc_address(local, v6)
                .with_context(|| format!("parsing {local:?} in {file}"))?;
            if addr.port() == port {
                found.push(addr);
            }
        }
    }
    Ok(found)
}

/// Parses `0100007F:1F90` (IPv4) or a 32-digit IPv6 form: the address is
/// printed as 32-bit words in host byte order, the port as plain hex.
fn parse_proc_address(text: &str, v6: bool) -> Result<SocketAddr> {
    let (ip_hex, port_hex) = text.split_once(':').context("no ':' in address")?;
    let port = u16::from_str_radix(port_hex, 16)?;
    let mut bytes = Vec::with_capacity(16);
    for chunk in ip_hex.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(chunk)?, 16)?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match (v6, bytes.len()) {
        (false, 4) => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        (true, 16) => {
            let octets: [u8; 16] = bytes.try_into().expect("length checked above");
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => anyhow::bail!("unexpected address length"),
    };
    Ok(SocketAddr::new(ip, port))
}

/// `GET path` over HTTP/1.1; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .context("no answer within 5 s")??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_proc_net_addresses() {
        let v4 = parse_proc_address("0100007F:11D7", false).unwrap();
        assert_eq!(v4, "127.0.0.1:4567".parse().unwrap());
        let any = parse_proc_address("00000000:0050", false).unwrap();
        assert_eq!(any, "0.0.0.0:80".parse().unwrap());
        let v6 = parse_proc_address("00000000000000000000000001000000:1F90", true).unwrap();
        assert_eq!(v6, "[::1]:8080".parse().unwrap());
    }

    #[test]
    fn sees_its_own_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let addrs = listening_addresses(port).unwrap();
        assert_eq!(addrs, vec![listener.local_addr().unwrap()]);
    }
}
