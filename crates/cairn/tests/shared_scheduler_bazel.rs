//! Failover under a running build: Bazel 4.2.3 builds `bazel-exec-workspace/` with every
//! action remote through one of three scheduler replicas that share their state in Redis
//! (blobs in a second Redis), with a worker on each of two replicas. While `//special:sleepy`
//! runs, the replica Bazel is attached to is killed with SIGKILL. Bazel reaches the replicas
//! through a small TCP front (as a load balancer would): a new connection goes to the first
//! replica that accepts it, so after the kill Bazel's retries land on a survivor, which answers
//! its WaitExecution from the shared state. The build must succeed with every output right.
//!
//! The replicas and workers are the kit's `Fleet` (`common/shared_fleet.rs`), as in
//! `shared_scheduler.rs`.
//!
//! Needs `bazel` on PATH (Debian's `bazel-bootstrap`) and works offline; without Bazel it
//! fails, unless `CAIRN_SKIP_BAZEL=1` is set.

mod common;
#[path = "common/redis.rs"]
mod redis_kit;
#[path = "common/shared_fleet.rs"]
mod shared_fleet;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bazel::{self, Bazel, COMMAND_DEADLINE};
use common::front::Front;
use common::CairnWorker;
use shared_fleet::Fleet;

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
    // Three replicas (the scheduler in cache_lookup over the AC), a two-slot worker on
    // replica 0 (the one Bazel reaches first) and one on replica 1.
    let mut fleet = Fleet::empty("");
    fleet.cache_lookup = true;
    fleet.worker_slots = 2;
    fleet.add_replicas(3);
    let workers: Vec<(CairnWorker, PathBuf)> = [0usize, 1]
        .iter()
        .map(|&i| {
            let name = format!("{i}");
            (fleet.worker(&name, i), fleet.worker_dir(&name).join("work"))
        })
        .collect();
    let addrs: Vec<SocketAddr> = (0..3).map(|i| fleet.r(i).cairn.addr).collect();
    let front = Front::start(addrs);

    let bazel = Bazel::new(
        program,
        &fleet.tmp.path().join("bazel"),
        "bazel-exec-workspace",
    );
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
        fleet.kill9(0);
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
    drop(fleet);
}
