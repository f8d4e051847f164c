//! The Build Event Protocol (`services.experimental_bep`) with Bazel 4.2.3 as the client:
//! `--bes_backend=grpc://...` streams a build's events to Cairn, every one is acknowledged
//! and stored, and the stream's last sequence number is recorded for a reader.
//!
//! Needs `bazel` on PATH (Debian's `bazel-bootstrap`); without it the test fails, unless
//! `CAIRN_SKIP_BAZEL=1` is set.

mod common;

use cairn_proto::bes::v1 as bes;
use common::bazel::{self, Bazel};
use common::Cairn;

const CONFIG: &str = r#"{
  stores: {
    BEP: { filesystem: { content_path: "@DIR@/bep", temp_path: "@DIR@/bep-tmp", eviction_policy: { max_bytes: "256mb" } } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: { experimental_bep: { store: "BEP" } },
  }],
}"#;

#[test]
fn bazel_streams_its_build_events_to_cairn() {
    let Some(program) = bazel::find_or_skip("bep") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cairn_dir = tmp.path().join("cairn");
    std::fs::create_dir_all(&cairn_dir).unwrap();
    let cairn = Cairn::start_with(&cairn_dir, CONFIG, None);
    let bazel = Bazel::new(program, &tmp.path().join("bazel"), "bazel-workspace");

    let invocation = uuid::Uuid::new_v4().to_string();
    let build = uuid::Uuid::new_v4().to_string();
    let mut flags = bazel.offline_flags();
    flags.push(format!("--bes_backend=grpc://{}", cairn.addr));
    flags.push(format!("--invocation_id={invocation}"));
    flags.push(format!("--build_request_id={build}"));
    flags.push("--bes_timeout=60s".to_string());
    flags.push("--spawn_strategy=local".to_string());
    flags.push("//...".to_string());
    let out = bazel.run("build", &flags);
    let text = out.text();
    assert!(
        !text.contains("Build Event Protocol upload failed") && !text.contains("BES"),
        "Bazel reported a BES problem:\n{text}"
    );

    // The tool's stream: its last sequence number is recorded, and each event up to it is
    // stored under its key.
    let stream = bes::StreamId {
        build_id: build.clone(),
        invocation_id: invocation.clone(),
        component: bes::stream_id::BuildComponent::Tool as i32,
    };
    let content = cairn_dir.join("bep");
    let read =
        |key: cairn_core::Digest| std::fs::read(cairn_store::filesystem::blob_path(&content, &key));
    let last = read(cairn_server::bep::event_key(&stream, None))
        .expect("the tool stream's last-sequence record");
    let last = i64::from_le_bytes(last[..8].try_into().unwrap());
    assert!(last > 10, "only {last} tool events");
    for seq in 1..=last {
        let bytes = read(cairn_server::bep::event_key(&stream, Some(seq)))
            .unwrap_or_else(|e| panic!("event {seq} of {last}: {e}"));
        let event = <bes::OrderedBuildEvent as prost::Message>::decode(bytes.as_slice()).unwrap();
        assert_eq!(event.sequence_number, seq);
        assert_eq!(event.stream_id.as_ref(), Some(&stream));
        assert!(!event.event.is_empty());
    }
    drop(bazel);
    cairn.kill9();
}

/// What a broken or hostile BES client gets: a clear status for an event without a stream or
/// with a sequence number below 1, and nothing stored for it.
#[tokio::test]
async fn bad_build_events_are_invalid_argument() {
    let tmp = tempfile::tempdir().unwrap();
    let cairn = Cairn::start_with(tmp.path(), CONFIG, None);
    let mut client =
        bes::publish_build_event_client::PublishBuildEventClient::new(cairn.channel().await);
    let stream = bes::StreamId {
        build_id: "b".into(),
        invocation_id: "i".into(),
        component: bes::stream_id::BuildComponent::Tool as i32,
    };
    for (what, event) in [
        ("no event", None),
        (
            "no stream",
            Some(bes::OrderedBuildEvent {
                stream_id: None,
                sequence_number: 1,
                event: b"x".to_vec(),
            }),
        ),
        (
            "sequence 0",
            Some(bes::OrderedBuildEvent {
                stream_id: Some(stream.clone()),
                sequence_number: 0,
                event: b"x".to_vec(),
            }),
        ),
    ] {
        let e = client
            .publish_lifecycle_event(bes::PublishLifecycleEventRequest {
                build_event: event.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        // In a tool stream, the bad event ends the stream with that status.
        let mut acks = client
            .publish_build_tool_event_stream(futures::stream::iter(vec![
                bes::PublishBuildToolEventStreamRequest {
                    ordered_build_event: event,
                    ..Default::default()
                },
            ]))
            .await
            .unwrap()
            .into_inner();
        let first = futures::StreamExt::next(&mut acks).await.unwrap();
        assert_eq!(
            first.unwrap_err().code(),
            tonic::Code::InvalidArgument,
            "{what}"
        );
    }
    // Nothing was stored.
    assert_eq!(common::blob_files(&tmp.path().join("bep")), 0);
}
