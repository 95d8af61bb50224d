//! Probing the connector's HTTP endpoints (`/healthz`, `/readyz`,
//! `/metrics`) with a plain HTTP/1.1 request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// `GET path` over HTTP/1.1; returns the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
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

/// Polls `GET path` until its status is `want`; fails after `timeout`,
/// asserting `/healthz` answers 200 on every round.
pub async fn wait_status(
    addr: SocketAddr,
    path: &str,
    want: u16,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (health, _) = get(addr, "/healthz").await?;
        assert_eq!(health, 200, "/healthz must answer throughout");
        let (status, body) = get(addr, path).await?;
        if status == want {
            return Ok(body);
        }
        if Instant::now() > deadline {
            bail!("{path} still answers {status} ({body}) after {timeout:?}, expected {want}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
