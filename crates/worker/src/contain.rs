//! Containment: every process an action starts, including those that double-fork or call
//! `setsid`, is killed when the action ends.
//!
//! Two mechanisms, chosen once per process ([`mode`]):
//!
//! - **A cgroup per action** (cgroup v2 with `cgroup.kill`, Linux 5.14, in a hierarchy this
//!   process may write): the command moves itself into `cairn-action-<worker pid>-<n>`, a
//!   child of the worker's own cgroup, before `execve`, so everything it starts is in it,
//!   wherever it is re-parented. At the end one write to `cgroup.kill` kills them all, the
//!   worker waits for the cgroup to empty and removes it. Cost: a `mkdir`, one write and a
//!   `rmdir` per action (tens of microseconds each on the test machine).
//! - **A child subreaper** otherwise (no cgroup v2, a read-only one, or
//!   `CAIRN_ACTION_CGROUPS=off`): the worker process marks itself
//!   `PR_SET_CHILD_SUBREAPER`, so that a process whose parent dies is re-parented to the worker
//!   instead of init. An orphan cannot be told apart by action once its parent is gone, so at
//!   the end of every action the worker kills every such orphan (a child of the worker process
//!   that it did not launch and that left the worker's process group), and their children in
//!   turn as they are re-parented, and reaps them. An action therefore cannot keep a detached
//!   daemon even while it runs: one action's end kills the orphans of all. The flag is
//!   per-process: a worker embedded in the server makes the server a subreaper, and orphans of
//!   other programs the server started come to it too; those that stay in the server's process
//!   group are left alone (and, once they exit, stay zombies until the server exits).
//!
//! In both modes the worker reaps the zombies of escaped processes that were re-parented to
//! it (always in subreaper mode; with cgroups only when the worker is pid 1 of a container),
//! never a child it did not launch that stayed in its process group, and never a command's
//! leader, which its [`crate::launch::Child`] reaps after killing the group.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Environment variable that turns per-action cgroups off (`off`), e.g. where another
/// program owns the cgroup tree.
pub(crate) const CGROUPS_ENV: &str = "CAIRN_ACTION_CGROUPS";
/// How long an action's processes may take to die after SIGKILL.
const DEATH_WAIT: Duration = Duration::from_secs(10);
/// Rounds of the subreaper sweep: each kills the orphans re-parented since the last one.
const SWEEP_ROUNDS: usize = 64;

/// How this process contains actions.
#[derive(Debug)]
pub(crate) enum Mode {
    /// Per-action cgroups are made in this directory (the worker's own cgroup).
    Cgroup(PathBuf),
    /// The worker process is a child subreaper.
    Subreaper,
}

/// The mode, detected on first use (and, for the subreaper, set up).
pub(crate) fn mode() -> &'static Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    MODE.get_or_init(|| {
        let off = std::env::var(CGROUPS_ENV).is_ok_and(|v| v == "off" || v == "0");
        let why = if off {
            format!("{CGROUPS_ENV}=off")
        } else {
            match usable_cgroup_dir() {
                Ok(dir) => {
                    tracing::info!(cgroup = %dir.display(), "actions run in a cgroup each");
                    return Mode::Cgroup(dir);
                }
                Err(e) => e.to_string(),
            }
        };
        // SAFETY: prctl(2) PR_SET_CHILD_SUBREAPER takes only integers.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if r != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot become a child subreaper: processes that escape an action's process group may outlive it");
        }
        tracing::info!(reason = %why, "no per-action cgroups; the worker is a child subreaper");
        Mode::Subreaper
    })
}

/// The worker's cgroup v2 directory, when it can make child cgroups with `cgroup.kill`.
fn usable_cgroup_dir() -> io::Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other("the process is in no cgroup v2 hierarchy"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    // `id parent major:minor root mount-point options... - fstype source super-options`
    let (root, mount_point) = mounts
        .lines()
        .find_map(|l| {
            let (fields, tail) = l.split_once(" - ")?;
            if tail.split(' ').next()? != "cgroup2" {
                return None;
            }
            let mut f = fields.split(' ');
            Some((f.nth(3)?.to_string(), f.next()?.to_string()))
        })
        .ok_or_else(|| io::Error::other("no cgroup2 file system is mounted"))?;
    let rel = own
        .strip_prefix(root.trim_end_matches('/'))
        .ok_or_else(|| io::Error::other("the process's cgroup is outside the mounted tree"))?;
    let dir = Path::new(&unescape(&mount_point)).join(rel.trim_start_matches('/'));
    let probe = dir.join(format!("cairn-action-{}-probe", std::process::id()));
    std::fs::create_dir(&probe)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", probe.display())))?;
    let has_kill = probe.join("cgroup.kill").exists();
    let _ = std::fs::remove_dir(&probe);
    if !has_kill {
        return Err(io::Error::other("cgroup.kill needs Linux 5.14"));
    }
    remove_stale(&dir);
    Ok(dir)
}

/// Removes the empty cgroups of workers that are gone (a crash leaves them).
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("cairn-action-"))
            .and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Mount points in mountinfo escape space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup of one action: made before the command starts, which moves itself into it
/// through `procs`; killed and removed when it ends ([`ActionCgroup::kill_and_remove`], or on
/// drop, which blocks as long).
#[derive(Debug)]
pub(crate) struct ActionCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, open for writing.
    procs: Option<OwnedFd>,
}

impl ActionCgroup {
    /// A fresh cgroup in `parent`.
    pub fn create(parent: &Path) -> io::Result<ActionCgroup> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("cairn-action-{}-{n}", std::process::id()));
        let described = |e: io::Error, what: &str| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir(&dir).map_err(|e| described(e, "creating the cgroup"))?;
        match std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
        {
            Ok(f) => Ok(ActionCgroup {
                procs: Some(f.into()),
                dir,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(described(e, "opening cgroup.procs of"))
            }
        }
    }

    /// The descriptor the child writes `0` to, to move itself in.
    pub fn procs_fd(&self) -> libc::c_int {
        self.procs.as_ref().map_or(-1, |p| p.as_raw_fd())
    }

    /// SIGKILL to every process in the cgroup (one write; never blocks).
    pub fn kill(&self) {
        if let Err(e) = std::fs::write(self.dir.join("cgroup.kill"), "1") {
            tracing::warn!(cgroup = %self.dir.display(), error = %e, "cannot kill the action's cgroup");
        }
    }

    fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events")).is_ok_and(|events| {
            events.lines().any(|l| {
                l.strip_prefix("populated ")
                    .is_some_and(|v| v.trim() != "0")
            })
        })
    }

    /// Kills everything in the cgroup, waits (bounded) until it is empty and removes it.
    /// Blocking.
    pub fn kill_and_remove(self) {
        drop(self);
    }
}

impl Drop for ActionCgroup {
    fn drop(&mut self) {
        self.kill();
        let deadline = Instant::now() + DEATH_WAIT;
        let mut pause = Duration::from_micros(50);
        while self.populated() {
            if Instant::now() > deadline {
                tracing::warn!(cgroup = %self.dir.display(), "processes of the action did not die in time; leaving its cgroup");
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        self.procs = None;
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(cgroup = %self.dir.display(), error = %e, "cannot remove the action's cgroup");
        }
    }
}

/// Launches between `clone` and their pid's registration in [`LEADERS`].
static LAUNCHING: AtomicUsize = AtomicUsize::new(0);
/// Commands launched and not yet reaped by their `Child`: the sweep never reaps those.
static LEADERS: Mutex<Option<HashSet<libc::pid_t>>> = Mutex::new(None);

/// Held by a launcher from before `clone` until the new pid is registered.
pub(crate) struct Launching(());

impl Launching {
    pub fn begin() -> Launching {
        LAUNCHING.fetch_add(1, Ordering::SeqCst);
        Launching(())
    }

    /// Registers a started command (call before its `Child` can reap it).
    pub fn started(self, pid: libc::pid_t) {
        LEADERS.lock().get_or_insert_with(HashSet::new).insert(pid);
    }
}

impl Drop for Launching {
    fn drop(&mut self) {
        LAUNCHING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A command's leader was reaped by its owner: its pid is no longer ours to protect.
pub(crate) fn reaped(pid: libc::pid_t) {
    if let Some(set) = LEADERS.lock().as_mut() {
        set.remove(&pid);
    }
}

/// Kills (in subreaper mode) and reaps the escaped processes re-parented to this process; see
/// the module doc. Blocking; bounded by [`DEATH_WAIT`].
pub(crate) fn sweep() {
    let kill = matches!(mode(), Mode::Subreaper);
    // SAFETY: getpgrp(2) and getpid(2) cannot fail.
    let (own_group, own_pid) = unsafe { (libc::getpgrp(), libc::getpid()) };
    if !kill && own_pid != 1 {
        return; // orphans go to init (or a subreaper above us), which reaps them
    }
    let deadline = Instant::now() + DEATH_WAIT;
    for _ in 0..SWEEP_ROUNDS {
        let escaped: Vec<(libc::pid_t, bool)> = {
            let children = children_of_this_process();
            let leaders = LEADERS.lock();
            // A launch in flight may have a child not yet registered: leave this round.
            if LAUNCHING.load(Ordering::SeqCst) > 0 {
                return;
            }
            children
                .into_iter()
                .filter(|pid| leaders.as_ref().is_none_or(|l| !l.contains(pid)))
                .filter_map(|pid| {
                    let (group, zombie) = stat_of(pid)?;
                    (group != own_group).then_some((pid, zombie))
                })
                .collect()
        };
        if escaped.is_empty() {
            return;
        }
        for &(pid, zombie) in &escaped {
            if kill && !zombie {
                // SAFETY: kill(2) takes integers; `pid` is our unreaped child, so it names
                // that process.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for &(pid, _) in &escaped {
            reap_before(pid, deadline);
        }
        if Instant::now() > deadline {
            tracing::warn!("escaped processes of actions did not die in time");
            return;
        }
    }
}

/// Waits for our child `pid` to exit (until `deadline`) and reaps it.
fn reap_before(pid: libc::pid_t, deadline: Instant) {
    let mut pause = Duration::from_micros(50);
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) writes one int through a valid pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r != 0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Children of every thread of this process (orphans are re-parented to any live thread).
fn children_of_this_process() -> Vec<libc::pid_t> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<libc::pid_t>().ok()),
            );
        }
    }
    out
}

/// The process group of `pid` and whether it is a zombie.
fn stat_of(pid: libc::pid_t) -> Option<(libc::pid_t, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`; comm may contain anything but ends at the last ')'.
    let mut f = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = f.next()?;
    let group = f.nth(1)?.parse().ok()?;
    Some((group, state == "Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape(r"/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn stat_of_reads_group_and_state_past_odd_names() {
        // SAFETY: getpid(2) and getpgrp(2) cannot fail.
        let (pid, group) = unsafe { (libc::getpid(), libc::getpgrp()) };
        assert_eq!(stat_of(pid), Some((group, false)));
    }
}
