//! The HTTP plumbing the test-only Kinesis endpoints share
//! ([`crate::KinesisFaults`], [`crate::InstantKinesis`]): a server loop on
//! a listener, a request relayed to kinesalite, a plain answer.
//!
//! Every socket here sets `TCP_NODELAY`: a request or answer goes out in
//! more than one write, and with Nagle's algorithm the second waits for the
//! ACK of the first, which the other end delays by up to 40 ms (a latency
//! tail the benchmarks would blame on the client).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Serves HTTP/1.1 on `listener` until the returned handle is aborted:
/// every request is answered by `handle(state, request)`; an error closes
/// the connection without an answer.
pub(crate) fn serve<S, F, Fut, E>(listener: TcpListener, state: Arc<S>, handle: F) -> AbortHandle
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Full<Bytes>>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // No Nagle delay on answers (see `forward`).
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| handle(state.clone(), request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
    .abort_handle()
}

/// True when the request's headers name the Kinesis PutRecords operation.
pub(crate) fn is_put_records(headers: &HeaderMap) -> bool {
    headers
        .get("x-amz-target")
        .is_some_and(|t| t.as_bytes().ends_with(b".PutRecords"))
}

/// Sends `request` to `upstream` (kinesalite) on a connection of its own
/// and returns the whole answer.
pub(crate) async fn forward(
    upstream: SocketAddr,
    request: Request<Full<Bytes>>,
) -> Result<Response<Full<Bytes>>> {
    let stream = TcpStream::connect(upstream)
        .await
        .context("connecting to kinesalite")?;
    // A request goes in more than one write: with Nagle's algorithm the
    // second waits for the ACK of the first, which the other end delays by
    // 40 ms.
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// An answer of `status` with `text` as its body.
pub(crate) fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response
}
