//! Outbound gRPC endpoints: `grpc://` (plaintext h2c) and `grpcs://` (TLS) addresses with
//! NativeLink's client `tls_config`, for the `grpc` store and workers' scheduler connections.
//!
//! The files are read when the endpoint is built; an unreadable or malformed file is an error
//! naming its key path. A [`Pool`] of channels reads them again when they change (checked at
//! most every [`TLS_RECHECK`]): new connections use the new files, open ones carry on. A
//! `grpcs://` address without `tls_config` trusts the operating system's CAs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cairn_config::servers::ClientTlsConfig;
use cairn_core::Error;
use tonic::transport::{Certificate, Channel, Endpoint, Identity};

/// A status from a call to another server, with CANCELLED read as UNAVAILABLE: our own side
/// never cancels a call it still awaits (a caller that gives up drops the future), so a
/// CANCELLED status means the connection ended under the call (the server died or reset it),
/// which is worth a retry and is reported as the server being unavailable.
pub fn connection_status(s: tonic::Status) -> tonic::Status {
    if s.code() == tonic::Code::Cancelled {
        tonic::Status::unavailable(format!("{} (the connection ended)", s.message()))
    } else {
        s
    }
}

/// How often a [`Pool`] looks at its TLS files.
pub const TLS_RECHECK: Duration = Duration::from_secs(5);

/// The TLS files of some `tls_config`s, to watch for changes.
pub fn tls_files<'a>(
    configs: impl IntoIterator<Item = Option<&'a ClientTlsConfig>>,
) -> Vec<PathBuf> {
    configs
        .into_iter()
        .flatten()
        .flat_map(|t| [&t.ca_file, &t.cert_file, &t.key_file])
        .flatten()
        .map(PathBuf::from)
        .collect()
}

type Build = dyn Fn() -> Result<Vec<Channel>, Error> + Send + Sync;

/// Lazy channels, picked round-robin, built again (TLS files read again) when a watched file
/// changes. A rebuild that fails (a half-written or wrong file) is logged and the channels in
/// use stay. Clones share the pool.
#[derive(Clone)]
pub struct Pool(Arc<PoolInner>);

struct PoolInner {
    /// Key path, for the log.
    at: String,
    build: Box<Build>,
    files: Vec<PathBuf>,
    next: AtomicUsize,
    state: parking_lot::Mutex<PoolState>,
}

struct PoolState {
    channels: Arc<[Channel]>,
    /// Modification time and length of each file when last looked at.
    stamps: Vec<Option<(SystemTime, u64)>>,
    checked: Instant,
}

fn stamps(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

impl Pool {
    /// Builds the channels now (an error is the caller's, naming its key) and keeps `build`
    /// to build them again when one of `files` changes.
    pub fn new(
        at: &str,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<Vec<Channel>, Error> + Send + Sync + 'static,
    ) -> Result<Pool, Error> {
        let stamped = stamps(&files);
        let channels = build()?;
        if channels.is_empty() {
            return Err(Error::invalid_argument(format!("{at}: no endpoints")));
        }
        Ok(Pool(Arc::new(PoolInner {
            at: at.to_string(),
            build: Box::new(build),
            files,
            next: AtomicUsize::new(0),
            state: parking_lot::Mutex::new(PoolState {
                channels: channels.into(),
                stamps: stamped,
                checked: Instant::now(),
            }),
        })))
    }

    /// The next channel.
    pub fn pick(&self) -> Channel {
        let channels = self.current();
        let i = self.0.next.fetch_add(1, Ordering::Relaxed) % channels.len();
        channels[i].clone()
    }

    /// The channels now in use, rebuilt first if a file changed since the last look.
    pub fn current(&self) -> Arc<[Channel]> {
        let p = &self.0;
        let mut st = p.state.lock();
        if p.files.is_empty() || st.checked.elapsed() < TLS_RECHECK {
            return st.channels.clone();
        }
        st.checked = Instant::now();
        let now = stamps(&p.files);
        if now == st.stamps {
            return st.channels.clone();
        }
        // Whatever comes of it, these stamps are seen: a bad file is reported once.
        st.stamps = now;
        match (p.build)() {
            Ok(channels) if !channels.is_empty() => {
                tracing::info!(at = %p.at, "TLS files changed: new connections use them");
                st.channels = channels.into();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(at = %p.at, error = %e, "TLS files changed but cannot be used; keeping the ones loaded before")
            }
        }
        st.channels.clone()
    }
}

/// The tonic endpoint for `address` at key path `at` (such as
/// `stores.CAS.grpc.endpoints[0]`), with `tls` applied when the scheme is `grpcs://`.
pub fn endpoint(address: &str, tls: Option<&ClientTlsConfig>, at: &str) -> Result<Endpoint, Error> {
    let (secure, rest) = match address.split_once("://") {
        Some(("grpc" | "http", rest)) => (false, rest),
        Some(("grpcs" | "https", rest)) => (true, rest),
        Some((scheme, _)) => {
            return Err(Error::invalid_argument(format!(
                "{at}: {address:?}: unknown scheme {scheme}://, expected grpc:// or grpcs://"
            )))
        }
        None => (false, address),
    };
    let uri = format!("{}://{rest}", if secure { "https" } else { "http" });
    let ep = Endpoint::from_shared(uri).map_err(|e| {
        Error::invalid_argument(format!("{at}: {address:?} is not an address: {e}"))
    })?;
    if !secure {
        if tls.is_some() {
            return Err(Error::invalid_argument(format!(
                "{at}.tls_config: set, but {address:?} is plaintext; write grpcs:// to use TLS"
            )));
        }
        return Ok(ep);
    }
    let config = client_tls(tls, at)?;
    ep.tls_config(config)
        .map_err(|e| Error::invalid_argument(format!("{at}.tls_config: {e}")))
}

fn read(path: &str, key: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::invalid_argument(format!("{key}: reading {path}: {e}")))
}

/// tonic's client TLS from the config: the CA file, the identity for mTLS, native roots.
fn client_tls(
    tls: Option<&ClientTlsConfig>,
    at: &str,
) -> Result<tonic::transport::ClientTlsConfig, Error> {
    let mut out = tonic::transport::ClientTlsConfig::new();
    let Some(tls) = tls else {
        return Ok(out.with_native_roots());
    };
    let at = format!("{at}.tls_config");
    if let Some(ca) = &tls.ca_file {
        let pem = read(ca, &format!("{at}.ca_file"))?;
        if !pem_has(&pem, "CERTIFICATE") {
            return Err(Error::invalid_argument(format!(
                "{at}.ca_file: {ca} holds no PEM certificate"
            )));
        }
        out = out.ca_certificate(Certificate::from_pem(pem));
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let cert_pem = read(cert, &format!("{at}.cert_file"))?;
            if !pem_has(&cert_pem, "CERTIFICATE") {
                return Err(Error::invalid_argument(format!(
                    "{at}.cert_file: {cert} holds no PEM certificate"
                )));
            }
            let key_pem = read(key, &format!("{at}.key_file"))?;
            if !pem_has(&key_pem, "PRIVATE KEY") {
                return Err(Error::invalid_argument(format!(
                    "{at}.key_file: {key} holds no PEM private key"
                )));
            }
            out = out.identity(Identity::from_pem(cert_pem, key_pem));
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(Error::invalid_argument(format!(
                "{at}.key_file: required with cert_file"
            )))
        }
        (None, Some(_)) => {
            return Err(Error::invalid_argument(format!(
                "{at}.cert_file: required with key_file"
            )))
        }
    }
    if tls.use_native_roots == Some(true) || tls.ca_file.is_none() {
        out = out.with_native_roots();
    }
    Ok(out)
}

/// Whether `pem` has a block whose label ends with `label` (`PRIVATE KEY` matches PKCS#8,
/// `RSA PRIVATE KEY` and `EC PRIVATE KEY`).
fn pem_has(pem: &[u8], label: &str) -> bool {
    String::from_utf8_lossy(pem)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .any(|l| l.trim_end_matches('-').ends_with(label))
}

/// NativeLink's connection settings of one endpoint: `connect_timeout_s`, `tcp_keepalive_s`,
/// `http2_keepalive_interval_s` and `http2_keepalive_timeout_s` (0 or unset: 30, 30, 30 and
/// 20 s; pings on idle connections too), and `concurrency_limit`.
pub fn with_endpoint_settings(ep: Endpoint, e: &cairn_config::stores::GrpcEndpoint) -> Endpoint {
    let secs =
        |v: u64, default: u64| std::time::Duration::from_secs(if v == 0 { default } else { v });
    let ep = ep
        .connect_timeout(secs(e.connect_timeout_s, 30))
        .tcp_keepalive(Some(secs(e.tcp_keepalive_s, 30)))
        .http2_keep_alive_interval(secs(e.http2_keepalive_interval_s, 30))
        .keep_alive_timeout(secs(e.http2_keepalive_timeout_s, 20))
        .keep_alive_while_idle(true);
    match e.concurrency_limit {
        Some(n) if n > 0 => ep.concurrency_limit(n as usize),
        _ => ep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_misplaced_tls_are_told_apart() {
        assert!(endpoint("grpc://127.0.0.1:1", None, "x").is_ok());
        assert!(endpoint("127.0.0.1:1", None, "x").is_ok());
        let e = endpoint("ftp://h:1", None, "stores.A.grpc.endpoints[0]").unwrap_err();
        assert!(e.message.contains("stores.A.grpc.endpoints[0]"), "{e}");
        let tls = ClientTlsConfig::default();
        let e = endpoint("grpc://h:1", Some(&tls), "w").unwrap_err();
        assert!(e.message.contains("w.tls_config"), "{e}");
    }

    #[test]
    fn unreadable_and_wrong_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let tls = ClientTlsConfig {
            ca_file: Some(dir.path().join("missing.pem").display().to_string()),
            ..Default::default()
        };
        let e = endpoint("grpcs://h:1", Some(&tls), "w").unwrap_err();
        assert!(e.message.contains("w.tls_config.ca_file"), "{e}");
        let tls = ClientTlsConfig {
            ca_file: Some(junk.display().to_string()),
            ..Default::default()
        };
        let e = endpoint("grpcs://h:1", Some(&tls), "w").unwrap_err();
        assert!(e.message.contains("holds no PEM certificate"), "{e}");
        let tls = ClientTlsConfig {
            cert_file: Some(junk.display().to_string()),
            ..Default::default()
        };
        let e = endpoint("grpcs://h:1", Some(&tls), "w").unwrap_err();
        assert!(e.message.contains("w.tls_config.key_file"), "{e}");
    }
}
