//! Remote execution over real gRPC: Execute through the scheduler to a local worker and back,
//! the action cache in front, merging, WaitExecution, Operations, and bad input.

mod common;

use std::time::Duration;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::longrunning::{
    operation, operations_client::OperationsClient, Operation,
};
use cairn_core::{Digest, DigestFunction};
use common::actions::ShellAction;
use common::Cairn;
use futures::StreamExt;
use prost::Message;
use tonic::Code;

const CONFIG: &str = r#"{
  stores: {
    CAS: { memory: {} },
    AC: { completeness_checking: { backend: { memory: {} }, cas_store: { ref_store: { name: "CAS" } } } },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/worker-tmp" } },
      slow: { ref_store: { name: "CAS" } } } },
  },
  schedulers: {
    MAIN: { cache_lookup: { ac_store: { ref_store: { name: "AC" } }, scheduler: { simple: {
      supported_platform_properties: { OSFamily: "exact" },
      unschedulable_grace_period_s: 1,
    } } } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "", remote_execution: { scheduler: "MAIN" } }],
        health: {},
      } },
    { listener: { http: { socket_address: "127.0.0.1:@WPORT@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
  workers: [{ local: {
    worker_api_endpoint: { uri: "grpc://127.0.0.1:@WPORT@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
    max_inflight_tasks: 4,
  } }],
}"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &std::path::Path) -> Cairn {
    Cairn::start_with(
        dir,
        &CONFIG.replace("@WPORT@", &free_port().to_string()),
        None,
    )
}

const SHA: DigestFunction = DigestFunction::Sha256;

struct Client {
    cas: re::content_addressable_storage_client::ContentAddressableStorageClient<
        tonic::transport::Channel,
    >,
    exec: re::execution_client::ExecutionClient<tonic::transport::Channel>,
    ops: OperationsClient<tonic::transport::Channel>,
    ac: re::action_cache_client::ActionCacheClient<tonic::transport::Channel>,
}

async fn client(c: &Cairn) -> Client {
    let ch = c.channel().await;
    Client {
        cas: re::content_addressable_storage_client::ContentAddressableStorageClient::new(
            ch.clone(),
        ),
        exec: re::execution_client::ExecutionClient::new(ch.clone()),
        ops: OperationsClient::new(ch.clone()),
        ac: re::action_cache_client::ActionCacheClient::new(ch),
    }
}

async fn put(cl: &mut Client, blobs: Vec<Vec<u8>>) {
    let requests = blobs
        .into_iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(SHA.compute(&b).to_proto()),
            data: b,
            compressor: 0,
        })
        .collect();
    let r = cl
        .cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r
        .responses
        .iter()
        .all(|r| r.status.as_ref().unwrap().code == 0));
}

/// Uploads a shell command as an Action (with an input file `in.txt`) and returns its digest.
async fn action(
    cl: &mut Client,
    script: &str,
    outputs: &[&str],
    do_not_cache: bool,
    upload: bool,
) -> Digest {
    let (d, blobs) = ShellAction {
        script,
        outputs,
        inputs: &[("in.txt", b"input file\n")],
        do_not_cache,
    }
    .build();
    if upload {
        put(cl, blobs).await;
    }
    d
}

fn response(op: &Operation) -> re::ExecuteResponse {
    match op.result.as_ref().expect("done operation has a result") {
        operation::Result::Response(any) => {
            re::ExecuteResponse::decode(any.value.as_slice()).unwrap()
        }
        operation::Result::Error(e) => panic!("operation error {e:?}"),
    }
}

fn stage(op: &Operation) -> i32 {
    re::ExecuteOperationMetadata::decode(op.metadata.as_ref().unwrap().value.as_slice())
        .unwrap()
        .stage
}

async fn execute(cl: &mut Client, d: Digest, skip_cache_lookup: bool) -> Vec<Operation> {
    let mut s = cl
        .exec
        .execute(re::ExecuteRequest {
            action_digest: Some(d.to_proto()),
            skip_cache_lookup,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ops = Vec::new();
    while let Some(op) = s.next().await {
        ops.push(op.unwrap());
    }
    ops
}

#[tokio::test]
async fn execute_runs_caches_and_serves_cached_results() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let mut cl = client(&c).await;
    let d = action(
        &mut cl,
        "cat in.txt > out/result.txt; echo to-stdout; echo to-stderr >&2",
        &["out/result.txt"],
        false,
        true,
    )
    .await;
    let ops = execute(&mut cl, d, false).await;
    let last = ops.last().unwrap();
    assert!(last.done);
    assert_eq!(stage(last), re::execution_stage::Value::Completed as i32);
    assert!(ops
        .iter()
        .any(|o| stage(o) == re::execution_stage::Value::Queued as i32
            || stage(o) == re::execution_stage::Value::Executing as i32));
    let resp = response(last);
    assert_eq!(
        resp.status.as_ref().map_or(0, |s| s.code),
        0,
        "{:?}",
        resp.status
    );
    assert!(!resp.cached_result);
    let result = resp.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.output_files[0].path, "out/result.txt");
    assert_eq!(
        result.output_files[0].digest.as_ref().unwrap(),
        &SHA.compute(b"input file\n").to_proto()
    );
    assert!(result.stdout_digest.is_some() && result.stderr_digest.is_some());

    // The same action again: from the action cache, nothing runs.
    let ops = execute(&mut cl, d, false).await;
    assert_eq!(ops.len(), 1);
    let resp = response(&ops[0]);
    assert!(resp.cached_result);
    assert_eq!(resp.result.unwrap().output_files, result.output_files);
    // skip_cache_lookup runs it again.
    let ops = execute(&mut cl, d, true).await;
    assert!(!response(ops.last().unwrap()).cached_result);
    // The AC has it.
    cl.ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(d.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap();
    // The scheduler's state is on /metrics.
    let body = common::http_get(c.addr, "/metrics").await.1;
    for want in [
        "nativelink_worker_active_count{scheduler=\"MAIN\"} 1",
        "nativelink_scheduler_queue_length{scheduler=\"MAIN\"} 0",
        "nativelink_queue_length{scheduler=\"MAIN\"} 0",
        "nativelink_worker_slots_total{scheduler=\"MAIN\"} 4",
        "nativelink_worker_slots_busy{scheduler=\"MAIN\"} 0",
        "nativelink_execution_active_count{scheduler=\"MAIN\",execution_stage=\"queued\"} 0",
        "nativelink_execution_retry_count_total{scheduler=\"MAIN\"} 0",
        "nativelink_requests_total{service=\"execution\",method=\"Execute\"} 3",
        "nativelink_execution_completed_count_total{execution_result=\"success\"} 2",
        "nativelink_execution_completed_count_total{execution_result=\"cache_hit\"} 1",
    ] {
        assert!(body.contains(want), "{want} not in {body}");
    }
}

#[tokio::test]
async fn failing_and_uncacheable_actions_are_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let mut cl = client(&c).await;
    let d = action(&mut cl, "echo broken >&2; exit 3", &[], false, true).await;
    let resp = response(execute(&mut cl, d, false).await.last().unwrap());
    assert_eq!(resp.result.as_ref().unwrap().exit_code, 3);
    let e = cl
        .ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(d.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let d = action(&mut cl, "echo fine", &[], true, true).await;
    let resp = response(execute(&mut cl, d, false).await.last().unwrap());
    assert_eq!(resp.result.as_ref().unwrap().exit_code, 0);
    let e = cl
        .ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(d.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn identical_concurrent_actions_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let mut cl = client(&c).await;
    // The output differs on every run (a random number), so equal outputs mean one run.
    let d = action(
        &mut cl,
        "sleep 1; od -An -N8 -tx8 /dev/urandom > out.txt",
        &["out.txt"],
        false,
        true,
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let mut exec = cl.exec.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = exec
                .execute(re::ExecuteRequest {
                    action_digest: Some(d.to_proto()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut last = None;
            while let Some(op) = s.next().await {
                last = Some(op.unwrap());
            }
            last.unwrap()
        }));
    }
    let mut digests = Vec::new();
    for t in tasks {
        let resp = response(&t.await.unwrap());
        digests.push(resp.result.unwrap().output_files[0].digest.clone());
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
}

#[tokio::test]
async fn missing_blobs_are_failed_precondition_with_violations() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let mut cl = client(&c).await;
    // The Action itself is not uploaded.
    let d = action(&mut cl, "true", &[], false, false).await;
    let e = cl
        .exec
        .execute(re::ExecuteRequest {
            action_digest: Some(d.to_proto()),
            ..Default::default()
        })
        .await
        .expect_err("missing action");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let st = cairn_core::proto::google::rpc::Status::decode(e.details()).unwrap();
    let pf = cairn_core::precondition::PreconditionFailure::decode(st.details[0].value.as_slice())
        .unwrap();
    assert_eq!(pf.violations[0].r#type, "MISSING");
    assert_eq!(
        pf.violations[0].subject,
        format!("blobs/{}/{}", d.hash_hex(), d.size())
    );

    // The Action and Command are there, the input file is not.
    #[allow(deprecated)]
    let command = re::Command {
        arguments: vec!["/bin/true".into()],
        ..Default::default()
    };
    let missing_file = SHA.compute(b"never uploaded");
    let root = re::Directory {
        files: vec![re::FileNode {
            name: "f".into(),
            digest: Some(missing_file.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let act = re::Action {
        command_digest: Some(SHA.compute(&command.encode_to_vec()).to_proto()),
        input_root_digest: Some(SHA.compute(&root.encode_to_vec()).to_proto()),
        ..Default::default()
    };
    put(
        &mut cl,
        vec![
            command.encode_to_vec(),
            root.encode_to_vec(),
            act.encode_to_vec(),
        ],
    )
    .await;
    let ops = execute(&mut cl, SHA.compute(&act.encode_to_vec()), false).await;
    let status = response(ops.last().unwrap()).status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    let pf =
        cairn_core::precondition::PreconditionFailure::decode(status.details[0].value.as_slice())
            .unwrap();
    assert_eq!(
        pf.violations[0].subject,
        format!("blobs/{}/{}", missing_file.hash_hex(), missing_file.size())
    );
}

#[tokio::test]
async fn bad_output_paths_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let mut cl = client(&c).await;
    for out in ["/etc/passwd", "../escape"] {
        let d = action(&mut cl, "true", &[out], false, true).await;
        let status = response(execute(&mut cl, d, false).await.last().unwrap())
            .status
            .unwrap();
        assert_eq!(
            status.code,
            Code::InvalidArgument as i32,
            "{out}: {status:?}"
        );
    }
}

#[tokio::test]
async fn unschedulable_platform_fails_naming_the_property() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let mut cl = client(&c).await;
    let d = true_action(&mut cl, "windows", &["/bin/true"]).await;
    let start = std::time::Instant::now();
    let ops = tokio::time::timeout(Duration::from_secs(30), execute(&mut cl, d, false))
        .await
        .expect("the action must not wait forever");
    let status = response(ops.last().unwrap()).status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(
        status.message.contains("OSFamily") && status.message.contains("windows"),
        "{}",
        status.message
    );
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn operations_wait_get_list_cancel_and_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let mut cl = client(&c).await;
    let d = action(&mut cl, "sleep 30", &[], false, true).await;
    let mut s = cl
        .exec
        .execute(re::ExecuteRequest {
            action_digest: Some(d.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.next().await.unwrap().unwrap();
    let name = first.name.clone();
    assert!(!first.done);
    // Another client re-attaches with WaitExecution and sees the same operation.
    let mut w = cl
        .exec
        .wait_execution(re::WaitExecutionRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.next().await.unwrap().unwrap().name, name);
    let got = cl
        .ops
        .get_operation(
            cairn_core::proto::google::longrunning::GetOperationRequest { name: name.clone() },
        )
        .await
        .unwrap()
        .into_inner();
    assert!(!got.done);
    let list = cl
        .ops
        .list_operations(cairn_core::proto::google::longrunning::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.operations.iter().any(|o| o.name == name));
    // Pages: bounded whatever the client asks; a filter or a negative size is refused.
    use cairn_core::proto::google::longrunning::ListOperationsRequest;
    let one = cl
        .ops
        .list_operations(ListOperationsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(one.operations.len() <= 1);
    if !one.next_page_token.is_empty() {
        let next = cl
            .ops
            .list_operations(ListOperationsRequest {
                page_size: 1,
                page_token: one.next_page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(next.operations.iter().all(|o| o.name > one.next_page_token));
    }
    for bad in [
        ListOperationsRequest {
            page_size: -1,
            ..Default::default()
        },
        ListOperationsRequest {
            filter: "done = true".into(),
            ..Default::default()
        },
    ] {
        let e = cl.ops.list_operations(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // Cancel: the waiting streams end with CANCELLED, quickly (the sleep is killed).
    let t = std::time::Instant::now();
    cl.ops
        .cancel_operation(
            cairn_core::proto::google::longrunning::CancelOperationRequest { name: name.clone() },
        )
        .await
        .unwrap();
    let mut last = None;
    while let Some(op) = s.next().await {
        last = Some(op.unwrap());
    }
    let status = response(&last.unwrap()).status.unwrap();
    assert_eq!(status.code, Code::Cancelled as i32, "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(10));

    for name in ["operations/nope", ""] {
        let e = cl
            .exec
            .wait_execution(re::WaitExecutionRequest { name: name.into() })
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), Code::NotFound, "{name}");
        let e = cl
            .ops
            .cancel_operation(
                cairn_core::proto::google::longrunning::CancelOperationRequest {
                    name: name.into(),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let e = cl
            .ops
            .get_operation(
                cairn_core::proto::google::longrunning::GetOperationRequest { name: name.into() },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
}

#[tokio::test]
async fn an_empty_input_root_needs_no_upload() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let mut cl = client(&c).await;
    let d = true_action(&mut cl, "linux", &["/bin/true"]).await;
    let resp = response(execute(&mut cl, d, false).await.last().unwrap());
    assert_eq!(
        resp.status.as_ref().map_or(0, |s| s.code),
        0,
        "{:?}",
        resp.status
    );
    assert_eq!(resp.result.unwrap().exit_code, 0);
}

#[tokio::test]
async fn sigterm_lets_running_actions_finish() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path());
    let mut cl = client(&c).await;
    let d = action(
        &mut cl,
        "sleep 2; echo finished > out.txt",
        &["out.txt"],
        false,
        true,
    )
    .await;
    let mut s = cl
        .exec
        .execute(re::ExecuteRequest {
            action_digest: Some(d.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Wait until it runs.
    loop {
        let op = s.next().await.unwrap().unwrap();
        if stage(&op) == re::execution_stage::Value::Executing as i32 {
            break;
        }
    }
    let exit = tokio::task::spawn_blocking(move || c.terminate());
    let mut last = None;
    while let Some(op) = s.next().await {
        last = Some(op.unwrap());
    }
    let resp = response(&last.unwrap());
    assert_eq!(
        resp.status.as_ref().map_or(0, |s| s.code),
        0,
        "{:?}",
        resp.status
    );
    assert_eq!(resp.result.unwrap().exit_code, 0);
    assert!(exit.await.unwrap().success());
}

/// [`CONFIG`] with the scheduler wrapped in a property_modifier that turns any OSFamily into
/// linux, and `worker_extra` added to the worker's keys.
fn modifier_config(worker_extra: &str) -> String {
    let config = CONFIG.replace(
        "MAIN: { cache_lookup: { ac_store: { ref_store: { name: \"AC\" } }, scheduler: { simple: {",
        "MAIN: { property_modifier: { modifications: [{ remove: \"OSFamily\" }, { add: { name: \"OSFamily\", value: \"linux\" } }], scheduler: { cache_lookup: { ac_store: { ref_store: { name: \"AC\" } }, scheduler: { simple: {",
    );
    assert_ne!(config, CONFIG, "the replacement must apply");
    let closed = config.replace(
        "      unschedulable_grace_period_s: 1,\n    } } } },",
        "      unschedulable_grace_period_s: 1,\n    } } } } } },",
    );
    assert_ne!(closed, config, "the closing replacement must apply");
    let extended = closed.replace(
        "    max_inflight_tasks: 4,\n",
        &format!("    max_inflight_tasks: 4,\n    {worker_extra}\n"),
    );
    assert_ne!(extended, closed, "the worker replacement must apply");
    extended.replace("@WPORT@", &free_port().to_string())
}

#[tokio::test]
async fn property_modifier_rewrites_the_platform_before_matching() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(dir.path(), &modifier_config(""), None);
    let mut cl = client(&c).await;
    let d = true_action(&mut cl, "windows", &["/bin/true"]).await;
    let resp = response(execute(&mut cl, d, false).await.last().unwrap());
    assert_eq!(
        resp.status.as_ref().map_or(0, |s| s.code),
        0,
        "{:?}",
        resp.status
    );
    assert_eq!(resp.result.unwrap().exit_code, 0);
}

#[tokio::test]
async fn additional_environment_sees_the_platform_the_scheduler_matched() {
    let dir = tempfile::tempdir().unwrap();
    let config = modifier_config(
        r#"additional_environment: { OS: { property: "OSFamily" }, GREETING: { value: "hi" } },"#,
    );
    let c = Cairn::start_with(dir.path(), &config, None);
    let mut cl = client(&c).await;
    // The client asks for windows; the property_modifier made it linux; the worker says so.
    let d = true_action(&mut cl, "windows", &["/bin/sh", "-c", "echo $GREETING $OS"]).await;
    let resp = response(execute(&mut cl, d, false).await.last().unwrap());
    let result = resp.result.expect("a result");
    assert_eq!(result.exit_code, 0, "{:?}", resp.status);
    let stdout = result.stdout_digest.expect("stdout");
    let read = cl
        .cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![stdout],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.responses[0].data, b"hi linux\n");
}

/// `use_namespaces` and `use_mount_namespace`: the action is process 1 of its own PID
/// namespace and its `/proc` lists its own processes only; a process it leaves running dies
/// with it. Without the keys it shares the worker's view.
#[tokio::test]
async fn actions_run_in_their_own_namespaces_when_configured() {
    let script = "echo pid=$$; echo procs=$(ls /proc | grep -c '^[0-9]')";
    let stdout_of = |cl: &mut Client, resp: re::ExecuteResponse| {
        let result = resp.result.expect("a result");
        assert_eq!(result.exit_code, 0, "{:?}", resp.status);
        let digest = result.stdout_digest.expect("stdout");
        let mut cas = cl.cas.clone();
        async move {
            let read = cas
                .batch_read_blobs(re::BatchReadBlobsRequest {
                    digests: vec![digest],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            String::from_utf8(read.responses[0].data.clone()).unwrap()
        }
    };
    let procs = |out: &str| -> usize {
        out.split("procs=")
            .nth(1)
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or_else(|| panic!("{out}"))
    };

    let dir = tempfile::tempdir().unwrap();
    let config = modifier_config("use_namespaces: true, use_mount_namespace: true,");
    let c = Cairn::start_with(dir.path(), &config, None);
    let mut cl = client(&c).await;
    let d = true_action(&mut cl, "linux", &["/bin/sh", "-c", script]).await;
    let resp = response(execute(&mut cl, d, false).await.last().unwrap());
    let out = stdout_of(&mut cl, resp).await;
    assert!(out.starts_with("pid=1\n"), "{out}");
    assert!(procs(&out) <= 4, "{out}");
    drop(c);

    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(dir.path(), &modifier_config(""), None);
    let mut cl = client(&c).await;
    let d = true_action(&mut cl, "linux", &["/bin/sh", "-c", script]).await;
    let resp = response(execute(&mut cl, d, false).await.last().unwrap());
    let out = stdout_of(&mut cl, resp).await;
    assert!(!out.starts_with("pid=1\n"), "{out}");
    assert!(procs(&out) > 4, "{out}");
}

#[test]
fn a_mount_namespace_without_use_namespaces_is_refused_by_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.json5");
    std::fs::write(
        &f,
        modifier_config("use_mount_namespace: true,").replace("@ADDR@", "127.0.0.1:0"),
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
            err.contains("workers[0].local.use_mount_namespace: a mount namespace needs use_namespaces: true"),
            "{verb}: {err}"
        );
    }
}

/// `historical_resource`: a hint for the action's target (from the client's RequestMetadata)
/// raises its `cpu_count` minimum past what the only worker offers, so no worker can run it
/// (FAILED_PRECONDITION naming the property); the same action from another target runs.
#[tokio::test]
async fn historical_resource_hints_raise_an_actions_minimums() {
    let dir = tempfile::tempdir().unwrap();
    let hints = dir.path().join("hints.json");
    std::fs::write(
        &hints,
        r#"[{"target_id": "//pkg:heavy", "action_mnemonic": "TestRunner", "cpu_count": 16}]"#,
    )
    .unwrap();
    let config = CONFIG
        .replace(
            "MAIN: { cache_lookup: { ac_store: { ref_store: { name: \"AC\" } }, scheduler: { simple: {",
            &format!(
                "MAIN: {{ historical_resource: {{ hints_file: {:?}, scheduler: {{ cache_lookup: {{ ac_store: {{ ref_store: {{ name: \"AC\" }} }}, scheduler: {{ simple: {{\n      supported_platform_properties: {{ cpu_count: \"minimum\" }},",
                hints.display().to_string()
            ),
        )
        .replace(
            "      unschedulable_grace_period_s: 1,\n    } } } },",
            "      unschedulable_grace_period_s: 1,\n    } } } } } },",
        )
        .replace(
            "platform_properties: { OSFamily: { values: [\"linux\"] } },",
            "platform_properties: { OSFamily: { values: [\"linux\"] }, cpu_count: { values: [\"4\"] } },",
        )
        .replace("@WPORT@", &free_port().to_string());
    assert!(config.contains("historical_resource") && config.contains("cpu_count: { values"));
    let c = Cairn::start_with(dir.path(), &config, None);
    let mut cl = client(&c).await;
    let d = true_action(&mut cl, "linux", &["/bin/true"]).await;
    let run_as = |target: &str| {
        let mut r = tonic::Request::new(re::ExecuteRequest {
            action_digest: Some(d.to_proto()),
            skip_cache_lookup: true,
            ..Default::default()
        });
        let md = re::RequestMetadata {
            target_id: target.to_string(),
            action_mnemonic: "TestRunner".to_string(),
            tool_invocation_id: "inv-1".to_string(),
            ..Default::default()
        };
        r.metadata_mut().insert_bin(
            "build.bazel.remote.execution.v2.requestmetadata-bin",
            tonic::metadata::MetadataValue::from_bytes(&md.encode_to_vec()),
        );
        r
    };
    let mut exec = cl.exec.clone();
    let last = |mut s: tonic::Streaming<Operation>| async move {
        let mut last = None;
        while let Some(op) = s.next().await {
            last = Some(op.unwrap());
        }
        last.unwrap()
    };
    let heavy = last(
        exec.execute(run_as("//pkg:heavy"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let status = response(&heavy).status.unwrap_or_default();
    assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
    assert!(status.message.contains("cpu_count"), "{status:?}");

    let light = last(
        exec.execute(run_as("//pkg:light"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let resp = response(&light);
    assert_eq!(resp.status.map_or(0, |s| s.code), 0);
    assert_eq!(resp.result.unwrap().exit_code, 0);
}

/// Uploads an Action running `argv` with the empty input root (the empty blob, always
/// present) and the given OSFamily; returns its digest.
async fn true_action(cl: &mut Client, os: &str, argv: &[&str]) -> Digest {
    #[allow(deprecated)]
    let command = re::Command {
        arguments: argv.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let act = re::Action {
        command_digest: Some(SHA.compute(&command.encode_to_vec()).to_proto()),
        input_root_digest: Some(SHA.empty_digest().to_proto()),
        platform: Some(re::Platform {
            properties: vec![re::platform::Property {
                name: "OSFamily".into(),
                value: os.into(),
            }],
        }),
        ..Default::default()
    };
    let act = act.encode_to_vec();
    let d = SHA.compute(&act);
    put(cl, vec![command.encode_to_vec(), act]).await;
    d
}

/// `unacknowledged_kill_timeout_s`: a worker that never answers a kill is removed (its
/// session ends with UNAVAILABLE saying why), so a wedged worker cannot keep its slot. The
/// worker here is a real gRPC client of the worker API that takes an action and then goes
/// silent, but for keepalives.
#[tokio::test]
async fn a_worker_that_ignores_a_kill_is_removed() {
    use cairn_proto::worker::v1 as wapi;
    let dir = tempfile::tempdir().unwrap();
    let wport = free_port();
    let config = CONFIG
        .replace("@WPORT@", &wport.to_string())
        .replace(
            "      unschedulable_grace_period_s: 1,",
            "      unschedulable_grace_period_s: 1,\n      unacknowledged_kill_timeout_s: 1,\n      worker_timeout_s: 30,",
        );
    // No local worker: the fake below is the only one.
    let config = config[..config.find("  workers: [").unwrap()].to_string() + "}";
    let c = Cairn::start_with(dir.path(), &config, None);
    let mut cl = client(&c).await;

    // The worker API listener starts right after the first one, whose line `start_with`
    // waited for: connect once it is there.
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{wport}")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ch = loop {
        match endpoint.connect().await {
            Ok(ch) => break ch,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "the worker API never listened: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<wapi::WorkerMessage>(16);
    tx.send(wapi::WorkerMessage {
        message: Some(wapi::worker_message::Message::Register(wapi::Register {
            name: "wedged".into(),
            properties: vec![wapi::Property {
                name: "OSFamily".into(),
                value: "linux".into(),
            }],
            slots: 1,
        })),
    })
    .await
    .unwrap();
    let mut inbound = wapi::worker_api_client::WorkerApiClient::new(ch)
        .session(tokio_stream_of(rx))
        .await
        .unwrap()
        .into_inner();
    // Registered, then the action.
    let d = true_action(&mut cl, "linux", &["/bin/true"]).await;
    let mut exec = cl.exec.clone();
    let mut s = exec
        .execute(re::ExecuteRequest {
            action_digest: Some(d.to_proto()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let name = s.next().await.unwrap().unwrap().name;
    let mut started = false;
    while let Some(m) = inbound.next().await {
        if let Some(wapi::scheduler_message::Message::StartAction(_)) = m.unwrap().message {
            started = true;
            break;
        }
    }
    assert!(started);
    // Cancel: the scheduler sends a kill, which this worker ignores.
    cl.ops
        .cancel_operation(cairn_core::proto::google::longrunning::CancelOperationRequest { name })
        .await
        .unwrap();
    let mut killed = false;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(20), inbound.next()).await {
            Err(_) => panic!("the silent worker was not removed within 20 s"),
            Ok(None) => break None,
            Ok(Some(Err(e))) => break Some(e),
            Ok(Some(Ok(m))) => {
                if let Some(wapi::scheduler_message::Message::KillAction(_)) = m.message {
                    killed = true;
                }
                let _ = tx
                    .send(wapi::WorkerMessage {
                        message: Some(wapi::worker_message::Message::Keepalive(wapi::Keepalive {})),
                    })
                    .await;
            }
        }
    };
    assert!(killed, "no kill was sent");
    let e = end.expect("the session should end with a status");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("kill was not acknowledged"), "{e:?}");
}

fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// The admin API (`services.admin`): a drained worker gets nothing new, and takes work again
/// once undrained; bad requests get clear answers.
#[tokio::test]
async fn the_admin_api_drains_and_undrains_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG
        .replace("@WPORT@", &free_port().to_string())
        .replace(
            "        health: {},\n",
            "        health: {},\n        admin: {},\n",
        )
        .replace(
            "    max_inflight_tasks: 4,",
            "    name: \"w1\",\n    max_inflight_tasks: 4,",
        );
    assert!(config.contains("admin: {}") && config.contains("\"w1\""));
    let c = Cairn::start_with(dir.path(), &config, None);
    let mut cl = client(&c).await;

    // The local worker registers just after the listener is up: drain it once it is there.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = common::http_request(
            c.addr,
            "POST",
            "/admin/scheduler/MAIN/set_drain_worker/w1/1",
        )
        .await;
        if code == 200 {
            break;
        }
        assert_eq!(code, 404, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "worker w1 never registered: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The action waits: no worker may take it.
    let d = true_action(&mut cl, "linux", &["/bin/true"]).await;
    let mut exec = cl.exec.clone();
    let mut s = exec
        .execute(re::ExecuteRequest {
            action_digest: Some(d.to_proto()),
            skip_cache_lookup: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = s.next().await.unwrap().unwrap();
    assert!(!first.done);
    let name = first.name.clone();
    let waiting = tokio::time::timeout(Duration::from_secs(2), s.next()).await;
    if let Ok(Some(Ok(op))) = &waiting {
        assert!(!op.done, "a drained worker ran the action");
    }
    let got = cl
        .ops
        .get_operation(
            cairn_core::proto::google::longrunning::GetOperationRequest { name: name.clone() },
        )
        .await
        .unwrap()
        .into_inner();
    assert!(!got.done);
    assert_eq!(stage(&got), re::execution_stage::Value::Queued as i32);

    // Undrained: the waiting action runs.
    let (code, body) = common::http_request(
        c.addr,
        "POST",
        "/admin/scheduler/MAIN/set_drain_worker/w1/0",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let mut last = None;
    while let Some(op) = s.next().await {
        last = Some(op.unwrap());
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(response(&last).result.unwrap().exit_code, 0);

    for (path, want) in [
        ("/admin/scheduler/NOPE/set_drain_worker/w1/1", 404),
        ("/admin/scheduler/MAIN/set_drain_worker/nobody/1", 404),
        ("/admin/scheduler/MAIN/set_drain_worker/w1/yes", 400),
    ] {
        let (code, body) = common::http_request(c.addr, "POST", path).await;
        assert_eq!(code, want, "{path}: {body}");
    }
}
