//! End to end: Bazel 4.2.3 runs its actions on Cairn with `--remote_executor`.
//!
//! One Bazel server (one output base) on a copy of `bazel-exec-workspace/` goes through four
//! steps, each against Cairn processes of its own:
//! - `default_run`: the default run (no arguments) builds and tests the workspace (C++
//!   compile and link, a genrule with three outputs, a rule whose output is a directory with
//!   an executable file and a symlink, an `sh_test`) with every action remote; after `bazel
//!   clean` everything comes from the cache;
//! - `failing_action`: a command that exits 3 fails the build, and Bazel shows its stderr;
//! - `unschedulable`: an action whose platform no worker has fails with FAILED_PRECONDITION,
//!   naming the property, once the scheduler's grace period has passed;
//! - `worker_killed`: with a scheduler+CAS process and two worker processes, the worker that
//!   runs an action is killed with SIGKILL mid-action; the action runs again on the other
//!   worker and the build succeeds.
//!
//! A failed step does not stop the next ones; the test fails at the end, naming them.
//! Needs `bazel` on PATH (Debian's `bazel-bootstrap`) and works offline; without Bazel it
//! fails, unless `CAIRN_SKIP_BAZEL=1` is set.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bazel::{self, Bazel, COMMAND_DEADLINE};
use common::{free_addr, Cairn, CairnWorker};

/// The built-in config of the default run.
const DEFAULT_CONFIG: &str = include_str!("../src/default.json5");

/// `worker_killed`: the CAS, the AC and the scheduler in one process, with no worker. A
/// worker that stops talking is dropped after 2 s (its stream breaking is noticed at once).
const SCHEDULER_AND_CAS: &str = r#"{
  stores: [
    { name: "CAS", memory: { eviction_policy: { max_bytes: "1gb" } } },
    { name: "AC", completeness_checking: { backend: { memory: {} }, cas_store: { ref_store: { name: "CAS" } } } },
  ],
  schedulers: [{
    name: "MAIN",
    cache_lookup: {
      ac_store: { ref_store: { name: "AC" } },
      scheduler: {
        simple: {
          supported_platform_properties: { OSFamily: "exact", cpu_count: "minimum" },
          worker_timeout_s: 2,
        },
      },
    },
  }],
  servers: [
    {
      name: "public",
      listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }, { instance_name: "main", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }, { instance_name: "main", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS" }, { instance_name: "main", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "", remote_execution: { scheduler: "MAIN" } }],
      },
    },
    {
      name: "worker_api",
      listener: { http: { socket_address: "@WORKER_API@", tls: @WORKER_API_TLS@ } },
      services: { worker_api: { scheduler: "MAIN" } },
    },
  ],
}"#;

/// The file `//special:sleepy` creates in its working directory when its command starts.
const SLEEPY_STARTED: &str = "cairn-sleepy-started";

type Step = fn(&Bazel, &Path);

#[test]
fn bazel_runs_its_actions_on_cairn() {
    let Some(program) = bazel::find_or_skip("bazel_remote_exec") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bazel = Bazel::new(program, &tmp.path().join("bazel"), "bazel-exec-workspace");
    let steps: [(&str, Step); 4] = [
        ("default_run", default_run),
        ("failing_action", failing_action),
        ("unschedulable", unschedulable),
        ("worker_killed", worker_killed),
    ];
    let mut failed = Vec::new();
    for (name, step) in steps {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let started = Instant::now();
        let ok = catch_unwind(AssertUnwindSafe(|| step(&bazel, &dir))).is_ok();
        eprintln!(
            "bazel_remote_exec: step {name}: {} in {:.1?}",
            if ok { "ok" } else { "FAILED" },
            started.elapsed()
        );
        if !ok {
            failed.push(name);
        }
    }
    drop(bazel); // `bazel shutdown`
    assert!(
        failed.is_empty(),
        "failed steps (their panics are above): {failed:?}"
    );
}

/// The default run builds and tests everything remotely, then serves it all from its cache.
fn default_run(bazel: &Bazel, dir: &Path) {
    let cairn = Cairn::start_env(dir, &default_run_env(dir));
    let flags = bazel.remote_flags(cairn.addr, None, "OSFamily=linux");

    let build = bazel.run("build", &with_target(&flags, "//..."));
    let built = build.all_processes_were("remote");
    check_outputs(bazel);
    let test = bazel.run("test", &with_target(&flags, "//..."));
    let tested = test.all_processes_were("remote");
    assert_test_passed(&test.text());

    // `bazel clean` drops Bazel's local action cache and outputs: every action, the test's
    // included, must now be a remote cache hit, and nothing may run.
    bazel.run("clean", &[]);
    let again = bazel.run("test", &with_target(&flags, "//..."));
    let hits = again.all_processes_were("remote cache hit");
    assert_eq!(
        hits,
        built + tested,
        "after `bazel clean`: expected every action of the build ({built}) and the test \
         ({tested}) from the cache"
    );
    assert_test_passed(&again.text());
    check_outputs(bazel);
}

/// A command that exits 3 fails the build; Bazel shows the exit code and the command's stderr.
fn failing_action(bazel: &Bazel, dir: &Path) {
    let cairn = Cairn::start_env(dir, &default_run_env(dir));
    let flags = bazel.remote_flags(cairn.addr, None, "OSFamily=linux");
    let out = bazel.try_run(
        "build",
        &with_target(&flags, "//special:fail"),
        COMMAND_DEADLINE,
    );
    let text = out.text();
    assert!(!out.status.success(), "//special:fail built:\n{text}");
    assert!(text.contains("(Exit 3)"), "no `(Exit 3)` in:\n{text}");
    // The command line itself never contains this line; only the command's stderr does.
    assert!(
        text.lines()
            .any(|l| l.trim() == "deliberate failure: stderr is shown"),
        "the failing command's stderr is not in Bazel's output:\n{text}"
    );
}

/// An action that asks for `OSFamily=windows`, which no worker offers, fails with
/// FAILED_PRECONDITION naming the property once the 2 s grace period has passed.
fn unschedulable(bazel: &Bazel, dir: &Path) {
    let config = DEFAULT_CONFIG.replacen(
        "simple: {",
        "simple: {\n            unschedulable_grace_period_s: 2,",
        1,
    );
    assert_ne!(
        config, DEFAULT_CONFIG,
        "default.json5 has no `simple: {{` scheduler to give a grace period to"
    );
    let path = dir.join("cairn.json5");
    std::fs::write(&path, config).unwrap();
    let cairn = Cairn::start_config_env(dir, &path, &default_run_env(dir));
    let flags = bazel.remote_flags(cairn.addr, None, "OSFamily=windows");
    let out = bazel.try_run(
        "build",
        &with_target(&flags, "//special:nowhere"),
        Duration::from_secs(60),
    );
    let text = out.text();
    assert!(!out.status.success(), "//special:nowhere built:\n{text}");
    assert!(
        out.elapsed < Duration::from_secs(30),
        "the build took {:?} to fail; the grace period is 2 s",
        out.elapsed
    );
    assert!(
        out.elapsed >= Duration::from_secs(2),
        "the build failed after {:?}, before the 2 s grace period passed",
        out.elapsed
    );
    let lower = text.to_lowercase();
    assert!(
        lower.contains("failed precondition") || lower.contains("failed_precondition"),
        "no FAILED_PRECONDITION in:\n{text}"
    );
    assert!(
        text.contains("OSFamily") && text.contains("windows"),
        "the missing property `OSFamily=windows` is not named in:\n{text}"
    );
}

/// Two worker processes; the one that starts `//special:sleepy` is killed with SIGKILL while
/// the command runs. The scheduler re-queues the action, the other worker runs it, and the
/// build succeeds.
fn worker_killed(bazel: &Bazel, dir: &Path) {
    let worker_api = free_addr();
    let server_dir = dir.join("server");
    std::fs::create_dir(&server_dir).unwrap();
    let tls = common::certs::split_tls_dir(dir);
    let server = Cairn::start_with(
        &server_dir,
        &SCHEDULER_AND_CAS
            .replace("@WORKER_API@", &worker_api.to_string())
            .replace("@WORKER_API_TLS@", &common::certs::worker_api_tls(&tls)),
        None,
    );
    // The split deployment's worker config: a local filesystem CAS over a `grpc` store.
    let worker_config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deployment-examples/split/worker.json5");
    let start_worker = |name: &str| {
        let data = dir.join(name);
        let env = [
            ("CAIRN_WORKER_API_ENDPOINT", format!("grpcs://{worker_api}")),
            ("CAIRN_TLS_DIR", tls.display().to_string()),
            ("CAIRN_CAS_ENDPOINT", format!("grpc://{}", server.addr)),
            ("CAIRN_WORKER_DATA", data.display().to_string()),
            ("CAIRN_WORKER_SLOTS", "2".to_string()),
        ];
        let worker = CairnWorker::start(name, &worker_config, &env, Duration::from_secs(30));
        (worker, data.join("work"))
    };
    let mut workers = vec![start_worker("worker-a"), start_worker("worker-b")];

    let flags = bazel.remote_flags(server.addr, None, "OSFamily=linux");
    let args = with_target(&flags, "//special:sleepy");
    let (out, victim_work, rerun) = std::thread::scope(|s| {
        let build = s.spawn(|| bazel.try_run("build", &args, Duration::from_secs(90)));
        let finished = || build.is_finished();
        let first = poll_until(
            COMMAND_DEADLINE,
            || {
                workers
                    .iter()
                    .position(|(_, work)| find_file(work, SLEEPY_STARTED).is_some())
            },
            finished,
        );
        let Some(first) = first else {
            let out = build.join().unwrap();
            panic!(
                "the sleepy action was never seen running on a worker\n{}",
                out.text()
            );
        };
        let (victim, victim_work) = workers.remove(first);
        let (survivor, survivor_work) = &workers[0];
        eprintln!(
            "bazel_remote_exec: //special:sleepy runs on {}; killing it (SIGKILL)",
            victim.label
        );
        victim.kill9();
        let rerun = poll_until(
            COMMAND_DEADLINE,
            || find_file(survivor_work, SLEEPY_STARTED),
            finished,
        )
        .map(|_| survivor.label.clone());
        (build.join().unwrap(), victim_work, rerun)
    });
    assert!(
        out.status.success(),
        "the build failed after its worker was killed\n{}",
        out.text()
    );
    assert!(
        rerun.is_some(),
        "the build succeeded, but the action was never seen running on the other worker"
    );
    assert_eq!(out.all_processes_were("remote"), 1);
    assert_eq!(read(&bazel.bin("special/sleepy.txt")), "slept\n");

    // The killed worker's command is in a process group of its own, so the SIGKILL of the
    // worker did not reach it: give it the rest of its 4 s before the temporary directory
    // goes away.
    let orphan_done = poll_until(
        Duration::from_secs(6),
        || find_file(&victim_work, "sleepy.txt"),
        || false,
    );
    if orphan_done.is_some() {
        eprintln!("bazel_remote_exec: note: the killed worker's command outlived it and finished");
    }
}

/// The default run's environment: data under `dir`, the public listener on any free port,
/// the worker API on a port chosen here (its local worker dials it), four worker slots.
fn default_run_env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("CAIRN_DATA", dir.join("data").display().to_string()),
        ("CAIRN_LISTEN", "127.0.0.1:0".to_string()),
        ("CAIRN_WORKER_API_LISTEN", free_addr().to_string()),
        ("CAIRN_WORKER_SLOTS", "4".to_string()),
    ]
}

fn with_target(flags: &[String], target: &str) -> Vec<String> {
    let mut args = flags.to_vec();
    args.push(target.to_string());
    args
}

fn assert_test_passed(text: &str) {
    assert!(
        text.lines()
            .any(|l| l.starts_with("//:report_test") && l.contains("PASSED")),
        "//:report_test did not pass:\n{text}"
    );
    assert!(
        text.contains("1 test passes."),
        "no `1 test passes.` in:\n{text}"
    );
}

/// The outputs built remotely and downloaded by Bazel are the real ones.
fn check_outputs(bazel: &Bazel) {
    // One action, three outputs.
    assert_eq!(
        read(&bazel.bin("upper.txt")),
        "ACTIONS THAT RUN ELSEWHERE\n"
    );
    assert_eq!(read(&bazel.bin("count.txt")), "27\n");
    assert_eq!(
        read(&bazel.bin("underscored.txt")),
        "actions_that_run_elsewhere\n"
    );
    // The output directory, with its nested directories and an executable file.
    let tree = bazel.bin("tree");
    assert_eq!(
        files_under(&tree),
        [
            "alpha.txt",
            "link.txt",
            "nested/deeper/tool.sh",
            "nested/shout.txt"
        ],
        "files and symlinks of the output directory bazel-bin/tree"
    );
    assert_eq!(read(&tree.join("alpha.txt")), "alpha\n");
    assert_eq!(
        std::fs::read_link(tree.join("link.txt")).ok(),
        Some(PathBuf::from("alpha.txt")),
        "bazel-bin/tree/link.txt should be a symlink to alpha.txt"
    );
    assert_eq!(
        read(&tree.join("nested/shout.txt")),
        "ACTIONS THAT RUN ELSEWHERE\n"
    );
    assert!(
        is_executable(&tree.join("nested/deeper/tool.sh")),
        "bazel-bin/tree/nested/deeper/tool.sh lost its executable bit"
    );
    // The remotely linked binary runs here too.
    let hello = std::process::Command::new(bazel.bin("hello"))
        .output()
        .expect("run bazel-bin/hello");
    assert_eq!(
        String::from_utf8_lossy(&hello.stdout),
        "hello from a remote worker\n"
    );
    // An action that ran the remotely linked binary and read the directory made by another.
    assert_eq!(
        read(&bazel.bin("report.txt")),
        "hello from a remote worker\n\
         ACTIONS THAT RUN ELSEWHERE\n\
         27\n\
         ACTIONS THAT RUN ELSEWHERE\n\
         run from the tree\n\
         alpha\n\
         ./alpha.txt\n\
         ./link.txt\n\
         ./nested/deeper/tool.sh\n\
         ./nested/shout.txt\n"
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

/// The files and symlinks under `root`, as sorted `/`-separated relative paths.
fn files_under(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A file named `name` anywhere under `root`. Directories may vanish while this looks (a
/// worker removes an action's directory when it is done); such errors are skipped.
fn find_file(root: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    for entry in entries.flatten() {
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

/// Polls `look` every 20 ms until it finds something, `stop` says there is no point any
/// more (after one last look), or `within` passes.
fn poll_until<T>(
    within: Duration,
    mut look: impl FnMut() -> Option<T>,
    stop: impl Fn() -> bool,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        let stopping = stop() || Instant::now() > deadline;
        if let Some(found) = look() {
            return Some(found);
        }
        if stopping {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
