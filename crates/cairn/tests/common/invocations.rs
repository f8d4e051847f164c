//! A client as Bazel is one for the web UI's record of invocations: the first build event of
//! an invocation (so that it has a page), and GetActionResult and Execute calls carrying
//! Bazel's `RequestMetadata` header with its `tool_invocation_id`.

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::Digest;
use cairn_proto::bes::v1 as bes;
use cairn_server::web_ui::events as ev;
use prost::Message;

pub const METADATA: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// `message` with Bazel's RequestMetadata header: `metadata` as given (raw bytes).
pub fn with_metadata<T>(message: T, metadata: &[u8]) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert_bin(
        METADATA,
        tonic::metadata::MetadataValue::from_bytes(metadata),
    );
    r
}

/// Bazel 4.2.3's RequestMetadata for `invocation`, encoded.
pub fn invocation_metadata(invocation: &str) -> Vec<u8> {
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
pub async fn start_invocation(ch: tonic::transport::Channel, invocation: &str) {
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
pub async fn execute(
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

/// Execute with `metadata`: the action's exit code.
pub async fn exit_code(ch: tonic::transport::Channel, digest: &Digest, metadata: &[u8]) -> i32 {
    execute(ch, digest, metadata)
        .await
        .result
        .expect("a result")
        .exit_code
}

/// GetActionResult with `metadata`: whether the action cache had it.
pub async fn get_action_result(
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

/// The `<tr>` of `d` in an invocation page's remote actions.
pub fn action_row(page: &str, d: &Digest) -> String {
    let at = page
        .find(&format!(
            "<tr><td><a href=\"/action/{}-{}\"",
            d.hash_hex(),
            d.size()
        ))
        .unwrap_or_else(|| panic!("no row of {d}:\n{page}"));
    page[at..at + page[at..].find("</tr>").unwrap()].to_string()
}

/// A shell action running `script`, uploaded through `ch` (instance ""): its digest.
pub async fn shell(ch: tonic::transport::Channel, script: &'static str) -> Digest {
    super::actions::ShellAction {
        script,
        ..Default::default()
    }
    .upload(ch, "")
    .await
}

/// The page at `path` of the server at `addr`, which answers 200.
pub async fn page(addr: std::net::SocketAddr, path: &str) -> String {
    let (code, page) = super::http_get(addr, path).await;
    assert_eq!(code, 200, "GET {path}: {page}");
    page
}

/// An invocation page whose remote actions are `summary` (as the page words it after
/// "Remote actions ("), among them `failed`, which failed with exit `code` on a worker whose
/// name starts with `worker`, and `fine`, which succeeded. The failed action's row.
pub fn assert_failed_and_fine(
    page: &str,
    summary: &str,
    failed: &Digest,
    code: i32,
    worker: &str,
    fine: &Digest,
) -> String {
    assert!(
        page.contains(&format!("Remote actions ({summary}")),
        "not {summary}:\n{page}"
    );
    let row = action_row(page, failed);
    assert!(
        row.contains(">failure</span>")
            && row.contains(&format!("<td>{code}</td>"))
            && row.contains(&format!("<td>{worker}")),
        "{row}"
    );
    assert!(action_row(page, fine).contains(">success</span>"), "{page}");
    row
}

/// The summary of two executed actions of which one failed.
pub const ONE_OF_TWO_FAILED: &str =
    "2: 0 cache hits, 2 cache misses, <span class=\"bad\">1 failed</span>)";
