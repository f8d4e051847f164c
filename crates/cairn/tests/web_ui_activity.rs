//! The web UI's own record of each invocation's remote actions, against a real Cairn with a
//! local worker whose scheduler forgets completed operations after 1 s: GetActionResult and
//! Execute calls carrying Bazel's `RequestMetadata` (its `tool_invocation_id`) show on the
//! invocation's page with cache hits and misses, how each execution ended, its exit code and
//! worker, after the scheduler forgot them. Garbage metadata and oversized ids are ignored
//! and the server stays up.

mod common;

use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::Digest;
use cairn_proto::bes::v1 as bes;
use cairn_server::web_ui::events as ev;
use common::actions::ShellAction;
use common::{http_get, Cairn};
use prost::Message;

const CONFIG: &str = r#"{
  stores: {
    CAS: { memory: {} },
    AC: { memory: {} },
    BEP: { memory: {} },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/worker-tmp" } },
      slow: { ref_store: { name: "CAS" } } } },
  },
  schedulers: {
    MAIN: { cache_lookup: { ac_store: { ref_store: { name: "AC" } }, scheduler: { simple: {
      supported_platform_properties: { OSFamily: "exact" }, retain_completed_for_s: 1 } } } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        experimental_bep: { store: "BEP" },
        health: {},
        web_ui: { bep_store: "BEP", cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"] },
      } },
    { listener: { http: { socket_address: "127.0.0.1:@WPORT@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
  workers: [{ local: {
    name: "wk",
    worker_api_endpoint: { uri: "grpc://127.0.0.1:@WPORT@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
  } }],
}"#;

const METADATA: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `message` with Bazel's RequestMetadata header: `metadata` as given (raw bytes).
fn with_metadata<T>(message: T, metadata: &[u8]) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert_bin(
        METADATA,
        tonic::metadata::MetadataValue::from_bytes(metadata),
    );
    r
}

fn invocation_metadata(invocation: &str) -> Vec<u8> {
    re::RequestMetadata {
        tool_invocation_id: invocation.into(),
        tool_details: Some(re::ToolDetails {
            tool_name: "bazel".into(),
            tool_version: "4.2.3".into(),
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The invocation's first event, so that it has a page.
async fn start_invocation(ch: tonic::transport::Channel, invocation: &str) {
    let event = ev::BuildEvent {
        started: Some(ev::BuildStarted {
            uuid: invocation.into(),
            start_time_millis: 1_700_000_000_000,
            command: "build".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    bes::publish_build_event_client::PublishBuildEventClient::new(ch)
        .publish_lifecycle_event(bes::PublishLifecycleEventRequest {
            build_event: Some(bes::OrderedBuildEvent {
                stream_id: Some(bes::StreamId {
                    build_id: format!("build-{invocation}"),
                    invocation_id: invocation.into(),
                    component: bes::stream_id::BuildComponent::Tool as i32,
                }),
                sequence_number: 1,
                event: ev::wrap_bazel_event(&event),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Execute with `metadata`; the final ExecuteResponse.
async fn execute(
    ch: tonic::transport::Channel,
    digest: &Digest,
    metadata: &[u8],
) -> re::ExecuteResponse {
    let mut stream = re::execution_client::ExecutionClient::new(ch)
        .execute(with_metadata(
            re::ExecuteRequest {
                action_digest: Some(digest.to_proto()),
                ..Default::default()
            },
            metadata,
        ))
        .await
        .unwrap()
        .into_inner();
    while let Some(op) = stream.message().await.unwrap() {
        if let Some(cairn_core::proto::google::longrunning::operation::Result::Response(any)) =
            op.result
        {
            return re::ExecuteResponse::decode(any.value.as_slice()).unwrap();
        }
    }
    panic!("the Execute stream ended before the operation was done");
}

async fn get_action_result(
    ch: tonic::transport::Channel,
    digest: &Digest,
    metadata: &[u8],
) -> bool {
    re::action_cache_client::ActionCacheClient::new(ch)
        .get_action_result(with_metadata(
            re::GetActionResultRequest {
                action_digest: Some(digest.to_proto()),
                ..Default::default()
            },
            metadata,
        ))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_pages_keep_remote_actions_after_the_scheduler_forgets_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cairn = Cairn::start_with(
        tmp.path(),
        &CONFIG.replace("@WPORT@", &free_port().to_string()),
        None,
    );
    let ch = cairn.channel().await;
    start_invocation(ch.clone(), "inv-a").await;
    start_invocation(ch.clone(), "inv-b").await;
    let (a, b) = (invocation_metadata("inv-a"), invocation_metadata("inv-b"));

    let fine = ShellAction {
        script: "echo fine",
        ..Default::default()
    }
    .upload(ch.clone(), "")
    .await;
    let fails = ShellAction {
        script: "echo '<bad>' >&2; exit 3",
        ..Default::default()
    }
    .upload(ch.clone(), "")
    .await;

    // inv-a: two cache misses, then both executed, one failing.
    assert!(!get_action_result(ch.clone(), &fine, &a).await);
    assert!(!get_action_result(ch.clone(), &fails, &a).await);
    let r = execute(ch.clone(), &fine, &a).await;
    assert_eq!(r.result.unwrap().exit_code, 0);
    let r = execute(ch.clone(), &fails, &a).await;
    assert_eq!(r.result.unwrap().exit_code, 3);
    // inv-b: a hit by GetActionResult, a hit by Execute, and a miss.
    assert!(get_action_result(ch.clone(), &fine, &b).await);
    let r = execute(ch.clone(), &fine, &b).await;
    assert!(r.cached_result);
    let absent = cairn_core::DigestFunction::Sha256.compute(b"no such action");
    assert!(!get_action_result(ch.clone(), &absent, &b).await);

    // Garbage metadata, an empty id and an oversized id: served, not recorded.
    for metadata in [
        vec![0xff, 0xff, 0xff],
        invocation_metadata(""),
        invocation_metadata(&"x".repeat(10_000)),
    ] {
        assert!(get_action_result(ch.clone(), &fine, &metadata).await);
    }

    // The scheduler forgets the completed operations (retain_completed_for_s: 1).
    let deadline = Instant::now() + Duration::from_secs(30);
    for d in [&fine, &fails] {
        let path = format!("/action/{}-{}", d.hash_hex(), d.size());
        loop {
            let (code, page) = http_get(cairn.addr, &path).await;
            assert_eq!(code, 200, "{page}");
            if !page.contains("<h2>Operations</h2>") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the scheduler still holds {d}:\n{page}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let (code, page) = http_get(cairn.addr, "/invocation/inv-a").await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains(
            "Remote actions (2: 0 cache hits, 2 cache misses, <span class=\"bad\">1 failed</span>)"
        ),
        "{page}"
    );
    let row = |page: &str, d: &Digest| -> String {
        let at = page
            .find(&format!(
                "<tr><td><a href=\"/action/{}-{}\"",
                d.hash_hex(),
                d.size()
            ))
            .unwrap_or_else(|| panic!("no row of {d}:\n{page}"));
        page[at..at + page[at..].find("</tr>").unwrap()].to_string()
    };
    let failed = row(&page, &fails);
    assert!(
        failed.contains(">failure</span>")
            && failed.contains("<td>3</td>")
            && failed.contains("<td>wk"),
        "{failed}"
    );
    let ok = row(&page, &fine);
    assert!(
        ok.contains(">success</span>") && ok.contains("<td>0</td>") && ok.contains("<td>miss</td>"),
        "{ok}"
    );
    assert!(
        page.find(&failed).unwrap() < page.find(&ok).unwrap(),
        "failed actions first:\n{page}"
    );

    // The failed action's page still shows its stderr: its result is not in the action
    // cache and the scheduler forgot it, the record kept it.
    let (code, page) = http_get(
        cairn.addr,
        &format!("/action/{}-{}", fails.hash_hex(), fails.size()),
    )
    .await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("the last failed execution this server recorded")
            && page.contains("&lt;bad&gt;"),
        "{page}"
    );

    // The list of invocations counts them too.
    let (code, list) = http_get(cairn.addr, "/invocations").await;
    assert_eq!(code, 200, "{list}");
    assert!(
        list.contains("2: 0 hits, 2 misses, <span class=\"bad\">1 failed</span>")
            && list.contains("2: 1 hits, 1 misses"),
        "{list}"
    );

    let (code, page) = http_get(cairn.addr, "/invocation/inv-b").await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("Remote actions (2: 1 cache hits, 1 cache misses)"),
        "{page}"
    );
    let hit = row(&page, &fine);
    assert!(
        hit.contains(">hit</span>") && hit.contains("from the cache"),
        "{hit}"
    );

    let (code, _) = http_get(cairn.addr, "/status").await;
    assert_eq!(code, 200, "the server is still up");
    cairn.kill9();
}
