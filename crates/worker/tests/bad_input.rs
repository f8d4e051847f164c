//! Actions the worker must refuse: missing blobs (FAILED_PRECONDITION with a
//! PreconditionFailure naming every digest) and malformed actions (INVALID_ARGUMENT).

mod common;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Code, Digest};
use cairn_worker::{PreconditionFailure, PRECONDITION_FAILURE_TYPE_URL};
use common::*;
use prost::Message;

/// The subjects of the MISSING violations of a FAILED_PRECONDITION response, sorted.
fn missing_subjects(response: &re::ExecuteResponse) -> Vec<String> {
    assert_eq!(
        code(response),
        Code::FailedPrecondition.rpc_code(),
        "{response:?}"
    );
    assert!(response.result.is_none());
    let status = response.status.as_ref().unwrap();
    assert_eq!(status.details.len(), 1, "{status:?}");
    assert_eq!(status.details[0].type_url, PRECONDITION_FAILURE_TYPE_URL);
    let failure = PreconditionFailure::decode(&status.details[0].value[..]).unwrap();
    assert!(failure.violations.iter().all(|v| v.r#type == "MISSING"));
    let mut subjects: Vec<_> = failure.violations.into_iter().map(|v| v.subject).collect();
    subjects.sort();
    subjects
}

fn subject(d: &Digest) -> String {
    format!("blobs/{}/{}", d.hash_hex(), d.size())
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn missing_action_is_one_violation() {
    let kit = Kit::new();
    let action = F.compute(b"no such action");
    let response = kit.run(action).await;
    assert_eq!(missing_subjects(&response), [subject(&action)]);
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn every_missing_input_is_listed() {
    let kit = Kit::new();
    let present = kit.blob("here").await;
    let gone1 = F.compute(b"missing file one");
    let gone2 = F.compute(b"missing file two, used twice");
    let gone_dir = F.compute(b"not a stored directory");
    let sub = kit
        .proto(&re::Directory {
            files: vec![file("a", gone2, false), file("b", present, false)],
            directories: vec![dir("lost", gone_dir)],
            ..Default::default()
        })
        .await;
    let root = kit
        .proto(&re::Directory {
            files: vec![
                file("g1", gone1, false),
                file("g2", gone2, true),
                file("p", present, false),
            ],
            directories: vec![dir("sub", sub)],
            ..Default::default()
        })
        .await;
    let action = kit.action(&command(&["/bin/true"]), root).await;
    let response = kit.run(action).await;
    assert_eq!(
        missing_subjects(&response),
        sorted(vec![subject(&gone1), subject(&gone2), subject(&gone_dir)])
    );
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn missing_command_and_root_are_listed_together() {
    let kit = Kit::new();
    let command = re::Command {
        arguments: strings(&["/bin/true"]),
        ..Default::default()
    };
    let command_digest = F.compute(&command.encode_to_vec()); // never stored
                                                              // Never stored (not the empty Directory: that one is the empty blob, always present).
    let root = F.compute(
        &re::Directory {
            files: vec![re::FileNode {
                name: "f".into(),
                digest: Some(F.compute(b"f").to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let action = kit
        .proto(&re::Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(root.to_proto()),
            ..Default::default()
        })
        .await;
    let response = kit.run(action).await;
    assert_eq!(
        missing_subjects(&response),
        sorted(vec![subject(&command_digest), subject(&root)])
    );
}

#[tokio::test]
async fn missing_inputs_are_found_with_a_local_cas_too() {
    let kit = Kit::with_local_cas().await;
    let gone = F.compute(b"gone");
    let root = kit
        .proto(&re::Directory {
            files: vec![file("g", gone, false)],
            ..Default::default()
        })
        .await;
    let action = kit.action(&command(&["/bin/true"]), root).await;
    assert_eq!(missing_subjects(&kit.run(action).await), [subject(&gone)]);
}

async fn invalid_message(kit: &Kit, command: &re::Command) -> String {
    let action = kit.action(command, kit.empty_root().await).await;
    invalid_action_message(kit, action).await
}

async fn invalid_action_message(kit: &Kit, action: Digest) -> String {
    let response = kit.run(action).await;
    assert_eq!(
        code(&response),
        Code::InvalidArgument.rpc_code(),
        "{response:?}"
    );
    assert!(response.result.is_none());
    kit.assert_work_root_empty();
    assert_eq!(kit.cached(action).await, None);
    response.status.unwrap().message
}

#[tokio::test]
async fn absolute_or_dotdot_output_paths_are_invalid() {
    let kit = Kit::new();
    #[allow(deprecated)]
    let cases = [
        re::Command {
            output_files: strings(&["/tmp/escape"]),
            ..command(&["/bin/true"])
        },
        re::Command {
            output_files: strings(&["a/../../escape"]),
            ..command(&["/bin/true"])
        },
        re::Command {
            output_directories: strings(&["../up"]),
            ..command(&["/bin/true"])
        },
        re::Command {
            output_paths: strings(&["ok", "/abs"]),
            ..command(&["/bin/true"])
        },
    ];
    for c in cases {
        let m = invalid_message(&kit, &c).await;
        assert!(m.contains("absolute") || m.contains(".."), "{m}");
    }
}

#[tokio::test]
async fn working_directory_outside_the_input_root_is_invalid() {
    let kit = Kit::new();
    for wd in ["/tmp", "..", "a/../../b"] {
        let c = re::Command {
            working_directory: wd.into(),
            ..command(&["/bin/true"])
        };
        let m = invalid_message(&kit, &c).await;
        assert!(m.contains("working_directory"), "{m}");
    }
}

#[tokio::test]
async fn timeout_above_the_maximum_is_invalid() {
    let kit = Kit::new(); // max_timeout 120 s
    let action = kit
        .action_with(&command(&["/bin/true"]), kit.empty_root().await, |a| {
            a.timeout = timeout(121)
        })
        .await;
    let m = invalid_action_message(&kit, action).await;
    assert!(m.contains("timeout") && m.contains("maximum"), "{m}");
}

#[tokio::test]
async fn malformed_protos_and_trees_are_invalid() {
    let kit = Kit::new();
    // An Action that is not a proto.
    let action = kit.blob(vec![0xff, 0xff, 0xff]).await;
    let m = invalid_action_message(&kit, action).await;
    assert!(m.contains("not a valid Action"), "{m}");

    // An input entry that is a path, not a name.
    let data = kit.blob("x").await;
    let root = kit
        .proto(&re::Directory {
            files: vec![file("../x", data, false)],
            ..Default::default()
        })
        .await;
    let action = kit.action(&command(&["/bin/true"]), root).await;
    let m = invalid_action_message(&kit, action).await;
    assert!(m.contains("single path segment"), "{m}");

    // No arguments.
    let m = invalid_message(&kit, &re::Command::default()).await;
    assert!(m.contains("no program"), "{m}");
}

#[tokio::test]
async fn an_input_symlink_cannot_redirect_output_parents() {
    let kit = Kit::new();
    let outside = kit.tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let root = kit
        .proto(&re::Directory {
            symlinks: vec![symlink("out", &outside.display().to_string())],
            ..Default::default()
        })
        .await;
    #[allow(deprecated)]
    let c = re::Command {
        output_files: strings(&["out/new/file"]),
        ..command(&["/bin/true"])
    };
    let action = kit.action(&c, root).await;
    let m = invalid_action_message(&kit, action).await;
    assert!(m.contains("symlink"), "{m}");
    assert!(!outside.join("new").exists());
}
