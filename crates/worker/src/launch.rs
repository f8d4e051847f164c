//! Starting a command so that it cannot outlive the worker process, at the cost of
//! `posix_spawn`.
//!
//! Every command is started with `PR_SET_PDEATHSIG = SIGKILL`: when the worker process dies,
//! even by SIGKILL, the kernel kills the command (the leader of the action's process group;
//! what it started itself is killed by a live worker, see `contain`). The death signal is tied
//! to the *thread* that created the child, not to the process, so commands are started by
//! launcher threads that live as long as the process, never by a runtime or blocking-pool
//! thread that may exit while the worker runs on. After setting the signal the child checks
//! that its parent is still the worker, which closes the race with a worker that died
//! meanwhile.
//!
//! Why not `std::process::Command::pre_exec`: any pre-exec code makes the standard library
//! `fork` the whole worker instead of using `posix_spawn`, and copying the worker's page tables
//! (then taking copy-on-write faults in every thread) cost 1.6 ms more per command on the
//! 2-core test machine. So the child is created here as glibc's `posix_spawn` does:
//! `clone(CLONE_VM | CLONE_VFORK)` on a stack of its own, every signal blocked across the
//! clone (through the system call, so that glibc's own signals 32 and 33 are blocked too), and
//! a child that makes only system calls (no allocation, no lock) before `execve`. The launcher
//! thread is suspended until the child has called `execve` or failed, and a failure's errno
//! and step are handed back through the shared memory.
//!
//! An `execve` can hang (a program on a hung mount, a child stopped before it): launcher
//! threads form a pool, a launch takes an idle one or starts another (at most
//! [`MAX_LAUNCHERS`]), so one hung launch holds up no other; its caller bounds its own wait
//! (`execute` by the action's timeout). A caller that stops waiting (its future dropped) leaves
//! the command to the launcher, which kills and reaps it as soon as it has started.
//!
//! When the worker has transparent huge pages off (cairn's `main` turns them off), the child
//! does not touch that flag of the memory map it shares with the worker: it executes the THP
//! trampoline (`trampoline`), which turns THP back on in its own map and executes the
//! command; the command's `execve` errno comes back through a pipe.
//!
//! The child has stdin on `/dev/null`, stdout and stderr on pipes, no other descriptor (ours
//! are close-on-exec; any inherited ones are closed with `close_range`, or one by one from
//! `/proc/self/fd` where that fails, and the launch fails if neither works), every signal at
//! its default action with none blocked, its own process group (and cgroup, see `contain`),
//! and exactly the given environment. A program name without a slash is looked up on the
//! `PATH` of that environment (`/bin:/usr/bin` without one), as `std::process::Command` does
//! once the environment is cleared; the file executed is always named by an absolute path.
//! The exit is awaited through a pidfd (Linux 5.3 or later) without reaping, so that the
//! process group is killed while its id still belongs to the action ([`Child::terminate`]);
//! a [`Child`] dropped before that is killed and reaped in the background.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::contain::{self, ActionCgroup};
use crate::trampoline;

/// Launcher threads at most: launches beyond these many hung ones wait for a thread.
pub(crate) const MAX_LAUNCHERS: usize = 64;
/// Stack of a launcher thread.
const LAUNCHER_STACK: usize = 256 << 10;
/// Stack of the child between `clone` and `execve`; it makes a few dozen system calls, and
/// lists `/proc/self/fd` into a 4 KiB buffer when `close_range` fails.
const CHILD_STACK: usize = 64 << 10;
/// How long to wait for a killed command to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(10);
/// Signals the kernel knows (1 to 64 on Linux).
const KERNEL_SIGNALS: libc::c_int = 64;
/// `PATH` of a command whose environment has none (glibc's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// What to run.
pub(crate) struct Spec<'a> {
    /// Absolute, relative to the current directory (with a slash), or a name to look up.
    pub program: &'a Path,
    /// `argv[1..]`; `argv[0]` is the program as given.
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    pub namespaces: Namespaces,
}

/// Linux namespaces a command runs in (NativeLink's `use_namespaces` and
/// `use_mount_namespace`).
///
/// With `Isolated` the command is created in new user, PID, IPC and UTS namespaces: it is
/// process 1 of its own PID namespace, so when it exits the kernel kills everything it left
/// behind, it sees no other process and no other System V IPC object, and its user and group
/// ids are mapped to themselves (the command runs as the worker's user, without privileges
/// outside). With `mount` it also gets a mount namespace: mounts are made private (nothing it
/// mounts reaches the worker) and `/proc` is mounted afresh for its PID namespace, so `/proc`
/// lists its own processes only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Namespaces {
    #[default]
    None,
    Isolated {
        mount: bool,
    },
}

/// A started command.
pub(crate) struct Child {
    pid: libc::pid_t,
    /// `None` only while being dropped.
    pidfd: Option<AsyncFd<OwnedFd>>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    /// Set once the leader is reaped.
    status: Option<ExitStatus>,
    cgroup: Option<ActionCgroup>,
}

impl Child {
    /// Waits for the command to exit, without reaping it: its process id, and so the id of its
    /// group, cannot be reused until [`Child::terminate`].
    pub async fn exited(&self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let Some(pidfd) = self.pidfd.as_ref() else {
            return Err(io::Error::other("the child is being dropped"));
        };
        // A pidfd is readable once its process has exited (and stays so until reaped).
        let _ready = pidfd.readable().await?;
        Ok(())
    }

    /// Kills the command's process group and everything else it started (its cgroup, or the
    /// escaped orphans, see `contain`), then reaps the command and returns how it ended;
    /// bounded by [`REAP_WAIT`]. Calling it again returns the same status.
    pub async fn terminate(&mut self) -> io::Result<ExitStatus> {
        if self.status.is_none() {
            self.kill_all();
        }
        let status = match tokio::time::timeout(REAP_WAIT, self.reap()).await {
            Ok(status) => status,
            Err(_) => Err(io::Error::other(
                "the killed process was not reaped in time",
            )),
        };
        let cgroup = self.cgroup.take();
        let cleaned = tokio::task::spawn_blocking(move || {
            if let Some(cgroup) = cgroup {
                cgroup.kill_and_remove();
            }
            contain::sweep();
        });
        if let Err(e) = cleaned.await {
            tracing::warn!(error = %e, "cleaning up after a command failed");
        }
        status
    }

    /// SIGKILL to the process group and the cgroup. Only while the leader is unreaped: until
    /// then no other process can have its id, as a process or a group.
    fn kill_all(&self) {
        // SAFETY: kill(2) takes integers; the leader is not reaped, so `-pid` names its group
        // (and `pid` itself, should it have left the group).
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
            libc::kill(self.pid, libc::SIGKILL);
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill();
        }
    }

    async fn reap(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let Some(pidfd) = self.pidfd.as_ref() else {
            return Err(io::Error::other("the child is being dropped"));
        };
        loop {
            let mut ready = pidfd.readable().await?;
            if let Some(status) = try_reap(self.pid)? {
                self.status = Some(status);
                return Ok(status);
            }
            ready.clear_ready();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let cgroup = self.cgroup.take();
        if self.status.is_none() {
            self.kill_all();
            finish_in_background(Some(self.pid), cgroup);
        } else if cgroup.is_some() {
            finish_in_background(None, cgroup);
        }
    }
}

/// On a thread of its own (the waits block): reaps `pid` (our child, already killed), kills
/// and removes `cgroup`, and sweeps escaped processes.
fn finish_in_background(pid: Option<libc::pid_t>, cgroup: Option<ActionCgroup>) {
    let finish = move || {
        if let Some(pid) = pid {
            let mut status = 0;
            // SAFETY: waitpid(2) writes one int through a valid pointer; `pid` is our
            // unreaped child, killed by the caller.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            contain::reaped(pid);
        }
        if let Some(cgroup) = cgroup {
            cgroup.kill_and_remove();
        }
        contain::sweep();
    };
    if let Err(e) = std::thread::Builder::new()
        .name("cairn-reaper".into())
        .spawn(finish)
    {
        tracing::warn!(?pid, error = %e, "cannot start a thread to reap a dropped command");
    }
}

/// The exit status of `pid` if it has exited (and reaps it), `None` while it runs.
fn try_reap(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) writes one int through a valid pointer.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => return Ok(None),
            r if r == pid => {
                contain::reaped(pid);
                return Ok(Some(ExitStatus::from_raw(status)));
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Starts `spec` from a launcher thread. Must be called from within a tokio runtime.
/// Dropping the future before it returns leaves the command, if it starts, to be killed and
/// reaped by the launcher.
pub(crate) async fn spawn(spec: Spec<'_>) -> io::Result<Child> {
    let (image, readers) = image_of(&spec)?;
    spawn_image(image, readers).await
}

/// What the child needs, and the worker's ends of its stdout and stderr.
fn image_of(spec: &Spec<'_>) -> io::Result<(Image, [OwnedFd; 2])> {
    let (stdout_r, stdout_w) = pipe_above_stdio()?;
    let (stderr_r, stderr_w) = pipe_above_stdio()?;
    let image = Image {
        program: cstring(resolve(spec.program, spec.env, spec.cwd)?.as_os_str())?,
        argv: std::iter::once(Ok(cstring(spec.program.as_os_str())?))
            .chain(spec.args.iter().map(|a| cstring(OsStr::new(a))))
            .collect::<io::Result<_>>()?,
        envp: environ(spec.env)?,
        cwd: cstring(spec.cwd.as_os_str())?,
        stdio: [above_child_fds(open_dev_null()?)?, stdout_w, stderr_w],
        namespaces: spec.namespaces,
        // SAFETY: getuid(2) and getgid(2) cannot fail.
        uid_map: CString::new(format!("{0} {0} 1\n", unsafe { libc::getuid() }))
            .map_err(io::Error::other)?,
        gid_map: CString::new(format!("{0} {0} 1\n", unsafe { libc::getgid() }))
            .map_err(io::Error::other)?,
        #[cfg(test)]
        stop_before_exec: false,
    };
    Ok((image, [stdout_r, stderr_r]))
}

/// Hands `image` to a launcher; `readers` are the worker's ends of stdout and stderr.
async fn spawn_image(image: Image, readers: [OwnedFd; 2]) -> io::Result<Child> {
    let [stdout_r, stderr_r] = readers;
    let pool = pool();
    let slot = pool
        .slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| io::Error::other("the launcher pool is closed"))?;
    let launcher = match pool.idle.lock().pop() {
        Some(launcher) => launcher,
        None => new_launcher()?,
    };
    let (reply, answer) = oneshot::channel();
    launcher
        .send(Launch { image, reply, slot })
        .map_err(|_| io::Error::other("a launcher thread has stopped"))?;
    let mut started = answer
        .await
        .map_err(|_| io::Error::other("a launcher thread dropped a command"))??;
    let pidfd = started
        .pidfd
        .take()
        .expect("a Started has its pidfd until taken here");
    let mut child = Child {
        pid: started.pid,
        pidfd: None,
        stdout: None,
        stderr: None,
        status: None,
        cgroup: started.cgroup.take(),
    };
    drop(started); // without its pidfd: nothing to kill
                   // From here on, dropping `child` kills and reaps the process.
                   // SAFETY: an `OwnedFd` keeps its descriptor open, and names the same one, until the
                   // `AsyncFd` that owns it is dropped.
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    child.pidfd = Some(pidfd);
    child.stdout = Some(pipe::Receiver::from_owned_fd(stdout_r)?);
    child.stderr = Some(pipe::Receiver::from_owned_fd(stderr_r)?);
    Ok(child)
}

/// The file to execute, as an absolute path (the child changes directory before `execve`):
/// `program` itself when it has a slash (relative to the worker's directory), else the first
/// executable regular file of that name on the environment's `PATH`, whose relative entries
/// are taken from `cwd`, as execvp(3) in the child would.
fn resolve(program: &Path, env: &[(String, String)], cwd: &Path) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return std::path::absolute(program);
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    for dir in path.split(':') {
        let candidate = cwd.join(dir).join(program);
        if std::fs::metadata(&candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return std::path::absolute(candidate);
        }
    }
    Err(io::Error::from_raw_os_error(libc::ENOENT))
}

/// `NAME=value` for each variable; a name given twice keeps its last value (as
/// `std::process::Command` does), in the place of that last one.
fn environ(env: &[(String, String)]) -> io::Result<Vec<CString>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = env
        .iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.as_str()))
        .map(|(k, v)| cstring(OsStr::new(&format!("{k}={v}"))))
        .collect::<io::Result<Vec<_>>>()?;
    out.reverse();
    Ok(out)
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        )
    })
}

/// A pipe (read end, write end), both close-on-exec and numbered above the descriptors the
/// child sets up, so that its `dup2`s never overwrite one it still needs.
fn pipe_above_stdio() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = std::io::pipe()?;
    Ok((above_child_fds(r.into())?, above_child_fds(w.into())?))
}

fn open_dev_null() -> io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

/// Descriptors the child sets up: 0, 1 and 2, and with the THP trampoline its errno pipe (3)
/// and the trampoline itself (4).
const CHILD_FDS: RawFd = 5;
/// Where the child puts the THP trampoline to execute it.
const TRAMPOLINE_FD: RawFd = 4;

/// `fd`, or a close-on-exec duplicate numbered [`CHILD_FDS`] or more when it is below (a
/// worker started with closed standard descriptors, or a low one free).
pub(crate) fn above_child_fds(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= CHILD_FDS {
        return Ok(fd);
    }
    // SAFETY: fcntl(2) F_DUPFD_CLOEXEC on a descriptor we own returns a new descriptor that
    // nothing else owns.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, CHILD_FDS) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Everything the child needs, prepared (allocated) before the clone.
struct Image {
    program: CString,
    /// `argv[0]` is the program as the command gave it.
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    /// The child's stdin, stdout and stderr; closed here once the child has exec'd.
    stdio: [OwnedFd; 3],
    namespaces: Namespaces,
    /// `/proc/self/uid_map` and `gid_map` lines: the worker's ids mapped to themselves.
    uid_map: CString,
    gid_map: CString,
    /// Test only: the child stops itself (SIGSTOP) before `execve`, as a hung exec would.
    #[cfg(test)]
    stop_before_exec: bool,
}

/// One command for a launcher thread.
struct Launch {
    image: Image,
    reply: oneshot::Sender<io::Result<Started>>,
    /// The caller's place in the pool, given back once the launcher is idle again.
    slot: OwnedSemaphorePermit,
}

/// A command that has exec'd, on its way to its caller. Dropped on the way (the caller has
/// gone, before or after the reply was sent), it kills and reaps the command.
struct Started {
    pid: libc::pid_t,
    /// Taken by the caller, with the cgroup, when it makes the `Child`.
    pidfd: Option<OwnedFd>,
    cgroup: Option<ActionCgroup>,
}

impl Drop for Started {
    fn drop(&mut self) {
        if self.pidfd.is_none() {
            return;
        }
        #[cfg(test)]
        tests::ABANDONED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: kill(2) takes integers; `pid` is our unreaped child, so it and its group
        // are the command's.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
            libc::kill(self.pid, libc::SIGKILL);
        }
        finish_in_background(Some(self.pid), self.cgroup.take());
    }
}

/// Idle launcher threads, and the permits that bound how many there are.
struct Pool {
    idle: Mutex<Vec<std::sync::mpsc::SyncSender<Launch>>>,
    slots: Arc<Semaphore>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        idle: Mutex::new(Vec::new()),
        slots: Arc::new(Semaphore::new(MAX_LAUNCHERS)),
    })
}

/// Starts a launcher thread and returns its queue. The thread keeps a sender of its own queue,
/// so it never exits: the death signal of a command it started never fires while the worker
/// lives. Once idle again it puts itself back in the pool.
fn new_launcher() -> io::Result<std::sync::mpsc::SyncSender<Launch>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Launch>(1);
    let own = tx.clone();
    std::thread::Builder::new()
        .name("cairn-launcher".into())
        .stack_size(LAUNCHER_STACK)
        .spawn(move || {
            let mut stack = vec![0u8; CHILD_STACK];
            while let Ok(Launch { image, reply, slot }) = rx.recv() {
                let result = start(&image, &mut stack);
                drop(image);
                // Fails when the caller has gone: the `Started` is dropped and so killed.
                let _ = reply.send(result);
                pool().idle.lock().push(own.clone());
                drop(slot);
            }
        })?;
    Ok(tx)
}

/// The steps of the child, named in the error of a launch that fails before `execve`.
const STEPS: [&str; 12] = [
    "execve",
    "joining the action's cgroup",
    "creating a process group",
    "setting the parent-death signal",
    "checking that the worker is alive",
    "redirecting stdin, stdout and stderr",
    "closing inherited descriptors",
    "changing to the working directory",
    "passing descriptors to the THP trampoline",
    "mapping user and group ids in the action's user namespace",
    "making the action's mounts private",
    "mounting /proc for the action's PID namespace",
];

/// What the child reads (through raw pointers into the launcher's memory, which it shares)
/// and the errno and step it leaves when it cannot exec.
#[repr(C)]
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdio: [RawFd; 3],
    /// `cgroup.procs` of the action's cgroup, or -1.
    cgroup_procs: RawFd,
    worker: libc::pid_t,
    /// Transparent huge pages are off for the worker (cairn's `main` turns them off): the
    /// child executes the THP trampoline (this descriptor, or -1 to run the command as is),
    /// with `trampoline_argv` (the program's path, then `argv`) and the write end of
    /// `errno_pipe` for the command's `execve` failure. See `trampoline`.
    trampoline: RawFd,
    trampoline_argv: *const *const libc::c_char,
    errno_pipe: RawFd,
    /// In new namespaces: the id maps to write, whether to mount `/proc`, and a pidfd of the
    /// worker (in a new PID namespace `getppid` is 0, so the worker's death is seen there).
    namespaced: bool,
    mount_proc: bool,
    uid_map: *const libc::c_char,
    gid_map: *const libc::c_char,
    worker_pidfd: RawFd,
    #[cfg(test)]
    stop_before_exec: bool,
    /// Index in [`STEPS`] of the step that failed.
    step: usize,
    errno: libc::c_int,
}

/// Creates the child and returns once it has exec'd.
fn start(image: &Image, stack: &mut [u8]) -> io::Result<Started> {
    let null_terminated = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let argv = null_terminated(&image.argv);
    let envp = null_terminated(&image.envp);
    // SAFETY: PR_GET_THP_DISABLE takes no pointers; it returns 1 when THP is off.
    let thp_off = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) } == 1;
    let trampoline = if thp_off { trampoline::program() } else { None };
    let trampoline_argv: Vec<*const libc::c_char> = match trampoline {
        Some(_) => std::iter::once(image.program.as_ptr())
            .chain(argv.iter().copied())
            .collect(),
        None => Vec::new(),
    };
    // The command's execve happens in the trampoline, after this thread is resumed: its
    // errno comes back through a pipe that the successful execve closes.
    let errno_pipe = match trampoline {
        Some(_) => Some(pipe_above_stdio()?),
        None => None,
    };
    let worker = libc::pid_t::try_from(std::process::id())
        .map_err(|_| io::Error::other("process id out of range"))?;
    let namespace_flags = match image.namespaces {
        Namespaces::None => 0,
        Namespaces::Isolated { mount } => {
            libc::CLONE_NEWUSER
                | libc::CLONE_NEWPID
                | libc::CLONE_NEWIPC
                | libc::CLONE_NEWUTS
                | if mount { libc::CLONE_NEWNS } else { 0 }
        }
    };
    let worker_pidfd = if namespace_flags != 0 {
        worker_pidfd()?
    } else {
        -1
    };
    let cgroup = match contain::mode() {
        contain::Mode::Cgroup(parent) => Some(ActionCgroup::create(parent)?),
        contain::Mode::Subreaper => None,
    };
    let mut args = ChildArgs {
        program: image.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: image.cwd.as_ptr(),
        stdio: [
            image.stdio[0].as_raw_fd(),
            image.stdio[1].as_raw_fd(),
            image.stdio[2].as_raw_fd(),
        ],
        cgroup_procs: cgroup.as_ref().map_or(-1, |c| c.procs_fd()),
        worker,
        trampoline: trampoline.unwrap_or(-1),
        trampoline_argv: trampoline_argv.as_ptr(),
        errno_pipe: errno_pipe.as_ref().map_or(-1, |(_, w)| w.as_raw_fd()),
        namespaced: image.namespaces != Namespaces::None,
        mount_proc: image.namespaces == Namespaces::Isolated { mount: true },
        uid_map: image.uid_map.as_ptr(),
        gid_map: image.gid_map.as_ptr(),
        worker_pidfd,
        #[cfg(test)]
        stop_before_exec: image.stop_before_exec,
        step: 0,
        errno: 0,
    };
    // The stack grows down from its end, which the ABI wants 16-byte aligned.
    let top = stack.as_mut_ptr_range().end as usize & !15;

    // Every signal blocked, glibc's internal 32 and 33 included (sigfillset leaves those out,
    // and a handler of theirs must not run in the child either).
    let all: u64 = !0;
    let mut saved: u64 = 0;
    // SAFETY: rt_sigprocmask(2) reads and writes one 8-byte kernel sigset through valid
    // pointers.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            &mut saved as *mut u64,
            8usize,
        );
    }
    let launching = contain::Launching::begin();
    // SAFETY: CLONE_VM | CLONE_VFORK suspends this thread until the child has called execve
    // or _exit, so everything `args` points to (owned by this frame and by `image`) and the
    // child's stack outlive the child's use of them. The child runs `child_main` on its own
    // stack with every signal blocked, so no handler of ours runs in the shared memory, and
    // it makes only system calls. SIGCHLD makes it a normal child, reaped with waitpid.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | namespace_flags | libc::SIGCHLD,
            (&mut args as *mut ChildArgs).cast(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &saved as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
    if pid < 0 {
        return Err(clone_error);
    }
    // SAFETY: the child wrote `errno` and `step` (if at all) before exec or exit, and has done
    // neither since; volatile reads because the compiler cannot see those writes.
    let (mut errno, step) = unsafe {
        (
            std::ptr::read_volatile(&args.errno),
            std::ptr::read_volatile(&args.step),
        )
    };
    if let Some((r, w)) = errno_pipe.filter(|_| errno == 0) {
        drop(w);
        errno = read_errno(r);
    }
    if errno != 0 {
        let mut status = 0;
        // SAFETY: the child has exited (_exit after the failure); this reaps it.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if let Some(cgroup) = cgroup {
            cgroup.kill_and_remove();
        }
        let e = io::Error::from_raw_os_error(errno);
        return Err(match STEPS.get(step) {
            // The program's own failure, as is: callers look at ETXTBSY.
            Some(&"execve") | None => e,
            Some(what) => io::Error::new(e.kind(), format!("{what}: {e}")),
        });
    }
    // SAFETY: pidfd_open(2) takes plain integers; the child is not reaped, so `pid` names it.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let e = io::Error::last_os_error();
        let mut status = 0;
        // SAFETY: as for kill(2) and waitpid(2) above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
        if let Some(cgroup) = cgroup {
            cgroup.kill_and_remove();
        }
        return Err(e);
    }
    launching.started(pid);
    Ok(Started {
        pid,
        // SAFETY: pidfd_open returned a new descriptor (close-on-exec) that nothing else owns.
        pidfd: Some(unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) }),
        cgroup,
    })
}

/// The child, between clone and execve. Only system calls: it shares the launcher's memory.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` of `start`, alive while the launcher is suspended.
    let args = unsafe { &mut *arg.cast::<ChildArgs>() };
    #[cfg(test)]
    tests::record_entry_mask();
    // SAFETY: each call below is a thin wrapper over one system call, with pointers into
    // `args` or to local values; none allocates or takes a lock.
    unsafe {
        // Default dispositions before any signal can be delivered (our handlers must never run
        // here; this copy of the handler table is the child's own, without CLONE_SIGHAND).
        // Through the system call, as the C library refuses its own signals (32 and 33); an
        // all-zero kernel sigaction is SIG_DFL with no flags.
        let default = [0u64; 4];
        for sig in 1..=KERNEL_SIGNALS {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    default.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
        }
        let step = 'setup: {
            // First, so that everything the command starts is in the cgroup.
            if args.cgroup_procs >= 0
                && libc::write(args.cgroup_procs, b"0".as_ptr().cast(), 1) != 1
            {
                break 'setup 1;
            }
            if libc::setpgid(0, 0) != 0 {
                break 'setup 2;
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                break 'setup 3;
            }
            // The worker died before the signal was set: nothing would kill us later.
            if args.namespaced {
                let mut worker = libc::pollfd {
                    fd: args.worker_pidfd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                if libc::poll(&mut worker, 1, 0) != 0 {
                    *libc::__errno_location() = libc::ESRCH;
                    break 'setup 4;
                }
                if write_file(c"/proc/self/setgroups", c"deny").is_err()
                    || write_file(c"/proc/self/uid_map", CStr::from_ptr(args.uid_map)).is_err()
                    || write_file(c"/proc/self/gid_map", CStr::from_ptr(args.gid_map)).is_err()
                {
                    break 'setup 9;
                }
                if args.mount_proc {
                    if libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    {
                        break 'setup 10;
                    }
                    if libc::mount(
                        c"proc".as_ptr(),
                        c"/proc".as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        std::ptr::null(),
                    ) != 0
                    {
                        break 'setup 11;
                    }
                }
            } else if libc::getppid() != args.worker {
                *libc::__errno_location() = libc::ESRCH;
                break 'setup 4;
            }
            for (to, from) in args.stdio.iter().enumerate() {
                if libc::dup2(*from, to as libc::c_int) < 0 {
                    break 'setup 5;
                }
            }
            // The trampoline's errno pipe (without close-on-exec: it closes it when the
            // command's execve succeeds) and the trampoline itself (closed by its execve).
            let lowest = if args.trampoline >= 0 {
                if libc::dup2(args.errno_pipe, trampoline::ERRNO_FD) < 0
                    || libc::dup3(args.trampoline, TRAMPOLINE_FD, libc::O_CLOEXEC) < 0
                {
                    break 'setup 8;
                }
                CHILD_FDS
            } else {
                3
            };
            // Descriptors the worker inherited without close-on-exec (a jobserver's pipes, a
            // lock) are none of the command's business.
            if let Err(errno) = close_from(lowest) {
                *libc::__errno_location() = errno;
                break 'setup 6;
            }
            if libc::chdir(args.cwd) != 0 {
                break 'setup 7;
            }
            #[cfg(test)]
            if args.stop_before_exec {
                libc::syscall(
                    libc::SYS_kill,
                    libc::syscall(libc::SYS_getpid),
                    libc::SIGSTOP,
                );
            }
            let none: u64 = 0;
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &none as *const u64,
                std::ptr::null_mut::<u64>(),
                8usize,
            );
            if args.trampoline >= 0 {
                libc::syscall(
                    libc::SYS_execveat,
                    TRAMPOLINE_FD,
                    c"".as_ptr(),
                    args.trampoline_argv,
                    args.envp,
                    libc::AT_EMPTY_PATH,
                );
            } else {
                libc::execve(args.program, args.argv, args.envp);
            }
            0
        };
        let errno = *libc::__errno_location();
        std::ptr::write_volatile(&mut args.step, step);
        std::ptr::write_volatile(&mut args.errno, if errno == 0 { libc::EIO } else { errno });
        libc::_exit(127)
    }
}

/// Writes `data` to the file `path` with system calls only (for the child): errno is left set
/// on failure.
///
/// # Safety
/// Only system calls on the given pointers.
unsafe fn write_file(path: &CStr, data: &CStr) -> Result<(), ()> {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(());
    }
    let len = data.to_bytes().len();
    let written = libc::write(fd, data.as_ptr().cast(), len);
    libc::close(fd);
    if written == len as isize {
        Ok(())
    } else {
        Err(())
    }
}

/// A pidfd of the worker process, opened once: readable once the worker has exited.
fn worker_pidfd() -> io::Result<RawFd> {
    static PIDFD: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = PIDFD.get() {
        return Ok(fd.as_raw_fd());
    }
    // SAFETY: pidfd_open(2) takes plain integers; our own process id names us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor (close-on-exec) that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    Ok(PIDFD.get_or_init(|| fd).as_raw_fd())
}

/// The errno the trampoline wrote when the command's `execve` failed, or 0 at end of file
/// (the `execve` succeeded and closed the pipe).
fn read_errno(pipe: OwnedFd) -> libc::c_int {
    let mut file = std::fs::File::from(pipe);
    let mut buf = [0u8; 4];
    match std::io::Read::read_exact(&mut file, &mut buf) {
        Ok(()) => libc::c_int::from_ne_bytes(buf),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Closes every descriptor from `lowest` up: `close_range` (Linux 5.9), else each one listed in
/// `/proc/self/fd` (read with `getdents64` into a buffer on the stack: no allocation). The
/// errno of the fallback when both fail.
///
/// # Safety
/// Only for the child: it closes descriptors that other owners in this memory believe open.
unsafe fn close_from(lowest: libc::c_int) -> Result<(), libc::c_int> {
    if libc::syscall(
        libc::SYS_close_range,
        lowest as libc::c_uint,
        libc::c_uint::MAX,
        0u32,
    ) == 0
    {
        return Ok(());
    }
    let errno = || *libc::__errno_location();
    let dir = libc::open(
        c"/proc/self/fd".as_ptr(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if dir < 0 {
        return Err(errno());
    }
    let mut buf = [0u8; 4096];
    // Closing while listing may make the listing skip entries: list again until a pass
    // closes nothing.
    let result = loop {
        let mut closed = 0;
        if libc::lseek(dir, 0, libc::SEEK_SET) < 0 {
            break Err(errno());
        }
        let failed = loop {
            let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
            if n < 0 {
                break Some(errno());
            }
            if n == 0 {
                break None;
            }
            // struct linux_dirent64 { u64 ino; i64 off; u16 reclen; u8 type; char name[]; }
            let mut at = 0usize;
            while at + 19 < n as usize {
                let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                let mut fd: libc::c_int = 0;
                let mut digits = 0;
                for &c in &buf[at + 19..at + reclen] {
                    if !c.is_ascii_digit() {
                        break;
                    }
                    fd = fd
                        .saturating_mul(10)
                        .saturating_add((c - b'0') as libc::c_int);
                    digits += 1;
                }
                if digits > 0 && fd >= lowest && fd != dir {
                    libc::close(fd);
                    closed += 1;
                }
                at += reclen.max(1);
            }
        };
        match failed {
            Some(e) => break Err(e),
            None if closed == 0 => break Ok(()),
            None => {}
        }
    };
    libc::close(dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// Commands the launcher killed because their caller had gone.
    pub(super) static ABANDONED: AtomicUsize = AtomicUsize::new(0);
    /// The signal mask the last child started with.
    static ENTRY_MASK: AtomicU64 = AtomicU64::new(0);

    /// Called by the child first thing (it shares our memory, so the static is ours).
    pub(super) fn record_entry_mask() {
        let mut mask: u64 = 0;
        // SAFETY: rt_sigprocmask(2) with no new set writes the current one through a valid
        // pointer.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_BLOCK,
                std::ptr::null::<u64>(),
                &mut mask as *mut u64,
                8usize,
            );
        }
        ENTRY_MASK.store(mask, Ordering::SeqCst);
    }

    fn sh(script: &str) -> (Image, [OwnedFd; 2]) {
        let args = ["-c".to_string(), script.to_string()];
        let spec = Spec {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &[],
            cwd: Path::new("/"),
            namespaces: Namespaces::None,
        };
        image_of(&spec).unwrap()
    }

    /// Runs `script` in `namespaces` and returns its exit code and stdout.
    async fn run_in(namespaces: Namespaces, script: &str) -> (Option<i32>, String) {
        use tokio::io::AsyncReadExt;
        let args = ["-c".to_string(), script.to_string()];
        let env = [("PATH".to_string(), "/bin:/usr/bin".to_string())];
        let mut child = spawn(Spec {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            cwd: Path::new("/"),
            namespaces,
        })
        .await
        .unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        child.exited().await.unwrap();
        (child.terminate().await.unwrap().code(), out)
    }

    #[tokio::test]
    async fn namespaced_commands_are_process_1_and_see_only_their_own_processes() {
        let script = "echo pid=$$; sleep 1000 & echo procs=$(ls /proc | grep -c '^[0-9]'); \
                      cat /proc/self/uid_map; id -u";
        let uid = unsafe { libc::getuid() };

        let (code, out) = run_in(Namespaces::Isolated { mount: true }, script).await;
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("pid=1\n"), "{out}");
        // sh, sleep, and the ls and grep of the count: nothing of the worker's.
        let procs: usize = out
            .split("procs=")
            .nth(1)
            .and_then(|r| r.lines().next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap();
        assert!(procs <= 5, "{out}");
        let map: Vec<&str> = out.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(
            map,
            [uid.to_string(), uid.to_string(), "1".to_string()],
            "{out}"
        );
        assert_eq!(out.lines().nth(3), Some(uid.to_string().as_str()), "{out}");

        // Without a mount namespace: process 1 still, but /proc is the worker's.
        let (code, out) = run_in(Namespaces::Isolated { mount: false }, script).await;
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("pid=1\n"), "{out}");
        assert!(
            !out.contains("procs=1\n") && !out.contains("procs=2\n"),
            "{out}"
        );

        // Not namespaced: an ordinary process id.
        let (code, out) = run_in(Namespaces::None, "echo pid=$$").await;
        assert_eq!(code, Some(0));
        assert!(!out.contains("pid=1\n"), "{out}");

        // The worker's /proc was never touched by the command's mount.
        assert!(std::path::Path::new(&format!("/proc/{}", std::process::id())).exists());
    }

    /// Our children (of any thread) in state `state`.
    fn children_in_state(state: &str) -> Vec<libc::pid_t> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for pid in list.split_whitespace() {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let s = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .next();
                if s == Some(state) {
                    out.push(pid.parse().unwrap());
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn the_child_starts_with_every_signal_blocked_glibcs_own_too() {
        let (image, readers) = sh("exit 0");
        let mut child = spawn_image(image, readers).await.unwrap();
        child.exited().await.unwrap();
        assert_eq!(child.terminate().await.unwrap().code(), Some(0));
        let mask = ENTRY_MASK.load(Ordering::SeqCst);
        let bit = |sig: u32| 1u64 << (sig - 1);
        assert_ne!(mask & bit(32), 0, "{mask:#x}");
        assert_ne!(mask & bit(33), 0, "{mask:#x}");
        // The kernel never blocks SIGKILL and SIGSTOP.
        assert_eq!(mask, !bit(9) & !bit(19), "{mask:#x}");
    }

    #[tokio::test]
    async fn the_leader_stays_unreaped_until_its_group_is_killed() {
        let (image, readers) = sh("sleep 1000 & exit 0");
        let mut child = spawn_image(image, readers).await.unwrap();
        child.exited().await.unwrap();
        // A zombie: its id, and so its group's, cannot name another process yet.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.pid)).unwrap();
        assert_eq!(
            stat.rsplit(')').next().unwrap().split_whitespace().next(),
            Some("Z")
        );
        assert_eq!(child.terminate().await.unwrap().code(), Some(0));
        assert!(!Path::new(&format!("/proc/{}", child.pid)).exists());
    }

    /// Our children (of any thread) whose command line is `cmdline`, with their state.
    fn children_running(cmdline: &str) -> Vec<(libc::pid_t, String)> {
        let mut out = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for pid in list.split_whitespace() {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if cmd == cmdline.as_bytes() {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
                    out.push((pid.parse().unwrap(), stat.unwrap_or_default()));
                }
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_launch_whose_caller_is_gone_is_killed_and_reaped() {
        let before = ABANDONED.load(Ordering::SeqCst);
        let (image, readers) = sh("exec sleep 1000.25");
        let mut launch = Box::pin(spawn_image(image, readers));
        assert!(futures::poll!(&mut launch).is_pending());
        drop(launch);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ABANDONED.load(Ordering::SeqCst) == before {
            assert!(Instant::now() < deadline, "the command was never abandoned");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Killed and reaped: not even a zombie is left.
        loop {
            let left = children_running("sleep\x001000.25\x00");
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "left behind: {left:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_launch_stuck_before_exec_holds_up_no_other() {
        let (mut stuck, readers) = sh("exit 0");
        stuck.stop_before_exec = true;
        let stuck = tokio::spawn(spawn_image(stuck, readers));
        // The stuck child is stopped, its launcher suspended in clone.
        let deadline = Instant::now() + Duration::from_secs(10);
        let stopped = loop {
            if let Some(&pid) = children_in_state("T").first() {
                break pid;
            }
            assert!(Instant::now() < deadline, "the stuck child never stopped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        for _ in 0..3 {
            let (image, readers) = sh("exit 3");
            let started = Instant::now();
            let mut child =
                tokio::time::timeout(Duration::from_secs(5), spawn_image(image, readers))
                    .await
                    .expect("a launch behind a stuck one finished")
                    .unwrap();
            child.exited().await.unwrap();
            assert_eq!(child.terminate().await.unwrap().code(), Some(3));
            assert!(started.elapsed() < Duration::from_secs(5));
        }
        // The caller gives up; the stuck child is let go (here: killed), and its launcher
        // kills and reaps it.
        stuck.abort();
        // SAFETY: kill(2) on our stopped child.
        unsafe { libc::kill(stopped, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{stopped}")).exists() {
            assert!(
                Instant::now() < deadline,
                "the stuck child was never reaped"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
