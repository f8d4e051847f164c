//! Actions that try to harm the worker or what it stores: processes that escape the action,
//! floods of output, outputs and symlinks that leave the input root, writes to input files.
//! Each gets a clear status, the worker stays up, and nothing is stored that should not be.

mod common;

use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::Code;
use common::*;

#[tokio::test]
async fn processes_that_double_fork_or_setsid_die_with_the_action() {
    let kit = Kit::new();
    let action = kit
        .action(
            &sh(&escaping_script(kit.tmp.path())),
            kit.empty_root().await,
        )
        .await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert_eq!(
        kit.read(result.stdout_digest.as_ref().unwrap()).await,
        "done\n"
    );
    for file in ["forked.pid", "setsid.pid"] {
        let pid = pid_in(&kit.tmp.path().join(file));
        assert!(dead(&pid), "{file}: process {pid} outlived its action");
    }
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn an_escaped_process_holding_stdout_does_not_hold_up_the_result() {
    let kit = Kit::new();
    let pid_file = kit.tmp.path().join("holder.pid");
    // The escaped sleep keeps the stdout pipe open: the capture ends only when it dies.
    let script = format!(
        "setsid sh -c 'echo $$ > {p}; exec sleep 1000' & \
         while [ ! -s {p} ]; do sleep 0.01; done; echo out",
        p = pid_file.display()
    );
    let action = kit.action(&sh(&script), kit.empty_root().await).await;
    let start = Instant::now();
    let response = kit.run(action).await;
    assert_eq!(
        kit.read(ok(&response).stdout_digest.as_ref().unwrap())
            .await,
        "out\n"
    );
    assert!(dead(&pid_in(&pid_file)));
    // Without the kill, the capture would wait its full 2 s drain deadline.
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_stdout_and_stderr_flood_is_cut_and_the_worker_stays_up() {
    let kit = Kit::with(|c| c.max_output_bytes_stdio = 1 << 20);
    let action = kit
        .action(
            &sh("head -c 300000000 /dev/zero; head -c 300000000 /dev/zero >&2; echo end"),
            kit.empty_root().await,
        )
        .await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert_eq!(result.exit_code, 0);
    for (name, d) in [
        ("stdout", &result.stdout_digest),
        ("stderr", &result.stderr_digest),
    ] {
        let kept = kit.read(d.as_ref().unwrap()).await;
        assert_eq!(kept.len(), 1 << 20, "{name}");
        assert!(
            response
                .message
                .contains(&format!("{name} was cut to its first 1048576 bytes")),
            "{}",
            response.message
        );
    }
    // The worker runs the next action as usual.
    let action = kit
        .action(&command(&["/bin/echo", "next"]), kit.empty_root().await)
        .await;
    let response = kit.run(action).await;
    assert_eq!(
        kit.read(ok(&response).stdout_digest.as_ref().unwrap())
            .await,
        "next\n"
    );
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn an_output_directory_with_symlinks_out_of_the_root_and_loops_stores_only_symlinks() {
    let kit = Kit::new();
    let cmd = re::Command {
        output_paths: strings(&["d"]),
        ..sh(
            "mkdir -p d/sub && ln -s / d/root && ln -s /etc/passwd d/passwd \
              && ln -s loop d/loop && ln -s ../.. d/sub/up && echo x > d/x",
        )
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    let result = ok(&response);
    let tree: re::Tree = kit
        .read_proto(result.output_directories[0].tree_digest.as_ref().unwrap())
        .await;
    let root = tree.root.unwrap();
    let links: Vec<_> = root
        .symlinks
        .iter()
        .map(|l| (l.name.as_str(), l.target.as_str()))
        .collect();
    assert_eq!(
        links,
        [("loop", "loop"), ("passwd", "/etc/passwd"), ("root", "/")]
    );
    let files: Vec<_> = root.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(files, ["x"], "nothing behind a symlink was read");
    assert_eq!(tree.children.len(), 1);
    assert_eq!(tree.children[0].symlinks[0].target, "../..");
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn an_output_whose_parent_the_command_turned_into_a_symlink_out_is_absent() {
    let kit = Kit::new();
    let outside = kit.tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "not for the CAS").unwrap();
    let cmd = re::Command {
        output_paths: strings(&["o/secret", "o"]),
        ..sh(&format!("rmdir o; ln -s {} o", outside.display()))
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    let result = ok(&response);
    assert!(result.output_files.is_empty(), "{:?}", result.output_files);
    assert_eq!(
        result.output_symlinks.len(),
        1,
        "o itself is reported as the symlink"
    );
    let secret = F.compute(b"not for the CAS");
    assert_eq!(
        cairn_store::StoreExt::has(&*kit.cas, &secret)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn an_action_that_rewrites_or_chmods_its_inputs_cannot_change_the_local_cas() {
    let kit = Kit::with_local_cas().await;
    let local = kit.local.clone().unwrap();
    let data = kit.blob("original\n").await;
    let tool = kit.blob("#!/bin/sh\necho tool\n").await;
    let root = kit
        .proto(&re::Directory {
            files: vec![file("data.txt", data, false), file("tool.sh", tool, true)],
            ..Default::default()
        })
        .await;
    // Written as is (root ignores the read-only mode), then made writable and written, then
    // truncated in place; the executable too.
    let evil = sh(
        "echo evil >> data.txt; chmod 666 data.txt; echo evil > data.txt; \
                   chmod 777 tool.sh; echo 'echo evil' > tool.sh; : > data.txt; exit 0",
    );
    let response = kit.run(kit.action(&evil, root).await).await;
    assert_eq!(ok(&response).exit_code, 0);

    let check = sh("cat data.txt; ./tool.sh; stat -c %a data.txt tool.sh");
    let response = kit.run(kit.action(&check, root).await).await;
    assert_eq!(
        kit.read(ok(&response).stdout_digest.as_ref().unwrap())
            .await,
        "original\ntool\n444\n555\n"
    );
    for (d, content) in [(data, "original\n"), (tool, "#!/bin/sh\necho tool\n")] {
        let path = local.path_of_blob(&d).unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), content);
    }
    kit.assert_work_root_empty();
}
#[tokio::test]
async fn a_deeply_nested_output_directory_is_a_clear_status_not_a_crash() {
    let kit = Kit::new();
    // As deep as a path can be made from the action's directory.
    let cmd = re::Command {
        output_paths: strings(&["d"]),
        ..sh("mkdir d && cd d && i=0; while [ $i -lt 1500 ]; do mkdir a && cd a || break; i=$((i+1)); done; echo deep > f")
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let response = kit.run(action).await;
    assert_eq!(code(&response), Code::ResourceExhausted.rpc_code());
    let message = &response.status.as_ref().unwrap().message;
    assert!(message.contains("deeper than 128 levels"), "{message}");
    // The worker is up.
    let action = kit
        .action(&command(&["/bin/true"]), kit.empty_root().await)
        .await;
    assert_eq!(ok(&kit.run(action).await).exit_code, 0);
    kit.assert_work_root_empty();
}

#[tokio::test]
async fn outputs_past_the_caps_are_resource_exhausted_and_nothing_is_stored() {
    let kit = Kit::with(|c| {
        c.max_output_files = 10;
        c.max_output_bytes = 1000;
    });
    let status = |response: &re::ExecuteResponse| {
        assert_eq!(
            code(response),
            Code::ResourceExhausted.rpc_code(),
            "{response:?}"
        );
        assert!(response.result.is_none());
        response.status.as_ref().unwrap().message.clone()
    };
    // Too many entries: 20 files in an output directory.
    let cmd = re::Command {
        output_paths: strings(&["d"]),
        ..sh("mkdir d; for i in $(seq 20); do echo $i > d/$i; done; echo printed")
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let message = status(&kit.run(action).await);
    assert!(
        message.contains("max_output_files") && message.contains("10"),
        "{message}"
    );
    assert_eq!(kit.cached(action).await, None);
    for i in 1..=20 {
        let blob = F.compute(format!("{i}\n").as_bytes());
        assert_eq!(
            cairn_store::StoreExt::has(&*kit.cas, &blob).await.unwrap(),
            None
        );
    }
    // Too many bytes: two files of 600.
    let cmd = re::Command {
        output_paths: strings(&["a", "b"]),
        ..sh("head -c 600 /dev/zero > a; head -c 600 /dev/zero | tr '\\0' x > b")
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    let message = status(&kit.run(action).await);
    assert!(
        message.contains("max_output_bytes") && message.contains("1000"),
        "{message}"
    );
    assert_eq!(
        cairn_store::StoreExt::has(&*kit.cas, &F.compute(&[0u8; 600]))
            .await
            .unwrap(),
        None
    );
    // Within the caps, as usual.
    let cmd = re::Command {
        output_paths: strings(&["a"]),
        ..sh("head -c 1000 /dev/zero > a")
    };
    let action = kit.action(&cmd, kit.empty_root().await).await;
    assert_eq!(ok(&kit.run(action).await).output_files.len(), 1);
    kit.assert_work_root_empty();
}
