//! The worker pipeline on real processes: inputs, outputs, stdout and stderr, the environment,
//! timeouts, cancellation, caching and the cleanup of the action directory.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::Code;
use common::*;
use prost::Message;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn echo_stdout_is_uploaded_and_the_result_cached() {
    let kit = Kit::new();
    let action = kit
        .action(&command(&["/bin/echo", "hello"]), kit.empty_root().await)
        .await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert!(!response.cached_result);
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        kit.read(result.stdout_digest.as_ref().unwrap()).await,
        "hello\n"
    );
    assert_eq!(result.stderr_digest, None, "empty stderr names no blob");

    let meta = result.execution_metadata.as_ref().unwrap();
    assert_eq!(meta.worker, "test-worker");
    let ts = |t: &Option<cairn_core::proto::google::protobuf::Timestamp>| {
        let t = t.as_ref().expect("timestamp set");
        (t.seconds, t.nanos)
    };
    let order = [
        ts(&meta.worker_start_timestamp),
        ts(&meta.input_fetch_start_timestamp),
        ts(&meta.input_fetch_completed_timestamp),
        ts(&meta.execution_start_timestamp),
        ts(&meta.execution_completed_timestamp),
        ts(&meta.output_upload_start_timestamp),
        ts(&meta.output_upload_completed_timestamp),
        ts(&meta.worker_completed_timestamp),
    ];
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");

    assert_eq!(kit.cached(action).await.as_ref(), Some(result));
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn queued_timestamp_is_reported() {
    let kit = Kit::new();
    let action = kit
        .action(&command(&["/bin/true"]), kit.empty_root().await)
        .await;
    let queued = std::time::SystemTime::now() - Duration::from_secs(5);
    let req = cairn_worker::RunRequest {
        action_digest: action,
        skip_cache_write: false,
        queued_at: Some(queued),
        platform: None,
    };
    let response = kit
        .runner
        .run_request(req, CancellationToken::new())
        .await
        .unwrap();
    let meta = ok(&response).execution_metadata.clone().unwrap();
    let q = meta.queued_timestamp.unwrap();
    let s = meta.worker_start_timestamp.unwrap();
    assert!(q.seconds + 4 <= s.seconds, "{q:?} {s:?}");
}

#[tokio::test]
async fn outputs_in_nested_directories_files_trees_and_executable_bits() {
    let kit = Kit::new();
    #[allow(deprecated)]
    let cmd = re::Command {
        output_files: strings(&["out/deep/a.txt", "run.sh"]),
        output_directories: strings(&["gen/tree"]),
        working_directory: "w".into(),
        ..sh("echo a > out/deep/a.txt \
              && printf '#!/bin/sh\\n' > run.sh && chmod 755 run.sh \
              && mkdir -p gen/tree/sub/empty && echo b > gen/tree/sub/b && chmod 700 gen/tree/sub/b \
              && echo top > gen/tree/top.txt && ln -s ../top.txt gen/tree/sub/link")
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert_eq!(result.exit_code, 0);

    let files: Vec<_> = result
        .output_files
        .iter()
        .map(|f| (f.path.as_str(), f.is_executable))
        .collect();
    assert_eq!(files, [("out/deep/a.txt", false), ("run.sh", true)]);
    assert_eq!(
        kit.read(result.output_files[0].digest.as_ref().unwrap())
            .await,
        "a\n"
    );

    assert_eq!(result.output_directories.len(), 1);
    let out_dir = &result.output_directories[0];
    assert_eq!(out_dir.path, "gen/tree");
    assert!(!out_dir.is_topologically_sorted);
    assert_eq!(out_dir.root_directory_digest, None);
    let tree: re::Tree = kit.read_proto(out_dir.tree_digest.as_ref().unwrap()).await;
    let root = tree.root.as_ref().unwrap();
    assert_eq!(root.files.len(), 1);
    assert_eq!(root.files[0].name, "top.txt");
    assert_eq!(
        kit.read(root.files[0].digest.as_ref().unwrap()).await,
        "top\n"
    );
    assert_eq!(root.directories.len(), 1);
    assert_eq!(root.directories[0].name, "sub");
    // children: sub and sub/empty, each once.
    assert_eq!(tree.children.len(), 2);
    let sub = tree
        .children
        .iter()
        .find(|d| Some(F.compute(&d.encode_to_vec()).to_proto()) == root.directories[0].digest)
        .expect("the child named by the root is in the tree");
    assert_eq!(sub.files.len(), 1);
    assert_eq!(sub.files[0].name, "b");
    assert!(sub.files[0].is_executable);
    assert_eq!(kit.read(sub.files[0].digest.as_ref().unwrap()).await, "b\n");
    assert_eq!(
        sub.symlinks,
        [symlink("link", "../top.txt")],
        "symlinks in a tree are kept as they are"
    );
    let names: Vec<_> = sub.directories.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["empty"]);
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn output_directory_format_directory_only_uploads_directory_blobs() {
    let kit = Kit::new();
    let cmd = re::Command {
        output_paths: strings(&["d"]),
        output_directory_format: re::command::OutputDirectoryFormat::TreeAndDirectory as i32,
        ..sh("mkdir -p d/e && echo x > d/e/x")
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    let out = &ok(&response).output_directories[0];
    let root: re::Directory = kit
        .read_proto(out.root_directory_digest.as_ref().unwrap())
        .await;
    let child: re::Directory = kit
        .read_proto(root.directories[0].digest.as_ref().unwrap())
        .await;
    assert_eq!(child.files[0].name, "x");
}

#[tokio::test]
async fn output_paths_report_files_directories_and_symlinks() {
    let kit = Kit::new();
    let cmd = re::Command {
        output_paths: strings(&["d", "f", "l", "missing"]),
        ..sh("mkdir d && echo in > d/in && echo f > f && ln -s /etc/passwd l")
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "f");
    assert_eq!(result.output_directories.len(), 1);
    assert_eq!(result.output_directories[0].path, "d");
    assert_eq!(result.output_symlinks.len(), 1);
    assert_eq!(result.output_symlinks[0].path, "l");
    assert_eq!(result.output_symlinks[0].target, "/etc/passwd");
    #[allow(deprecated)]
    {
        assert!(result.output_file_symlinks.is_empty());
        assert!(result.output_directory_symlinks.is_empty());
    }
}

#[tokio::test]
async fn symlink_outputs_are_reported_not_followed_even_when_they_escape() {
    let kit = Kit::new();
    #[allow(deprecated)]
    let cmd = re::Command {
        output_files: strings(&["escape", "inside", "via/passwd"]),
        output_directories: strings(&["dirlink"]),
        ..sh(
            "ln -s /etc/passwd escape && echo x > real && ln -s real inside \
              && ln -s /etc dirlink && rmdir via && ln -s /etc via",
        )
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert!(result.output_files.is_empty(), "{:?}", result.output_files);
    assert!(result.output_directories.is_empty());
    let targets: Vec<_> = result
        .output_symlinks
        .iter()
        .map(|s| (s.path.as_str(), s.target.as_str()))
        .collect();
    assert_eq!(
        targets,
        [
            ("escape", "/etc/passwd"),
            ("inside", "real"),
            ("dirlink", "/etc")
        ]
    );
    #[allow(deprecated)]
    {
        assert_eq!(result.output_file_symlinks.len(), 2);
        assert_eq!(result.output_directory_symlinks.len(), 1);
        assert_eq!(result.output_directory_symlinks[0].path, "dirlink");
    }
    kit.assert_work_root_empty();
}

/// Inputs: files with and without the executable bit (the same blob as both), symlinks,
/// subdirectories, an empty file; argv[0] relative to the working directory.
async fn inputs_are_materialised(kit: &Kit) {
    let script = kit.blob("#!/bin/sh\necho tool ran\n").await;
    let data = kit.blob("data\n").await;
    let empty = kit.blob("").await;
    let sub = kit
        .proto(&re::Directory {
            files: vec![
                file("copy.sh", script, false),
                file("data.txt", data, false),
            ],
            symlinks: vec![symlink("link", "../data.txt")],
            ..Default::default()
        })
        .await;
    let root = kit
        .proto(&re::Directory {
            files: vec![
                file("data.txt", data, false),
                file("empty", empty, false),
                file("tool.sh", script, true),
            ],
            directories: vec![dir("sub", sub)],
            ..Default::default()
        })
        .await;
    let cmd = re::Command {
        output_paths: strings(&["out.txt"]),
        ..command(&["./tool.sh"])
    };
    // The tool prints; a second action inspects the tree.
    let action = kit.action(&cmd, root).await;
    let response = kit.run(action).await;
    assert_eq!(
        kit.read(ok(&response).stdout_digest.as_ref().unwrap())
            .await,
        "tool ran\n"
    );

    let inspect = sh(
        "stat -c '%n %a' tool.sh data.txt empty sub/copy.sh sub/data.txt; \
                      readlink sub/link; cat sub/link; wc -c < empty",
    );
    let action = kit.action(&inspect, root).await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert_eq!(result.exit_code, 0, "{:?}", result);
    let stdout = kit.read(result.stdout_digest.as_ref().unwrap()).await;
    assert_eq!(
        std::str::from_utf8(&stdout).unwrap(),
        "tool.sh 555\ndata.txt 444\nempty 444\nsub/copy.sh 444\nsub/data.txt 444\n../data.txt\ndata\n0\n"
    );
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn inputs_are_materialised_from_the_cas() {
    inputs_are_materialised(&Kit::new()).await;
}

#[tokio::test]
async fn inputs_are_copied_from_a_local_filesystem_cas() {
    use std::os::unix::fs::MetadataExt;
    let kit = Kit::with_local_cas().await;
    let local = kit.local.clone().unwrap();
    let data = kit.blob("data\n").await;
    let script = kit.blob("#!/bin/sh\necho tool ran\n").await;
    inputs_are_materialised(&kit).await;
    // The blobs were copied into the local CAS, and from there into the action: the input's
    // inode is its own.
    let path = local
        .path_of_blob(&data)
        .expect("fetched into the local CAS");
    assert!(local.path_of_blob(&script).is_some());
    let root = kit
        .proto(&re::Directory {
            files: vec![file("data.txt", data, false)],
            ..Default::default()
        })
        .await;
    let action = kit.action(&sh("stat -c %i data.txt"), root).await;
    let response = kit.run(action).await;
    let stdout = kit
        .read(ok(&response).stdout_digest.as_ref().unwrap())
        .await;
    let inode: u64 = std::str::from_utf8(&stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(std::fs::metadata(path).unwrap().ino(), inode);
}

#[tokio::test]
async fn environment_is_only_the_commands() {
    let kit = Kit::new();
    let cmd = re::Command {
        environment_variables: vec![
            re::command::EnvironmentVariable {
                name: "A".into(),
                value: "1".into(),
            },
            re::command::EnvironmentVariable {
                name: "PATH".into(),
                value: "/bin:/usr/bin".into(),
            },
        ],
        ..command(&["/usr/bin/env"])
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    let stdout = kit
        .read(ok(&response).stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(stdout, "A=1\nPATH=/bin:/usr/bin\n");
}

#[tokio::test]
async fn working_directory_and_output_parents_are_created() {
    let kit = Kit::new();
    #[allow(deprecated)]
    let cmd = re::Command {
        working_directory: "a/b".into(),
        output_files: strings(&["x/y/z.txt"]),
        output_directories: strings(&["p/q"]),
        ..sh("pwd; test -d x/y && test -d p && test ! -e p/q && echo x > x/y/z.txt")
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert_eq!(result.exit_code, 0);
    let stdout = kit.read(result.stdout_digest.as_ref().unwrap()).await;
    // <work root>/<action directory>/a/b
    let pwd = std::path::PathBuf::from(std::str::from_utf8(&stdout).unwrap().trim_end());
    assert!(pwd.ends_with("a/b"), "{pwd:?}");
    assert_eq!(
        pwd.ancestors().nth(3),
        Some(std::fs::canonicalize(kit.work_root()).unwrap().as_path())
    );
    assert_eq!(result.output_files[0].path, "x/y/z.txt");
}

#[tokio::test]
async fn timeout_kills_the_process_group_and_keeps_partial_stdout() {
    let kit = Kit::new();
    let pid_file = kit.tmp.path().join("bg.pid");
    let script = format!(
        "sleep 30 & echo $! > {}; echo started; echo oops >&2; sleep 30",
        pid_file.display()
    );
    #[allow(deprecated)]
    let cmd = re::Command {
        output_files: strings(&["never"]),
        ..sh(&script)
    };
    let action = kit
        .action_with(&cmd, kit.empty_root().await, |a| a.timeout = timeout(1))
        .await;
    let start = Instant::now();
    let response = kit.run(action).await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        code(&response),
        Code::DeadlineExceeded.rpc_code(),
        "{response:?}"
    );
    let result = response
        .result
        .as_ref()
        .expect("a timed-out response keeps stdout and stderr");
    assert_eq!(
        kit.read(result.stdout_digest.as_ref().unwrap()).await,
        "started\n"
    );
    assert_eq!(
        kit.read(result.stderr_digest.as_ref().unwrap()).await,
        "oops\n"
    );
    assert_eq!(kit.cached(action).await, None);

    // The background sleep, in the same process group, is gone (or a zombie).
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next();
    assert!(
        matches!(state, None | Some("Z")),
        "background process still running: {stat}"
    );
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn cancel_kills_the_command_and_returns_cancelled() {
    let kit = Kit::new();
    let action = kit
        .action(&command(&["/bin/sleep", "30"]), kit.empty_root().await)
        .await;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        trigger.cancel();
    });
    let start = Instant::now();
    let response = kit.runner.run(action, false, cancel).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(code(&response), Code::Cancelled.rpc_code(), "{response:?}");
    assert_eq!(kit.cached(action).await, None);
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn a_cancelled_token_stops_the_action_before_it_runs() {
    let kit = Kit::new();
    let marker = kit.tmp.path().join("ran");
    let action = kit
        .action(
            &sh(&format!("touch {}", marker.display())),
            kit.empty_root().await,
        )
        .await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let response = kit.runner.run(action, false, cancel).await.unwrap();
    assert_eq!(code(&response), Code::Cancelled.rpc_code());
    assert!(!marker.exists());
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn non_zero_exit_is_reported_but_not_cached() {
    let kit = Kit::new();
    let action = kit
        .action(&sh("echo failing >&2; exit 3"), kit.empty_root().await)
        .await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert_eq!(result.exit_code, 3);
    assert_eq!(
        kit.read(result.stderr_digest.as_ref().unwrap()).await,
        "failing\n"
    );
    assert_eq!(kit.cached(action).await, None);
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn do_not_cache_is_not_cached() {
    let kit = Kit::new();
    let action = kit
        .action(&command(&["/bin/true"]), kit.empty_root().await)
        .await;
    let response = kit
        .runner
        .run(action, true, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(ok(&response).exit_code, 0);
    assert_eq!(kit.cached(action).await, None);

    // The Action's own do_not_cache too.
    let action = kit
        .action_with(&command(&["/bin/true"]), kit.empty_root().await, |a| {
            a.do_not_cache = true
        })
        .await;
    let response = kit.run(action).await;
    assert_eq!(ok(&response).exit_code, 0);
    assert_eq!(kit.cached(action).await, None);
}

#[tokio::test]
async fn stdout_is_cut_at_the_cap() {
    let kit = Kit::with(|c| c.max_output_bytes_stdio = 10);
    let action = kit
        .action(
            &sh("i=0; while [ $i -lt 1000 ]; do echo 0123456789; i=$((i+1)); done"),
            kit.empty_root().await,
        )
        .await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert_eq!(result.exit_code, 0, "the command is not blocked by the cap");
    assert_eq!(
        kit.read(result.stdout_digest.as_ref().unwrap()).await,
        "0123456789"
    );
    assert!(
        response.message.contains("stdout was cut"),
        "{}",
        response.message
    );
}

#[tokio::test]
async fn a_program_that_cannot_start_is_failed_precondition() {
    let kit = Kit::new();
    let action = kit
        .action(
            &command(&["/nonexistent/tool", "x"]),
            kit.empty_root().await,
        )
        .await;
    let response = kit.run(action).await;
    assert_eq!(code(&response), Code::FailedPrecondition.rpc_code());
    let status = response.status.as_ref().unwrap();
    assert!(
        status.message.contains("/nonexistent/tool"),
        "{}",
        status.message
    );
    assert!(status.details.is_empty(), "not a missing-blob failure");
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn concurrent_runs_do_not_interfere() {
    let kit = std::sync::Arc::new(Kit::new());
    let mut tasks = Vec::new();
    for i in 0..8 {
        let kit = kit.clone();
        tasks.push(tokio::spawn(async move {
            let cmd = re::Command {
                output_paths: strings(&["o"]),
                ..sh(&format!("echo {i} > o"))
            };
            let action = kit.action(&cmd, kit.empty_root().await).await;
            let response = kit.run(action).await;
            let f = &ok(&response).output_files[0];
            assert_eq!(kit.read(f.digest.as_ref().unwrap()).await, format!("{i}\n"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn clean_work_root_removes_abandoned_directories() {
    let kit = Kit::new();
    let stale = kit.work_root().join("stale/root/ro");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o500)).unwrap();
    kit.runner.clean_work_root().await.unwrap();
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn an_unqualified_program_is_looked_up_on_the_commands_path() {
    let kit = Kit::new();
    let cmd = re::Command {
        environment_variables: vec![re::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/bin:/usr/bin".into(),
        }],
        ..command(&["echo", "found"])
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    assert_eq!(
        kit.read(ok(&response).stdout_digest.as_ref().unwrap())
            .await,
        "found\n"
    );
}

#[tokio::test]
async fn a_blob_evicted_from_the_local_cas_is_streamed_from_the_cas() {
    let kit = Kit::with_local_cas().await;
    let local = kit.local.clone().unwrap();
    let data = kit.blob("evicted soon\n").await;
    cairn_store::StoreExt::put_bytes(&*local, &data, "evicted soon\n".into())
        .await
        .unwrap();
    // The index still lists the blob, but its file is gone (as after an eviction that raced
    // with the lookup).
    std::fs::remove_file(local.path_of_blob(&data).unwrap()).unwrap();
    let root = kit
        .proto(&re::Directory {
            files: vec![file("data.txt", data, false)],
            ..Default::default()
        })
        .await;
    let action = kit.action(&sh("cat data.txt"), root).await;
    let response = kit.run(action).await;
    assert_eq!(
        kit.read(ok(&response).stdout_digest.as_ref().unwrap())
            .await,
        "evicted soon\n"
    );
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn the_command_starts_clean_stdin_null_no_extra_descriptors_no_signals_masked() {
    let kit = &Kit::new();
    let stdout_of = |cmd: re::Command| async move {
        let action = kit.action(&cmd, kit.empty_root().await).await;
        let response = kit.run(action).await;
        let stdout = kit
            .read(ok(&response).stdout_digest.as_ref().unwrap())
            .await;
        String::from_utf8(stdout.to_vec()).unwrap()
    };
    // ls lists its own descriptors: 0, 1, 2 and the one it reads /proc/self/fd through.
    let listing = stdout_of(command(&["/bin/ls", "-l", "/proc/self/fd"])).await;
    let fds: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_once(" -> "))
        .filter(|(_, target)| !(target.starts_with("/proc/") && target.ends_with("/fd")))
        .map(|(l, _)| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(fds, ["0", "1", "2"], "{listing}");
    assert!(listing.contains(" 0 -> /dev/null\n"), "{listing}");
    // grep itself reads its own status: a shell's `$$` would name the shell, which blocks
    // every signal for a moment while it forks grep (dash does), so its mask is not ours.
    let status = stdout_of(command(&[
        "/bin/grep",
        "-E",
        "^Sig(Blk|Ign)",
        "/proc/self/status",
    ]))
    .await;
    assert_eq!(
        status, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
        "{status}"
    );
}

#[tokio::test]
async fn the_command_gets_transparent_huge_pages_even_when_the_worker_turned_them_off() {
    // As cairn's main does for the server (BENCHMARKS.md); the setting survives fork and exec,
    // so without the launcher's care every command would inherit it.
    // SAFETY: PR_SET_THP_DISABLE and PR_GET_THP_DISABLE take only integers.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let kit = &Kit::new();
    let action = kit
        .action(
            &command(&["/bin/grep", "^THP_enabled", "/proc/self/status"]),
            kit.empty_root().await,
        )
        .await;
    let response = kit.run(action).await;
    let stdout = kit
        .read(ok(&response).stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(&stdout[..], b"THP_enabled:\t1\n");
    assert_eq!(
        unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) },
        1,
        "the worker keeps THP off"
    );
}

#[tokio::test]
async fn directories_made_ahead_are_used_and_cleaned() {
    let kit = Kit::with(|cfg| cfg.dirs_ahead = 2);
    let cmd = re::Command {
        output_paths: strings(&["o"]),
        ..sh("test -z \"$(ls -A)\" && echo fresh > o")
    };
    for _ in 0..3 {
        let action = kit.action(&cmd, kit.empty_root().await).await;
        let response = kit.run(action).await;
        let f = &ok(&response).output_files[0];
        assert_eq!(kit.read(f.digest.as_ref().unwrap()).await, "fresh\n");
    }
    // The stock is made up in the background: at most two empty directories, nothing else.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = std::fs::read_dir(kit.work_root())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.len() <= 2, "{left:?}");
        for dir in &left {
            assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0, "{dir:?}");
        }
        if left.len() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "stock not made up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kit.runner.clean_work_root().await.unwrap();
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn a_silent_command_leaves_no_capture_blobs() {
    let kit = Kit::new();
    let action = kit
        .action(&command(&["/bin/true"]), kit.empty_root().await)
        .await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert!(result.stdout_digest.is_none() && result.stderr_digest.is_none());
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn a_variable_given_twice_keeps_its_last_value() {
    let kit = Kit::new();
    let var = |name: &str, value: &str| re::command::EnvironmentVariable {
        name: name.into(),
        value: value.into(),
    };
    let cmd = re::Command {
        environment_variables: vec![var("A", "first"), var("B", "b"), var("A", "last")],
        ..command(&["/usr/bin/env"])
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    let stdout = kit
        .read(ok(&response).stdout_digest.as_ref().unwrap())
        .await;
    assert_eq!(stdout, "B=b\nA=last\n");
}
