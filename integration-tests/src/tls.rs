//! Throwaway certificates for the TLS tests: a CA and a server (leaf)
//! certificate it signs, made with the `openssl` command-line tool.
//!
//! rustls refuses a CA certificate used as the server's own (NOTES.md), so
//! the leaf is a separate `CA:FALSE` certificate with the names a test
//! connects by (`IP:127.0.0.1`, `DNS:localhost`). EC P-256 keys: quick to
//! make, and every server and rustls take them. Files are world-readable
//! (the servers run as their own OS accounts); a server that insists on a
//! private key file copies it (see `Postgres::start_with_tls`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

/// A CA and a server certificate signed by it, in a temporary directory.
pub struct TestCerts {
    dir: TempDir,
}

impl TestCerts {
    /// Makes a CA named `name` and a leaf for 127.0.0.1 / localhost.
    pub fn generate(name: &str) -> Result<Self> {
        Self::generate_for(name, "IP:127.0.0.1,DNS:localhost")
    }

    /// Makes a CA named `name` and a leaf whose subjectAltName is
    /// `alt_names` (e.g. `DNS:localhost`: a leaf that does not name
    /// 127.0.0.1, for host-name checks).
    pub fn generate_for(name: &str, alt_names: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tributary-tls-")
            .tempdir()
            .context("creating a directory for the test certificates")?;
        // Readable by the servers' OS accounts.
        set_mode(dir.path(), 0o755)?;
        let certs = TestCerts { dir };
        let p = |f: &str| certs.path(f).display().to_string();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        openssl(
            &[
                &["req", "-x509", "-nodes", "-days", "2"][..],
                &ec,
                &[
                    "-keyout",
                    &p("ca.key"),
                    "-out",
                    &p("ca.pem"),
                    "-subj",
                    &format!("/CN={name}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        )?;
        openssl(
            &[
                &["req", "-nodes"][..],
                &ec,
                &[
                    "-keyout",
                    &p("server.key"),
                    "-out",
                    &p("server.csr"),
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
        )?;
        std::fs::write(
            certs.path("leaf.ext"),
            format!(
                "basicConstraints=CA:FALSE\nsubjectAltName={alt_names}\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            ),
        )?;
        certs.sign(
            &certs.path("server.csr"),
            &certs.path("leaf.ext"),
            &certs.path("server.pem"),
        )?;
        for file in ["server.key", "ca.key"] {
            set_mode(&certs.path(file), 0o644)?;
        }
        Ok(certs)
    }

    /// Makes a client certificate for `cn` (a role name) signed by the CA;
    /// returns the certificate's and the key's paths (PEM).
    pub fn client(&self, cn: &str) -> Result<(PathBuf, PathBuf)> {
        let (cert, key, csr, ext) = (
            self.path(&format!("{cn}.pem")),
            self.path(&format!("{cn}.key")),
            self.path(&format!("{cn}.csr")),
            self.path(&format!("{cn}.ext")),
        );
        let s = |p: &Path| p.display().to_string();
        openssl(&[
            "req",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            &s(&key),
            "-out",
            &s(&csr),
            "-subj",
            &format!("/CN={cn}"),
        ])?;
        std::fs::write(
            &ext,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        )?;
        self.sign(&csr, &ext, &cert)?;
        Ok((cert, key))
    }

    /// Signs the request `csr` with the CA, with the extensions in `ext`.
    fn sign(&self, csr: &Path, ext: &Path, out: &Path) -> Result<()> {
        let s = |p: &Path| p.display().to_string();
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &s(csr),
            "-CA",
            &s(&self.ca()),
            "-CAkey",
            &s(&self.path("ca.key")),
            "-CAcreateserial",
            "-extfile",
            &s(ext),
            "-out",
            &s(out),
        ])
    }

    /// The CA's certificate (PEM): what `sslrootcert=` names.
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// The server's certificate (PEM), signed by [`TestCerts::ca`].
    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }

    /// The server's private key (PEM).
    pub fn server_key(&self) -> PathBuf {
        self.path("server.key")
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl (install it: scripts/install-deps.sh)")?;
    if !output.status.success() {
        bail!(
            "openssl {} failed ({}):\n{}",
            args.first().unwrap_or(&""),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}
