//! NativeLink 1.6.6 keys that Cairn honours, each against real processes: a front Cairn whose
//! CAS is a `grpc` store on an upstream (another Cairn, or a socket that never answers).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::proto::google::bytestream::WriteRequest;
use cairn_core::{Digest, DigestFunction};
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

/// Uploads through `c` with ByteStream.Write (SHA-256, the function named in the resource).
async fn write(c: &Cairn, blob: &[u8], identity: Option<&str>) -> Result<(), tonic::Status> {
    let d = DigestFunction::Sha256.compute(blob);
    let name = format!(
        "uploads/{}/blobs/sha256/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    let msg = WriteRequest {
        resource_name: name,
        write_offset: 0,
        finish_write: true,
        data: blob.to_vec(),
    };
    let mut req = tonic::Request::new(futures::stream::iter(vec![msg]));
    if let Some(who) = identity {
        req.metadata_mut()
            .insert("x-identity", who.parse().unwrap());
    }
    ByteStreamClient::new(c.channel().await)
        .write(req)
        .await
        .map(|_| ())
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

/// Reads a whole blob through `c` with ByteStream.Read.
async fn read(c: &Cairn, instance: &str, d: &Digest) -> Vec<u8> {
    use futures::StreamExt;
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    let mut s = ByteStreamClient::new(c.channel().await)
        .max_decoding_message_size(64 << 20)
        .read(cairn_core::proto::google::bytestream::ReadRequest {
            resource_name: format!("{prefix}blobs/{}/{}", d.hash_hex(), d.size()),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.next().await {
        got.extend_from_slice(&m.unwrap().data);
    }
    got
}

/// Uploads `blob` to `instance` of `c` with BatchUpdateBlobs.
async fn batch_put(c: &Cairn, instance: &str, blob: &[u8]) -> Digest {
    let d = DigestFunction::Sha256.compute(blob);
    let r = ContentAddressableStorageClient::new(c.channel().await)
        .max_encoding_message_size(64 << 20)
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data: blob.to_vec(),
                compressor: 0,
            }],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.responses[0].status.as_ref().map_or(0, |s| s.code), 0);
    d
}

/// Pages of `path` in the page cache (mincore over a read-only mapping, which faults
/// nothing in).
fn resident_pages(path: &std::path::Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: a private read-only mapping of an open file, unmapped before returning; mincore
    // writes one byte per page into `vec`, which has exactly that many.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
        libc::munmap(addr, len);
    }
    vec.iter().filter(|b| *b & 1 == 1).count()
}

#[tokio::test]
async fn evict_page_cache_keeps_written_and_read_blobs_out_of_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(
        dir.path(),
        r#"{
          stores: {
            EVICT: { filesystem: { content_path: "@DIR@/evict", evict_page_cache: true } },
            KEEP: { filesystem: { content_path: "@DIR@/keep" } },
          },
          servers: [{
            listener: { http: { socket_address: "@ADDR@" } },
            services: {
              cas: [{ instance_name: "evict", cas_store: "EVICT" }, { instance_name: "keep", cas_store: "KEEP" }],
              bytestream: [{ instance_name: "evict", cas_store: "EVICT" }, { instance_name: "keep", cas_store: "KEEP" }],
            },
          }],
        }"#,
        None,
    );
    // Large (streamed) and small (written whole) puts take different paths in the store.
    for (len, seed) in [(2_000_000, 7), (20_000, 8)] {
        let blob = data(len, seed);
        let kept = batch_put(&c, "keep", &blob).await;
        let evicted = batch_put(&c, "evict", &blob).await;
        let kept_file = dir.path().join("keep").join(kept.file_name());
        let evicted_file = dir.path().join("evict").join(evicted.file_name());
        assert!(
            resident_pages(&kept_file) > 0,
            "a plain store leaves its pages cached"
        );
        assert_eq!(
            resident_pages(&evicted_file),
            0,
            "{len} bytes: after the put"
        );
        assert_eq!(read(&c, "evict", &evicted).await, blob);
        assert_eq!(
            resident_pages(&evicted_file),
            0,
            "{len} bytes: after the read"
        );
        assert_eq!(read(&c, "keep", &kept).await, blob);
        assert!(resident_pages(&kept_file) > 0);
    }
}

#[tokio::test]
async fn bypass_dedup_threshold_bytes_reads_large_blobs_without_filling_the_fast_tier() {
    let dir = tempfile::tempdir().unwrap();
    // Puts reach only the slow tier; reads fill the fast one, below the threshold.
    let c = Cairn::start_with(
        dir.path(),
        r#"{
          stores: {
            CAS: { fast_slow: {
              fast: { filesystem: { content_path: "@DIR@/fast" } },
              fast_direction: "get",
              slow: { memory: {} },
              bypass_dedup_threshold_bytes: "1MiB",
            } },
          },
          servers: [{
            listener: { http: { socket_address: "@ADDR@" } },
            services: {
              cas: [{ instance_name: "", cas_store: "CAS" }],
              bytestream: [{ instance_name: "", cas_store: "CAS" }],
            },
          }],
        }"#,
        None,
    );
    let big = data(1 << 20, 9);
    let small = data((1 << 20) - 1, 10);
    let db = batch_put(&c, "", &big).await;
    let ds = batch_put(&c, "", &small).await;
    assert_eq!(read(&c, "", &db).await, big);
    assert_eq!(read(&c, "", &ds).await, small);
    let fast = dir.path().join("fast");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fast.join(ds.file_name()).exists() {
        assert!(
            Instant::now() < deadline,
            "the small blob never reached the fast tier"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !fast.join(db.file_name()).exists(),
        "the large blob bypassed the fast tier"
    );
}

#[test]
fn freebind_binds_an_address_this_machine_does_not_have() {
    // 192.0.2.1 (TEST-NET-1) is assigned to no interface here.
    let config = |freebind: bool| {
        format!(
            r#"{{
              stores: {{ CAS: {{ memory: {{}} }} }},
              servers: [{{
                listener: {{ http: {{ socket_address: "192.0.2.1:0", freebind: {freebind} }} }},
                services: {{ cas: [{{ instance_name: "", cas_store: "CAS" }}] }},
              }}],
            }}"#
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.json5");
    std::fs::write(&path, config(false)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("run")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("servers[0]: binding 192.0.2.1"), "{err}");

    let c = Cairn::start_with(dir.path(), &config(true), None);
    assert_eq!(c.addr.ip().to_string(), "192.0.2.1");
    assert_ne!(c.addr.port(), 0);
}

#[tokio::test]
async fn remote_cache_compression_decides_whether_zstd_is_advertised_and_taken() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(
        dir.path(),
        r#"{
          stores: { CAS: { memory: {} } },
          servers: [{
            listener: { http: { socket_address: "@ADDR@" } },
            services: {
              cas: [{ instance_name: "z", cas_store: "CAS" }, { instance_name: "plain", cas_store: "CAS" }],
              bytestream: [{ instance_name: "z", cas_store: "CAS" }, { instance_name: "plain", cas_store: "CAS" }],
              capabilities: [{ instance_name: "z", remote_cache_compression: true }, { instance_name: "plain" }],
            },
          }],
        }"#,
        None,
    );
    let blob = data(100_000, 11);
    let d = DigestFunction::Sha256.compute(&blob);
    let packed = zstd::encode_all(&blob[..], 3).unwrap();
    let zstd = re::compressor::Value::Zstd as i32;
    let mut caps = re::capabilities_client::CapabilitiesClient::new(c.channel().await);
    let mut cas = ContentAddressableStorageClient::new(c.channel().await);
    for (instance, on) in [("z", true), ("plain", false)] {
        let got = caps
            .get_capabilities(re::GetCapabilitiesRequest {
                instance_name: instance.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .cache_capabilities
            .unwrap();
        assert_eq!(got.supported_compressors.contains(&zstd), on, "{instance}");
        assert_eq!(
            got.supported_batch_update_compressors.contains(&zstd),
            on,
            "{instance}"
        );

        let r = cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                instance_name: instance.into(),
                requests: vec![re::batch_update_blobs_request::Request {
                    digest: Some(d.to_proto()),
                    data: packed.clone(),
                    compressor: zstd,
                }],
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let code = r.responses[0].status.as_ref().map_or(0, |s| s.code);
        assert_eq!(code == 0, on, "{instance}: {:?}", r.responses[0].status);
        if !on {
            assert_eq!(code, tonic::Code::InvalidArgument as i32);
            batch_put(&c, instance, &blob).await;
        }

        // BatchReadBlobs answers zstd only where it is on.
        let r = cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                instance_name: instance.into(),
                digests: vec![d.to_proto()],
                acceptable_compressors: vec![zstd],
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.responses[0].compressor == zstd, on, "{instance}");

        // ByteStream's compressed-blobs names likewise.
        let name = format!(
            "{instance}/compressed-blobs/zstd/{}/{}",
            d.hash_hex(),
            d.size()
        );
        let read = ByteStreamClient::new(c.channel().await)
            .read(cairn_core::proto::google::bytestream::ReadRequest {
                resource_name: name,
                read_offset: 0,
                read_limit: 0,
            })
            .await;
        let first = match read {
            Ok(s) => futures::StreamExt::next(&mut s.into_inner()).await.unwrap(),
            Err(e) => Err(e),
        };
        match (on, first) {
            (true, Ok(_)) => {}
            (false, Err(e)) => {
                assert_eq!(e.code(), tonic::Code::InvalidArgument);
                assert!(e.message().contains("remote_cache_compression"), "{e:?}");
            }
            (on, other) => panic!("{instance} (zstd {on}): {other:?}"),
        }
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

/// `cairn check-config` and `cairn run` on `text`: both exit codes and their stderr.
fn verdicts(text: &str) -> [(bool, String); 2] {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json5");
    std::fs::write(&path, text).unwrap();
    ["check-config", "run"].map(|cmd| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg(cmd)
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
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

#[test]
fn worker_api_kill_revoked_keys_parse_and_bad_values_are_refused_by_key_path() {
    let config = |keys: &str| {
        format!(
            r#"{{
              stores: {{ CAS: {{ memory: {{}} }} }},
              schedulers: {{ MAIN: {{ simple: {{}} }} }},
              servers: [{{
                listener: {{ http: {{ socket_address: "127.0.0.1:0" }} }},
                services: {{ worker_api: {{ scheduler: "MAIN", {keys} }} }},
              }}],
            }}"#
        )
    };
    let accepted = config(
        r#"kill_revoked_operations_interval_s: "10s", disable_kill_revoked_operations: true"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.json5");
    std::fs::write(&path, &accepted).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Cairn::start_with(dir.path(), &accepted, None);
    for (ok, err) in verdicts(&config(r#"kill_revoked_operations_interval_s: "soon""#)) {
        assert!(!ok, "{err}");
        assert!(
            err.contains("servers[0].services.worker_api.kill_revoked_operations_interval_s"),
            "{err}"
        );
    }
}

/// Every event line stored in the filesystem store at `dir`.
fn stored_events(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut out = Vec::new();
    // Blob files only, not the store's checkpoint.
    for e in entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
    {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        out.extend(
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON event")),
        );
    }
    out
}

#[tokio::test]
async fn experimental_origin_events_publishes_an_event_per_request_to_its_store() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(
        dir.path(),
        r#"{
          stores: {
            CAS: { memory: {} },
            EVENTS: { filesystem: { content_path: "@DIR@/events" } },
          },
          servers: [{
            listener: { http: { socket_address: "@ADDR@" } },
            services: {
              cas: [{ instance_name: "", cas_store: "CAS" }],
              bytestream: [{ instance_name: "", cas_store: "CAS" }],
              health: {},
            },
            experimental_identity_header: { header_name: "x-who" },
          }],
          experimental_origin_events: { publisher: { store: "EVENTS" }, max_event_queue_size: 1 },
        }"#,
        None,
    );
    let d = DigestFunction::Sha256.compute(b"evented");
    let metadata = re::RequestMetadata {
        tool_details: Some(re::ToolDetails {
            tool_name: "bazel".into(),
            tool_version: "4.2.3".into(),
        }),
        tool_invocation_id: "inv-1".into(),
        action_mnemonic: "CppCompile".into(),
        ..Default::default()
    };
    let mut cas = ContentAddressableStorageClient::new(c.channel().await);
    for _ in 0..3 {
        let mut req = tonic::Request::new(re::FindMissingBlobsRequest {
            blob_digests: vec![d.to_proto()],
            ..Default::default()
        });
        req.metadata_mut().insert("x-who", "alice".parse().unwrap());
        req.metadata_mut().insert_bin(
            "build.bazel.remote.execution.v2.requestmetadata-bin",
            tonic::metadata::MetadataValue::from_bytes(&metadata.encode_to_vec()),
        );
        cas.find_missing_blobs(req).await.unwrap();
    }
    write(&c, b"evented", None).await.unwrap();
    // A RequestMetadata header that is not one: served, and recorded without it.
    let mut req = tonic::Request::new(re::FindMissingBlobsRequest::default());
    req.metadata_mut().insert_bin(
        "build.bazel.remote.execution.v2.requestmetadata-bin",
        tonic::metadata::MetadataValue::from_bytes(b"\xff\xff garbage"),
    );
    cas.find_missing_blobs(req).await.unwrap();
    let bad = cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: "nowhere".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // HTTP routes are not gRPC requests: no event.
    assert_eq!(common::http_get(c.addr, "/status").await.0, 200);

    // Written as they come; SIGTERM writes whatever is still queued.
    let events_dir = dir.path().join("events");
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_events(&events_dir).len() < 6 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            stored_events(&events_dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(cas);
    // Off the runtime, so that the dropped clients' connections close meanwhile.
    let exit = tokio::task::spawn_blocking(move || c.terminate());
    assert!(exit.await.unwrap().success());
    let events = stored_events(&events_dir);
    assert_eq!(events.len(), 6, "{events:#?}");
    let cas_service = "build.bazel.remote.execution.v2.ContentAddressableStorage";
    let found: Vec<_> = events
        .iter()
        .filter(|e| e["method"] == "FindMissingBlobs" && e["identity"] == "alice")
        .collect();
    assert_eq!(found.len(), 3, "{events:#?}");
    for e in &found {
        assert_eq!(e["service"], cas_service);
        assert_eq!(e["grpc_status"], 0);
        assert_eq!(e["request_metadata"]["tool_invocation_id"], "inv-1");
        assert_eq!(e["request_metadata"]["tool_name"], "bazel");
        assert_eq!(e["request_metadata"]["action_mnemonic"], "CppCompile");
        assert!(e["event_id"].as_str().is_some_and(|s| s.len() == 36));
    }
    let write_event = events.iter().find(|e| e["method"] == "Write").unwrap();
    assert_eq!(write_event["service"], "google.bytestream.ByteStream");
    assert_eq!(write_event["grpc_status"], 0);
    let failed = events
        .iter()
        .find(|e| e["grpc_status"] == tonic::Code::InvalidArgument as i64)
        .unwrap();
    assert_eq!(failed["identity"], "");
    assert!(failed.get("request_metadata").is_none());
    let garbled = events
        .iter()
        .filter(|e| e["method"] == "FindMissingBlobs" && e["grpc_status"] == 0)
        .filter(|e| e.get("request_metadata").is_none())
        .count();
    assert_eq!(garbled, 1, "{events:#?}");
}

/// A scheduler with one local worker of one slot; `@RUN_ON@` is the worker API's
/// `disable_kill_revoked_operations`.
const EXECUTION: &str = r#"{
  stores: {
    CAS: { memory: {} },
    AC: { memory: {} },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas" } },
      slow: { ref_store: { name: "CAS" } } } },
  },
  schedulers: { MAIN: { simple: { supported_platform_properties: { OSFamily: "exact" } } } },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
      } },
    { listener: { http: { socket_address: "@WADDR@" } },
      services: { worker_api: { scheduler: "MAIN", disable_kill_revoked_operations: @RUN_ON@ } } },
  ],
  workers: [{ local: {
    worker_api_endpoint: { uri: "grpc://@WADDR@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
    max_inflight_tasks: 1,
  } }],
}"#;

/// Runs `first` until it executes, cancels it, then runs `second` to its end. Returns the
/// action cache's entries for both (polled for `first` up to `wait_first`).
async fn cancel_then_run(
    run_on: bool,
    wait_first: Duration,
) -> (Option<re::ActionResult>, re::ActionResult, Cairn) {
    use cairn_core::proto::google::longrunning::operations_client::OperationsClient;
    use futures::StreamExt;
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let waddr = common::free_addr().to_string();
    let c = Cairn::start_with(
        dir.path(),
        &EXECUTION
            .replace("@WADDR@", &waddr)
            .replace("@RUN_ON@", &run_on.to_string()),
        None,
    );
    // Kept for the run: the worker's directories live in it.
    std::mem::forget(dir);
    let first = common::actions::ShellAction {
        script: "sleep 2; date +%s%N > t",
        outputs: &["t"],
        ..Default::default()
    }
    .upload(c.channel().await, "")
    .await;
    let second = common::actions::ShellAction {
        script: "date +%s%N > t; echo second >> t",
        outputs: &["t"],
        ..Default::default()
    }
    .upload(c.channel().await, "")
    .await;
    let mut exec = re::execution_client::ExecutionClient::new(c.channel().await);
    let mut ops = OperationsClient::new(c.channel().await);
    let mut ac = re::action_cache_client::ActionCacheClient::new(c.channel().await);
    let mut s = exec
        .execute(re::ExecuteRequest {
            action_digest: Some(first.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let name = loop {
        let op = s.next().await.expect("an update").unwrap();
        let meta = re::ExecuteOperationMetadata::decode(
            op.metadata.as_ref().map_or(&[][..], |m| &m.value[..]),
        )
        .unwrap();
        if meta.stage == re::execution_stage::Value::Executing as i32 {
            break op.name;
        }
    };
    ops.cancel_operation(cairn_core::proto::google::longrunning::CancelOperationRequest { name })
        .await
        .unwrap();
    drop(s);
    let mut s = exec
        .execute(re::ExecuteRequest {
            action_digest: Some(second.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = s.next().await {
        last = Some(op.unwrap());
    }
    let done = match last.unwrap().result {
        Some(cairn_core::proto::google::longrunning::operation::Result::Response(r)) => {
            re::ExecuteResponse::decode(&r.value[..]).unwrap()
        }
        other => panic!("{other:?}"),
    };
    let second_result = done.result.expect("the second action ran");
    let get = |d: Digest| re::GetActionResultRequest {
        action_digest: Some(d.to_proto()),
        ..Default::default()
    };
    let deadline = Instant::now() + wait_first;
    let first_result = loop {
        match ac.get_action_result(get(first)).await {
            Ok(r) => break Some(r.into_inner()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(_) => break None,
        }
    };
    (first_result, second_result, c)
}

/// The nanosecond time an action wrote at the start of its output `t`.
async fn time_written(c: &Cairn, r: &re::ActionResult) -> u128 {
    let f = &r.output_files[0];
    let d = Digest::from_proto(0, f.digest.as_ref().unwrap()).unwrap();
    let text = String::from_utf8(read(c, "", &d).await).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn disable_kill_revoked_operations_lets_a_cancelled_action_finish_and_keep_its_slot() {
    let (first, second, c) = cancel_then_run(true, Duration::from_secs(20)).await;
    let first = first.expect("the cancelled action ran to its end and its result was cached");
    assert_eq!(first.exit_code, 0);
    // One slot: the second action started only after the first had ended.
    let (ended, started) = (
        time_written(&c, &first).await,
        time_written(&c, &second).await,
    );
    assert!(
        started >= ended,
        "second started {started}, first ended {ended}"
    );
}

#[tokio::test]
async fn by_default_a_cancelled_action_is_killed_on_its_worker() {
    // The first action would finish 2 s after it started; give it 4.
    let (first, _second, _c) = cancel_then_run(false, Duration::from_secs(4)).await;
    assert!(
        first.is_none(),
        "the cancelled action was not killed: {first:?}"
    );
}
