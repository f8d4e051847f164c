//! Failover under a running build: Bazel 4.2.3 builds `bazel-exec-workspace/` with every
//! action remote through one of three scheduler replicas that share their state in Redis
//! (blobs in a second Redis), with a worker on each of two replicas. While `//special:sleepy`
//! runs, the replica Bazel is attached to is killed with SIGKILL. Bazel reaches the replicas
//! through a small TCP front (as a load balancer would): a new connection goes to the first
//! replica that accepts it, so after the kill Bazel's retries land on a survivor, which answers
//! its WaitExecution from the shared state. The build must succeed with every output right.
//!
//! Needs `bazel` on PATH (Debian's `bazel-bootstrap`) and works offline; without Bazel it
//! fails, unless `CAIRN_SKIP_BAZEL=1` is set.

mod common;
#[path = "common/redis.rs"]
mod redis_kit;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bazel::{self, Bazel, COMMAND_DEADLINE};
use common::front::Front;
use common::{free_addr, Cairn, CairnWorker};
use redis_kit::RedisServer;

const REPLICA: &str = r#"{
  stores: [
    { name: "STATE", redis_store: { addresses: ["@STATE@"] } },
    { name: "CAS", redis_store: { addresses: ["@REDIS@"], key_prefix: "cas:" } },
    { name: "AC", redis_store: { addresses: ["@REDIS@"], key_prefix: "ac:" } },
  ],
  schedulers: [{ name: "MAIN", cache_lookup: {
    ac_store: "AC",
    scheduler: { simple: {
      supported_platform_properties: { OSFamily: "exact", cpu_count: "minimum" },
      worker_timeout_s: 2,
      experimental_backend: { redis: { redis_store: "STATE" } },
    } },
  } }],
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "main", cas_store: "CAS" }],
        ac: [{ instance_name: "main", ac_store: "AC" }],
        bytestream: [{ instance_name: "main", cas_store: "CAS" }],
        execution: [{ instance_name: "main", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "main", remote_execution: { scheduler: "MAIN" } }],
      } },
    { listener: { http: { socket_address: "@WORKER_API@", tls: @WORKER_API_TLS@ } },
      services: { worker_api: { scheduler: "MAIN" } } },
  ],
}"#;

fn find_file(root: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => {
                if let Some(found) = find_file(&path, name) {
                    return Some(found);
                }
            }
            Ok(_) if entry.file_name() == name => return Some(path),
            _ => {}
        }
    }
    None
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn bazel_builds_through_a_replica_killed_mid_build() {
    let Some(program) = bazel::find_or_skip("shared_scheduler_bazel") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(tmp.path());
    let state = RedisServer::start(tmp.path());
    let tls = common::certs::split_tls_dir(tmp.path());
    let mut replicas: Vec<Option<(Cairn, SocketAddr)>> = (0..3)
        .map(|i| {
            let dir = tmp.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let worker_api = free_addr();
            let cairn = Cairn::start_with(
                &dir,
                &REPLICA
                    .replace("@REDIS@", &redis.url())
                    .replace("@STATE@", &state.url())
                    .replace("@WORKER_API@", &worker_api.to_string())
                    .replace("@WORKER_API_TLS@", &common::certs::worker_api_tls(&tls)),
                Some(free_addr()),
            );
            Some((cairn, worker_api))
        })
        .collect();
    let addr = |r: &Option<(Cairn, SocketAddr)>| r.as_ref().unwrap().0.addr;
    let worker_config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deployment-examples/split/worker.json5");
    // A worker on replica 0 (the one Bazel reaches first) and one on replica 1.
    let workers: Vec<(CairnWorker, PathBuf)> = [0usize, 1]
        .iter()
        .map(|&i| {
            let (cairn, worker_api) = replicas[i].as_ref().unwrap();
            let data = tmp.path().join(format!("worker-{i}"));
            let env = [
                ("CAIRN_WORKER_API_ENDPOINT", format!("grpcs://{worker_api}")),
                ("CAIRN_TLS_DIR", tls.display().to_string()),
                ("CAIRN_CAS_ENDPOINT", format!("grpc://{}", cairn.addr)),
                ("CAIRN_WORKER_DATA", data.display().to_string()),
                ("CAIRN_WORKER_SLOTS", "2".to_string()),
            ];
            let w = CairnWorker::start(
                &format!("worker-{i}"),
                &worker_config,
                &env,
                Duration::from_secs(30),
            );
            (w, data.join("work"))
        })
        .collect();
    let front = Front::start(replicas.iter().map(addr).collect());

    let bazel = Bazel::new(program, &tmp.path().join("bazel"), "bazel-exec-workspace");
    let mut args = bazel.remote_flags(front.addr, None, "OSFamily=linux");
    args.push("--remote_instance_name=main".into());
    args.push("//...".into());
    args.push("//special:sleepy".into());

    let out = std::thread::scope(|s| {
        let build = s.spawn(|| bazel.try_run("build", &args, COMMAND_DEADLINE));
        let started = Instant::now();
        let seen = loop {
            if let Some(i) = workers
                .iter()
                .position(|(_, work)| find_file(work, "cairn-sleepy-started").is_some())
            {
                break Some(i);
            }
            if build.is_finished() || started.elapsed() > COMMAND_DEADLINE {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match seen {
            Some(i) => eprintln!(
                "shared_scheduler_bazel: //special:sleepy runs on worker-{i}; killing replica 0 (SIGKILL), the one Bazel is attached to"
            ),
            None => eprintln!("shared_scheduler_bazel: //special:sleepy was never seen running"),
        }
        let (cairn, _) = replicas[0].take().unwrap();
        cairn.kill9();
        build.join().unwrap()
    });
    assert!(
        out.status.success(),
        "the build failed after the replica was killed\n{}",
        out.text()
    );
    assert!(out.all_processes_were("remote") > 0, "{}", out.text());
    assert_eq!(read(&bazel.bin("special/sleepy.txt")), "slept\n");
    let message = read(&bazel.workspace().join("message.txt"));
    assert_eq!(read(&bazel.bin("upper.txt")), message.to_uppercase());
    assert_eq!(
        read(&bazel.bin("count.txt")).trim(),
        message.len().to_string()
    );
    assert_eq!(
        read(&bazel.bin("underscored.txt")),
        message.replace(' ', "_")
    );
    let hello = std::process::Command::new(bazel.bin("hello"))
        .output()
        .unwrap();
    assert!(hello.status.success());
    let report = read(&bazel.bin("report.txt"));
    assert!(report.contains(&message.to_uppercase()), "{report}");
    eprintln!(
        "shared_scheduler_bazel: build succeeded in {:.1?}",
        out.elapsed
    );
    drop(bazel);
    drop(workers);
    drop(replicas);
}
