//! Test kit: start the real `cairn` binary on a loopback port and talk to it with tonic.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running Cairn process; killed on drop.
pub struct Cairn {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config: PathBuf,
}

impl Cairn {
    /// Starts `cairn run CONFIG` where CONFIG is `config_text` with `@DIR@` replaced by `dir`
    /// and `@ADDR@` by `127.0.0.1:0` (or `addr` when given, for restarts on the same port).
    pub fn start_with(dir: &Path, config_text: &str, addr: Option<SocketAddr>) -> Cairn {
        let listen = addr.map_or("127.0.0.1:0".to_string(), |a| a.to_string());
        let text = config_text
            .replace("@DIR@", &dir.display().to_string())
            .replace("@ADDR@", &listen);
        let config = dir.join("cairn.json5");
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("run")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cairn");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("cairn exited before listening")
                .expect("read cairn stdout");
            if let Some(rest) = line.split(" listening on ").nth(1) {
                break rest.trim().parse().expect("address");
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Cairn {
            child,
            addr,
            dir: dir.to_path_buf(),
            config,
        }
    }

    /// Starts with the standard test config: memory CAS (verify on) and a completeness
    /// checking AC, instance names "" and "main".
    pub fn start(dir: &Path) -> Cairn {
        Cairn::start_with(dir, MEMORY_CONFIG, None)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to cairn")
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY-free: `kill` is an external command here to avoid a libc dependency.
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }
}

impl Drop for Cairn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const MEMORY_CONFIG: &str = r#"{
  stores: {
    CAS: { memory: { eviction_policy: { max_bytes: "512mb" } } },
    AC: { completeness_checking: { backend: { memory: {} }, cas_store: { ref_store: { name: "CAS" } } } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }, { instance_name: "main", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }, { instance_name: "main", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }, { instance_name: "main", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }, { instance_name: "main" }],
      health: {},
    },
  }],
}"#;

pub const FILESYSTEM_CONFIG: &str = r#"{
  stores: {
    CAS: { filesystem: { content_path: "@DIR@/cas", temp_path: "@DIR@/tmp", eviction_policy: { max_bytes: "2gb" } } },
    AC: { completeness_checking: { backend: { filesystem: { content_path: "@DIR@/ac", temp_path: "@DIR@/tmp-ac" } }, cas_store: { ref_store: { name: "CAS" } } } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
      health: {},
    },
  }],
}"#;

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Processes configured through environment variables, worker-only processes, and Bazel.
// ---------------------------------------------------------------------------------------

/// An unused loopback address, for a listener whose port must be known before the process
/// starts (a worker API that a worker dials). The port is free when this returns; another
/// process could take it before ours binds, which on a test machine does not happen in
/// practice.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}

impl Cairn {
    /// Starts the default run (`cairn` with no arguments) in `dir`, with `env` set on the
    /// child (`CAIRN_DATA`, `CAIRN_LISTEN`, ...), and waits for its first listener.
    /// `config_path()` is empty: the config is the built-in one.
    pub fn start_env(dir: &Path, env: &[(&str, String)]) -> Cairn {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .current_dir(dir)
            .envs(env.iter().map(|(k, v)| (k, v)));
        Cairn::spawn_until_listening(command, dir, PathBuf::new())
    }

    /// Starts `cairn run CONFIG` on an existing file, unchanged, with `env` set on the child
    /// (for configs that read `${VAR:-default}`), and waits for its first listener.
    pub fn start_config_env(dir: &Path, config: &Path, env: &[(&str, String)]) -> Cairn {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .current_dir(dir)
            .arg("run")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)));
        Cairn::spawn_until_listening(command, dir, config.to_path_buf())
    }

    /// Spawns `command`, reads its stdout up to the first `listening on ADDR` line, then
    /// keeps draining stdout in a thread.
    fn spawn_until_listening(mut command: Command, dir: &Path, config: PathBuf) -> Cairn {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cairn");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let Some(line) = lines.next() else {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                panic!("cairn exited ({status}) before listening; its stderr is above");
            };
            let line = line.expect("read cairn stdout");
            if let Some(rest) = line.split(" listening on ").nth(1) {
                break rest.trim().parse().expect("address");
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Cairn {
            child,
            addr,
            dir: dir.to_path_buf(),
            config,
        }
    }
}

/// A `cairn run CONFIG` process that serves no listener: a worker-only config. Its stderr
/// is echoed line by line with a `[label]` prefix. Killed on drop.
pub struct CairnWorker {
    pub child: Child,
    pub label: String,
}

impl CairnWorker {
    /// The line a local worker logs once the scheduler has accepted it.
    pub const REGISTERED: &'static str = "registered with the scheduler";

    /// Starts `cairn run CONFIG` with `env` set on the child and returns once the worker has
    /// registered with the scheduler; panics if that takes longer than `within` or the
    /// process exits first.
    pub fn start(
        label: &str,
        config: &Path,
        env: &[(&str, String)],
        within: Duration,
    ) -> CairnWorker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("run")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cairn worker");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (registered, on_registered) = std::sync::mpsc::channel();
        let prefix = format!("[{label}]");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{prefix} {line}");
                if line.contains(CairnWorker::REGISTERED) {
                    let _ = registered.send(());
                }
            }
        });
        let mut worker = CairnWorker {
            child,
            label: label.to_string(),
        };
        match on_registered.recv_timeout(within) {
            Ok(()) => worker,
            Err(_) => {
                let status = worker.child.try_wait().ok().flatten();
                panic!(
                    "worker {label} did not log {:?} within {within:?} (exit status: {status:?}); \
                     its stderr is above",
                    CairnWorker::REGISTERED
                );
            }
        }
    }

    /// SIGKILL and reap: the process gets no chance to say goodbye to the scheduler.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CairnWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bazel 4.2.3 (Debian's `bazel-bootstrap`) as a real REAPI client, offline: the
/// repositories its built-in WORKSPACE suffix would download are replaced by the small ones
/// in `tests/bazel-offline-repos/` (see /work/shared/reference/bazel-offline.md).
pub mod bazel {
    use std::collections::BTreeMap;
    use std::io::Read;
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Command, ExitStatus, Stdio};
    use std::time::{Duration, Instant};

    /// The repositories that Bazel 4's built-in WORKSPACE suffix would fetch from the network.
    pub const OFFLINE_REPOS: [&str; 3] = ["rules_cc", "rules_java", "remote_coverage_tools"];

    /// How long any one Bazel command may take before the test gives up on it.
    pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);

    /// `bazel` on PATH. Without it: `None` when `CAIRN_SKIP_BAZEL=1` (the caller returns,
    /// skipped), else a panic that says how to install it.
    pub fn find_or_skip(test: &str) -> Option<PathBuf> {
        let found = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("bazel"))
                .find(|candidate| candidate.is_file())
        });
        if found.is_none() {
            if std::env::var("CAIRN_SKIP_BAZEL").as_deref() == Ok("1") {
                eprintln!("{test}: SKIPPED, `bazel` is not on PATH and CAIRN_SKIP_BAZEL=1");
                return None;
            }
            panic!(
                "{test}: `bazel` is not on PATH. Install it (`apt-get install -y \
                 bazel-bootstrap`, as .ci/run does) or set CAIRN_SKIP_BAZEL=1 to skip this test."
            );
        }
        found
    }

    /// A Bazel client on a copy of a fixture workspace, with its own output base; its server
    /// is shut down on drop.
    pub struct Bazel {
        program: PathBuf,
        workspace: PathBuf,
        repos: PathBuf,
        output_base: PathBuf,
        output_user_root: PathBuf,
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
            }
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
                "`{}` failed with {}\n{}",
                output.command,
                output.status,
                output.text()
            );
            output
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
                    l.starts_with("INFO: ")
                        && (l.contains(" processes: ") || l.contains(" process: "))
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
}

/// A minimal HTTP/1.1 GET over a raw socket.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let code: u16 = text[9..12].parse().unwrap();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (code, body)
}
