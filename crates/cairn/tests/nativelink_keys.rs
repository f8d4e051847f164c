//! NativeLink 1.6.6 keys of the filesystem and fast_slow stores, listeners, capabilities,
//! the worker API and origin events, each against real processes. The `grpc` store's keys are
//! in `nativelink_grpc_store.rs`.

mod common;

use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::{Digest, DigestFunction};
use common::blobs::{batch_put, read, verdicts, write};
use common::{data, Cairn};
use re::content_addressable_storage_client::ContentAddressableStorageClient;

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
        let kept_file = cairn_store::filesystem::blob_path(&dir.path().join("keep"), &kept);
        let evicted_file = cairn_store::filesystem::blob_path(&dir.path().join("evict"), &evicted);
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
    while !cairn_store::filesystem::blob_path(&fast, &ds).exists() {
        assert!(
            Instant::now() < deadline,
            "the small blob never reached the fast tier"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !cairn_store::filesystem::blob_path(&fast, &db).exists(),
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
    // Blob files only (in the prefix directories), not the store's own `.cairn-*` files.
    let files = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten());
    for e in files {
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
) -> (
    Option<re::ActionResult>,
    re::ActionResult,
    Cairn,
    tempfile::TempDir,
) {
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
    // The directory goes back with the process: the worker's directories live in it.
    (first_result, second_result, c, dir)
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
    let (first, second, c, _dir) = cancel_then_run(true, Duration::from_secs(20)).await;
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
    let (first, _second, _c, _dir) = cancel_then_run(false, Duration::from_secs(4)).await;
    assert!(
        first.is_none(),
        "the cancelled action was not killed: {first:?}"
    );
}
