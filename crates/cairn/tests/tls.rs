//! TLS on the listener, against the real binary: gRPC, `/status` and `/metrics` on one TLS
//! port (ALPN `h2` and `http/1.1`), client certificates (NativeLink's `client_ca_file` and
//! `client_crl_file`, the guide's `ca_file` + `verify_client`), and certificates rotated under
//! a running server. The certificates are made by the test (`common::certs`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use common::certs::{Pair, Pki};
use common::Cairn;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn config(tls: &str) -> String {
    format!(
        r#"{{
  stores: {{ CAS: {{ memory: {{ eviction_policy: {{ max_bytes: "64mb" }} }} }} }},
  servers: [{{
    listener: {{ http: {{ socket_address: "@ADDR@", tls: {tls} }} }},
    services: {{
      cas: [{{ instance_name: "", cas_store: "CAS" }}],
      capabilities: [{{ instance_name: "" }}],
      health: {{}},
    }},
  }}],
}}"#
    )
}

fn server_tls(server: &Pair, extra: &str) -> String {
    format!(
        r#"{{ cert_file: "{}", key_file: "{}"{extra} }}"#,
        server.cert.display(),
        server.key.display()
    )
}

/// A tonic channel to `addr` over TLS, trusting `ca`, presenting `identity` if given.
async fn grpc(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<&Pair>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some(p) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&p.cert).unwrap(),
            std::fs::read(&p.key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn capabilities(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
    re::capabilities_client::CapabilitiesClient::new(ch)
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .map(|_| ())
}

/// A raw TLS connection (rustls) to `addr`: offering `alpn`, presenting `identity` if given.
async fn raw_tls(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<&Pair>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
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
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut s = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    // TLS 1.3 reports a refused client certificate only when the server's alert is read.
    s.write_all(b"").await?;
    Ok(s)
}

/// `GET path` over an HTTP/1.1 connection kept open: (status code, body).
async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    path: &str,
) -> std::io::Result<(u16, String)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("connection closed mid-response"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let head = &text[..end];
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
            return Ok((code, text[end + 4..end + 4 + len].to_string()));
        }
    }
}

#[tokio::test]
async fn grpc_status_and_metrics_share_one_tls_port() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "root");
    let server = pki.issue("server", 10, true);
    let cairn = Cairn::start_with(tmp.path(), &config(&server_tls(&server, "")), None);

    // gRPC over TLS (h2 through ALPN).
    capabilities(grpc(cairn.addr, &pki.ca, None).await.unwrap())
        .await
        .unwrap();
    let h2 = raw_tls(cairn.addr, &pki.ca, None, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // /status and /metrics over HTTP/1.1 on the same port.
    let mut h1 = raw_tls(cairn.addr, &pki.ca, None, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (code, _) = get(&mut h1, "/status").await.unwrap();
    assert_eq!(code, 200);
    let (code, body) = get(&mut h1, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("nativelink_requests_total"), "{body}");

    // A plaintext client gets nothing from the TLS port.
    let plain = Endpoint::from_shared(format!("http://{}", cairn.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(capabilities(ch).await.is_err(), "plaintext gRPC was served");
    }
    // A client that does not trust the server's CA refuses it.
    let other = Pki::new(&tmp.path().join("other"), "other");
    assert!(grpc(cairn.addr, &other.ca, None).await.is_err());
}

/// Client certificates: NativeLink's keys and the guide's keys mean the same thing.
#[tokio::test]
async fn client_certificates_are_required_verified_and_revocable() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "root");
    let server = pki.issue("server", 10, true);
    let good = pki.issue("good-client", 20, false);
    let revoked = pki.issue("revoked-client", 21, false);
    let crl = pki.crl("root", &[21]);
    let stranger_pki = Pki::new(&tmp.path().join("stranger"), "stranger");
    let stranger = stranger_pki.issue("stranger-client", 20, false);

    let nativelink = format!(
        r#", client_ca_file: "{}", client_crl_file: "{}""#,
        pki.ca.display(),
        crl.display()
    );
    let guide = format!(r#", ca_file: "{}", verify_client: true"#, pki.ca.display());
    for (form, extra) in [("client_ca_file", nativelink), ("ca_file", guide)] {
        let dir = tmp.path().join(form);
        std::fs::create_dir_all(&dir).unwrap();
        let cairn = Cairn::start_with(&dir, &config(&server_tls(&server, &extra)), None);

        let ch = grpc(cairn.addr, &pki.ca, Some(&good)).await.unwrap();
        capabilities(ch)
            .await
            .unwrap_or_else(|e| panic!("{form}: {e}"));

        // No certificate, and one from a CA the server does not trust: refused.
        for (who, id) in [("no certificate", None), ("untrusted CA", Some(&stranger))] {
            let refused = match grpc(cairn.addr, &pki.ca, id).await {
                Ok(ch) => capabilities(ch).await.is_err(),
                Err(_) => true,
            };
            assert!(refused, "{form}: a client with {who} was served");
            let mut raw = raw_tls(cairn.addr, &pki.ca, id, &[b"http/1.1"]).await;
            if let Ok(s) = raw.as_mut() {
                assert!(
                    get(s, "/status").await.is_err(),
                    "{form}: /status answered a client with {who}"
                );
            }
        }
        // Revoked (only the NativeLink form has a CRL).
        let revoked_refused = match grpc(cairn.addr, &pki.ca, Some(&revoked)).await {
            Ok(ch) => capabilities(ch).await.is_err(),
            Err(_) => true,
        };
        assert_eq!(
            revoked_refused,
            form == "client_ca_file",
            "{form}: revoked certificate"
        );
    }
}

#[tokio::test]
async fn certificates_rotate_under_a_running_server_without_dropping_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "root");
    let server = pki.issue("server", 10, true);
    let cairn = Cairn::start_with(tmp.path(), &config(&server_tls(&server, "")), None);

    let served_serial = |s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let mut open = raw_tls(cairn.addr, &pki.ca, None, &[b"http/1.1"])
        .await
        .unwrap();
    let first = served_serial(&open);
    assert_eq!(get(&mut open, "/status").await.unwrap().0, 200);

    // cert-manager rewrites the Secret: new certificate and key in place.
    pki.issue("server", 11, true);
    let new_der = CertificateDer::pem_file_iter(&server.cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    assert_ne!(first, new_der);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = raw_tls(cairn.addr, &pki.ca, None, &[b"http/1.1"])
            .await
            .unwrap();
        if served_serial(&s) == new_der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before the rotation is still served.
    assert_eq!(get(&mut open, "/status").await.unwrap().0, 200);

    // A broken rewrite is logged and the last good certificate stays.
    std::fs::write(&server.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    // The server looks at the files every second; give it several looks.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let s = raw_tls(cairn.addr, &pki.ca, None, &[b"http/1.1"])
            .await
            .expect("a broken certificate file stopped TLS");
        assert_eq!(served_serial(&s), new_der);
    }
    capabilities(grpc(cairn.addr, &pki.ca, None).await.unwrap())
        .await
        .unwrap();
}

#[test]
fn bad_tls_files_stop_the_start_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "root");
    let server = pki.issue("server", 10, true);
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    for (extra_or_key, key_path) in [
        (
            format!(
                r#"{{ cert_file: "{}", key_file: "{}" }}"#,
                server.cert.display(),
                junk.display()
            ),
            "servers[0].listener.http.tls.key_file",
        ),
        (
            server_tls(
                &server,
                &format!(r#", client_ca_file: "{}""#, junk.display()),
            ),
            "servers[0].listener.http.tls.client_ca_file",
        ),
        (
            server_tls(&server, ", verify_client: true"),
            "servers[0].listener.http.tls.verify_client",
        ),
    ] {
        let text = config(&extra_or_key).replace("@ADDR@", "127.0.0.1:0");
        let path = tmp.path().join("c.json5");
        std::fs::write(&path, text).unwrap();
        for verb in ["run", "check-config"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
                .arg(verb)
                .arg(&path)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{verb} accepted it: {err}");
            assert!(err.contains(key_path), "{verb}: {err}");
        }
    }
}

/// The CI venv's Python with grpcio (scripts/test installs it).
fn grpcio_python(test: &str) -> Option<std::path::PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/venv/bin/python3");
    let ok = python.is_file()
        && std::process::Command::new(&python)
            .args(["-c", "import grpc"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    common::tools::missing_tool(
        test,
        "grpcio in .ci/venv",
        "CAIRN_SKIP_GRPCIO",
        "Run scripts/test, which installs it",
    )
}

/// A second, independent TLS stack as the client: gRPC's C core (PyPI grpcio, what Reclient
/// and other C++ clients use) over TLS and mTLS. (Debian's Bazel 4.2.3 cannot speak grpcs://
/// at all: its bundled Netty lacks ALPN; see docs/operations.md.)
#[test]
fn grpc_c_core_clients_connect_over_tls_and_mtls() {
    let Some(python) = grpcio_python("grpc_c_core_clients_connect_over_tls_and_mtls") else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/grpcio_reapi.py");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "root");
    let server = pki.issue("server", 10, true);
    let client = pki.issue("grpcio-client", 20, false);
    let stranger = Pki::new(&tmp.path().join("stranger"), "stranger").issue("x", 30, false);
    let run = |addr: std::net::SocketAddr, identity: Option<&Pair>| {
        let mut c = std::process::Command::new(&python);
        c.arg(&script).arg(addr.to_string()).arg(&pki.ca);
        if let Some(p) = identity {
            c.arg(&p.cert).arg(&p.key);
        }
        let out = c.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    let dir = tmp.path().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let cairn = Cairn::start_with(&dir, &config(&server_tls(&server, "")), None);
    let (ok, text) = run(cairn.addr, None);
    assert!(ok && text.starts_with("ok "), "server TLS: {text}");
    drop(cairn);

    let dir = tmp.path().join("mtls");
    std::fs::create_dir_all(&dir).unwrap();
    let extra = format!(r#", client_ca_file: "{}""#, pki.ca.display());
    let cairn = Cairn::start_with(&dir, &config(&server_tls(&server, &extra)), None);
    let (ok, text) = run(cairn.addr, Some(&client));
    assert!(
        ok && text.starts_with("ok "),
        "mTLS with a certificate: {text}"
    );
    for (who, id) in [("no certificate", None), ("another CA's", Some(&stranger))] {
        let (ok, text) = run(cairn.addr, id);
        assert!(
            !ok && text.contains("refused UNAVAILABLE"),
            "mTLS, {who}: {text}"
        );
    }
}

/// The outbound side: a `grpc` store and a `grpc` scheduler read their `tls_config` files again
/// when they change, so a client certificate renewed in place (cert-manager) is used by the
/// next connection without a restart. The backend is restarted to trust only a new CA: the
/// front's old certificate is refused, its new one (written over the same files) is taken.
/// Before that, garbage written over the files is not taken: the front keeps its identity.
#[tokio::test]
async fn outbound_client_certificates_are_reloaded_when_their_files_change() {
    let tmp = tempfile::tempdir().unwrap();
    let old_ca = Pki::new(&tmp.path().join("old"), "old");
    let new_ca = Pki::new(&tmp.path().join("new"), "new");
    let server = old_ca.issue("backend", 1, true);
    let client_ca = tmp.path().join("client-ca.pem");
    std::fs::copy(&old_ca.ca, &client_ca).unwrap();
    let backend_config = format!(
        r#"{{
  stores: {{ CAS: {{ memory: {{}} }} }},
  schedulers: {{ MAIN: {{ simple: {{ supported_platform_properties: {{ pool: "exact" }} }} }} }},
  servers: [{{
    listener: {{ http: {{ socket_address: "@ADDR@", tls: {{ cert_file: "{}", key_file: "{}", client_ca_file: "{}" }} }} }},
    services: {{
      cas: [{{ instance_name: "", cas_store: "CAS" }}],
      bytestream: [{{ instance_name: "", cas_store: "CAS" }}],
      execution: [{{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }}],
      capabilities: [{{ instance_name: "", remote_execution: {{ scheduler: "MAIN" }} }}],
    }},
  }}],
}}"#,
        server.cert.display(),
        server.key.display(),
        client_ca.display()
    );
    let bdir = tmp.path().join("backend");
    std::fs::create_dir_all(&bdir).unwrap();
    let backend_addr = common::free_addr();
    let backend = Cairn::start_with(&bdir, &backend_config, Some(backend_addr));

    // The front's identity files, rewritten in place later.
    let (cert, key) = (tmp.path().join("front.crt"), tmp.path().join("front.key"));
    let first = old_ca.issue("front", 2, false);
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let tls = format!(
        r#"tls_config: {{ ca_file: "{}", cert_file: "{}", key_file: "{}" }}"#,
        old_ca.ca.display(),
        cert.display(),
        key.display()
    );
    let front_config = format!(
        r#"{{
  stores: {{ CAS: {{ grpc: {{ instance_name: "", store_type: "cas",
    endpoints: [{{ address: "grpcs://127.0.0.1:{port}", {tls} }}] }} }} }},
  schedulers: {{ FRONT: {{ grpc: {{ endpoint: {{ address: "grpcs://127.0.0.1:{port}", {tls} }} }} }} }},
  servers: [{{
    listener: {{ http: {{ socket_address: "@ADDR@" }} }},
    services: {{
      cas: [{{ instance_name: "", cas_store: "CAS" }}],
      capabilities: [{{ instance_name: "", remote_execution: {{ scheduler: "FRONT" }} }}],
    }},
  }}],
}}"#,
        port = backend_addr.port()
    );
    let fdir = tmp.path().join("front");
    std::fs::create_dir_all(&fdir).unwrap();
    let front = Cairn::start_with(&fdir, &front_config, None);
    let ch = front.channel().await;
    let store = |n: u8| {
        let ch = ch.clone();
        async move {
            let blob = vec![n; 100];
            let r =
                re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch)
                    .batch_update_blobs(re::BatchUpdateBlobsRequest {
                        requests: vec![re::batch_update_blobs_request::Request {
                            digest: Some(
                                cairn_core::DigestFunction::Sha256.compute(&blob).to_proto(),
                            ),
                            data: blob,
                            compressor: 0,
                        }],
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
            match r.responses[0].status.as_ref() {
                Some(s) if s.code != 0 => Err(s.message.clone()),
                _ => Ok(()),
            }
        }
    };
    let properties = || {
        let ch = ch.clone();
        async move {
            re::capabilities_client::CapabilitiesClient::new(ch)
                .get_capabilities(re::GetCapabilitiesRequest::default())
                .await
                .map_err(|e| e.to_string())
                .map(|c| {
                    c.into_inner()
                        .execution_capabilities
                        .map(|e| e.supported_node_properties)
                        .unwrap_or_default()
                })
        }
    };
    store(1).await.unwrap();
    assert_eq!(properties().await.unwrap(), ["pool"]);

    // Garbage written over the front's certificate and key: the change cannot be loaded, so
    // the front keeps the identity it had. The pool looks at its files at most every
    // TLS_RECHECK (5 s) and nothing signals that it did, so the test lets that time pass and
    // makes a call (which is when the pool looks); then the backend restarts, so that the
    // front must connect again, with the identity it kept.
    std::fs::write(&cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    std::fs::write(&key, b"not a key at all").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    store(10).await.unwrap();
    drop(backend);
    let backend = Cairn::start_with(&bdir, &backend_config, Some(backend_addr));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n: u8 = 10;
    loop {
        n = n.wrapping_add(1);
        match (store(n).await, properties().await) {
            (Ok(()), Ok(p)) if p == ["pool"] => break,
            (a, b) => assert!(
                Instant::now() < deadline,
                "the front lost its identity to unreadable files: store {a:?}, capabilities {b:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();

    // The backend now trusts only the new CA; the front's certificate is still the old one.
    drop(backend);
    std::fs::copy(&new_ca.ca, &client_ca).unwrap();
    let backend = Cairn::start_with(&bdir, &backend_config, Some(backend_addr));
    let e = store(2).await.unwrap_err();
    assert!(!e.is_empty());
    // (GetCapabilities still answers, without the properties the backend did not give.)
    assert!(properties().await.unwrap().is_empty());

    // Renewed in place: the next connections present it.
    let renewed = new_ca.issue("front", 3, false);
    std::fs::copy(&renewed.cert, &cert).unwrap();
    std::fs::copy(&renewed.key, &key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n: u8 = 100;
    loop {
        n = n.wrapping_add(1);
        match (store(n).await, properties().await) {
            (Ok(()), Ok(p)) if p == ["pool"] => break,
            (a, b) => assert!(
                Instant::now() < deadline,
                "the renewed certificate was never used: store {a:?}, capabilities {b:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(backend);
}
