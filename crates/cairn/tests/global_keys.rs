//! NativeLink's `global` and per-server keys that change what the server does, each shown
//! against the real binary: `disable_metrics`, `default_digest_hash_function`,
//! `default_digest_size_health_check` and `experimental_identity_header`.

mod common;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::DigestFunction;
use common::Cairn;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::Code;

fn config(global: &str, server_extra: &str) -> String {
    format!(
        r#"{{
  global: {global},
  stores: {{
    CAS: {{ memory: {{ eviction_policy: {{ max_bytes: "64mb" }} }} }},
    AC: {{ completeness_checking: {{ backend: {{ memory: {{}} }}, cas_store: {{ ref_store: {{ name: "CAS" }} }} }} }},
  }},
  servers: [{{
    listener: {{ http: {{ socket_address: "@ADDR@" }} }},
    {server_extra}
    services: {{
      cas: [{{ instance_name: "", cas_store: "CAS" }}],
      ac: [{{ instance_name: "", ac_store: "AC" }}],
      capabilities: [{{ instance_name: "" }}],
      health: {{}},
    }},
  }}],
}}"#
    )
}

fn metric(body: &str, line_prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn disable_metrics_removes_the_metrics_route() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(tmp.path(), &config("{ disable_metrics: true }", ""), None);
    // Not served: a plain 404, as for any path nothing serves.
    let (code, body) = common::http_get(c.addr, "/metrics").await;
    assert_eq!(code, 404, "{body}");
    assert!(!body.contains("nativelink_"), "{body}");
    assert_eq!(common::http_get(c.addr, "/no-such-page").await.0, 404);
    assert_eq!(common::http_get(c.addr, "/status").await.0, 200);
}

#[tokio::test]
async fn default_digest_hash_function_decides_unnamed_64_digit_hashes() {
    let blob = b"hashed with blake3 by a client that does not say so".to_vec();
    for (name, function) in [
        ("sha256", DigestFunction::Sha256),
        ("blake3", DigestFunction::Blake3),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let global = format!(r#"{{ default_digest_hash_function: "{name}" }}"#);
        let c = Cairn::start_with(tmp.path(), &config(&global, ""), None);
        let mut cas = ContentAddressableStorageClient::new(c.channel().await);
        let r = cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: vec![re::batch_update_blobs_request::Request {
                    digest: Some(DigestFunction::Blake3.compute(&blob).to_proto()),
                    data: blob.clone(),
                    compressor: 0,
                }],
                // No digest_function: the server's default decides.
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let code = r.responses[0].status.as_ref().unwrap().code;
        let expected = if function == DigestFunction::Blake3 {
            Code::Ok
        } else {
            Code::InvalidArgument
        };
        assert_eq!(code, expected as i32, "{name}: {r:?}");
    }
    // Anything but sha256 or blake3 is a config error with the key path.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("c.json5");
    std::fs::write(
        &path,
        config(r#"{ default_digest_hash_function: "md5" }"#, "").replace("@ADDR@", "127.0.0.1:0"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("global.default_digest_hash_function"),
        "{err}"
    );
}

#[tokio::test]
async fn the_health_check_writes_and_reads_a_blob_of_the_configured_size() {
    for (global, probes) in [
        ("{}", false),
        ("{ default_digest_size_health_check: 4096 }", true),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cairn::start_with(tmp.path(), &config(global, ""), None);
        let (code, body) = common::http_get(c.addr, "/status").await;
        assert_eq!(code, 200, "{body}");
        let (_, metrics) = common::http_get(c.addr, "/metrics").await;
        for store in ["CAS", "AC"] {
            let bytes = metric(
                &metrics,
                &format!("nativelink_store_size_bytes{{store=\"{store}\"}}"),
            )
            .unwrap_or(0.0);
            assert_eq!(
                bytes > 0.0,
                probes,
                "{global}: {store} holds {bytes} bytes after /status\n{metrics}"
            );
        }
        // The probe stores one blob per size, however often it runs.
        common::http_get(c.addr, "/status").await;
        let (_, again) = common::http_get(c.addr, "/metrics").await;
        let entries = |m: &str| metric(m, "nativelink_store_entries{store=\"CAS\"}");
        assert_eq!(entries(&metrics), entries(&again));
    }
}

#[tokio::test]
async fn a_required_identity_header_refuses_requests_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(
        tmp.path(),
        &config(
            "{}",
            r#"experimental_identity_header: { header_name: "x-build-user", required: true },"#,
        ),
        None,
    );
    let ch = c.channel().await;
    let e = re::capabilities_client::CapabilitiesClient::new(ch.clone())
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("x-build-user"), "{e:?}");
    let mut req = tonic::Request::new(re::GetCapabilitiesRequest::default());
    req.metadata_mut()
        .insert("x-build-user", "alice".parse().unwrap());
    re::capabilities_client::CapabilitiesClient::new(ch)
        .get_capabilities(req)
        .await
        .unwrap();
    // /status is not a gRPC request: it needs no identity.
    assert_eq!(common::http_get(c.addr, "/status").await.0, 200);
}

/// `cache_metrics` (NativeLink's wrapper store): the wrapped tier's operations are counted
/// under its `cache_type`; `filesystem.max_concurrent_writes` is taken (writes still work).
#[tokio::test]
async fn cache_metrics_count_the_wrapped_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let config = r#"{
  stores: {
    CAS: { fast_slow: {
      fast: { cache_metrics: { cache_type: "cas_fast", backend: { memory: {} } } },
      slow: { filesystem: { content_path: "@DIR@/cas", temp_path: "@DIR@/tmp", max_concurrent_writes: 2 } },
    } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: { cas: [{ instance_name: "", cas_store: "CAS" }], health: {} },
  }],
}"#;
    let c = Cairn::start_with(tmp.path(), config, None);
    let mut cas = ContentAddressableStorageClient::new(c.channel().await);
    let blobs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1000]).collect();
    let r = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: blobs
                .iter()
                .map(|b| re::batch_update_blobs_request::Request {
                    digest: Some(DigestFunction::Sha256.compute(b).to_proto()),
                    data: b.clone(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r
        .responses
        .iter()
        .all(|r| r.status.as_ref().unwrap().code == 0));
    let (_, body) = common::http_get(c.addr, "/metrics").await;
    let writes = metric(
        &body,
        "nativelink_cache_operations_total{cache_type=\"cas_fast\",cache_operation_name=\"write\",cache_operation_result=\"success\"}",
    );
    assert_eq!(writes, Some(8.0), "{body}");
    // Every blob reached the filesystem tier through its write limit.
    assert_eq!(common::blob_files(&tmp.path().join("cas")), 8);
}
