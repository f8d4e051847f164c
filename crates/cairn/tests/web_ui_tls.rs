//! The web UI is behind the listener's TLS and client-certificate settings: a client with a
//! certificate from the trusted CA gets the pages over HTTPS, a client without one gets no
//! page at all.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::certs::{Pair, Pki};
use common::Cairn;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// HTTPS `GET path` with `identity` as the client certificate: the response's status line and
/// body, or the error that refused it.
async fn https_get(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<&Pair>,
    path: &str,
) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    // The provider the server uses (tls.rs does the same).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(p) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&p.cert)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(&p.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    if buf.is_empty() {
        return Err(std::io::Error::other("no response"));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test]
async fn pages_need_the_listeners_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "root");
    let server = pki.issue("server", 10, true);
    let client = pki.issue("operator", 20, false);
    let config = format!(
        r#"{{
  stores: {{ CAS: {{ memory: {{}} }}, AC: {{ memory: {{}} }} }},
  schedulers: {{ MAIN: {{ simple: {{}} }} }},
  servers: [{{
    listener: {{ http: {{ socket_address: "@ADDR@", tls: {{ cert_file: "{}", key_file: "{}", client_ca_file: "{}" }} }} }},
    services: {{
      cas: [{{ instance_name: "", cas_store: "CAS" }}],
      web_ui: {{ cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"] }},
    }},
  }}],
}}"#,
        server.cert.display(),
        server.key.display(),
        pki.ca.display()
    );
    let cairn = Cairn::start_with(tmp.path(), &config, None);
    let page = https_get(cairn.addr, &pki.ca, Some(&client), "/queue")
        .await
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<h1>Queue</h1>"), "{page}");
    let refused = https_get(cairn.addr, &pki.ca, None, "/queue").await;
    assert!(
        refused
            .as_ref()
            .map_or(true, |p| !p.contains("<h1>Queue</h1>")),
        "a client without a certificate got the page: {refused:?}"
    );
    cairn.kill9();
}
