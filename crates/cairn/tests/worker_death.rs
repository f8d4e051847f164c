//! A worker process that dies by SIGKILL takes its running command with it: the command
//! (started with a parent-death signal) must not live on as an orphan.
//!
//! A scheduler+CAS process and a worker process (`deployment-examples/split/worker.json5`);
//! an action writes its pid to a file and sleeps; the worker is SIGKILLed; the command's
//! process must be gone (or a zombie waiting for init to reap it) within a deadline.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use common::actions::ShellAction;
use common::{free_addr, Cairn, CairnWorker};

/// CAS, AC and scheduler in one process; the worker API on `@WORKER_API@`.
const SCHEDULER_AND_CAS: &str = r#"{
  stores: [
    { name: "CAS", memory: {} },
    { name: "AC", memory: {} },
  ],
  schedulers: [{ name: "MAIN", simple: { supported_platform_properties: { OSFamily: "exact" } } }],
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "main", cas_store: "CAS" }],
        ac: [{ instance_name: "main", ac_store: "AC" }],
        bytestream: [{ instance_name: "main", cas_store: "CAS" }],
        execution: [{ instance_name: "main", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "main", remote_execution: { scheduler: "MAIN" } }],
      } },
    { listener: { http: { socket_address: "@WORKER_API@", tls: @WORKER_API_TLS@ } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
}"#;

/// How long anything in this test may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// Whether `pid` is a live process: it exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the
        // last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Polls `done` every 20 ms until it holds; panics with `what` after [`DEADLINE`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_sigkilled_worker_leaves_no_command_running() {
    let tmp = tempfile::tempdir().unwrap();
    let worker_api = free_addr();
    let tls = common::certs::split_tls_dir(tmp.path());
    let server = Cairn::start_with(
        tmp.path(),
        &SCHEDULER_AND_CAS
            .replace("@WORKER_API@", &worker_api.to_string())
            .replace("@WORKER_API_TLS@", &common::certs::worker_api_tls(&tls)),
        None,
    );
    let worker_dir = tmp.path().join("worker");
    std::fs::create_dir_all(&worker_dir).unwrap();
    let worker_config: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deployment-examples/split/worker.json5");
    let worker = CairnWorker::start(
        "worker",
        &worker_config,
        &[
            ("CAIRN_WORKER_API_ENDPOINT", format!("grpcs://{worker_api}")),
            ("CAIRN_TLS_DIR", tls.display().to_string()),
            ("CAIRN_CAS_ENDPOINT", format!("grpc://{}", server.addr)),
            ("CAIRN_WORKER_DATA", worker_dir.display().to_string()),
            ("CAIRN_WORKER_SLOTS", "1".to_string()),
        ],
        DEADLINE,
    );

    // The command writes its pid (the shell's, which `exec` hands to sleep) and sleeps.
    let pid_file = tmp.path().join("command.pid");
    let script = format!(
        "echo $$ > {}.tmp && mv {0}.tmp {0} && exec sleep 600",
        pid_file.display()
    );
    let channel = server.channel().await;
    let digest = ShellAction {
        script: &script,
        ..Default::default()
    }
    .upload(channel.clone(), "main")
    .await
    .to_proto();
    let mut exec = re::execution_client::ExecutionClient::new(channel);
    let execution = tokio::spawn(async move {
        let mut ops = exec
            .execute(re::ExecuteRequest {
                instance_name: "main".into(),
                action_digest: Some(digest),
                skip_cache_lookup: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Held open until the test ends; the action never completes.
        while let Ok(Some(_)) = ops.message().await {}
    });

    let mut pid = None;
    wait_until("the command writes its pid", || {
        pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        pid.is_some()
    })
    .await;
    let pid = pid.unwrap();
    wait_until("the command runs sleep", || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    })
    .await;
    assert!(
        alive(pid),
        "the command {pid} is not running before the kill"
    );

    worker.kill9();
    wait_until(&format!("the command {pid} dies with its worker"), || {
        !alive(pid)
    })
    .await;
    execution.abort();
}
