//! The Remote Asset API (`services.fetch`, `services.push`) against the real binary: Bazel
//! 4.2.3 with `--experimental_remote_downloader` gets an external archive through Cairn, which
//! downloads it once from a local HTTP server and then serves it from its cache with the
//! server gone; and the API's edge cases with a tonic client (wrong checksum, push then fetch,
//! read-only push, 404, unsupported calls).
//!
//! The Bazel test needs `bazel` on PATH (Debian's `bazel-bootstrap`); without it it fails,
//! unless `CAIRN_SKIP_BAZEL=1` is set.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use cairn_core::proto::build::bazel::remote::asset::v1 as asset;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::DigestFunction;
use common::bazel::{self, Bazel};
use common::Cairn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = r#"{
  stores: {
    CAS: { memory: { eviction_policy: { max_bytes: "256mb" } } },
    AC: { memory: { eviction_policy: { max_bytes: "64mb" } } },
    ASSETS: { memory: { eviction_policy: { max_bytes: "16mb" } } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
      fetch: [{ instance_name: "", fetch_store: "ASSETS" }],
      push: [{ instance_name: "", push_store: "ASSETS" }, { instance_name: "ro", push_store: "ASSETS", read_only: true }],
    },
  }],
}"#;

/// A minimal HTTP/1.1 file server on loopback that records each request's path and
/// User-Agent, and answers 404 for unknown paths.
struct FileServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FileServer {
    async fn start(files: Vec<(&'static str, Vec<u8>)>) -> FileServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let files = Arc::new(files);
        let log = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let (files, log) = (files.clone(), log.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let agent = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("user-agent:")
                                .map(|v| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    log.lock().unwrap().push((path.clone(), agent));
                    let body = files
                        .iter()
                        .find(|(p, _)| *p == path)
                        .map(|(_, b)| b.clone());
                    let (status, body) = match body {
                        Some(b) => ("200 OK", b),
                        None => ("404 Not Found", b"no such file".to_vec()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                });
            }
        });
        FileServer {
            addr,
            requests,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A tar.gz of `greeting/BUILD` and `greeting/hello.txt`, made with `tar`.
fn greeting_archive(dir: &std::path::Path) -> Vec<u8> {
    let src = dir.join("src/greeting");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("BUILD"),
        "exports_files([\"hello.txt\"], visibility = [\"//visibility:public\"])\n",
    )
    .unwrap();
    std::fs::write(src.join("hello.txt"), "fetched through cairn\n").unwrap();
    let out = dir.join("greeting.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(dir.join("src"))
        .arg("greeting")
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(out).unwrap()
}

fn sri(data: &[u8]) -> String {
    use base64::Engine;
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD
            .encode(DigestFunction::Sha256.compute(data).hash())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_fetches_an_external_archive_through_cairn_and_again_without_the_origin() {
    let Some(program) = bazel::find_or_skip("remote_asset") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let archive = greeting_archive(tmp.path());
    let origin = FileServer::start(vec![("/greeting.tar.gz", archive.clone())]).await;
    let cairn_dir = tmp.path().join("cairn");
    std::fs::create_dir_all(&cairn_dir).unwrap();
    let cairn = Cairn::start_with(&cairn_dir, CONFIG, None);

    let bazel = Bazel::new(program, &tmp.path().join("bazel"), "bazel-asset-workspace");
    let ws = bazel.workspace().join("WORKSPACE");
    let text = std::fs::read_to_string(&ws)
        .unwrap()
        .replace("@URL@", &origin.url("/greeting.tar.gz"))
        .replace(
            "@SHA256@",
            &DigestFunction::Sha256.compute(&archive).hash_hex(),
        );
    std::fs::write(&ws, text).unwrap();
    let mut flags = bazel.offline_flags();
    flags.push(format!(
        "--experimental_remote_downloader=grpc://{}",
        cairn.addr
    ));
    flags.push(format!("--remote_cache=grpc://{}", cairn.addr));
    flags.push("//:shout".to_string());

    tokio::task::block_in_place(|| {
        bazel.run("build", &flags);
    });
    let shout = std::fs::read_to_string(bazel.bin("shout.txt")).unwrap();
    assert_eq!(shout, "FETCHED THROUGH CAIRN\n");
    // The origin was asked once, by Cairn (not by Bazel).
    let asked = origin.requests();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(asked[0].1.starts_with("cairn/"), "{asked:?}");

    // The origin goes away; a build from nothing still gets the archive, from Cairn.
    drop(origin);
    tokio::task::block_in_place(|| {
        bazel.run("clean", &["--expunge".to_string()]);
        bazel.run("build", &flags);
    });
    let shout = std::fs::read_to_string(bazel.bin("shout.txt")).unwrap();
    assert_eq!(shout, "FETCHED THROUGH CAIRN\n");
    drop(bazel);
}

fn qualifier(name: &str, value: &str) -> asset::Qualifier {
    asset::Qualifier {
        name: name.into(),
        value: value.into(),
    }
}

#[tokio::test]
async fn fetch_and_push_edge_cases() {
    let tmp = tempfile::tempdir().unwrap();
    let blob = b"an asset's bytes".to_vec();
    let origin = FileServer::start(vec![("/a.bin", blob.clone())]).await;
    let cairn = Cairn::start_with(tmp.path(), CONFIG, None);
    let ch = cairn.channel().await;
    let mut fetch = asset::fetch_client::FetchClient::new(ch.clone());
    let mut push = asset::push_client::PushClient::new(ch.clone());
    let blob_digest = DigestFunction::Sha256.compute(&blob);

    // A wrong checksum: the download is refused and nothing is recorded or stored.
    let wrong = fetch
        .fetch_blob(asset::FetchBlobRequest {
            uris: vec![origin.url("/a.bin")],
            qualifiers: vec![qualifier("checksum.sri", &sri(b"something else"))],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = wrong.status.unwrap();
    assert_eq!(
        status.code,
        tonic::Code::InvalidArgument as i32,
        "{status:?}"
    );
    assert!(status.message.contains("checksum.sri"), "{status:?}");
    let missing =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch.clone())
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![blob_digest.to_proto()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 1);

    // The right checksum: downloaded, stored, and the digest returned.
    let ok = fetch
        .fetch_blob(asset::FetchBlobRequest {
            uris: vec![origin.url("/a.bin")],
            qualifiers: vec![qualifier("checksum.sri", &sri(&blob))],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.status.unwrap().code, 0);
    assert_eq!(ok.blob_digest, Some(blob_digest.to_proto()));

    // A URI nobody downloads: what Push recorded is what Fetch answers.
    let pushed = push
        .push_blob(asset::PushBlobRequest {
            uris: vec!["https://example.invalid/pushed.tgz".into()],
            blob_digest: Some(blob_digest.to_proto()),
            ..Default::default()
        })
        .await;
    assert!(pushed.is_ok(), "{pushed:?}");
    let got = fetch
        .fetch_blob(asset::FetchBlobRequest {
            uris: vec!["https://example.invalid/pushed.tgz".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().code, 0);
    assert_eq!(got.blob_digest, Some(blob_digest.to_proto()));

    // 404 at the origin: NOT_FOUND in the status, naming the URI.
    let gone = fetch
        .fetch_blob(asset::FetchBlobRequest {
            uris: vec![origin.url("/nope")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = gone.status.unwrap();
    assert_eq!(status.code, tonic::Code::NotFound as i32, "{status:?}");
    assert!(status.message.contains("/nope"), "{status:?}");

    // Requests that are wrong in themselves are gRPC errors.
    let e = fetch
        .fetch_blob(asset::FetchBlobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = push
        .push_blob(asset::PushBlobRequest {
            instance_name: "ro".into(),
            uris: vec!["https://example.invalid/x".into()],
            blob_digest: Some(blob_digest.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = fetch
        .fetch_directory(asset::FetchDirectoryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    // The origin saw only what was downloaded: the two fetches of /a.bin and the 404.
    assert_eq!(origin.requests().len(), 3, "{:?}", origin.requests());
}
