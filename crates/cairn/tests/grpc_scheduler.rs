//! The `grpc` scheduler: a front process with no queue of its own forwards Execute,
//! WaitExecution and the Operations calls to a backend scheduler over TLS, reports the
//! backend's platform properties in GetCapabilities, and says UNAVAILABLE, naming itself and
//! where it forwards, when the backend is gone.

mod common;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::longrunning::operations_client::OperationsClient;
use cairn_core::proto::google::longrunning::{
    operation, GetOperationRequest, ListOperationsRequest, Operation,
};
use cairn_core::DigestFunction;
use common::actions::ShellAction;
use common::certs::Pki;
use common::{free_addr, Cairn};
use futures::StreamExt;
use prost::Message;
use tonic::Code;

const SHA: DigestFunction = DigestFunction::Sha256;

/// The backend: CAS, AC, a `simple` scheduler with a local worker, all over TLS.
const BACKEND: &str = r#"{
  stores: {
    CAS: { memory: {} },
    AC: { memory: {} },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/worker-tmp" } },
      slow: { ref_store: { name: "CAS" } } } },
  },
  schedulers: {
    MAIN: { simple: { supported_platform_properties: { OSFamily: "exact", pool: "exact" } } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@", tls: { cert_file: "@CERT@", key_file: "@KEY@" } } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "", remote_execution: { scheduler: "MAIN" } }],
      } },
    { listener: { http: { socket_address: "@WADDR@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
  workers: [{ local: {
    worker_api_endpoint: { uri: "grpc://@WADDR@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
  } }],
}"#;

/// The front: its CAS and AC are the backend's (grpc stores) and its scheduler forwards.
const FRONT: &str = r#"{
  stores: {
    CAS: { grpc: { instance_name: "", store_type: "cas",
      endpoints: [{ address: "grpcs://@BACKEND@", tls_config: { ca_file: "@CA@" } }] } },
    AC: { grpc: { instance_name: "", store_type: "ac",
      endpoints: [{ address: "grpcs://@BACKEND@", tls_config: { ca_file: "@CA@" } }] } },
  },
  schedulers: {
    FRONT: { grpc: {
      endpoint: { address: "grpcs://@BACKEND@", tls_config: { ca_file: "@CA@" } },
      retry: { max_retries: 1, delay: 0.05 },
      max_concurrent_requests: 100,
      connections_per_endpoint: 2,
    } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      execution: [{ instance_name: "", cas_store: "CAS", scheduler: "FRONT" }],
      capabilities: [{ instance_name: "", remote_execution: { scheduler: "FRONT" } }],
    },
  }],
}"#;

fn response(op: &Operation) -> re::ExecuteResponse {
    match op.result.as_ref().expect("a done operation has a result") {
        operation::Result::Response(any) => re::ExecuteResponse::decode(&any.value[..]).unwrap(),
        operation::Result::Error(e) => panic!("operation error {e:?}"),
    }
}

async fn last(mut s: tonic::Streaming<Operation>) -> Operation {
    let mut last = None;
    while let Some(op) = s.next().await {
        last = Some(op.unwrap());
    }
    last.expect("at least one operation")
}

#[tokio::test]
async fn a_grpc_scheduler_forwards_execution_over_tls_and_reports_the_backends_properties() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"), "root");
    let server = pki.issue("backend", 10, true);
    let bdir = tmp.path().join("backend");
    std::fs::create_dir_all(&bdir).unwrap();
    let backend_addr = free_addr();
    let backend = Cairn::start_with(
        &bdir,
        &BACKEND
            .replace("@CERT@", &server.cert.display().to_string())
            .replace("@KEY@", &server.key.display().to_string())
            .replace("@WADDR@", &free_addr().to_string()),
        Some(backend_addr),
    );
    let fdir = tmp.path().join("front");
    std::fs::create_dir_all(&fdir).unwrap();
    let front = Cairn::start_with(
        &fdir,
        &FRONT
            .replace("@BACKEND@", &backend_addr.to_string())
            .replace("@CA@", &pki.ca.display().to_string()),
        None,
    );
    let ch = front.channel().await;

    // The backend's platform properties, through the front.
    let caps = re::capabilities_client::CapabilitiesClient::new(ch.clone())
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let exec = caps.execution_capabilities.unwrap();
    assert!(exec.exec_enabled);
    assert_eq!(exec.supported_node_properties, ["OSFamily", "pool"]);

    // An action uploaded through the front (its CAS is the backend's) runs on the backend's
    // worker, and the front streams the backend's operation.
    let digest = ShellAction {
        script: "echo forwarded",
        ..Default::default()
    }
    .upload(ch.clone(), "")
    .await;
    let mut exec = re::execution_client::ExecutionClient::new(ch.clone());
    let op = last(
        exec.execute(re::ExecuteRequest {
            action_digest: Some(digest.to_proto()),
            skip_cache_lookup: true,
            digest_function: SHA.to_proto(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    assert!(op.done);
    let resp = response(&op);
    assert_eq!(resp.status.map_or(0, |s| s.code), 0);
    let result = resp.result.unwrap();
    assert_eq!(result.exit_code, 0);
    let out =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch.clone())
            .batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![result.stdout_digest.unwrap()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(out.responses[0].data, b"forwarded\n");

    // The operation is the backend's: WaitExecution, GetOperation and ListOperations
    // through the front find it.
    let waited = last(
        exec.wait_execution(re::WaitExecutionRequest {
            name: op.name.clone(),
        })
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    assert_eq!(waited.name, op.name);
    assert!(waited.done);
    let mut ops = OperationsClient::new(ch.clone());
    let got = ops
        .get_operation(GetOperationRequest {
            name: op.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done && got.name == op.name);
    let listed = ops
        .list_operations(ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.operations.iter().any(|o| o.name == op.name));
    let e = ops
        .get_operation(GetOperationRequest {
            name: "operations/unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // The backend goes away: the front says so, naming itself and the address.
    backend.kill9();
    let e = exec
        .execute(re::ExecuteRequest {
            action_digest: Some(digest.to_proto()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&backend_addr.to_string()), "{e:?}");
}

#[test]
fn a_worker_api_on_a_grpc_scheduler_is_refused_by_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.json5");
    std::fs::write(
        &f,
        r#"{ schedulers: { FRONT: { cache_lookup: { ac_store: { memory: {} }, scheduler: { grpc: { endpoint: { address: "grpc://127.0.0.1:1" } } } } } },
             servers: [{ listener: { http: { socket_address: "127.0.0.1:0" } }, services: { worker_api: { scheduler: "FRONT" } } }] }"#,
    )
    .unwrap();
    for verb in ["check-config", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg(verb)
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{verb} accepted it");
        assert!(
            err.contains("servers[0].services.worker_api.scheduler: \"FRONT\" is a grpc scheduler"),
            "{verb}: {err}"
        );
    }
}
