//! The `grpc` store: a Cairn whose CAS and AC live on another Cairn (a split deployment).

mod common;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::proto::google::bytestream::{ReadRequest, WriteRequest};
use cairn_core::DigestFunction;
use common::{data, Cairn};
use futures::StreamExt;

const FRONT: &str = r#"{
  stores: {
    CAS: { fast_slow: { fast: { memory: {} }, slow: { grpc: { instance_name: "main", endpoints: [{ address: "grpc://@UPSTREAM@" }], store_type: "cas" } } } },
    AC: { grpc: { instance_name: "main", endpoints: [{ address: "grpc://@UPSTREAM@" }], store_type: "ac" } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
    },
  }],
}"#;

#[tokio::test]
async fn a_front_server_stores_through_to_its_upstream() {
    let up_dir = tempfile::tempdir().unwrap();
    let upstream = Cairn::start(up_dir.path());
    let front_dir = tempfile::tempdir().unwrap();
    let front = Cairn::start_with(
        front_dir.path(),
        &FRONT.replace("@UPSTREAM@", &upstream.addr.to_string()),
        None,
    );

    let blob = data(3_000_000, 1);
    let d = DigestFunction::Sha256.compute(&blob);
    let mut fbs = ByteStreamClient::new(front.channel().await);
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    let msgs: Vec<WriteRequest> = blob
        .chunks(500_000)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * 500_000) as i64,
            finish_write: (i + 1) * 500_000 >= blob.len(),
            data: c.to_vec(),
        })
        .collect();
    fbs.write(futures::stream::iter(msgs)).await.unwrap();

    // The upstream has it, under its instance name "main".
    let mut ubs =
        ByteStreamClient::new(upstream.channel().await).max_decoding_message_size(64 << 20);
    let mut s = ubs
        .read(ReadRequest {
            resource_name: format!("main/blobs/{}/{}", d.hash_hex(), d.size()),
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
    assert_eq!(got, blob);

    // Uploaded upstream, found through the front (FindMissingBlobs and a ranged read).
    let other = data(5000, 2);
    let od = DigestFunction::Sha256.compute(&other);
    let mut ucas = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
        upstream.channel().await,
    );
    ucas.batch_update_blobs(re::BatchUpdateBlobsRequest {
        instance_name: "main".into(),
        requests: vec![re::batch_update_blobs_request::Request {
            digest: Some(od.to_proto()),
            data: other.clone(),
            compressor: 0,
        }],
        digest_function: 0,
    })
    .await
    .unwrap();
    let mut fcas = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
        front.channel().await,
    );
    let missing = DigestFunction::Sha256.compute(b"nowhere");
    let r = fcas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![od.to_proto(), missing.to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.missing_blob_digests, vec![missing.to_proto()]);
    let mut s = fbs
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", od.hash_hex(), od.size()),
            read_offset: 100,
            read_limit: 50,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.next().await {
        got.extend_from_slice(&m.unwrap().data);
    }
    assert_eq!(got, &other[100..150]);

    // Action results go upstream too.
    let action = DigestFunction::Sha256.compute(b"action");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "o".into(),
            digest: Some(od.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut fac = re::action_cache_client::ActionCacheClient::new(front.channel().await);
    fac.update_action_result(re::UpdateActionResultRequest {
        action_digest: Some(action.to_proto()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut uac = re::action_cache_client::ActionCacheClient::new(upstream.channel().await);
    let got = uac
        .get_action_result(re::GetActionResultRequest {
            instance_name: "main".into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, result);
    let e = fac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(missing.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // A wrong upload through the front is rejected (by the front's verification) and the
    // upstream stays clean.
    let bad_name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        missing.hash_hex(),
        3
    );
    let e = fbs
        .write(futures::stream::iter(vec![WriteRequest {
            resource_name: bad_name,
            write_offset: 0,
            finish_write: true,
            data: b"abc".to_vec(),
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

/// `retry`: a request to an upstream that is down is retried with backoff and succeeds once
/// the upstream is back; without `retry` it fails at once with UNAVAILABLE naming it. Also
/// `connections_per_endpoint`, `max_concurrent_requests` and `concurrency_limit` are taken.
#[tokio::test]
async fn retries_reach_an_upstream_that_comes_back() {
    let upstream_addr = common::free_addr();
    let front_config = |retry: &str| {
        format!(
            r#"{{
  stores: {{
    AC: {{ grpc: {{ instance_name: "main", endpoints: [{{ address: "grpc://{upstream_addr}", concurrency_limit: 8 }}], store_type: "ac", connections_per_endpoint: 2, max_concurrent_requests: 16 {retry} }} }},
  }},
  servers: [{{
    listener: {{ http: {{ socket_address: "@ADDR@" }} }},
    services: {{ ac: [{{ instance_name: "", ac_store: "AC" }}] }},
  }}],
}}"#
        )
    };
    let ask = |front: tonic::transport::Channel| async move {
        re::action_cache_client::ActionCacheClient::new(front)
            .get_action_result(re::GetActionResultRequest {
                action_digest: Some(DigestFunction::Sha256.compute(b"an action").to_proto()),
                ..Default::default()
            })
            .await
    };

    // Without retry: UNAVAILABLE, naming the upstream.
    let dir = tempfile::tempdir().unwrap();
    let front = Cairn::start_with(dir.path(), &front_config(""), None);
    let e = ask(front.channel().await).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&upstream_addr.to_string()), "{e:?}");
    drop(front);

    // With retry: the call waits, and the upstream starts meanwhile; NOT_FOUND is its answer.
    let dir = tempfile::tempdir().unwrap();
    let front = Cairn::start_with(
        dir.path(),
        &front_config(", retry: { max_retries: 30, delay: 0.05, jitter: 0.5 }"),
        None,
    );
    let call = tokio::spawn(ask(front.channel().await));
    let up_dir = tempfile::tempdir().unwrap();
    let _upstream = Cairn::start_with(up_dir.path(), common::MEMORY_CONFIG, Some(upstream_addr));
    let e = call.await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
}
