//! TLS to the server, for both kinds of connection: the replication
//! connection (`wire`, which wraps its TCP stream after the SSLRequest)
//! and the tokio-postgres query connections ([`MakeRustlsConnect`]).
//!
//! [`client_config`] is the one place that turns the URL's TLS parameters
//! ([`TlsParams`]) into a rustls client: the CA file for the chain check,
//! a verifier that leaves out the host-name check for `verify-ca` and
//! every check for a plain `require`/`prefer` (as libpq), and the client
//! certificate. The crypto provider is aws-lc-rs, the one the AWS SDK
//! already brings. Files are read at each connect, so a rotated CA or
//! client certificate is picked up by the next reconnect.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
pub use tributary_envelope::tls::{TlsMode, TlsParams};

/// A TLS setting the connector cannot use (a file missing or unreadable):
/// a person must fix `source.url`. The text carries the cause's.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TlsSetupError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

fn setup_error(message: String) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsSetupError {
    move |e| TlsSetupError {
        message: format!("{message}: {e}"),
        source: Some(Box::new(e)),
    }
}

/// The rustls client for `params` (reads the CA and client files).
pub fn client_config(params: &TlsParams) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = match (&params.root_cert, params.verifies_chain()) {
        (Some(path), true) => {
            let text = params.root_cert_text.clone().unwrap_or_default();
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(setup_error(format!("cannot read {text}")))?;
            for cert in certs {
                let cert = cert.map_err(setup_error(format!("cannot read {text}")))?;
                roots.add(cert).map_err(|e| TlsSetupError {
                    message: format!("{text}: not a usable CA certificate: {e}"),
                    source: Some(Box::new(e)),
                })?;
            }
            if roots.is_empty() {
                return Err(TlsSetupError {
                    message: format!("{text}: no PEM certificate in the file"),
                    source: None,
                });
            }
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsSetupError {
                        message: format!("{text}: cannot build a verifier"),
                        source: Some(Box::new(e)),
                    })?;
            Some(verifier)
        }
        _ => None,
    };
    let verifier = Arc::new(Verifier {
        chain,
        check_name: params.verifies_name(),
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError {
            message: "no TLS protocol version available".into(),
            source: Some(Box::new(e)),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&params.client_cert, &params.client_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(setup_error(format!(
                    "cannot read sslcert={}",
                    cert.display()
                )))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(setup_error(format!("cannot read sslkey={}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsSetupError {
                    message: format!("sslcert/sslkey: the key does not fit the certificate: {e}"),
                    source: Some(Box::new(e)),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Checks what the mode asks for: the chain (when a CA is given), the
/// name (`verify-full`), and always the handshake signatures.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A failed handshake, with what it means for the user first.
#[derive(Debug, thiserror::Error)]
#[error("{explanation}")]
pub struct HandshakeError {
    explanation: String,
    #[source]
    source: io::Error,
}

/// Runs the TLS handshake over `stream` to `host`; a failure explained.
pub async fn handshake<S>(
    config: Arc<ClientConfig>,
    params: &TlsParams,
    host: &str,
    stream: S,
) -> io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|source| {
            let explanation = params
                .explain(&source, host)
                .unwrap_or_else(|| format!("TLS handshake failed under {}", params.mode_text));
            io::Error::new(
                source.kind(),
                HandshakeError {
                    explanation,
                    source,
                },
            )
        })
}

/// tokio-postgres' TLS hook on [`client_config`].
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<ClientConfig>,
    params: Arc<TlsParams>,
}

impl MakeRustlsConnect {
    /// The hook for `params` (reads the CA and client files).
    pub fn new(params: &TlsParams) -> Result<Self, TlsSetupError> {
        Ok(Self {
            config: client_config(params)?,
            params: Arc::new(params.clone()),
        })
    }
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            params: self.params.clone(),
            host: domain.to_owned(),
        })
    }
}

/// One connection's handshake (see [`MakeRustlsConnect`]).
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    params: Arc<TlsParams>,
    host: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            handshake(self.config, &self.params, &self.host, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
        })
    }
}

/// A query connection's TLS stream.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM works without it; the password is not sent either way.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_shutdown(cx)
    }
}
