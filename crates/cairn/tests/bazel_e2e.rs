//! End to end: Bazel builds a small C++ and genrule workspace with Cairn as its remote cache,
//! then, after `bazel clean`, builds it again and must get every action from the cache.
//!
//! Needs `bazel` (Debian's `bazel-bootstrap`, Bazel 4.2.3) on PATH and works offline: the
//! repositories Bazel would download are replaced by the small ones in `bazel-offline-repos/`
//! (see /work/shared/reference/bazel-offline.md). Without Bazel the test fails, unless
//! `CAIRN_SKIP_BAZEL=1` is set.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{Cairn, FILESYSTEM_CONFIG};

/// The repositories that Bazel 4's built-in WORKSPACE suffix would fetch from the network.
const OFFLINE_REPOS: [&str; 3] = ["rules_cc", "rules_java", "remote_coverage_tools"];

#[test]
fn bazel_rebuild_after_clean_is_served_from_cairn() {
    let Some(bazel) = find_bazel() else {
        if std::env::var("CAIRN_SKIP_BAZEL").as_deref() == Ok("1") {
            eprintln!("bazel_e2e: SKIPPED, `bazel` is not on PATH and CAIRN_SKIP_BAZEL=1");
            return;
        }
        panic!(
            "`bazel` is not on PATH. Install it (`apt-get install -y bazel-bootstrap`, as .ci/run \
             does) or set CAIRN_SKIP_BAZEL=1 to skip this test."
        );
    };

    let tmp = tempfile::tempdir().unwrap();
    let cairn_dir = tmp.path().join("cairn");
    let workspace = tmp.path().join("workspace");
    let repos = tmp.path().join("repos");
    std::fs::create_dir(&cairn_dir).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    copy_dir(&fixtures.join("bazel-workspace"), &workspace);
    copy_dir(&fixtures.join("bazel-offline-repos"), &repos);

    let cairn = Cairn::start_with(&cairn_dir, FILESYSTEM_CONFIG, None);
    let bazel = Bazel {
        program: bazel,
        workspace: workspace.clone(),
        output_base: tmp.path().join("output_base"),
        output_user_root: tmp.path().join("output_user_root"),
    };
    let mut build_args = vec![
        format!("--remote_cache=grpc://{}", cairn.addr),
        "--spawn_strategy=local".to_string(),
        "--disk_cache=".to_string(),
        "--nosandbox_debug".to_string(),
        "--incompatible_strict_action_env".to_string(),
        "--color=no".to_string(),
        "--curses=no".to_string(),
    ];
    for repo in OFFLINE_REPOS {
        build_args.push(format!(
            "--override_repository={repo}={}",
            repos.join(repo).display()
        ));
    }
    build_args.push("//...".to_string());

    // First build: a fresh cache, so every action runs locally and is uploaded.
    let first = bazel.run("build", &build_args);
    let counts = process_counts(&first);
    let internal = counts.get("internal").copied().unwrap_or(0);
    let total: u64 = counts.values().sum();
    let executed = total - internal;
    assert!(executed > 0, "first build ran no actions: {counts:?}");
    assert_eq!(
        counts.get("local").copied(),
        Some(executed),
        "first build: every non-internal action should run locally: {counts:?}"
    );
    assert_no_remote_cache_warning(&first);

    // Second build after `bazel clean` (which drops the local action cache and outputs): every
    // action must come from Cairn, and nothing may run locally.
    bazel.run("clean", &[]);
    let second = bazel.run("build", &build_args);
    let counts = process_counts(&second);
    let hits = counts.get("remote cache hit").copied().unwrap_or(0);
    let internal = counts.get("internal").copied().unwrap_or(0);
    let total: u64 = counts.values().sum();
    assert!(hits > 0, "second build had no remote cache hit: {counts:?}");
    assert_eq!(
        hits,
        total - internal,
        "second build: every non-internal action should be a remote cache hit: {counts:?}"
    );
    assert_eq!(
        counts.get("local").copied().unwrap_or(0),
        0,
        "second build ran actions locally: {counts:?}"
    );
    assert_eq!(executed, hits, "both builds should have the same actions");
    assert_no_remote_cache_warning(&second);

    // The outputs downloaded from Cairn are the real ones.
    let report = std::fs::read_to_string(workspace.join("bazel-bin/report.txt"))
        .expect("read bazel-bin/report.txt");
    assert_eq!(
        report, "A CACHE THAT REMEMBERS\n23\nhello, cairn\n",
        "bazel-bin/report.txt"
    );

    drop(bazel);
    cairn.kill9();
}

/// A Bazel client with its own output base; its server is shut down on drop.
struct Bazel {
    program: PathBuf,
    workspace: PathBuf,
    output_base: PathBuf,
    output_user_root: PathBuf,
}

/// What one Bazel command printed.
struct Output {
    command: String,
    stderr: String,
}

impl Bazel {
    fn command(&self, name: &str) -> Command {
        let mut command = Command::new(&self.program);
        command
            .current_dir(&self.workspace)
            .arg(format!("--output_base={}", self.output_base.display()))
            .arg(format!(
                "--output_user_root={}",
                self.output_user_root.display()
            ))
            .arg("--nohome_rc")
            .arg("--max_idle_secs=60")
            .arg(name);
        command
    }

    /// Runs `bazel NAME ARGS` and panics, with Bazel's output, unless it succeeds.
    fn run(&self, name: &str, args: &[String]) -> Output {
        let command = format!("bazel {name} {}", args.join(" "));
        let started = Instant::now();
        let output = self
            .command(name)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {command}: {e}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        eprintln!(
            "bazel_e2e: `bazel {name}` took {:.1?}, {}",
            started.elapsed(),
            output.status
        );
        assert!(
            output.status.success(),
            "`{command}` failed with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            output.status
        );
        Output { command, stderr }
    }
}

impl Drop for Bazel {
    fn drop(&mut self) {
        // Best effort: `--max_idle_secs` stops the server anyway if this fails.
        let _ = self.command("shutdown").output();
    }
}

/// Parses Bazel's summary line, e.g. `INFO: 20 processes: 11 remote cache hit, 9 internal.`,
/// into counts by kind (`internal`, `local`, `remote cache hit`, `remote`, ...).
fn process_counts(output: &Output) -> BTreeMap<String, u64> {
    let line = output
        .stderr
        .lines()
        .rev()
        .find(|l| {
            l.starts_with("INFO: ") && (l.contains(" processes: ") || l.contains(" process: "))
        })
        .unwrap_or_else(|| {
            panic!(
                "no `INFO: N processes: ...` line from `{}`:\n{}",
                output.command, output.stderr
            )
        });
    eprintln!("bazel_e2e: {line}");
    let (_, list) = line.split_once(": ").unwrap().1.split_once(": ").unwrap();
    let mut counts = BTreeMap::new();
    for item in list.trim_end_matches('.').split(", ") {
        let (n, kind) = item
            .split_once(' ')
            .unwrap_or_else(|| panic!("unexpected item {item:?} in {line:?}"));
        let n: u64 = n
            .parse()
            .unwrap_or_else(|_| panic!("unexpected count {n:?} in {line:?}"));
        *counts.entry(kind.to_string()).or_default() += n;
    }
    counts
}

/// Bazel only warns when a remote cache read or write fails, then carries on locally.
fn assert_no_remote_cache_warning(output: &Output) {
    let warnings: Vec<&str> = output
        .stderr
        .lines()
        .filter(|l| l.starts_with("WARNING:") && l.to_lowercase().contains("remote cache"))
        .collect();
    assert!(
        warnings.is_empty(),
        "`{}` warned about the remote cache:\n{}",
        output.command,
        warnings.join("\n")
    );
}

fn find_bazel() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bazel"))
        .find(|candidate| candidate.is_file())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
