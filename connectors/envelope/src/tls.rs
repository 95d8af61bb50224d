//! TLS settings of a source connection, as users write them in
//! `source.url`, and the words for a failed handshake.
//!
//! Both sources take libpq's spelling (`sslmode=disable|prefer|require|
//! verify-ca|verify-full`, `sslrootcert=`, `sslcert=`, `sslkey=`); the
//! MySQL source also takes the MySQL client's (`ssl-mode=DISABLED|PREFERRED|
//! REQUIRED|VERIFY_CA|VERIFY_IDENTITY`, `ssl-ca=`, `ssl-cert=`, `ssl-key=`).
//! The parameters are taken off the URL here (pure: no file is read) so
//! each source hands its driver a URL without them and builds its TLS
//! client from [`TlsParams`]. What each mode checks, as libpq does:
//! `require` encrypts and checks nothing (unless `sslrootcert` is given: it
//! then checks the chain, like `verify-ca`), `verify-ca` checks that the
//! server's certificate chains to the CA in `sslrootcert`, `verify-full`
//! also that it names the host of the URL; `prefer` uses TLS when the
//! server offers it, unchecked, and plain TCP otherwise.

use std::error::Error;
use std::path::PathBuf;

/// How a connection uses TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it (unchecked), else plain TCP.
    Prefer,
    /// TLS or no connection; the certificate is not checked unless a CA
    /// file is given.
    Require,
    /// TLS with the server's certificate chained to the given CA.
    VerifyCa,
    /// [`TlsMode::VerifyCa`], and the certificate names the host.
    VerifyFull,
}

/// The TLS parameters of a URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsParams {
    /// The mode.
    pub mode: TlsMode,
    /// `sslrootcert` / `ssl-ca`: PEM file of the CA(s) to trust.
    pub root_cert: Option<PathBuf>,
    /// `sslcert` / `ssl-cert`: PEM client certificate (chain).
    pub client_cert: Option<PathBuf>,
    /// `sslkey` / `ssl-key`: PEM private key of the client certificate.
    pub client_key: Option<PathBuf>,
    /// The parameter that set the mode as the user wrote it
    /// (`sslmode=verify-full`), for messages.
    pub mode_text: String,
    /// The CA parameter as the user wrote it (`sslrootcert=/etc/ca.pem`).
    pub root_cert_text: Option<String>,
}

/// Which spellings a source accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spelling {
    /// libpq's only (`sslmode`, `sslrootcert`, ...).
    Libpq,
    /// libpq's and the MySQL client's (`ssl-mode`, `ssl-ca`, ...).
    LibpqOrMysql,
}

impl TlsParams {
    /// Takes the TLS parameters off `url`: returns the URL without them
    /// and the parameters (`default` mode when none is given). The error
    /// says what is wrong, for the key `source.url`.
    pub fn take_from_url(
        url: &str,
        spelling: Spelling,
        default: TlsMode,
    ) -> Result<(String, TlsParams), String> {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut kept = Vec::new();
        let mut mode: Option<(TlsMode, String)> = None;
        let mut params = TlsParams {
            mode: default,
            root_cert: None,
            client_cert: None,
            client_key: None,
            mode_text: String::new(),
            root_cert_text: None,
        };
        let mysql = spelling == Spelling::LibpqOrMysql;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            let path = || Some(PathBuf::from(&value));
            match key {
                "sslmode" => mode = Some((libpq_mode(&value)?, format!("sslmode={value}"))),
                "ssl-mode" if mysql => {
                    mode = Some((mysql_mode(&value)?, format!("ssl-mode={value}")));
                }
                "sslrootcert" => {
                    params.root_cert = path();
                    params.root_cert_text = Some(format!("sslrootcert={value}"));
                }
                "ssl-ca" if mysql => {
                    params.root_cert = path();
                    params.root_cert_text = Some(format!("ssl-ca={value}"));
                }
                "sslcert" => params.client_cert = path(),
                "ssl-cert" if mysql => params.client_cert = path(),
                "sslkey" => params.client_key = path(),
                "ssl-key" if mysql => params.client_key = path(),
                _ => kept.push(pair),
            }
        }
        if let Some((mode, text)) = mode {
            params.mode = mode;
            params.mode_text = text;
        } else {
            params.mode_text = match (default, spelling) {
                (TlsMode::Disable, Spelling::LibpqOrMysql) => "ssl-mode=DISABLED (the default)",
                (_, _) => "sslmode=prefer (the default)",
            }
            .into();
        }
        params.check()?;
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((url, params))
    }

    fn check(&self) -> Result<(), String> {
        let verify = matches!(self.mode, TlsMode::VerifyCa | TlsMode::VerifyFull);
        if verify && self.root_cert.is_none() {
            return Err(format!(
                "{} checks the server's certificate against a CA: add sslrootcert=PATH \
                 (the CA's PEM file) to the URL",
                self.mode_text
            ));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(
                "a client certificate needs both sslcert=PATH and sslkey=PATH in the URL".into(),
            );
        }
        Ok(())
    }

    /// True when the server's certificate must chain to the CA file.
    pub fn verifies_chain(&self) -> bool {
        match self.mode {
            TlsMode::VerifyCa | TlsMode::VerifyFull => true,
            // libpq: `require` with a CA file behaves as `verify-ca`.
            TlsMode::Require => self.root_cert.is_some(),
            TlsMode::Disable | TlsMode::Prefer => false,
        }
    }

    /// True when the server's certificate must name the host.
    pub fn verifies_name(&self) -> bool {
        self.mode == TlsMode::VerifyFull
    }

    /// The message for a server that refused TLS when the mode asks for it.
    pub fn refused_message(&self) -> String {
        format!(
            "the server does not accept TLS connections, and {} asks for TLS: enable TLS on \
             the server, or use sslmode=prefer or disable",
            self.mode_text
        )
    }

    /// What a failed TLS handshake means, when `err` or one of its causes
    /// is a rustls error; `host` is the host of the URL.
    pub fn explain(&self, err: &(dyn Error + 'static), host: &str) -> Option<String> {
        let tls = find_rustls_error(err)?;
        let ca = self
            .root_cert_text
            .clone()
            .unwrap_or_else(|| "sslrootcert".into());
        use rustls::{AlertDescription, CertificateError, Error as E};
        Some(match tls {
            E::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "the server's certificate is not signed by the CA in {ca} ({}): give the CA \
                 that signed the server's certificate",
                self.mode_text
            ),
            E::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "the server's certificate does not name the host {host} ({} checks the \
                 name): connect by a name or address the certificate lists, or use \
                 sslmode=verify-ca to check the chain only",
                self.mode_text
            ),
            E::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => "the server's certificate has expired".into(),
            E::InvalidCertificate(other) => format!(
                "the server's certificate was refused ({other:?}) under {}",
                self.mode_text
            ),
            E::AlertReceived(
                AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::UnknownCA,
            ) => format!(
                "the server refused the TLS handshake ({tls}): it wants a client certificate \
                 it trusts (sslcert=PATH and sslkey=PATH)"
            ),
            other => format!("TLS handshake failed under {}: {other}", self.mode_text),
        })
    }
}

/// The rustls error in `err`'s chain, also inside an `io::Error` (whose
/// `source()` skips the error it wraps).
fn find_rustls_error<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| find_rustls_error(inner))
        {
            return Some(inner);
        }
        next = e.source();
    }
    None
}

fn libpq_mode(value: &str) -> Result<TlsMode, String> {
    Ok(match value {
        "disable" => TlsMode::Disable,
        "prefer" => TlsMode::Prefer,
        "require" => TlsMode::Require,
        "verify-ca" => TlsMode::VerifyCa,
        "verify-full" => TlsMode::VerifyFull,
        other => {
            return Err(format!(
                "sslmode={other} is not known: use disable, prefer, require, verify-ca or \
                 verify-full"
            ));
        }
    })
}

fn mysql_mode(value: &str) -> Result<TlsMode, String> {
    Ok(match value.to_ascii_uppercase().as_str() {
        "DISABLED" => TlsMode::Disable,
        "PREFERRED" => TlsMode::Prefer,
        "REQUIRED" => TlsMode::Require,
        "VERIFY_CA" => TlsMode::VerifyCa,
        "VERIFY_IDENTITY" => TlsMode::VerifyFull,
        _ => {
            return Err(format!(
                "ssl-mode={value} is not known: use DISABLED, PREFERRED, REQUIRED, VERIFY_CA \
                 or VERIFY_IDENTITY"
            ));
        }
    })
}

/// Decodes `%XX` escapes (a path with spaces or `&`); anything else as is.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(url: &str, spelling: Spelling) -> Result<(String, TlsParams), String> {
        TlsParams::take_from_url(url, spelling, TlsMode::Prefer)
    }

    #[test]
    fn libpq_parameters_are_taken_off_the_url() {
        let (url, p) = take(
            "postgres://u@h/db?connect_timeout=3&sslmode=verify-full&sslrootcert=/etc/ca%20x.pem&sslcert=/c&sslkey=/k",
            Spelling::Libpq,
        )
        .unwrap();
        assert_eq!(url, "postgres://u@h/db?connect_timeout=3");
        assert_eq!(p.mode, TlsMode::VerifyFull);
        assert_eq!(p.root_cert, Some(PathBuf::from("/etc/ca x.pem")));
        assert_eq!(p.client_cert, Some(PathBuf::from("/c")));
        assert!(p.verifies_chain() && p.verifies_name());
        let (url, p) = take("postgres://u@h/db", Spelling::Libpq).unwrap();
        assert_eq!(
            (url.as_str(), p.mode),
            ("postgres://u@h/db", TlsMode::Prefer)
        );
        assert!(!p.verifies_chain());
        let (_, p) = take(
            "postgres://u@h/db?sslmode=require&sslrootcert=/ca",
            Spelling::Libpq,
        )
        .unwrap();
        assert!(
            p.verifies_chain() && !p.verifies_name(),
            "libpq: require + CA = verify-ca"
        );
    }

    #[test]
    fn mysql_spelling_is_accepted_where_asked_for() {
        let (url, p) = take(
            "mysql://u@h/db?ssl-mode=verify_identity&ssl-ca=/ca.pem",
            Spelling::LibpqOrMysql,
        )
        .unwrap();
        assert_eq!(url, "mysql://u@h/db");
        assert_eq!(p.mode, TlsMode::VerifyFull);
        assert_eq!(p.root_cert_text.as_deref(), Some("ssl-ca=/ca.pem"));
        let (url, p) = take("postgres://u@h/db?ssl-mode=REQUIRED", Spelling::Libpq).unwrap();
        assert_eq!(
            url, "postgres://u@h/db?ssl-mode=REQUIRED",
            "left for the driver"
        );
        assert_eq!(p.mode, TlsMode::Prefer);
    }

    #[test]
    fn incomplete_settings_are_refused_with_the_fix() {
        let err = take("postgres://u@h/db?sslmode=verify-ca", Spelling::Libpq).unwrap_err();
        assert!(err.contains("sslrootcert=PATH"), "{err}");
        let err = take("postgres://u@h/db?sslmode=allow", Spelling::Libpq).unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
        let err = take("mysql://u@h?ssl-mode=on", Spelling::LibpqOrMysql).unwrap_err();
        assert!(err.contains("VERIFY_IDENTITY"), "{err}");
        let err = take(
            "postgres://u@h/db?sslmode=require&sslcert=/c",
            Spelling::Libpq,
        )
        .unwrap_err();
        assert!(err.contains("sslkey"), "{err}");
    }

    #[test]
    fn handshake_failures_are_explained() {
        let (_, p) = take(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem",
            Spelling::Libpq,
        )
        .unwrap();
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let text = p.explain(&io, "h").unwrap();
        assert!(
            text.contains("not signed by the CA in sslrootcert=/ca.pem"),
            "{text}"
        );
        let name = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        assert!(
            p.explain(&name, "db.example")
                .unwrap()
                .contains("db.example")
        );
        assert!(p.explain(&std::io::Error::other("x"), "h").is_none());
    }
}
