//! TLS for a listener: rustls (ring provider) with the certificate, key, client CAs and CRLs
//! of `listener.http.tls`, reloaded when the files change.
//!
//! Client certificates: `client_ca_file` (NativeLink's key) or `ca_file` with
//! `verify_client: true` (the deployment guide's keys) require one that chains to those CAs
//! and is not revoked by `client_crl_file`; `ca_file` alone verifies a certificate that a
//! client presents but lets a client without one in.
//!
//! Reload: [`ReloadingTls::watch`] reads the files every [`RELOAD_INTERVAL`] and, when their
//! bytes changed, builds a new configuration. New connections use it; open connections keep
//! the one they were accepted with, so none is dropped. A file that does not load is logged
//! and the previous configuration stays. (Polling, rather than inotify, also sees the symlink
//! swap with which Kubernetes updates a mounted Secret.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_config::servers::TlsConfig;
use cairn_core::Error;
use parking_lot::RwLock;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// How often the files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// A PEM parse error in words (the library's Debug form lists the marker's bytes).
fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a PEM section has no END line".to_string(),
        E::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_string(),
        E::Base64Decode(why) => format!("a PEM section is not valid base64 ({why})"),
        E::NoItemsFound => "no PEM section of the expected kind".to_string(),
        other => other.to_string(),
    }
}

/// One file of the TLS settings: its key path (for messages) and where it is.
#[derive(Debug, Clone)]
struct File {
    key: String,
    path: PathBuf,
}

/// The files of one listener's TLS and what they mean.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    cert: File,
    key: File,
    client_cas: Vec<File>,
    crl: Option<File>,
    require_client_cert: bool,
}

impl TlsFiles {
    /// Validates the settings at key path `at` (`servers[0].listener.http.tls`).
    pub fn from_config(cfg: &TlsConfig, at: &str) -> Result<TlsFiles, Error> {
        let file = |name: &str, path: &str| File {
            key: format!("{at}.{name}"),
            path: PathBuf::from(path),
        };
        let mut client_cas = Vec::new();
        if let Some(p) = &cfg.client_ca_file {
            client_cas.push(file("client_ca_file", p));
        }
        if let Some(p) = &cfg.ca_file {
            if cfg.client_ca_file.as_deref() != Some(p.as_str()) {
                client_cas.push(file("ca_file", p));
            }
        }
        if cfg.verify_client && client_cas.is_empty() {
            return Err(Error::invalid_argument(format!(
                "{at}.verify_client: true needs ca_file (or client_ca_file), the CAs that client certificates are checked against"
            )));
        }
        if cfg.client_crl_file.is_some() && client_cas.is_empty() {
            return Err(Error::invalid_argument(format!(
                "{at}.client_crl_file: revocation lists need client_ca_file (or ca_file), the CAs that client certificates are checked against"
            )));
        }
        Ok(TlsFiles {
            cert: file("cert_file", &cfg.cert_file),
            key: file("key_file", &cfg.key_file),
            require_client_cert: cfg.verify_client || cfg.client_ca_file.is_some(),
            client_cas,
            crl: cfg
                .client_crl_file
                .as_deref()
                .map(|p| file("client_crl_file", p)),
        })
    }

    fn all(&self) -> impl Iterator<Item = &File> {
        [&self.cert, &self.key]
            .into_iter()
            .chain(self.client_cas.iter())
            .chain(self.crl.iter())
    }

    /// The bytes of every file, in [`TlsFiles::all`] order.
    fn read(&self) -> Result<Vec<Vec<u8>>, Error> {
        self.all()
            .map(|f| {
                std::fs::read(&f.path).map_err(|e| {
                    Error::invalid_argument(format!("{}: reading {}: {e}", f.key, f.path.display()))
                })
            })
            .collect()
    }

    /// Whether client certificates are required.
    pub fn requires_client_cert(&self) -> bool {
        self.require_client_cert
    }

    /// Builds the rustls configuration from the files' `bytes` (as [`TlsFiles::read`] gives).
    fn build(&self, bytes: &[Vec<u8>]) -> Result<rustls::ServerConfig, Error> {
        let bad = |f: &File, what: String| {
            Error::invalid_argument(format!("{}: {}: {what}", f.key, f.path.display()))
        };
        let mut bytes = bytes.iter();
        let mut next = || bytes.next().map(|b| b.as_slice()).unwrap_or_default();

        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(next())
            .collect::<Result<_, _>>()
            .map_err(|e| {
                bad(
                    &self.cert,
                    format!("not a PEM certificate chain: {}", pem_error(e)),
                )
            })?;
        if certs.is_empty() {
            return Err(bad(&self.cert, "holds no PEM certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(next()).map_err(|e| {
            bad(
                &self.key,
                format!("holds no PEM private key: {}", pem_error(e)),
            )
        })?;

        // ring, as the issue and STYLE.md ask (aws-lc-rs would need cmake and a C build);
        // rustls deprecates ring's provider only because it lacks post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::internal(format!("TLS protocol versions: {e}")))?;
        let builder = if self.client_cas.is_empty() {
            builder.with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            for ca in &self.client_cas {
                let mut any = false;
                for cert in CertificateDer::pem_slice_iter(next()) {
                    let cert = cert
                        .map_err(|e| bad(ca, format!("not a PEM certificate: {}", pem_error(e))))?;
                    roots
                        .add(cert)
                        .map_err(|e| bad(ca, format!("not a usable CA certificate ({e})")))?;
                    any = true;
                }
                if !any {
                    return Err(bad(ca, "holds no PEM certificate".into()));
                }
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if let Some(crl) = &self.crl {
                let crls: Vec<CertificateRevocationListDer<'static>> =
                    CertificateRevocationListDer::pem_slice_iter(next())
                        .collect::<Result<_, _>>()
                        .map_err(|e| {
                            bad(crl, format!("not a PEM revocation list: {}", pem_error(e)))
                        })?;
                if crls.is_empty() {
                    return Err(bad(crl, "holds no PEM X509 CRL".into()));
                }
                verifier = verifier.with_crls(crls);
            }
            if !self.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| bad(&self.client_cas[0], format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad(&self.key, format!("does not fit cert_file: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The files' bytes last taken, and the last ones that failed to load (so that a broken file
/// is logged once, not every second).
type Seen = (Vec<Vec<u8>>, Option<Vec<Vec<u8>>>);

/// The TLS configuration a listener accepts connections with, replaced when its files change.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// The bytes `current` was built from, and those of the last failed attempt.
    seen: parking_lot::Mutex<Seen>,
    reloads: std::sync::atomic::AtomicU64,
}

impl ReloadingTls {
    /// Loads the files; any problem is an error naming the key path.
    pub fn load(files: TlsFiles) -> Result<ReloadingTls, Error> {
        let bytes = files.read()?;
        let config = files.build(&bytes)?;
        Ok(ReloadingTls {
            files,
            current: RwLock::new(Arc::new(config)),
            seen: parking_lot::Mutex::new((bytes, None)),
            reloads: Default::default(),
        })
    }

    /// The configuration for a connection accepted now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }

    /// How many times new files were taken since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn requires_client_cert(&self) -> bool {
        self.files.requires_client_cert()
    }

    /// Checks the files once: takes them when they changed and load, logs when they do not.
    pub fn check(&self, server: &str) {
        let bytes = match self.files.read() {
            Ok(b) => b,
            Err(e) => {
                // A file mid-rewrite can be briefly missing; the next check looks again.
                tracing::debug!(server, error = %e, "TLS files not readable; keeping the current certificate");
                return;
            }
        };
        {
            let seen = self.seen.lock();
            if seen.0 == bytes || seen.1.as_ref() == Some(&bytes) {
                return;
            }
        }
        match self.files.build(&bytes) {
            Ok(config) => {
                *self.current.write() = Arc::new(config);
                self.seen.lock().0 = bytes;
                self.reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    server,
                    "TLS certificate files changed: new connections use them"
                );
            }
            Err(e) => {
                self.seen.lock().1 = Some(bytes);
                tracing::warn!(server, error = %e, "TLS certificate files changed but do not load; keeping the current certificate");
            }
        }
    }

    /// Checks the files every [`RELOAD_INTERVAL`] until `shutdown`.
    pub fn watch(self: Arc<Self>, server: String, shutdown: CancellationToken) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
                    _ = shutdown.cancelled() => return,
                }
                let this = self.clone();
                let server = server.clone();
                // File reads and key parsing off the reactor.
                let _ = tokio::task::spawn_blocking(move || this.check(&server)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &std::path::Path, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }

    fn cfg(cert: &str, key: &str) -> TlsConfig {
        TlsConfig {
            cert_file: cert.into(),
            key_file: key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_files_are_errors_naming_the_key_path() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "a");
        let at = "servers[0].listener.http.tls";
        let missing = dir.path().join("nope").display().to_string();
        let e = ReloadingTls::load(TlsFiles::from_config(&cfg(&missing, &k), at).unwrap())
            .err()
            .unwrap();
        assert!(
            e.message.starts_with(&format!("{at}.cert_file: reading")),
            "{e}"
        );
        let e = ReloadingTls::load(TlsFiles::from_config(&cfg(&c, &c), at).unwrap())
            .err()
            .unwrap();
        assert!(e.message.starts_with(&format!("{at}.key_file")), "{e}");
        let e = ReloadingTls::load(TlsFiles::from_config(&cfg(&k, &k), at).unwrap())
            .err()
            .unwrap();
        assert!(e.message.contains("holds no PEM certificate"), "{e}");
        // A key that is not the certificate's.
        let (_, other_key) = write_pair(dir.path(), "b");
        let e = ReloadingTls::load(TlsFiles::from_config(&cfg(&c, &other_key), at).unwrap())
            .err()
            .unwrap();
        assert!(e.message.contains("does not fit cert_file"), "{e}");
        let mut v = cfg(&c, &k);
        v.verify_client = true;
        let e = TlsFiles::from_config(&v, at).unwrap_err();
        assert!(e.message.starts_with(&format!("{at}.verify_client")), "{e}");
        let mut v = cfg(&c, &k);
        v.client_crl_file = Some(c.clone());
        let e = TlsFiles::from_config(&v, at).unwrap_err();
        assert!(
            e.message.starts_with(&format!("{at}.client_crl_file")),
            "{e}"
        );
    }

    #[test]
    fn changed_files_are_taken_and_broken_ones_keep_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "a");
        let tls = ReloadingTls::load(TlsFiles::from_config(&cfg(&c, &k), "t").unwrap()).unwrap();
        let before = tls.current.read().clone();
        tls.check("s");
        assert_eq!(tls.reloads(), 0, "unchanged files are not reloaded");
        std::fs::write(&c, "garbage").unwrap();
        tls.check("s");
        assert_eq!(tls.reloads(), 0);
        assert!(Arc::ptr_eq(&before, &tls.current.read()));
        write_pair(dir.path(), "a");
        tls.check("s");
        assert_eq!(tls.reloads(), 1);
        assert!(!Arc::ptr_eq(&before, &tls.current.read()));
    }
}
