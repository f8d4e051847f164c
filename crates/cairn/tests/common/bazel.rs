//! Bazel 4.2.3 (Debian's `bazel-bootstrap`) as a real REAPI client, offline: the
//! repositories its built-in WORKSPACE suffix would download are replaced by the small ones
//! in `tests/bazel-offline-repos/` (see /work/shared/reference/bazel-offline.md).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::tools::tool_on_path;

/// The repositories that Bazel 4's built-in WORKSPACE suffix would fetch from the network.
pub const OFFLINE_REPOS: [&str; 3] = ["rules_cc", "rules_java", "remote_coverage_tools"];

/// How long any one Bazel command may take before the test gives up on it.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);

/// `bazel` on PATH. Without it: `None` when `CAIRN_SKIP_BAZEL=1` (the caller returns,
/// skipped), else a panic that says how to install it.
pub fn find_or_skip(test: &str) -> Option<PathBuf> {
    tool_on_path(
        test,
        "bazel",
        "CAIRN_SKIP_BAZEL",
        "Install it with `apt-get install -y bazel-bootstrap`, as .ci/run does",
    )
}

/// A Bazel client on a copy of a fixture workspace, with its own output base; its server
/// is shut down on drop.
pub struct Bazel {
    program: PathBuf,
    workspace: PathBuf,
    repos: PathBuf,
    output_base: PathBuf,
    output_user_root: PathBuf,
    /// Startup options given before the command.
    startup: Vec<String>,
}

/// What one Bazel command did.
pub struct BazelOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Bazel {
    /// Copies `tests/FIXTURE` and the offline repositories under `root`, which also holds
    /// the output base.
    pub fn new(program: PathBuf, root: &Path, fixture: &str) -> Bazel {
        let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
        let workspace = root.join("workspace");
        let repos = root.join("repos");
        copy_dir(&tests.join(fixture), &workspace);
        copy_dir(&tests.join("bazel-offline-repos"), &repos);
        Bazel {
            program,
            workspace,
            repos,
            output_base: root.join("output_base"),
            output_user_root: root.join("output_user_root"),
            startup: Vec::new(),
        }
    }

    /// Adds startup options (`--host_jvm_args=...`) to every command.
    pub fn with_startup_args(mut self, args: &[String]) -> Bazel {
        self.startup.extend_from_slice(args);
        self
    }

    pub fn workspace(&self) -> &Path {
        &self.workspace
    }

    /// A file under `bazel-bin/`.
    pub fn bin(&self, path: &str) -> PathBuf {
        self.workspace.join("bazel-bin").join(path)
    }

    /// Flags every build and test needs: offline repositories, no disk cache, quiet and
    /// stable output, and a PATH that does not depend on the caller.
    pub fn offline_flags(&self) -> Vec<String> {
        let mut flags: Vec<String> = [
            "--disk_cache=",
            "--nosandbox_debug",
            "--incompatible_strict_action_env",
            "--color=no",
            "--curses=no",
        ]
        .map(String::from)
        .to_vec();
        for repo in OFFLINE_REPOS {
            flags.push(format!(
                "--override_repository={repo}={}",
                self.repos.join(repo).display()
            ));
        }
        flags
    }

    /// `offline_flags` plus `cache` as the remote cache, with every action run locally (and
    /// its result uploaded) unless the cache has it.
    pub fn cache_flags(&self, cache: SocketAddr) -> Vec<String> {
        let mut flags = self.offline_flags();
        flags.push(format!("--remote_cache=grpc://{cache}"));
        flags.push("--spawn_strategy=local".to_string());
        flags
    }

    /// `offline_flags` plus remote execution on `executor` (which is also the cache unless
    /// `cache` names another server), with the one platform property `platform`
    /// (`NAME=VALUE`).
    pub fn remote_flags(
        &self,
        executor: SocketAddr,
        cache: Option<SocketAddr>,
        platform: &str,
    ) -> Vec<String> {
        let mut flags = self.offline_flags();
        flags.push(format!("--remote_executor=grpc://{executor}"));
        if let Some(cache) = cache {
            flags.push(format!("--remote_cache=grpc://{cache}"));
        }
        flags.push("--spawn_strategy=remote".to_string());
        flags.push("--jobs=8".to_string());
        flags.push(format!("--remote_default_exec_properties={platform}"));
        flags
    }

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
            .arg("--max_idle_secs=120")
            .args(&self.startup)
            .arg(name);
        command
    }

    /// Runs `bazel NAME ARGS` and returns what it did, success or not; panics only if it
    /// runs past `deadline` (the client is then killed).
    pub fn try_run(&self, name: &str, args: &[String], deadline: Duration) -> BazelOutput {
        let command = format!("bazel {name} {}", args.join(" "));
        let started = Instant::now();
        let mut child = self
            .command(name)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {command}: {e}"));
        let stdout = read_in_thread(child.stdout.take().expect("stdout is piped"));
        let stderr = read_in_thread(child.stderr.take().expect("stderr is piped"));
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for bazel") {
                break status;
            }
            if started.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`{command}` ran past its {deadline:?} deadline\n--- stderr\n{}",
                    stderr.join().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let output = BazelOutput {
            command,
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
            elapsed: started.elapsed(),
        };
        eprintln!(
            "bazel: `bazel {name} {}` took {:.1?}, {}",
            args.last().map_or("", String::as_str),
            output.elapsed,
            output.status
        );
        output
    }

    /// Runs `bazel NAME ARGS` and panics, with Bazel's output, unless it succeeds.
    pub fn run(&self, name: &str, args: &[String]) -> BazelOutput {
        let output = self.try_run(name, args, COMMAND_DEADLINE);
        assert!(
            output.status.success(),
            "`{}` failed with {}\n{}\n--- end of the Bazel server's java.log\n{}",
            output.command,
            output.status,
            output.text(),
            self.java_log_tail()
        );
        output
    }

    /// The last lines of the Bazel server's log (where it writes what it tells no client,
    /// such as a TLS failure before the build starts).
    pub fn java_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.output_base.join("java.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(400)..].join("\n")
    }
}

impl Drop for Bazel {
    fn drop(&mut self) {
        // Best effort: `--max_idle_secs` stops the server anyway if this fails.
        let _ = self.command("shutdown").output();
    }
}

impl BazelOutput {
    /// stdout and stderr, labelled, for failure messages.
    pub fn text(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }

    /// Parses Bazel's summary line, e.g. `INFO: 20 processes: 11 remote cache hit, 9
    /// internal.`, into counts by kind (`internal`, `local`, `remote cache hit`,
    /// `remote`, ...).
    pub fn process_counts(&self) -> BTreeMap<String, u64> {
        let line = self
            .stderr
            .lines()
            .rev()
            .find(|l| {
                l.starts_with("INFO: ") && (l.contains(" processes: ") || l.contains(" process: "))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no `INFO: N processes: ...` line from `{}`:\n{}",
                    self.command, self.stderr
                )
            });
        eprintln!("bazel: {line}");
        let list = line
            .splitn(3, ": ")
            .nth(2)
            .unwrap_or_else(|| panic!("unexpected summary line {line:?}"));
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

    /// The number of processes of `kind` in the summary, asserting that every process was
    /// either of that kind or `internal` (Bazel's own symlinks and file writes).
    pub fn all_processes_were(&self, kind: &str) -> u64 {
        let counts = self.process_counts();
        let others: Vec<_> = counts
            .iter()
            .filter(|(k, _)| k.as_str() != kind && k.as_str() != "internal")
            .collect();
        assert!(
            others.is_empty(),
            "`{}`: expected only `{kind}` and `internal` processes, got {counts:?}",
            self.command
        );
        let n = counts.get(kind).copied().unwrap_or(0);
        assert!(n > 0, "`{}`: no `{kind}` process: {counts:?}", self.command);
        n
    }

    /// Asserts that Bazel printed no warning about the remote cache: it only warns when a
    /// cache read or write fails, then carries on locally.
    pub fn assert_no_remote_cache_warning(&self) {
        let warnings: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("WARNING:") && l.to_lowercase().contains("remote cache"))
            .collect();
        assert!(
            warnings.is_empty(),
            "`{}` warned about the remote cache:\n{}",
            self.command,
            warnings.join("\n")
        );
    }
}

fn read_in_thread(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Copies a directory tree; `std::fs::copy` keeps the permission bits (executable
/// scripts stay executable).
pub fn copy_dir(from: &Path, to: &Path) {
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
