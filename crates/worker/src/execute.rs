//! Step 2: run the command.
//!
//! The program runs with only the Command's environment, in the working directory, with stdin
//! closed, as the leader of its own process group, started by `launch` so that it dies with
//! the worker process. Its stdout and stderr are streamed into files beside the action
//! directory, created on the first byte (a silent command costs no file), and cut at a cap
//! (the rest is read and dropped, so the command never blocks on a full pipe). When the
//! command exits, runs past its timeout or is cancelled, its process group and everything else
//! it started are killed (`contain`), so no background process outlives the action; the same
//! happens if this future is dropped. The capture of stdout and stderr is bounded in time
//! after that, in case a process that could not be killed still holds a pipe.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cairn_core::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::ActionError;
use crate::launch;

/// How long stdout and stderr may still be read once the process group is dead.
const STDIO_DRAIN: Duration = Duration::from_secs(2);
/// Spawn attempts when the program is still open for writing in another process (ETXTBSY,
/// from a fork of a concurrent action that raced with the write of this input).
const SPAWN_ATTEMPTS: u32 = 10;

/// What to run.
pub(crate) struct ExecRequest<'a> {
    pub arguments: &'a [String],
    pub environment: &'a [(String, String)],
    pub cwd: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub timeout: Duration,
    /// Bytes kept of each of stdout and stderr.
    pub stdio_cap: u64,
    pub namespaces: launch::Namespaces,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It exited by itself (a signal counts as 128 + the signal number, as shells report it).
    Exited(i32),
    /// It ran past its timeout and was killed; the code is what the kill left.
    TimedOut(i32),
}

/// Bytes written by the command to one stream.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Capture {
    /// Bytes the command wrote.
    pub written: u64,
    /// Bytes kept in the file (at most the cap).
    pub kept: u64,
}

impl Capture {
    pub fn truncated(&self) -> bool {
        self.kept < self.written
    }
}

/// The run of a command.
#[derive(Debug)]
pub(crate) struct Execution {
    pub ending: Ending,
    pub stdout: Capture,
    pub stderr: Capture,
    pub started: SystemTime,
    pub finished: SystemTime,
}

/// Runs the command; CANCELLED (after killing the group) when `cancel` fires first.
pub(crate) async fn execute(
    req: ExecRequest<'_>,
    cancel: &CancellationToken,
) -> Result<Execution, ActionError> {
    let program = program_path(&req.arguments[0], &req.cwd);
    let started = SystemTime::now();
    let deadline = tokio::time::Instant::now() + req.timeout;
    // A launch is bounded too: an execve that hangs (a hung mount) is given up at the
    // timeout, and the launcher kills the command if it ever starts.
    let mut child = tokio::select! {
        child = spawn(&program, &req) => child?,
        _ = tokio::time::sleep_until(deadline) => return Err(ActionError::TimedOut(req.timeout)),
        _ = cancel.cancelled() => return Err(ActionError::Cancelled),
    };

    let (out_counters, err_counters) =
        (Arc::new(Counters::default()), Arc::new(Counters::default()));
    let mut captures = JoinSet::new();
    if let Some(out) = child.stdout.take() {
        let path = req.stdout.clone();
        captures.spawn(capture(out, path, req.stdio_cap, out_counters.clone()));
    }
    if let Some(err) = child.stderr.take() {
        let path = req.stderr.clone();
        captures.spawn(capture(err, path, req.stdio_cap, err_counters.clone()));
    }

    enum Why {
        Exited,
        TimedOut,
        Cancelled,
    }
    let why = tokio::select! {
        exited = child.exited() => {
            exited.map_err(|e| Error::io(format!("waiting for {program:?}"), e))?;
            Why::Exited
        }
        _ = tokio::time::sleep_until(deadline) => Why::TimedOut,
        _ = cancel.cancelled() => Why::Cancelled,
    };
    // Whatever happened, nothing the command started may live on: its process group (whose
    // id is still the unreaped leader's), its cgroup or escaped orphans are killed, then the
    // leader is reaped. Dropped before this, `child` does the same in the background.
    let status = child.terminate().await;
    let finished = SystemTime::now();

    let drained = drain(&mut captures).await;
    let ending = match why {
        Why::Cancelled => return Err(ActionError::Cancelled),
        Why::TimedOut => Ending::TimedOut(status.map_or(128 + libc::SIGKILL, |s| exit_code(&s))),
        Why::Exited => {
            let status = status.map_err(|e| Error::io(format!("waiting for {program:?}"), e))?;
            Ending::Exited(exit_code(&status))
        }
    };
    drained.map_err(|e| e.context("capturing the command's stdout and stderr"))?;
    Ok(Execution {
        ending,
        stdout: out_counters.get(),
        stderr: err_counters.get(),
        started,
        finished,
    })
}

/// argv[0] as given, except that a relative path with a separator is taken from the working
/// directory (as the REAPI says), independent of how the platform resolves it.
fn program_path(arg0: &str, cwd: &Path) -> PathBuf {
    if arg0.contains('/') && !arg0.starts_with('/') {
        cwd.join(arg0)
    } else {
        PathBuf::from(arg0)
    }
}

/// Starts the command, retrying while its program is still open for writing elsewhere.
async fn spawn(program: &Path, req: &ExecRequest<'_>) -> Result<launch::Child, ActionError> {
    let mut attempt = 1;
    loop {
        let spec = launch::Spec {
            program,
            args: &req.arguments[1..],
            env: req.environment,
            cwd: &req.cwd,
            namespaces: req.namespaces,
        };
        match launch::spawn(spec).await {
            Ok(child) => return Ok(child),
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < SPAWN_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(source) => {
                return Err(ActionError::Spawn {
                    program: req.arguments[0].clone(),
                    cwd: req.cwd.clone(),
                    source,
                })
            }
        }
    }
}

fn exit_code(status: &ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// What a capture task has seen so far; shared so that an aborted task still reports it.
#[derive(Default)]
struct Counters {
    written: AtomicU64,
    kept: AtomicU64,
}

impl Counters {
    fn get(&self) -> Capture {
        Capture {
            written: self.written.load(Ordering::Relaxed),
            kept: self.kept.load(Ordering::Relaxed),
        }
    }
}

/// Copies `pipe` into a new file at `path` (created on the first byte) up to `cap` bytes and
/// reads the rest to the end. A failed create or write (full disk) stops the copy but not the
/// reading, so the command never blocks on the pipe.
async fn capture(
    mut pipe: impl AsyncRead + Unpin,
    path: PathBuf,
    cap: u64,
    counters: Arc<Counters>,
) -> Result<(), Error> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut failed: Option<Error> = None;
    let mut file: Option<tokio::fs::File> = None;
    let mut kept = 0u64;
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading the command's output failed");
                break;
            }
        };
        counters.written.fetch_add(n as u64, Ordering::Relaxed);
        let keep = (cap - kept).min(n as u64) as usize;
        if keep > 0 && failed.is_none() {
            let written = match file.as_mut() {
                Some(f) => f.write_all(&buf[..keep]).await,
                None => match tokio::fs::File::create(&path).await {
                    Ok(f) => file.insert(f).write_all(&buf[..keep]).await,
                    Err(e) => {
                        failed = Some(Error::io(format!("creating {}", path.display()), e));
                        continue;
                    }
                },
            };
            match written {
                Ok(()) => {
                    kept += keep as u64;
                    counters.kept.store(kept, Ordering::Relaxed);
                }
                Err(e) => failed = Some(Error::io(format!("writing {}", path.display()), e)),
            }
        }
    }
    if let Some(mut f) = file {
        if let Err(e) = f.flush().await {
            failed.get_or_insert(Error::io(format!("writing {}", path.display()), e));
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Waits for the captures, at most [`STDIO_DRAIN`]; captures still running then are aborted
/// (their files keep what reached them).
async fn drain(captures: &mut JoinSet<Result<(), Error>>) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + STDIO_DRAIN;
    let mut result = Ok(());
    loop {
        match tokio::time::timeout_at(deadline, captures.join_next()).await {
            Ok(Some(Ok(Ok(())))) => {}
            Ok(Some(Ok(Err(e)))) => result = Err(e),
            Ok(Some(Err(e))) => {
                result = Err(Error::internal(format!("stdio capture task failed: {e}")));
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    "a process outside the action's process group still holds its stdout or stderr; stopped reading"
                );
                captures.abort_all();
                while captures.join_next().await.is_some() {}
                break;
            }
        }
    }
    result
}
