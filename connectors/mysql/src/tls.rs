//! Connections to the server, over TLS as `source.url` says: the binlog
//! connection and every query connection open through
//! [`ConnectOpts::connect`], bounded by [`CONNECT_TIMEOUT`].
//!
//! The URL's TLS parameters (both spellings, see
//! `tributary_envelope::tls`) become mysql_async `SslOpts` on its rustls
//! stack (aws-lc-rs, the AWS SDK's provider): only the CA file is trusted
//! (no built-in roots), `verify-ca` leaves out the host-name check,
//! `require` without a CA and `prefer` check nothing, and `prefer` falls
//! back to plain TCP when the server has no TLS. A failed handshake is
//! explained in the user's words (which parameter, what failed).

use mysql_async::{ClientIdentity, Conn, Opts, OptsBuilder, SslOpts};
use tributary_envelope::tls::{TlsMode, TlsParams};

/// How long opening a connection (TCP, TLS, authentication) may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A parsed `source.url`: the driver's options (through `Deref`) with the
/// TLS parameters they were built from.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    /// mysql_async's options, `SslOpts` included.
    pub opts: Opts,
    /// `sslmode`/`ssl-mode`, the CA and client files.
    pub tls: TlsParams,
}

impl std::ops::Deref for ConnectOpts {
    type Target = Opts;

    fn deref(&self) -> &Opts {
        &self.opts
    }
}

/// A TLS failure, explained, with the driver's error as the cause.
#[derive(Debug, thiserror::Error)]
#[error("{explanation}")]
struct TlsFailure {
    explanation: String,
    #[source]
    source: mysql_async::Error,
}

impl ConnectOpts {
    /// `opts` with the `SslOpts` that `tls` asks for.
    pub fn new(opts: Opts, tls: TlsParams) -> Self {
        let ssl = ssl_opts(&tls);
        let opts = OptsBuilder::from_opts(opts).ssl_opts(ssl).into();
        Self { opts, tls }
    }

    /// Opens a connection, the whole handshake bounded by
    /// [`CONNECT_TIMEOUT`] (a peer that accepts and then says nothing
    /// fails it). TLS failures come back as `Error::Other` whose text says
    /// what failed and which URL parameter to change.
    pub async fn connect(&self) -> Result<Conn, mysql_async::Error> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(mysql_async::Error::Io(mysql_async::IoError::Io(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {CONNECT_TIMEOUT:?} (connect timeout)"),
                ),
            ))),
        }
    }

    async fn connect_unbounded(&self) -> Result<Conn, mysql_async::Error> {
        match Conn::new(self.opts.clone()).await {
            Err(mysql_async::Error::Driver(
                mysql_async::DriverError::NoClientSslFlagFromServer,
            )) if self.tls.mode == TlsMode::Prefer => {
                let plain = OptsBuilder::from_opts(self.opts.clone()).ssl_opts(None::<SslOpts>);
                Conn::new(plain).await
            }
            Err(err) => Err(self.explain(err)),
            ok => ok,
        }
    }

    fn explain(&self, err: mysql_async::Error) -> mysql_async::Error {
        let explanation = match &err {
            mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer) => {
                Some(self.tls.refused_message())
            }
            _ => self.tls.explain(&err, self.opts.ip_or_hostname()),
        };
        match explanation {
            Some(explanation) => mysql_async::Error::Other(Box::new(TlsFailure {
                explanation,
                source: err,
            })),
            None => err,
        }
    }
}

fn ssl_opts(tls: &TlsParams) -> Option<SslOpts> {
    if tls.mode == TlsMode::Disable {
        return None;
    }
    let mut ssl = SslOpts::default().with_disable_built_in_roots(true);
    if tls.verifies_chain() {
        if let Some(ca) = &tls.root_cert {
            ssl = ssl.with_root_certs(vec![ca.clone().into()]);
        }
        ssl = ssl.with_danger_skip_domain_validation(!tls.verifies_name());
    } else {
        ssl = ssl.with_danger_accept_invalid_certs(true);
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        ssl = ssl.with_client_identity(Some(ClientIdentity::new(
            cert.clone().into(),
            key.clone().into(),
        )));
    }
    Some(ssl)
}

#[cfg(test)]
mod tests {
    use tributary_envelope::tls::Spelling;

    use super::*;

    fn opts(url: &str) -> ConnectOpts {
        let (rest, tls) =
            TlsParams::take_from_url(url, Spelling::LibpqOrMysql, TlsMode::Disable).unwrap();
        ConnectOpts::new(Opts::from_url(&rest).unwrap(), tls)
    }

    #[test]
    fn modes_become_ssl_opts() {
        assert!(opts("mysql://u@h/db").ssl_opts().is_none());
        let full = opts("mysql://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem");
        let ssl = full.ssl_opts().unwrap();
        assert!(!ssl.skip_domain_validation() && !ssl.accept_invalid_certs());
        assert!(ssl.disable_built_in_roots());
        assert_eq!(ssl.root_certs().len(), 1);
        let ca = opts("mysql://u@h/db?ssl-mode=VERIFY_CA&ssl-ca=/ca.pem");
        assert!(ca.ssl_opts().unwrap().skip_domain_validation());
        let required = opts("mysql://u@h/db?ssl-mode=REQUIRED");
        assert!(required.ssl_opts().unwrap().accept_invalid_certs());
    }
}
