//! Starting a command so that it cannot outlive the worker process, at the cost of
//! `posix_spawn`.
//!
//! Every command is started with `PR_SET_PDEATHSIG = SIGKILL`: when the worker process dies,
//! even by SIGKILL, the kernel kills the command (the leader of the action's process group;
//! what it started itself is killed with the group by a live worker, see `execute`). The death
//! signal is tied to the *thread* that created the child, not to the process, so every command
//! is started by one launcher thread that lives as long as the process, never by a runtime or
//! blocking-pool thread that may exit while the worker runs on. After setting the signal the
//! child checks that its parent is still the worker, which closes the race with a worker that
//! died meanwhile.
//!
//! Why not `std::process::Command::pre_exec`: any pre-exec code makes the standard library
//! `fork` the whole worker instead of using `posix_spawn`, and copying the worker's page tables
//! (then taking copy-on-write faults in every thread) cost 1.6 ms more per command on the
//! 2-core test machine. So the child is created here as glibc's `posix_spawn` does:
//! `clone(CLONE_VM | CLONE_VFORK)` on a stack of its own, every signal blocked across the
//! clone, and a child that makes only system calls (no allocation, no lock) before `execve`.
//! The launcher thread is suspended until the child has called `execve` or failed, and a
//! failure's errno is handed back through the shared memory.
//!
//! The child has stdin on `/dev/null`, stdout and stderr on pipes, no other descriptor (ours
//! are close-on-exec, and any inherited ones are closed), every signal at its default action
//! with none blocked, its own process group, and exactly the given environment. A program name
//! without a slash is looked up on the `PATH` of that environment (`/bin:/usr/bin` without
//! one), as `std::process::Command` does once the environment is cleared; the file executed is
//! always named by an absolute path. The exit is awaited through a pidfd (Linux 5.3 or later);
//! a [`Child`] dropped before it was reaped is killed and reaped in the background.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::OnceLock;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};

/// Commands waiting for the launcher thread before callers wait.
const QUEUE_DEPTH: usize = 64;
/// Stack of the child between `clone` and `execve`; it makes a dozen system calls.
const CHILD_STACK: usize = 64 << 10;
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
}

/// A started command.
pub(crate) struct Child {
    pid: libc::pid_t,
    /// `None` only while being dropped.
    pidfd: Option<AsyncFd<OwnedFd>>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    status: Option<ExitStatus>,
}

impl Child {
    /// The process id, which is also the id of its process group.
    pub fn id(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits for the process to exit and reaps it; then returns the same status again.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
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
        if self.status.is_some() {
            return;
        }
        // SAFETY: kill(2) takes plain integers; the child is not reaped, so `pid` still names it.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        if let Ok(Some(_)) = try_reap(self.pid) {
            return;
        }
        let pid = self.pid;
        match (self.pidfd.take(), tokio::runtime::Handle::try_current()) {
            (Some(pidfd), Ok(runtime)) => {
                runtime.spawn(async move {
                    let _ = pidfd.readable().await;
                    let _ = try_reap(pid);
                });
            }
            _ => {
                std::thread::spawn(move || {
                    let mut status = 0;
                    // SAFETY: waitpid(2) writes one int through a valid pointer.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                });
            }
        }
    }
}

/// The exit status of `pid` if it has exited (and reaps it), `None` while it runs.
fn try_reap(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) writes one int through a valid pointer.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => return Ok(None),
            r if r == pid => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Starts `spec` from the launcher thread. Must be called from within a tokio runtime.
pub(crate) async fn spawn(spec: Spec<'_>) -> io::Result<Child> {
    let (stdout_r, stdout_w) = pipe_above_stdio()?;
    let (stderr_r, stderr_w) = pipe_above_stdio()?;
    let image = Image {
        program: cstring(resolve(spec.program, spec.env, spec.cwd)?.as_os_str())?,
        argv: std::iter::once(Ok(cstring(spec.program.as_os_str())?))
            .chain(spec.args.iter().map(|a| cstring(OsStr::new(a))))
            .collect::<io::Result<_>>()?,
        envp: environ(spec.env)?,
        cwd: cstring(spec.cwd.as_os_str())?,
        stdio: [above_stdio(open_dev_null()?)?, stdout_w, stderr_w],
    };
    let (reply, answer) = oneshot::channel();
    launcher()?
        .send(Launch { image, reply })
        .await
        .map_err(|_| io::Error::other("the launcher thread has stopped"))?;
    let (pid, pidfd) = answer
        .await
        .map_err(|_| io::Error::other("the launcher thread dropped a command"))??;
    let mut child = Child {
        pid,
        pidfd: None,
        stdout: None,
        stderr: None,
        status: None,
    };
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

/// A pipe (read end, write end), both close-on-exec and numbered above 2, so that the child's
/// `dup2` onto 0, 1 and 2 never overwrites one it still needs.
fn pipe_above_stdio() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = std::io::pipe()?;
    Ok((above_stdio(r.into())?, above_stdio(w.into())?))
}

fn open_dev_null() -> io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

/// `fd`, or a close-on-exec duplicate numbered 3 or more when it is 0, 1 or 2 (a worker
/// started with closed standard descriptors).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: fcntl(2) F_DUPFD_CLOEXEC on a descriptor we own returns a new descriptor that
    // nothing else owns.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Everything the child needs, prepared (allocated) before the clone.
struct Image {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    /// The child's stdin, stdout and stderr; closed here once the child has exec'd.
    stdio: [OwnedFd; 3],
}

struct Launch {
    image: Image,
    reply: oneshot::Sender<io::Result<(libc::pid_t, OwnedFd)>>,
}

/// The launcher thread's queue; the thread is started on first use and never exits (its queue
/// is never closed), so the death signal of a command never fires while the worker lives.
fn launcher() -> io::Result<&'static mpsc::Sender<Launch>> {
    static LAUNCHER: OnceLock<mpsc::Sender<Launch>> = OnceLock::new();
    if let Some(tx) = LAUNCHER.get() {
        return Ok(tx);
    }
    let (tx, mut rx) = mpsc::channel::<Launch>(QUEUE_DEPTH);
    // Two callers may race here; only the thread whose sender is stored ever gets work, and
    // the other one ends as soon as its queue's only sender is dropped.
    std::thread::Builder::new()
        .name("cairn-launcher".into())
        .spawn(move || {
            let mut stack = vec![0u8; CHILD_STACK];
            while let Some(job) = rx.blocking_recv() {
                let _ = job.reply.send(start(&job.image, &mut stack));
            }
        })?;
    Ok(LAUNCHER.get_or_init(|| tx))
}

/// What the child reads (through raw pointers into the launcher's memory, which it shares)
/// and the errno it leaves when it cannot exec.
#[repr(C)]
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdio: [RawFd; 3],
    worker: libc::pid_t,
    empty_mask: libc::sigset_t,
    /// Transparent huge pages are off for the worker (cairn's `main` turns them off): the
    /// child turns them back on for the command, see `start`.
    thp_off: bool,
    errno: libc::c_int,
}

/// Creates the child and returns once it has exec'd: its pid and a pidfd for it.
fn start(image: &Image, stack: &mut [u8]) -> io::Result<(libc::pid_t, OwnedFd)> {
    let null_terminated = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let argv = null_terminated(&image.argv);
    let envp = null_terminated(&image.envp);
    let worker = libc::pid_t::try_from(std::process::id())
        .map_err(|_| io::Error::other("process id out of range"))?;
    // SAFETY: an all-zero sigset_t is a valid value, and sigemptyset initialises it.
    let mut empty_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe { libc::sigemptyset(&mut empty_mask) };
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
        worker,
        empty_mask,
        // SAFETY: PR_GET_THP_DISABLE takes no pointers; it returns 1 when THP is off.
        thp_off: unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) } == 1,
        errno: 0,
    };
    // The stack grows down from its end, which the ABI wants 16-byte aligned.
    let top = stack.as_mut_ptr_range().end as usize & !15;

    // SAFETY: all-zero sigset_t values are valid; sigfillset and pthread_sigmask only write
    // through the pointers given.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut saved: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut saved);
    }
    // SAFETY: CLONE_VM | CLONE_VFORK suspends this thread until the child has called execve
    // or _exit, so everything `args` points to (owned by this frame and by `image`) and the
    // child's stack outlive the child's use of them. The child runs `child_main` on its own
    // stack with every signal blocked, so no handler of ours runs in the shared memory, and
    // it makes only system calls. SIGCHLD makes it a normal child, reaped with waitpid.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ChildArgs).cast(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // The child shares our memory map until execve, and THP's off switch is a flag of that map
    // (kept across execve): the child cleared it so that the command runs with the system's
    // THP setting, and it is set again here for the worker.
    if args.thp_off {
        // SAFETY: PR_SET_THP_DISABLE takes only integers.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(clone_error);
    }
    // SAFETY: the child wrote `errno` (if at all) before exec or exit, and has done neither
    // since; a volatile read because the compiler cannot see that write.
    let errno = unsafe { std::ptr::read_volatile(&args.errno) };
    if errno != 0 {
        let mut status = 0;
        // SAFETY: the child has exited (_exit after the failure); this reaps it.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(errno));
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
        return Err(e);
    }
    // SAFETY: pidfd_open returned a new descriptor (close-on-exec) that nothing else owns.
    Ok((pid, unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) }))
}

/// The child, between clone and execve. Only system calls: it shares the launcher's memory.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` of `start`, alive while the launcher is suspended.
    let args = unsafe { &mut *arg.cast::<ChildArgs>() };
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
        let failed = 'setup: {
            if libc::setpgid(0, 0) != 0 {
                break 'setup true;
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                break 'setup true;
            }
            // The worker died before the signal was set: nothing would kill us later.
            if libc::getppid() != args.worker {
                *libc::__errno_location() = libc::ESRCH;
                break 'setup true;
            }
            for (to, from) in args.stdio.iter().enumerate() {
                if libc::dup2(*from, to as libc::c_int) < 0 {
                    break 'setup true;
                }
            }
            // Descriptors the worker inherited without close-on-exec (a jobserver's pipes, a
            // lock) are none of the command's business. Best effort: ENOSYS before Linux 5.9.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            if libc::chdir(args.cwd) != 0 {
                break 'setup true;
            }
            if args.thp_off {
                libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
            }
            libc::sigprocmask(libc::SIG_SETMASK, &args.empty_mask, std::ptr::null_mut());
            libc::execve(args.program, args.argv, args.envp);
            true
        };
        if failed {
            let errno = *libc::__errno_location();
            std::ptr::write_volatile(&mut args.errno, if errno == 0 { libc::EIO } else { errno });
        }
        libc::_exit(127)
    }
}
