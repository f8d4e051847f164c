//! The web UI (`services.web_ui`) over HTTP against a real Cairn with a local worker: build
//! events published through the Build Event Service appear on `/invocations` and
//! `/invocation/ID` (escaped, with the test log from the CAS), an action's page shows its
//! Command, result, outputs and timeline, `/queue` shows a queued action and the property
//! that blocks it, `/workers` the worker; bad digests, unknown and huge ids are clear errors
//! and the server stays up; read-only refuses the drain, which works when turned on.

mod common;

use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use cairn_proto::bes::v1 as bes;
use cairn_server::web_ui::events as ev;
use common::actions::{upload_blobs, ShellAction};
use common::{http_get, Cairn};
use prost::Message;

const SHA: DigestFunction = DigestFunction::Sha256;

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
    MAIN: { simple: {
      supported_platform_properties: { OSFamily: "exact" },
      unschedulable_grace_period_s: 600,
    } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "", remote_execution: { scheduler: "MAIN" } }],
        experimental_bep: { store: "BEP" },
        health: {},
        web_ui: { bep_store: "BEP", cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"],
                  max_invocations: 3, read_only: @READ_ONLY@ },
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
    max_inflight_tasks: 2,
  } }],
}"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &std::path::Path, read_only: bool) -> Cairn {
    Cairn::start_with(
        dir,
        &CONFIG
            .replace("@WPORT@", &free_port().to_string())
            .replace("@READ_ONLY@", &read_only.to_string()),
        None,
    )
}

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// GETs `path` until `ok(status, body)` or 30 s have passed; the last answer.
async fn poll(
    addr: std::net::SocketAddr,
    path: &str,
    ok: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(addr, path).await;
        if ok(code, &body) || Instant::now() > deadline {
            return (code, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs a form over a new HTTP/1.1 connection: (status, body).
async fn http_post(addr: std::net::SocketAddr, path: &str, form: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    (
        text[9..12].parse().unwrap(),
        text.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string(),
    )
}

/// Publishes Bazel events `events` (sequence 1, 2, ...) of the tool stream of `invocation`.
async fn publish(channel: tonic::transport::Channel, invocation: &str, events: &[ev::BuildEvent]) {
    let mut client = bes::publish_build_event_client::PublishBuildEventClient::new(channel);
    for (i, e) in events.iter().enumerate() {
        client
            .publish_lifecycle_event(bes::PublishLifecycleEventRequest {
                build_event: Some(bes::OrderedBuildEvent {
                    stream_id: Some(bes::StreamId {
                        build_id: format!("build-{invocation}"),
                        invocation_id: invocation.into(),
                        component: bes::stream_id::BuildComponent::Tool as i32,
                    }),
                    sequence_number: i as i64 + 1,
                    event: ev::wrap_bazel_event(e),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

const HOSTILE_LABEL: &str = "//pkg:<img src=x onerror=alert(1)>";

/// A failed build of one target and one test whose log (`log`) is in the CAS.
fn failed_build(invocation: &str, log: &Digest) -> Vec<ev::BuildEvent> {
    let id_target = ev::BuildEventId {
        target_completed: Some(ev::LabelId {
            label: HOSTILE_LABEL.into(),
        }),
        ..Default::default()
    };
    let id_test = ev::BuildEventId {
        test_result: Some(ev::TestResultId {
            label: "//pkg:t".into(),
            run: 1,
            shard: 0,
            attempt: 1,
        }),
        ..Default::default()
    };
    vec![
        ev::BuildEvent {
            started: Some(ev::BuildStarted {
                uuid: invocation.into(),
                start_time_millis: 1_700_000_000_000,
                command: "test".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ev::BuildEvent {
            unstructured_command_line: Some(ev::CommandLine {
                args: vec!["bazel".into(), "test".into(), "//pkg:all".into()],
            }),
            ..Default::default()
        },
        ev::BuildEvent {
            progress: Some(ev::Progress {
                stdout: String::new(),
                stderr: "INFO: compiling <script>alert(2)</script>\n".into(),
            }),
            ..Default::default()
        },
        ev::BuildEvent {
            id: Some(id_target),
            completed: Some(ev::TargetComplete { success: false }),
            ..Default::default()
        },
        ev::BuildEvent {
            id: Some(id_test),
            test_result: Some(ev::TestResult {
                status: 4,
                test_attempt_duration_millis: 12,
                test_action_output: vec![ev::File {
                    name: "test.log".into(),
                    uri: format!(
                        "bytestream://localhost/blobs/{}/{}",
                        log.hash_hex(),
                        log.size()
                    ),
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
        ev::BuildEvent {
            finished: Some(ev::BuildFinished {
                finish_time_millis: 1_700_000_003_000,
                exit_code: Some(ev::ExitCode {
                    name: "TESTS_FAILED".into(),
                    code: 3,
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_pages_from_build_events() {
    let tmp = tempfile::tempdir().unwrap();
    let cairn = start(tmp.path(), true);
    let ch = channel(cairn.addr).await;
    let log = b"FAIL: expected 1, got <2>\n".to_vec();
    let log_digest = SHA.compute(&log);
    upload_blobs(ch.clone(), "", vec![log]).await;
    publish(ch.clone(), "inv-1", &failed_build("inv-1", &log_digest)).await;

    let (code, list) = http_get(cairn.addr, "/invocations").await;
    assert_eq!(code, 200, "{list}");
    assert!(list.contains("/invocation/inv-1"), "{list}");
    assert!(list.contains("TESTS_FAILED"), "{list}");
    let (_, failed) = http_get(cairn.addr, "/invocations?status=failed&q=pkg%3Aall").await;
    assert!(failed.contains("inv-1"), "{failed}");
    let (_, none) = http_get(cairn.addr, "/invocations?status=succeeded").await;
    assert!(!none.contains("/invocation/inv-1"), "{none}");
    let (_, none) = http_get(cairn.addr, "/invocations?q=%3Cnothing%3E").await;
    assert!(
        !none.contains("/invocation/inv-1") && none.contains("&lt;nothing&gt;"),
        "{none}"
    );

    let (code, page) = http_get(cairn.addr, "/invocation/inv-1").await;
    assert_eq!(code, 200, "{page}");
    for want in [
        "bazel test //pkg:all",
        "TESTS_FAILED",
        "2023-11-14 22:13:20 UTC",
        "3.0 s",
        "//pkg:&lt;img src=x onerror=alert(1)&gt;",
        "FAILED",
        "FAIL: expected 1, got &lt;2&gt;",
        "INFO: compiling &lt;script&gt;alert(2)&lt;/script&gt;",
        &format!(
            "/blob/{}-{}?name=test.log",
            log_digest.hash_hex(),
            log_digest.size()
        ),
    ] {
        assert!(page.contains(want), "{want:?} is not on the page:\n{page}");
    }
    assert!(
        !page.contains("<img src=x") && !page.contains("<script>"),
        "{page}"
    );

    // Hostile and unknown ids.
    let (code, body) = http_get(cairn.addr, "/invocation/nope").await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = http_get(cairn.addr, &format!("/invocation/{}", "x".repeat(5000))).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = http_get(cairn.addr, "/invocation/%3Cscript%3E").await;
    assert_eq!(code, 404);
    assert!(
        body.contains("&lt;script&gt;") && !body.contains("<script>"),
        "{body}"
    );

    // Retention: max_invocations is 3, so the first of four more is forgotten.
    for i in 2..=4 {
        publish(
            ch.clone(),
            &format!("inv-{i}"),
            &failed_build("x", &log_digest)[..1],
        )
        .await;
    }
    let (code, _) = http_get(cairn.addr, "/invocation/inv-1").await;
    assert_eq!(code, 404, "the oldest invocation is past max_invocations");
    let (_, list) = http_get(cairn.addr, "/invocations").await;
    let newest = list.find("inv-4").unwrap();
    let older = list.find("inv-2").unwrap();
    assert!(newest < older, "newest first:\n{list}");

    let (code, _) = http_get(cairn.addr, "/status").await;
    assert_eq!(code, 200, "the server is still up");
    cairn.kill9();
}

/// Executes an uploaded action and waits for its end.
async fn execute(ch: tonic::transport::Channel, digest: &Digest) {
    let mut exec = re::execution_client::ExecutionClient::new(ch);
    let mut stream = exec
        .execute(re::ExecuteRequest {
            action_digest: Some(digest.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(op) = stream.message().await.unwrap() {
        if op.done {
            return;
        }
    }
    panic!("the Execute stream ended before the operation was done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_tree_and_blob_pages_and_bad_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let cairn = start(tmp.path(), true);
    let ch = channel(cairn.addr).await;
    // A real execution by the local worker: its result is in the AC with its metadata.
    let action = ShellAction {
        script: "printf '<b>out</b>'; printf 'made' > o.txt; echo err >&2",
        outputs: &["o.txt"],
        inputs: &[("in.txt", b"input")],
        ..Default::default()
    };
    let digest = action.upload(ch.clone(), "").await;
    execute(ch.clone(), &digest).await;

    let path = format!("/action/{}-{}", digest.hash_hex(), digest.size());
    let (code, page) = http_get(cairn.addr, &path).await;
    assert_eq!(code, 200, "{page}");
    let made = SHA.compute(b"made");
    for want in [
        "/bin/sh",
        "PATH",
        "OSFamily",
        "Exit code: <span class=\"ok\">0</span>",
        "&lt;b&gt;out&lt;/b&gt;",
        "err",
        &format!("/blob/{}-4?name=o.txt", made.hash_hex()),
        "input fetch",
        "execution",
        "Worker: <code>wk",
    ] {
        assert!(page.contains(want), "{want:?} is not on the page:\n{page}");
    }
    assert!(!page.contains("<b>out"), "{page}");

    // The input root, browsable, and an output downloaded whole.
    let (_, blobs) = action.build();
    let root = SHA.compute(&blobs[1]);
    let (code, tree) = http_get(
        cairn.addr,
        &format!("/tree/{}-{}", root.hash_hex(), root.size()),
    )
    .await;
    assert_eq!(code, 200, "{tree}");
    assert!(tree.contains("in.txt"), "{tree}");
    let (code, body) = http_get(
        cairn.addr,
        &format!("/blob/{}-4?name=o.txt", made.hash_hex()),
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "made"));

    // An output directory's Tree, rendered whole.
    let leaf = re::Directory {
        files: vec![re::FileNode {
            name: "inner.txt".into(),
            digest: Some(made.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let tree = re::Tree {
        root: Some(re::Directory {
            directories: vec![re::DirectoryNode {
                name: "nested".into(),
                digest: Some(SHA.compute(&leaf.encode_to_vec()).to_proto()),
            }],
            ..Default::default()
        }),
        children: vec![leaf],
    }
    .encode_to_vec();
    let td = SHA.compute(&tree);
    upload_blobs(ch.clone(), "", vec![tree]).await;
    let (code, page) = http_get(
        cairn.addr,
        &format!("/output-tree/{}-{}", td.hash_hex(), td.size()),
    )
    .await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("nested/<ul>") && page.contains("inner.txt"),
        "{page}"
    );

    // A failing action: its result is not cached, and its page shows it from the scheduler.
    let failing = ShellAction {
        script: "echo '<boom>' >&2; exit 3",
        ..Default::default()
    };
    let fd = failing.upload(ch.clone(), "").await;
    execute(ch.clone(), &fd).await;
    let (code, page) = http_get(
        cairn.addr,
        &format!("/action/{}-{}", fd.hash_hex(), fd.size()),
    )
    .await;
    assert_eq!(code, 200, "{page}");
    for want in [
        "Not in the action cache",
        "<span class=\"bad\">3</span>",
        "&lt;boom&gt;",
    ] {
        assert!(page.contains(want), "{want:?} is not on the page:\n{page}");
    }

    // Hostile digests: clear 4xx pages, nothing else.
    let missing = SHA.compute(b"never stored");
    for (path, want) in [
        ("/action/garbage".to_string(), 400),
        ("/action/zz-1".to_string(), 400),
        (format!("/action/{}-x", "a".repeat(64)), 400),
        (format!("/action/{}--5", "a".repeat(64)), 400),
        (format!("/action/{}-1", "A".repeat(64)), 400),
        (format!("/action/{}", "a".repeat(9000)), 400),
        (format!("/action/{}-{}", "a".repeat(64), u64::MAX), 400),
        (format!("/action/{}-99999999999", "a".repeat(64)), 400),
        (
            format!("/action/{}-{}", missing.hash_hex(), missing.size()),
            404,
        ),
        (
            format!("/tree/{}-{}", missing.hash_hex(), missing.size()),
            404,
        ),
        (
            format!("/blob/{}-{}", missing.hash_hex(), missing.size()),
            404,
        ),
        ("/blob/%3Cscript%3E-1".to_string(), 400),
        ("/output-tree/garbage".to_string(), 400),
        (
            format!("/output-tree/{}-{}", missing.hash_hex(), missing.size()),
            404,
        ),
        // A blob that is not an Action.
        (format!("/action/{}-4", made.hash_hex()), 422),
    ] {
        let (code, body) = http_get(cairn.addr, &path).await;
        assert_eq!(code, want, "{path}: {body}");
        assert!(!body.contains("<script>"), "{body}");
    }
    let (code, _) = http_get(cairn.addr, "/status").await;
    assert_eq!(code, 200, "the server is still up");
    cairn.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_and_workers_pages_and_the_drain_button() {
    let tmp = tempfile::tempdir().unwrap();
    let cairn = start(tmp.path(), false);
    let ch = channel(cairn.addr).await;
    let (code, workers) = poll(cairn.addr, "/workers", |_, b| b.contains("serving")).await;
    assert_eq!(code, 200, "{workers}");
    assert!(
        workers.contains("OSFamily=linux") && workers.contains("0/2 busy"),
        "{workers}"
    );
    assert!(workers.contains("<button>Drain</button>"), "{workers}");

    // An action no worker can run waits in the queue, with the property that blocks it.
    let action = ShellAction {
        script: "true",
        ..Default::default()
    };
    let (digest, blobs) = action.build_with_platform(&[("OSFamily", "windows")]);
    upload_blobs(ch.clone(), "", blobs).await;
    let mut exec = re::execution_client::ExecutionClient::new(ch.clone());
    let mut request = tonic::Request::new(re::ExecuteRequest {
        action_digest: Some(digest.to_proto()),
        ..Default::default()
    });
    let meta = re::RequestMetadata {
        tool_invocation_id: "inv-q".into(),
        ..Default::default()
    };
    request.metadata_mut().insert_bin(
        "build.bazel.remote.execution.v2.requestmetadata-bin",
        tonic::metadata::MetadataValue::from_bytes(&meta.encode_to_vec()),
    );
    let _waiting = exec.execute(request).await.unwrap().into_inner();
    let (code, queue) = poll(cairn.addr, "/queue", |_, b| b.contains(&digest.hash_hex())).await;
    assert_eq!(code, 200, "{queue}");
    for want in [
        "1 queued",
        "OSFamily=windows",
        "No worker can run these actions: no connected worker offers OSFamily=windows",
        "inv-q",
    ] {
        assert!(
            queue.contains(want),
            "{want:?} is not on the page:\n{queue}"
        );
    }

    // Drain: refused for an unknown worker or scheduler, done for the real one.
    let (code, _) = http_post(
        cairn.addr,
        "/workers/drain",
        "scheduler=MAIN&worker=nobody&draining=1",
    )
    .await;
    assert_eq!(code, 404);
    let (code, _) = http_post(
        cairn.addr,
        "/workers/drain",
        "scheduler=NOPE&worker=wk&draining=1",
    )
    .await;
    assert_eq!(code, 404);
    let (code, _) = http_post(
        cairn.addr,
        "/workers/drain",
        "scheduler=MAIN&worker=wk&draining=yes",
    )
    .await;
    assert_eq!(code, 400);
    let (code, body) = http_post(
        cairn.addr,
        "/workers/drain",
        "scheduler=MAIN&worker=wk&draining=1",
    )
    .await;
    assert_eq!(code, 303, "{body}");
    let (_, workers) = poll(cairn.addr, "/workers", |_, b| b.contains("draining")).await;
    assert!(workers.contains("<button>Undrain</button>"), "{workers}");
    cairn.kill9();

    // Read-only (the default): no button, and the POST is refused.
    let tmp = tempfile::tempdir().unwrap();
    let cairn = start(tmp.path(), true);
    let (_, workers) = poll(cairn.addr, "/workers", |_, b| b.contains("serving")).await;
    assert!(!workers.contains("<button>"), "{workers}");
    let (code, _) = http_post(
        cairn.addr,
        "/workers/drain",
        "scheduler=MAIN&worker=wk&draining=1",
    )
    .await;
    assert_eq!(code, 403);
    cairn.kill9();
}

/// A web UI naming a store or scheduler that does not exist, or a key it does not know, is
/// refused by `check-config` and by `run`, naming the key path.
#[test]
fn config_errors_name_the_web_ui_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.json5");
    for (services, key) in [
        (
            r#"web_ui: { bep_store: "NOPE" }"#,
            "servers[0].services.web_ui.bep_store",
        ),
        (
            r#"web_ui: { cas_store: "NOPE" }"#,
            "servers[0].services.web_ui.cas_store",
        ),
        (
            r#"web_ui: { schedulers: ["NOPE"] }"#,
            "servers[0].services.web_ui.schedulers[0]",
        ),
        (
            r#"web_ui: { read_only: "no" }"#,
            "servers[0].services.web_ui.read_only",
        ),
        (r#"web_ui: { colour: "blue" }"#, "colour"),
    ] {
        std::fs::write(
            &f,
            format!(
                r#"{{stores: {{CAS: {{memory: {{}}}}}}, servers: [{{listener: {{http: {{socket_address: "127.0.0.1:0"}}}}, services: {{ {services} }}}}]}}"#
            ),
        )
        .unwrap();
        for command in ["check-config", "run"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
                .arg(command)
                .arg(&f)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{command} {services}: {err}");
            assert!(
                err.contains(key),
                "{command} {services}: {key} not in {err}"
            );
        }
    }
}

/// A drain form posted from another site (as a browser says with `Sec-Fetch-Site`) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_drain_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let cairn = start(tmp.path(), false);
    poll(cairn.addr, "/workers", |_, b| b.contains("serving")).await;
    let form = "scheduler=MAIN&worker=wk&draining=1";
    let mut s = tokio::net::TcpStream::connect(cairn.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /workers/drain HTTP/1.1\r\nHost: x\r\nSec-Fetch-Site: cross-site\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert!(
        buf.starts_with(b"HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    let (_, workers) = http_get(cairn.addr, "/workers").await;
    assert!(
        workers.contains("serving <form"),
        "still serving: {workers}"
    );
    cairn.kill9();
}

/// Invocations outlive a restart: the index is kept in the BEP store and read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let config = CONFIG
        .replace(
            "BEP: { memory: {} }",
            r#"BEP: { filesystem: { content_path: "@DIR@/bep", temp_path: "@DIR@/bep-tmp" } }"#,
        )
        .replace("@READ_ONLY@", "true");
    let run = |port: u16| config.replace("@WPORT@", &port.to_string());
    let cairn = Cairn::start_with(tmp.path(), &run(free_port()), None);
    let ch = channel(cairn.addr).await;
    let log = SHA.compute(b"no log");
    publish(ch, "kept-1", &failed_build("kept-1", &log)).await;
    let (code, _) = http_get(cairn.addr, "/invocation/kept-1").await;
    assert_eq!(code, 200);
    cairn.kill9();

    let cairn = Cairn::start_with(tmp.path(), &run(free_port()), None);
    let (code, list) = http_get(cairn.addr, "/invocations").await;
    assert_eq!(code, 200);
    assert!(
        list.contains("/invocation/kept-1") && list.contains("TESTS_FAILED"),
        "{list}"
    );
    let (code, page) = http_get(cairn.addr, "/invocation/kept-1").await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("//pkg:&lt;img src=x onerror=alert(1)&gt;"),
        "{page}"
    );
    cairn.kill9();
}
