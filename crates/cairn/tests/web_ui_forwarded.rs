//! Execute calls that a `grpc` scheduler forwards are recorded on the front too: a front
//! process (web UI, BEP, a `grpc` scheduler and `grpc` stores) forwards to a backend (a
//! scheduler behind an action cache lookup, a local worker, no web UI), and the front's
//! invocation page lists the invocation's remote actions from Bazel's `RequestMetadata`: how
//! each execution ended, its exit code and worker, the failed action's stderr, and a cache hit
//! the backend answered. A call the front refuses records nothing and the front stays up.

mod common;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use common::invocations::{
    action_row, assert_failed_and_fine, execute, invocation_metadata, page, shell,
    start_invocation, ONE_OF_TWO_FAILED,
};
use common::{free_addr, http_get, Cairn};

const BACKEND: &str = r#"{
  stores: {
    CAS: { memory: {} },
    AC: { memory: {} },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/worker-tmp" } },
      slow: { ref_store: { name: "CAS" } } } },
  },
  schedulers: {
    MAIN: { cache_lookup: { ac_store: { ref_store: { name: "AC" } }, scheduler: { simple: {
      supported_platform_properties: { OSFamily: "exact" } } } } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
      } },
    { listener: { http: { socket_address: "@WADDR@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
  workers: [{ local: {
    name: "backend-wk",
    worker_api_endpoint: { uri: "grpc://@WADDR@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
  } }],
}"#;

const FRONT: &str = r#"{
  stores: {
    CAS: { grpc: { instance_name: "", store_type: "cas", endpoints: [{ address: "grpc://@BACKEND@" }] } },
    AC: { grpc: { instance_name: "", store_type: "ac", endpoints: [{ address: "grpc://@BACKEND@" }] } },
    BEP: { memory: {} },
  },
  schedulers: {
    FRONT: { grpc: { endpoint: { address: "grpc://@BACKEND@" } } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      execution: [{ instance_name: "", cas_store: "CAS", scheduler: "FRONT" }],
      experimental_bep: { store: "BEP" },
      web_ui: { bep_store: "BEP", cas_store: "CAS", ac_store: "AC", schedulers: ["FRONT"], activity_path: "" },
    },
  }],
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_front_records_its_invocations_remote_actions() {
    let tmp = tempfile::tempdir().unwrap();
    let bdir = tmp.path().join("backend");
    let fdir = tmp.path().join("front");
    std::fs::create_dir_all(&bdir).unwrap();
    std::fs::create_dir_all(&fdir).unwrap();
    let backend = Cairn::start_with(
        &bdir,
        &BACKEND.replace("@WADDR@", &free_addr().to_string()),
        None,
    );
    let front = Cairn::start_with(
        &fdir,
        &FRONT.replace("@BACKEND@", &backend.addr.to_string()),
        None,
    );
    let ch = front.channel().await;
    start_invocation(ch.clone(), "inv-fwd").await;
    start_invocation(ch.clone(), "inv-hit").await;
    start_invocation(ch.clone(), "inv-wait").await;
    let fine = shell(ch.clone(), "echo fine").await;
    let fails = shell(ch.clone(), "echo '<forwarded>' >&2; exit 4").await;

    let meta = invocation_metadata("inv-fwd");
    let r = execute(ch.clone(), &fine, &meta).await;
    assert_eq!(r.result.unwrap().exit_code, 0);
    let r = execute(ch.clone(), &fails, &meta).await;
    assert_eq!(r.result.unwrap().exit_code, 4);
    // The backend answers this one from its action cache.
    let r = execute(ch.clone(), &fine, &invocation_metadata("inv-hit")).await;
    assert!(r.cached_result);
    // Refused by the front (no such action): nothing recorded.
    let absent = cairn_core::DigestFunction::Sha256.compute(b"no such action");
    let refused = re::execution_client::ExecutionClient::new(ch.clone())
        .execute(common::invocations::with_metadata(
            re::ExecuteRequest {
                action_digest: Some(absent.to_proto()),
                ..Default::default()
            },
            &meta,
        ))
        .await;
    let code = match refused {
        Err(s) => s.code(),
        Ok(stream) => {
            let mut stream = stream.into_inner();
            match stream.message().await {
                Err(s) => s.code(),
                Ok(op) => panic!("an Execute of a missing action was answered: {op:?}"),
            }
        }
    };
    assert_eq!(code, tonic::Code::FailedPrecondition);

    // An Execute left after its first message, resumed with WaitExecution on the front: its
    // end is recorded from the WaitExecution stream.
    let slow = shell(ch.clone(), "sleep 1; exit 5").await;
    let mut stream = re::execution_client::ExecutionClient::new(ch.clone())
        .execute(common::invocations::with_metadata(
            re::ExecuteRequest {
                action_digest: Some(slow.to_proto()),
                ..Default::default()
            },
            &invocation_metadata("inv-wait"),
        ))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first message");
    assert!(!first.done, "{first:?}");
    drop(stream);
    let mut stream = re::execution_client::ExecutionClient::new(ch.clone())
        .wait_execution(re::WaitExecutionRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = stream.message().await.unwrap() {
        last = Some(op);
    }
    assert!(last.is_some_and(|op| op.done));
    let wait = page(front.addr, "/invocation/inv-wait").await;
    assert!(
        wait.contains(
            "Remote actions (1: 0 cache hits, 1 cache misses, <span class=\"bad\">1 failed</span>)"
        ),
        "{wait}"
    );
    assert!(action_row(&wait, &slow).contains("<td>5</td>"), "{wait}");

    let fwd = page(front.addr, "/invocation/inv-fwd").await;
    assert_failed_and_fine(&fwd, ONE_OF_TWO_FAILED, &fails, 4, "backend-wk", &fine);
    assert!(!fwd.contains(&absent.hash_hex()), "{fwd}");

    // The failed action's stderr, which no action cache holds, from the front's record.
    let action = page(
        front.addr,
        &format!("/action/{}-{}", fails.hash_hex(), fails.size()),
    )
    .await;
    assert!(
        action.contains("the last failed execution this server recorded")
            && action.contains("&lt;forwarded&gt;"),
        "{action}"
    );

    let hit = page(front.addr, "/invocation/inv-hit").await;
    assert!(
        hit.contains("Remote actions (1: 1 cache hits, 0 cache misses)"),
        "{hit}"
    );
    assert!(action_row(&hit, &fine).contains("from the cache"), "{hit}");

    let (code, _) = http_get(front.addr, "/invocations").await;
    assert_eq!(code, 200, "the front is still up");
    front.kill9();
    backend.kill9();
}
