//! The parts of Bazel's Build Event Protocol that the invocation pages read, decoded from the
//! bytes the Build Event Service stores.
//!
//! A stored event is a `google.devtools.build.v1.OrderedBuildEvent` whose `event` is a
//! `google.devtools.build.v1.BuildEvent`; Bazel puts its own `build_event_stream.BuildEvent`
//! in that event's `bazel_event` (a `google.protobuf.Any`). The messages below are our own
//! rendering of the public wire format, only the fields the pages show; prost skips every
//! other field. Decoding never panics: garbage is `None`.

use prost::Message;

/// `google.devtools.build.v1.BuildEvent`, only `bazel_event`.
#[derive(Clone, PartialEq, Message)]
struct BesEvent {
    #[prost(message, optional, tag = "60")]
    bazel_event: Option<Any>,
}

#[derive(Clone, PartialEq, Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `build_event_stream.BuildEvent`.
#[derive(Clone, PartialEq, Message)]
pub struct BuildEvent {
    #[prost(message, optional, tag = "1")]
    pub id: Option<BuildEventId>,
    #[prost(message, optional, tag = "3")]
    pub progress: Option<Progress>,
    #[prost(message, optional, tag = "5")]
    pub started: Option<BuildStarted>,
    #[prost(message, optional, tag = "7")]
    pub action: Option<ActionExecuted>,
    #[prost(message, optional, tag = "8")]
    pub completed: Option<TargetComplete>,
    #[prost(message, optional, tag = "10")]
    pub test_result: Option<TestResult>,
    #[prost(message, optional, tag = "12")]
    pub unstructured_command_line: Option<CommandLine>,
    #[prost(message, optional, tag = "14")]
    pub finished: Option<BuildFinished>,
}

#[derive(Clone, PartialEq, Message)]
pub struct BuildEventId {
    #[prost(message, optional, tag = "5")]
    pub target_completed: Option<LabelId>,
    #[prost(message, optional, tag = "6")]
    pub action_completed: Option<ActionCompletedId>,
    #[prost(message, optional, tag = "8")]
    pub test_result: Option<TestResultId>,
}

#[derive(Clone, PartialEq, Message)]
pub struct LabelId {
    #[prost(string, tag = "1")]
    pub label: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ActionCompletedId {
    #[prost(string, tag = "1")]
    pub primary_output: String,
    #[prost(string, tag = "2")]
    pub label: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct TestResultId {
    #[prost(string, tag = "1")]
    pub label: String,
    #[prost(int32, tag = "2")]
    pub run: i32,
    #[prost(int32, tag = "3")]
    pub shard: i32,
    #[prost(int32, tag = "4")]
    pub attempt: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct Progress {
    #[prost(string, tag = "1")]
    pub stdout: String,
    #[prost(string, tag = "2")]
    pub stderr: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct BuildStarted {
    #[prost(string, tag = "1")]
    pub uuid: String,
    #[prost(int64, tag = "2")]
    pub start_time_millis: i64,
    #[prost(string, tag = "3")]
    pub build_tool_version: String,
    #[prost(string, tag = "5")]
    pub command: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct CommandLine {
    #[prost(string, repeated, tag = "1")]
    pub args: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct File {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uri: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ActionExecuted {
    #[prost(bool, tag = "1")]
    pub success: bool,
    #[prost(int32, tag = "2")]
    pub exit_code: i32,
    #[prost(message, optional, tag = "3")]
    pub stdout: Option<File>,
    #[prost(message, optional, tag = "4")]
    pub stderr: Option<File>,
    #[prost(string, tag = "5")]
    pub label: String,
    #[prost(string, tag = "8")]
    pub r#type: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct TargetComplete {
    #[prost(bool, tag = "1")]
    pub success: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct TestResult {
    #[prost(message, repeated, tag = "2")]
    pub test_action_output: Vec<File>,
    #[prost(int64, tag = "3")]
    pub test_attempt_duration_millis: i64,
    #[prost(bool, tag = "4")]
    pub cached_locally: bool,
    #[prost(int32, tag = "5")]
    pub status: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct BuildFinished {
    #[prost(bool, tag = "1")]
    pub overall_success: bool,
    #[prost(int64, tag = "2")]
    pub finish_time_millis: i64,
    #[prost(message, optional, tag = "3")]
    pub exit_code: Option<ExitCode>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ExitCode {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int32, tag = "2")]
    pub code: i32,
}

/// The name of a `build_event_stream.TestStatus`.
pub fn test_status(n: i32) -> &'static str {
    match n {
        1 => "PASSED",
        2 => "FLAKY",
        3 => "TIMEOUT",
        4 => "FAILED",
        5 => "INCOMPLETE",
        6 => "REMOTE_FAILURE",
        7 => "FAILED_TO_BUILD",
        8 => "TOOL_HALTED_BEFORE_TESTING",
        _ => "NO_STATUS",
    }
}

/// Bazel's event inside a stored `OrderedBuildEvent`'s `event` bytes; `None` for lifecycle
/// events and for anything that does not decode.
pub fn bazel_event(bes_event: &[u8]) -> Option<BuildEvent> {
    let any = BesEvent::decode(bes_event).ok()?.bazel_event?;
    if !any.type_url.ends_with("build_event_stream.BuildEvent") {
        return None;
    }
    BuildEvent::decode(any.value.as_slice()).ok()
}

/// The CAS digest a `bytestream://HOST/[INSTANCE/]blobs/HASH/SIZE` URI names.
pub fn bytestream_digest(uri: &str) -> Option<(String, u64)> {
    let rest = uri.strip_prefix("bytestream://")?;
    let mut parts = rest.rsplit('/');
    let size = parts.next()?.parse().ok()?;
    let hash = parts.next()?;
    (parts.next()? == "blobs").then(|| (hash.to_string(), size))
}

/// Wraps a Bazel event the way the BES carries it (the inverse of [`bazel_event`]; for tests
/// and benchmarks).
pub fn wrap_bazel_event(e: &BuildEvent) -> Vec<u8> {
    BesEvent {
        bazel_event: Some(Any {
            type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
            value: e.encode_to_vec(),
        }),
    }
    .encode_to_vec()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn wrap(e: &BuildEvent) -> Vec<u8> {
        wrap_bazel_event(e)
    }

    #[test]
    fn decodes_what_it_wraps_and_refuses_garbage() {
        let e = BuildEvent {
            started: Some(BuildStarted {
                uuid: "u".into(),
                start_time_millis: 5,
                command: "build".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(bazel_event(&wrap(&e)), Some(e));
        assert_eq!(bazel_event(b"\xff\xff\xff"), None);
        assert_eq!(bazel_event(&[]), None);
    }

    #[test]
    fn bytestream_uris() {
        assert_eq!(
            bytestream_digest("bytestream://h:1/blobs/ab/12"),
            Some(("ab".into(), 12))
        );
        assert_eq!(
            bytestream_digest("bytestream://h:1/main/blobs/ab/12"),
            Some(("ab".into(), 12))
        );
        assert_eq!(bytestream_digest("file:///tmp/x"), None);
        assert_eq!(bytestream_digest("bytestream://h/blobs/ab/x"), None);
    }
}
