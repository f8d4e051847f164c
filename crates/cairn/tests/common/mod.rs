//! Test kit: start the real `cairn` binary on a loopback port and talk to it with tonic.
//! Bazel as a client is in `bazel`; finding external tools (or skipping without them) in
//! `tools`.
#![allow(dead_code)]

pub mod actions;
pub mod bazel;
pub mod blobs;
pub mod certs;
pub mod emulators;
pub mod fault_proxy;
pub mod front;
pub mod https_proxy;
pub mod invocations;
pub mod netns;
pub mod tools;
pub mod web_ui_build;
pub mod webdriver;

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
        // In `dir`: a default path under `./cairn-data` lands there, not in the source tree.
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .current_dir(dir)
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
      capabilities: [{ instance_name: "", remote_cache_compression: true }, { instance_name: "main", remote_cache_compression: true }],
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
      capabilities: [{ instance_name: "", remote_cache_compression: true }],
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
// Processes configured through environment variables, and worker-only processes.
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
    pub fn spawn_until_listening(mut command: Command, dir: &Path, config: PathBuf) -> Cairn {
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
        CairnWorker::start_in(
            label,
            Command::new(env!("CARGO_BIN_EXE_cairn")),
            config,
            env,
            within,
        )
    }

    /// As [`CairnWorker::start`], with `cairn` run through `command` (the binary itself, or
    /// `ip netns exec NAME cairn` from [`netns::NetNs::command`]).
    pub fn start_in(
        label: &str,
        mut command: Command,
        config: &Path,
        env: &[(&str, String)],
        within: Duration,
    ) -> CairnWorker {
        let mut child = command
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

/// A minimal HTTP/1.1 GET over a raw socket.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path).await
}

/// `METHOD path` without a body over a new HTTP/1.1 connection: (status code, body).
pub async fn http_request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
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

// ---------------------------------------------------------------------------------------
// A `cairn run` process watched line by line: every listener, every log line.
// ---------------------------------------------------------------------------------------

/// What a [`CairnRun`] has printed so far.
#[derive(Debug, Default)]
pub struct RunOutput {
    /// The address of each `listening on` line of stdout, in order.
    pub listening: Vec<SocketAddr>,
    /// Every stderr line (the log), in order.
    pub log: Vec<String>,
    /// Set once both output streams closed: the process is gone.
    pub closed: bool,
}

impl RunOutput {
    /// How many log lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log.iter().filter(|l| l.contains(needle)).count()
    }
}

enum RunLine {
    Listening(SocketAddr),
    Log(String),
    Closed,
}

/// `cairn run CONFIG` with its stdout and stderr read by two threads, so that a test can wait
/// for any number of listeners or log lines (where [`Cairn::start_with`] returns after the
/// first listener). Log lines are echoed to the test's stderr with a `[label]` prefix.
/// Killed on drop.
pub struct CairnRun {
    pub child: Child,
    pub label: String,
    lines: std::sync::mpsc::Receiver<RunLine>,
    pub output: RunOutput,
}

impl CairnRun {
    /// Starts `cairn run config` in `dir` with `env` set and `env_remove` unset on the child.
    pub fn spawn(
        label: &str,
        config: &Path,
        dir: &Path,
        env: &[(String, String)],
        env_remove: &[String],
    ) -> CairnRun {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command
            .current_dir(dir)
            .arg("run")
            .arg(config)
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for k in env_remove {
            command.env_remove(k);
        }
        let mut child = command.spawn().expect("start cairn run");
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let out_tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .split(" listening on ")
                    .nth(1)
                    .and_then(|a| a.trim().parse().ok())
                {
                    let _ = out_tx.send(RunLine::Listening(addr));
                }
            }
            let _ = out_tx.send(RunLine::Closed);
        });
        let stderr = child.stderr.take().expect("stderr is piped");
        let prefix = format!("[{label}]");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{prefix} {line}");
                let _ = tx.send(RunLine::Log(line));
            }
            let _ = tx.send(RunLine::Closed);
        });
        CairnRun {
            child,
            label: label.to_string(),
            lines,
            output: RunOutput::default(),
        }
    }

    /// Reads output until `done(&output)` holds; an error (with `what`) if the process's
    /// output ends first or `within` passes.
    pub fn wait_until(
        &mut self,
        what: &str,
        within: Duration,
        done: impl Fn(&RunOutput) -> bool,
    ) -> Result<(), String> {
        let deadline = std::time::Instant::now() + within;
        let mut closed = 0;
        loop {
            if done(&self.output) {
                return Ok(());
            }
            if self.output.closed {
                let status = self.child.try_wait().ok().flatten();
                return Err(format!(
                    "{}: exited (status {status:?}) before {what}; its log is above",
                    self.label
                ));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(RunLine::Listening(a)) => self.output.listening.push(a),
                Ok(RunLine::Log(l)) => self.output.log.push(l),
                Ok(RunLine::Closed) => {
                    closed += 1;
                    self.output.closed = closed == 2;
                }
                Err(_) => {
                    return Err(format!(
                        "{}: no {what} within {within:?}; its log is above",
                        self.label
                    ))
                }
            }
        }
    }

    /// Waits until the process catches SIGTERM (the `SigCgt` mask of `/proc/PID/status`):
    /// `cairn run` installs its handler only after its listeners and workers are up, and a
    /// SIGTERM before that ends it by the signal's default action.
    pub fn wait_catches_sigterm(&self, within: Duration) -> Result<(), String> {
        const SIGTERM_BIT: u64 = 1 << (15 - 1);
        let status = format!("/proc/{}/status", self.child.id());
        let deadline = std::time::Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(&status).unwrap_or_default();
            let caught = text
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok());
            if caught.is_some_and(|m| m & SIGTERM_BIT != 0) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "{}: SIGTERM not caught within {within:?} ({status}: {caught:?})",
                    self.label
                ));
            }
            // A state in /proc, polled: no event tells when a handler is installed.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM once the process catches it, then the exit status, or an error if it takes
    /// longer than `within` (then SIGKILL).
    pub fn terminate(mut self, within: Duration) -> Result<std::process::ExitStatus, String> {
        self.wait_catches_sigterm(within)?;
        Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .map_err(|e| format!("kill -TERM: {e}"))?;
        // Both output streams close when the process is gone.
        let drained = self.wait_until("exit after SIGTERM", within, |o| o.closed);
        let status = match drained {
            Ok(()) => self.child.wait().map_err(|e| e.to_string()),
            Err(e) => {
                let _ = self.child.kill();
                Err(e)
            }
        };
        let _ = self.child.wait();
        status
    }
}

impl Drop for CairnRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The blob files a filesystem store holds under `dir`, in its prefix directories (the
/// store's own files, such as its index snapshot, start with a dot).
pub fn blob_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                blob_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}
