//! NativeLink 1.6.6 keys of the `grpc` store and its endpoints, each against real processes:
//! a front Cairn whose CAS is a `grpc` store on an upstream (another Cairn, or a socket that
//! never answers, or one whose accept queue is full).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::{Digest, DigestFunction};
use common::blobs::{batch_put, read, verdicts, write};
use common::{data, Cairn};
use re::content_addressable_storage_client::ContentAddressableStorageClient;

/// An upstream with a memory CAS on instance "", `@GLOBAL@` and `@SERVER@` filled in.
const UPSTREAM: &str = r#"{
  stores: { CAS: { memory: {} } },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
      health: {},
    },
    @SERVER@
  }],
  @GLOBAL@
}"#;

/// A front whose CAS is a `grpc` store on `@UP@`, with `@STORE@` keys in the store and
/// `@ENDPOINT@` keys in its endpoint.
const FRONT: &str = r#"{
  stores: {
    CAS: { grpc: {
      endpoints: [{ address: "grpc://@UP@", @ENDPOINT@ }],
      store_type: "cas",
      @STORE@
    } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
    },
  }],
}"#;

fn upstream(dir: &std::path::Path, server: &str, global: &str) -> Cairn {
    Cairn::start_with(
        dir,
        &UPSTREAM
            .replace("@SERVER@", server)
            .replace("@GLOBAL@", global),
        None,
    )
}

fn front(dir: &std::path::Path, up: SocketAddr, store: &str, endpoint: &str) -> Cairn {
    Cairn::start_with(
        dir,
        &FRONT
            .replace("@UP@", &up.to_string())
            .replace("@STORE@", store)
            .replace("@ENDPOINT@", endpoint),
        None,
    )
}

async fn find_missing(
    c: &Cairn,
    digests: &[Digest],
    identity: Option<&str>,
) -> Result<Vec<re::Digest>, tonic::Status> {
    let mut cas = ContentAddressableStorageClient::new(c.channel().await);
    let mut req = tonic::Request::new(re::FindMissingBlobsRequest {
        blob_digests: digests.iter().map(|d| d.to_proto()).collect(),
        digest_function: re::digest_function::Value::Sha256 as i32,
        ..Default::default()
    });
    if let Some(who) = identity {
        req.metadata_mut()
            .insert("x-identity", who.parse().unwrap());
    }
    cas.find_missing_blobs(req)
        .await
        .map(|r| r.into_inner().missing_blob_digests)
}

#[tokio::test]
async fn use_legacy_resource_names_drops_the_digest_function_from_blob_names() {
    // An upstream that reads a 64-hex-digit hash without a function as BLAKE3: a SHA-256
    // blob named the legacy way fails its check there, one named with its function is kept.
    let up_dir = tempfile::tempdir().unwrap();
    let up = upstream(
        up_dir.path(),
        "",
        r#"global: { default_digest_hash_function: "blake3" },"#,
    );
    let modern_dir = tempfile::tempdir().unwrap();
    let modern = front(modern_dir.path(), up.addr, "", "");
    let legacy_dir = tempfile::tempdir().unwrap();
    let legacy = front(
        legacy_dir.path(),
        up.addr,
        r#"use_legacy_resource_names: "${LEGACY:-true}","#,
        "",
    );

    let blob = data(10_000, 1);
    let d = DigestFunction::Sha256.compute(&blob);
    write(&modern, &blob, None).await.unwrap();
    assert_eq!(find_missing(&modern, &[d], None).await.unwrap(), vec![]);

    let other = data(10_000, 2);
    let e = write(&legacy, &other, None).await.unwrap_err();
    assert!(
        e.message().contains("hash") || e.message().contains("match"),
        "a legacy name is read as BLAKE3 upstream: {e:?}"
    );
    let od = DigestFunction::Sha256.compute(&other);
    assert_eq!(
        find_missing(&modern, &[od], None).await.unwrap(),
        vec![od.to_proto()],
        "nothing wrong was stored"
    );
}

#[tokio::test]
async fn headers_are_sent_on_every_upstream_call() {
    // The upstream refuses requests that do not say who sends them.
    let up_dir = tempfile::tempdir().unwrap();
    let up = upstream(
        up_dir.path(),
        r#"experimental_identity_header: { required: true },"#,
        "",
    );
    let d = DigestFunction::Sha256.compute(b"headers");

    let plain_dir = tempfile::tempdir().unwrap();
    let plain = front(plain_dir.path(), up.addr, "", "");
    let e = find_missing(&plain, &[d], None).await.unwrap_err();
    assert!(e.message().contains("x-identity"), "{e:?}");

    let with_dir = tempfile::tempdir().unwrap();
    let with = front(
        with_dir.path(),
        up.addr,
        r#"headers: { "x-identity": "front-door" },"#,
        "",
    );
    assert_eq!(
        find_missing(&with, &[d], None).await.unwrap(),
        vec![d.to_proto()]
    );
    write(&with, b"headers", None).await.unwrap();
    assert_eq!(find_missing(&with, &[d], None).await.unwrap(), vec![]);
}

#[tokio::test]
async fn forward_headers_copies_the_client_request_headers_upstream() {
    let up_dir = tempfile::tempdir().unwrap();
    let up = upstream(
        up_dir.path(),
        r#"experimental_identity_header: { required: true },"#,
        "",
    );
    let f_dir = tempfile::tempdir().unwrap();
    let f = front(
        f_dir.path(),
        up.addr,
        r#"forward_headers: ["X-Identity"],"#,
        "",
    );
    let blob = data(300_000, 3);
    let d = DigestFunction::Sha256.compute(&blob);

    // Without the header the upstream refuses, and says why.
    let e = find_missing(&f, &[d], None).await.unwrap_err();
    assert!(e.message().contains("x-identity"), "{e:?}");
    let e = write(&f, &blob, None).await.unwrap_err();
    assert!(e.message().contains("x-identity"), "{e:?}");

    // With it, unary calls and uploads (whose store put runs in a task of its own) pass.
    assert_eq!(
        find_missing(&f, &[d], Some("alice")).await.unwrap(),
        vec![d.to_proto()]
    );
    write(&f, &blob, Some("alice")).await.unwrap();
    assert_eq!(find_missing(&f, &[d], Some("bob")).await.unwrap(), vec![]);
}

/// A TCP server that accepts connections and reads them, and never writes a byte.
fn silent_server() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(std::io::Read::read(&mut conn, &mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// Runs FindMissingBlobs through `f` and returns its error and how long it took.
async fn failing_call(f: &Cairn) -> (tonic::Status, Duration) {
    let d = DigestFunction::Sha256.compute(b"silence");
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(25), find_missing(f, &[d], None))
        .await
        .expect("the call through the front ended within 25 s");
    (r.unwrap_err(), start.elapsed())
}

#[tokio::test]
async fn rpc_timeout_s_cancels_a_call_the_upstream_never_answers() {
    let silent = silent_server();
    let f_dir = tempfile::tempdir().unwrap();
    let f = front(f_dir.path(), silent, r#"rpc_timeout_s: "2s","#, "");
    let (e, took) = failing_call(&f).await;
    assert!(took < Duration::from_secs(10), "took {took:?}: {e:?}");
    assert!(took >= Duration::from_secs(2), "took {took:?}: {e:?}");
    // The front is still up.
    assert!(common::http_get(f.addr, "/status").await.0 != 0);
}

#[tokio::test]
async fn http2_keepalive_drops_a_connection_whose_peer_stops_answering() {
    let silent = silent_server();
    let f_dir = tempfile::tempdir().unwrap();
    let f = front(
        f_dir.path(),
        silent,
        "",
        r#"http2_keepalive_interval_s: 1, http2_keepalive_timeout_s: "1s""#,
    );
    // Without the keys the call would wait 30 s for the first PING and 20 s for its answer.
    let (e, took) = failing_call(&f).await;
    assert!(took < Duration::from_secs(10), "took {took:?}: {e:?}");
}

#[tokio::test]
async fn connect_timeout_s_bounds_a_connection_that_never_completes() {
    // A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    // neither succeeds nor fails until the client gives up.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
        assert!(held.len() < 64, "the accept queue never filled");
    }
    let f_dir = tempfile::tempdir().unwrap();
    let f = front(f_dir.path(), addr, "", r#"connect_timeout_s: 1"#);
    let (e, took) = failing_call(&f).await;
    assert!(took < Duration::from_secs(8), "took {took:?}: {e:?}");
    drop(listener);
}

#[tokio::test]
async fn tcp_keepalive_s_arms_the_kernel_keepalive_timer_on_upstream_connections() {
    let up_dir = tempfile::tempdir().unwrap();
    let up = upstream(up_dir.path(), "", "");
    let f_dir = tempfile::tempdir().unwrap();
    let f = front(f_dir.path(), up.addr, "", r#"tcp_keepalive_s: 7"#);
    let d = DigestFunction::Sha256.compute(b"keepalive");
    find_missing(&f, &[d], None).await.unwrap();
    // /proc/net/tcp: the front's connection to the upstream port, established, with the
    // keepalive timer (`tr` 2) due within 7 s (in USER_HZ ticks of 1/100 s).
    let port = format!(":{:04X}", up.addr.port());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let timers: Vec<(u32, u64)> = table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2)?.ends_with(&port) && f.get(3)? == &"01").then_some(())?;
                let (tr, when) = f.get(5)?.split_once(':')?;
                Some((
                    u32::from_str_radix(tr, 16).ok()?,
                    u64::from_str_radix(when, 16).ok()?,
                ))
            })
            .collect();
        if timers.iter().any(|&(tr, when)| tr == 2 && when <= 700) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no upstream connection with a 7 s keepalive timer: {timers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Compressible bytes: zstd shrinks them a lot.
fn compressible(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b"cairn, a heap of stones "[i % 24])
        .collect()
}

#[tokio::test]
async fn experimental_remote_cache_compression_moves_large_blobs_as_zstd() {
    let zstd_dir = tempfile::tempdir().unwrap();
    let zstd_up = Cairn::start_with(
        zstd_dir.path(),
        &UPSTREAM
            .replace("@SERVER@", "")
            .replace("@GLOBAL@", "")
            .replace(
                r#"capabilities: [{ instance_name: "" }]"#,
                r#"capabilities: [{ instance_name: "", remote_cache_compression: true }]"#,
            ),
        None,
    );
    let plain_dir = tempfile::tempdir().unwrap();
    let plain_up = upstream(plain_dir.path(), "", "");
    let key = r#"experimental_remote_cache_compression: true,"#;

    // Against an upstream that takes zstd: large blobs go and come back compressed, ranged
    // reads and small blobs as they are.
    let f_dir = tempfile::tempdir().unwrap();
    let f = front(f_dir.path(), zstd_up.addr, key, "");
    let big = compressible(3_000_000);
    let small = compressible(1000);
    write(&f, &big, None).await.unwrap();
    write(&f, &small, None).await.unwrap();
    let (db, ds) = (
        DigestFunction::Sha256.compute(&big),
        DigestFunction::Sha256.compute(&small),
    );
    assert_eq!(read(&f, "", &db).await, big);
    assert_eq!(read(&f, "", &ds).await, small);
    assert_eq!(read(&zstd_up, "", &db).await, big, "stored whole upstream");

    // Against one that does not, a large upload is refused there (so it was compressed) and a
    // small one passes.
    let g_dir = tempfile::tempdir().unwrap();
    let g = front(g_dir.path(), plain_up.addr, key, "");
    let e = write(&g, &big, None).await.unwrap_err();
    assert!(e.message().contains("remote_cache_compression"), "{e:?}");
    write(&g, &small, None).await.unwrap();

    // Unset, the key follows a capabilities instance of the same file that turns zstd on;
    // false opts the store out.
    let with_caps = |store: &str| {
        FRONT
            .replace("@UP@", &plain_up.addr.to_string())
            .replace("@STORE@", store)
            .replace("@ENDPOINT@", "")
            .replace(
                r#"capabilities: [{ instance_name: "" }]"#,
                r#"capabilities: [{ instance_name: "", remote_cache_compression: true }]"#,
            )
    };
    let h_dir = tempfile::tempdir().unwrap();
    let h = Cairn::start_with(h_dir.path(), &with_caps(""), None);
    let e = write(&h, &big, None).await.unwrap_err();
    assert!(e.message().contains("remote_cache_compression"), "{e:?}");
    let i_dir = tempfile::tempdir().unwrap();
    let i = Cairn::start_with(
        i_dir.path(),
        &with_caps("experimental_remote_cache_compression: false,"),
        None,
    );
    write(&i, &big, None).await.unwrap();
    assert_eq!(read(&i, "", &db).await, big);
    // The blob is upstream now; a whole read through a compressing front asks for zstd.
    let name = format!("blobs/{}/{}", db.hash_hex(), db.size());
    let mut s = ByteStreamClient::new(g.channel().await)
        .read(cairn_core::proto::google::bytestream::ReadRequest {
            resource_name: name,
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .map(|r| r.into_inner());
    let e = match &mut s {
        Ok(s) => futures::StreamExt::next(s).await.unwrap().unwrap_err(),
        Err(e) => e.clone(),
    };
    assert!(e.message().contains("remote_cache_compression"), "{e:?}");
}

/// The value of `name{labels}` in a Prometheus text page (0 when absent).
fn counter(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn experimental_read_batching_reads_small_blobs_with_batch_read_blobs() {
    let up_dir = tempfile::tempdir().unwrap();
    let up = upstream(up_dir.path(), "", "");
    let f_dir = tempfile::tempdir().unwrap();
    let f = front(
        f_dir.path(),
        up.addr,
        r#"experimental_read_batching: { max_blob_size_bytes: "16KiB", dispatch_slots: 1 },"#,
        "",
    );
    // 64 small blobs and one above max_blob_size_bytes, stored upstream.
    let blobs: Vec<Vec<u8>> = (0..64)
        .map(|i| data(1000 + i * 10, 100 + i as u64))
        .collect();
    let mut digests = Vec::new();
    for b in &blobs {
        digests.push(batch_put(&up, "", b).await);
    }
    let big = data(100_000, 99);
    let dbig = batch_put(&up, "", &big).await;
    let missing = DigestFunction::Sha256.compute(b"not upstream");

    let reads = digests.iter().map(|d| read(&f, "", d));
    let got = futures::future::join_all(reads).await;
    assert_eq!(got, blobs);
    assert_eq!(read(&f, "", &dbig).await, big);
    // A blob the upstream lacks is NOT_FOUND through a batch as through ByteStream.
    let e = ByteStreamClient::new(f.channel().await)
        .read(cairn_core::proto::google::bytestream::ReadRequest {
            resource_name: format!("blobs/{}/{}", missing.hash_hex(), missing.size()),
            read_offset: 0,
            read_limit: 0,
        })
        .await;
    let e = match e {
        Ok(s) => futures::StreamExt::next(&mut s.into_inner())
            .await
            .unwrap()
            .unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    let (_, page) = common::http_get(up.addr, "/metrics").await;
    let batches = counter(
        &page,
        r#"nativelink_requests_total{service="cas",method="BatchReadBlobs"}"#,
    );
    let reads = counter(
        &page,
        r#"nativelink_requests_total{service="bytestream",method="Read"}"#,
    );
    // Every small blob came in a batch (several per call: one slot, 64 concurrent reads);
    // only the large one was a ByteStream read.
    assert_eq!(reads, 1, "{page}");
    eprintln!("{batches} BatchReadBlobs calls for 65 batched reads");
    assert!((2..=60).contains(&batches), "{batches} batches: {page}");
}

#[test]
fn key_mistakes_are_refused_by_key_path_by_check_config_and_run_alike() {
    let cases = [
        (
            r#"forward_headers: ["authorization"], experimental_read_batching: {},"#,
            "stores.CAS: grpc.experimental_read_batching: cannot be used with forward_headers",
        ),
        (
            r#"experimental_read_batching: { dispatch_slots: 0 },"#,
            "grpc.experimental_read_batching.dispatch_slots: expected at least 1",
        ),
        (
            r#"headers: { "bad header": "x" },"#,
            "grpc.headers.bad header",
        ),
        (r#"forward_headers: ["a b"],"#, "grpc.forward_headers[0]"),
    ];
    for (store, want) in cases {
        let text = FRONT
            .replace("@UP@", "127.0.0.1:1")
            .replace("@STORE@", store)
            .replace("@ENDPOINT@", "")
            .replace("@ADDR@", "127.0.0.1:0");
        for (ok, err) in verdicts(&text) {
            assert!(!ok && err.contains(want), "{store}: {err}");
        }
    }
    let text = r#"{
      stores: { CAS: { memory: {} } },
      servers: [{ listener: { http: { socket_address: "127.0.0.1:0" } }, services: { cas: [{ cas_store: "CAS" }] } }],
      experimental_origin_events: { publisher: { store: "EVENTS" } },
    }"#;
    for (ok, err) in verdicts(text) {
        assert!(!ok, "{err}");
        assert!(
            err.contains("experimental_origin_events.publisher.store: no store named \"EVENTS\""),
            "{err}"
        );
    }
}

/// An upstream CAS that lies in its BatchReadBlobs answers: for a blob of 1000 bytes it
/// sends 999, for one of 1001 it sends zstd that was not asked for, for one of 1002 it
/// answers nothing at all; everything else is UNIMPLEMENTED.
struct LyingCas;

#[tonic::async_trait]
impl re::content_addressable_storage_server::ContentAddressableStorage for LyingCas {
    async fn find_missing_blobs(
        &self,
        _: tonic::Request<re::FindMissingBlobsRequest>,
    ) -> Result<tonic::Response<re::FindMissingBlobsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("lying"))
    }
    async fn batch_update_blobs(
        &self,
        _: tonic::Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<tonic::Response<re::BatchUpdateBlobsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("lying"))
    }
    async fn batch_read_blobs(
        &self,
        request: tonic::Request<re::BatchReadBlobsRequest>,
    ) -> Result<tonic::Response<re::BatchReadBlobsResponse>, tonic::Status> {
        let responses = request
            .into_inner()
            .digests
            .into_iter()
            .filter(|d| d.size_bytes != 1002)
            .map(|d| re::batch_read_blobs_response::Response {
                data: vec![7; if d.size_bytes == 1000 { 999 } else { 10 }],
                compressor: if d.size_bytes == 1001 {
                    re::compressor::Value::Zstd as i32
                } else {
                    0
                },
                digest: Some(d),
                status: None,
            })
            .collect();
        Ok(tonic::Response::new(re::BatchReadBlobsResponse {
            responses,
        }))
    }
    type GetTreeStream =
        futures::stream::BoxStream<'static, Result<re::GetTreeResponse, tonic::Status>>;
    async fn get_tree(
        &self,
        _: tonic::Request<re::GetTreeRequest>,
    ) -> Result<tonic::Response<Self::GetTreeStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("lying"))
    }
    async fn split_blob(
        &self,
        _: tonic::Request<re::SplitBlobRequest>,
    ) -> Result<tonic::Response<re::SplitBlobResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("lying"))
    }
    async fn splice_blob(
        &self,
        _: tonic::Request<re::SpliceBlobRequest>,
    ) -> Result<tonic::Response<re::SpliceBlobResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("lying"))
    }
    type GetChunkMappingStream =
        futures::stream::BoxStream<'static, Result<re::GetChunkMappingResponse, tonic::Status>>;
    async fn get_chunk_mapping(
        &self,
        _: tonic::Request<re::GetChunkMappingRequest>,
    ) -> Result<tonic::Response<Self::GetChunkMappingStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("lying"))
    }
    async fn register_chunk_mapping(
        &self,
        _: tonic::Request<tonic::Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<tonic::Response<re::RegisterChunkMappingResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("lying"))
    }
}

#[tokio::test]
async fn read_batching_turns_an_upstream_s_lies_into_clear_errors() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let liar = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                re::content_addressable_storage_server::ContentAddressableStorageServer::new(
                    LyingCas,
                ),
            )
            .serve_with_incoming(futures::stream::unfold(listener, |l| async move {
                Some((l.accept().await.map(|(s, _)| s), l))
            })),
    );
    // A fast tier in front: nothing a lie brings may land in it.
    let dir = tempfile::tempdir().unwrap();
    let f = Cairn::start_with(
        dir.path(),
        &r#"{
          stores: { CAS: { fast_slow: {
            fast: { filesystem: { content_path: "@DIR@/fast" } },
            slow: { grpc: { endpoints: [{ address: "grpc://@UP@" }], store_type: "cas",
                            experimental_read_batching: {} } },
          } } },
          servers: [{
            listener: { http: { socket_address: "@ADDR@" } },
            services: { bytestream: [{ instance_name: "", cas_store: "CAS" }], health: {} },
          }],
        }"#
        .replace("@UP@", &liar.to_string()),
        None,
    );
    for (size, code, says) in [
        (
            1000,
            tonic::Code::DataLoss,
            "sent 999 bytes for a blob of 1000",
        ),
        (1001, tonic::Code::Internal, "compressor"),
        (1002, tonic::Code::Internal, "left out"),
    ] {
        let d = Digest::from_proto(
            0,
            &re::Digest {
                hash: "ab".repeat(32),
                size_bytes: size,
            },
        )
        .unwrap();
        let read = ByteStreamClient::new(f.channel().await)
            .read(cairn_core::proto::google::bytestream::ReadRequest {
                resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
                read_offset: 0,
                read_limit: 0,
            })
            .await;
        let e = match read {
            Ok(s) => futures::StreamExt::next(&mut s.into_inner())
                .await
                .expect("an answer")
                .unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(e.code(), code, "{size}: {e:?}");
        assert!(e.message().contains(says), "{size}: {e:?}");
    }
    assert_eq!(common::http_get(f.addr, "/status").await.0, 200);
    // No blob file in the fast tier's prefix directories.
    let kept: Vec<_> = std::fs::read_dir(dir.path().join("fast"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
}
