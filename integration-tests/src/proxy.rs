//! A test-only TCP proxy that can stall the traffic it forwards, for the
//! faults no emulator produces: a Kinesis endpoint that stops answering.
//!
//! [`FaultProxy`] listens on a free 127.0.0.1 port and forwards every
//! connection to an upstream address (kinesalite) with tokio's
//! `copy_bidirectional`. [`FaultProxy::pause`] stops forwarding: the copy of
//! every open connection is no longer polled, so neither side's bytes are
//! read, and new connections are accepted but not connected upstream. To the
//! client this looks like a black-holed or stalled endpoint: requests are
//! sent (until the socket buffers fill) and no answer comes, so every call
//! hangs until [`FaultProxy::resume`] or the client's own timeout. Nothing is
//! dropped or reordered: held bytes flow on after `resume`, including the
//! requests of clients that timed out meanwhile (like a network that
//! delivers late: such a request may still be carried out, a duplicate).
//! Each connection's own copy buffers (8 KiB per direction) and the kernel's
//! socket buffers hold what was in flight at the pause.
//!
//! [`FaultProxy::start_with_latency`] also delays every byte from the
//! upstream by a fixed time (a delay line: each chunk is written that long
//! after it was read, so a long answer is not delayed once per chunk): a
//! distant endpoint, one added round trip per request.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, copy_bidirectional};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

/// A TCP proxy on 127.0.0.1 in front of `upstream` that can be paused.
///
/// Dropping it stops the proxy and closes every connection it holds.
pub struct FaultProxy {
    addr: SocketAddr,
    paused: watch::Sender<bool>,
    accept_loop: AbortHandle,
}

impl FaultProxy {
    /// Starts forwarding from a free 127.0.0.1 port to `upstream`. Must be
    /// called inside a tokio runtime, which runs the proxy's tasks.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        Self::start_with_latency(upstream, Duration::ZERO).await
    }

    /// [`FaultProxy::start`], with every answer from `upstream` delayed by
    /// `latency` (zero: none).
    pub async fn start_with_latency(upstream: SocketAddr, latency: Duration) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the fault proxy to 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (paused, gate) = watch::channel(false);
        let accept_loop =
            tokio::spawn(accept_loop(listener, upstream, gate, latency)).abort_handle();
        Ok(FaultProxy {
            addr,
            paused,
            accept_loop,
        })
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint URL to give a client instead of the upstream's, e.g.
    /// `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops forwarding: open and new connections are held without reading
    /// from either side until [`FaultProxy::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Forwards again, starting with whatever was held.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The connection tasks live in the accept loop's JoinSet: aborting
        // the loop drops the set, which aborts them and closes their sockets.
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    gate: watch::Receiver<bool>,
    latency: Duration,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // A failed accept (e.g. out of file descriptors) drops that
                // one connection; the client sees it closed, as it would a
                // real endpoint's reset.
                if let Ok((client, _)) = accepted {
                    connections.spawn(forward(client, upstream, gate.clone(), latency));
                }
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Forwards one connection, polling the copy only while not paused.
async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut gate: watch::Receiver<bool>,
    latency: Duration,
) -> io::Result<()> {
    wait_running(&mut gate).await?;
    let mut server = TcpStream::connect(upstream).await?;
    // Each chunk goes on as it came: with Nagle's algorithm a request's
    // second segment waits for the ACK of its first, which the other end
    // delays by 40 ms (the proxy would add a latency tail of its own).
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let copy = async {
        if latency.is_zero() {
            return copy_bidirectional(&mut client, &mut server).await.map(drop);
        }
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, server_write) = server.split();
        let up = async {
            tokio::io::copy(&mut client_read, &mut { server_write }).await?;
            Ok::<_, io::Error>(())
        };
        tokio::try_join!(up, delay_line(&mut server_read, &mut client_write, latency)).map(drop)
    };
    tokio::pin!(copy);
    loop {
        let proxy_gone = tokio::select! {
            result = &mut copy => return result,
            // Paused: stop polling the copy (it keeps what it has buffered
            // and reads nothing more) until resumed.
            gone = async { gate.wait_for(|paused| *paused).await.is_err() } => gone,
        };
        if proxy_gone {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        wait_running(&mut gate).await?;
    }
}

/// Copies `from` to `to`, writing each chunk `delay` after it was read.
async fn delay_line<R, W>(from: &mut R, to: &mut W, delay: Duration) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        loop {
            let mut buf = vec![0; 16 * 1024];
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            buf.truncate(n);
            // The writer is gone only when it failed; its error is reported.
            if chunks.send((Instant::now() + delay, buf)).is_err() {
                return Ok(());
            }
        }
    };
    let write = async {
        while let Some((at, buf)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            to.write_all(&buf).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(drop)
}

async fn wait_running(gate: &mut watch::Receiver<bool>) -> io::Result<()> {
    gate.wait_for(|paused| !*paused)
        .await
        .map(drop)
        .map_err(|_| io::ErrorKind::BrokenPipe.into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An upstream that echoes every byte back.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
        stream.write_all(message).await.unwrap();
        let mut reply = vec![0; message.len()];
        stream.read_exact(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn forwards_holds_while_paused_and_delivers_after_resume() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        assert!(proxy.endpoint().starts_with("http://127.0.0.1:"));
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut open, b"hello").await, b"hello");

        proxy.pause();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"held").await.unwrap();
        fresh.write_all(b"new").await.unwrap();
        let mut buf = [0; 4];
        let stalled = tokio::time::timeout(Duration::from_millis(300), open.read(&mut buf)).await;
        assert!(stalled.is_err(), "an open connection is held while paused");
        let stalled = tokio::time::timeout(Duration::from_millis(300), fresh.read(&mut buf)).await;
        assert!(stalled.is_err(), "a new connection is held while paused");

        proxy.resume();
        let mut held = [0; 4];
        open.read_exact(&mut held).await.unwrap();
        assert_eq!(&held, b"held");
        let mut new = [0; 3];
        fresh.read_exact(&mut new).await.unwrap();
        assert_eq!(&new, b"new");
        assert_eq!(round_trip(&mut open, b"again").await, b"again");
    }

    #[tokio::test]
    async fn latency_delays_every_answer_once() {
        let latency = Duration::from_millis(200);
        let proxy = FaultProxy::start_with_latency(echo_server().await, latency)
            .await
            .unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        for _ in 0..2 {
            let start = std::time::Instant::now();
            // A 100 KB answer comes in many chunks: delayed once, not per chunk.
            let message = vec![7u8; 100_000];
            assert_eq!(round_trip(&mut stream, &message).await, message);
            let took = start.elapsed();
            assert!(took >= latency, "{took:?}");
            assert!(took < latency * 4, "{took:?}");
        }
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut stream, b"x").await, b"x");
        drop(proxy);
        let mut buf = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the connection is closed, not held");
        assert!(matches!(read, Ok(0) | Err(_)));
    }
}
