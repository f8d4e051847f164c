//! An HTTPS proxy that stands in for a cloud's endpoint: it answers `CONNECT host:443`, ends
//! the TLS the client then starts with a certificate of the test's CA for that host, and
//! pipes the plain HTTP to a local emulator. Set as `HTTPS_PROXY` (with the CA in
//! `SSL_CERT_FILE`), it lets a client that builds its endpoint from an account or a namespace
//! (`https://ACCOUNT.r2.cloudflarestorage.com`) reach the emulator unchanged. It records the
//! hosts it was asked for.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::certs::Pair;

pub struct HttpsProxy {
    pub addr: SocketAddr,
    hosts: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsProxy {
    /// Serves CONNECT on a free port with the certificate `cert`, piping to `upstream`.
    pub async fn start(cert: &Pair, upstream: SocketAddr) -> HttpsProxy {
        HttpsProxy::start_routes(cert, upstream, Vec::new()).await
    }

    /// As [`HttpsProxy::start`], piping the hosts of `routes` to their own upstreams.
    pub async fn start_routes(
        cert: &Pair,
        upstream: SocketAddr,
        routes: Vec<(String, SocketAddr)>,
    ) -> HttpsProxy {
        let routes = Arc::new(routes);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        // The emulators speak HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hosts: Arc<Mutex<BTreeSet<String>>> = Default::default();
        let seen = hosts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                let routes = routes.clone();
                tokio::spawn(async move {
                    // The request head: `CONNECT host:port HTTP/1.1` and headers.
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                        if client.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let Some(target) = head
                        .strip_prefix("CONNECT ")
                        .and_then(|r| r.split_whitespace().next())
                    else {
                        let _ = client
                            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                            .await;
                        return;
                    };
                    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
                    seen.lock().unwrap().insert(host.to_string());
                    if client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let to = routes
                        .iter()
                        .find(|(h, _)| h == host)
                        .map_or(upstream, |(_, a)| *a);
                    let Ok(mut up) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        HttpsProxy { addr, hosts, task }
    }

    /// The hosts clients asked to CONNECT to.
    pub fn hosts(&self) -> Vec<String> {
        self.hosts.lock().unwrap().iter().cloned().collect()
    }
}
