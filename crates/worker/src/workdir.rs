//! The directory of one action run: `<work_root>/<uuid>/`, the input root where the command
//! runs, and beside it `<uuid>.stdout` and `<uuid>.stderr`, the capture files, which exist only
//! once the command wrote to them; `<uuid>.action/`, a scratch directory made only for a worker
//! whose `additional_environment` names it, and `<uuid>.side_channel`, which only the command
//! creates.
//!
//! Cost: creating is one `mkdir` (the work root is created on first use), removing is one
//! `remove_dir_all` and two `unlink`s, each in one blocking task. On a journaling file system
//! every directory entry created or removed costs a journal update (0.1 to 1 ms each on the
//! test machine's disk), so the layout keeps them to the minimum, and [`WorkDirs`] can make
//! directories ahead of need, so that a run takes one without waiting.
//!
//! [`WorkDir::remove`] deletes it all, also when the command left directories without write
//! permission; if a run is abandoned without calling it (its future dropped), `Drop` removes
//! them on a blocking thread.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_core::Error;
use parking_lot::Mutex;

/// How long removing a finished action's directory is retried (NativeLink's
/// `max_cleanup_wait_s` and `max_cleanup_backoff_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleanup {
    /// Retries stop once this much time has passed since the first attempt.
    pub wait: Duration,
    /// Longest pause between two attempts; pauses double from 10 ms up to it.
    pub max_backoff: Duration,
}

impl Default for Cleanup {
    fn default() -> Cleanup {
        Cleanup {
            wait: Duration::from_secs(30),
            max_backoff: Duration::from_millis(500),
        }
    }
}

pub(crate) struct WorkDir {
    /// The input root; the capture files are named after it.
    path: PathBuf,
    removed: bool,
    cleanup: Cleanup,
}

impl WorkDir {
    /// Creates a fresh, uniquely named directory under `work_root` (and `work_root` itself if
    /// it does not exist yet).
    pub async fn create(work_root: &Path, cleanup: Cleanup) -> Result<WorkDir, Error> {
        let path = work_root.join(uuid::Uuid::new_v4().to_string());
        let root = work_root.to_path_buf();
        let dir = path.clone();
        tokio::task::spawn_blocking(move || {
            match std::fs::create_dir(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&root).map_err(|e| {
                        Error::io(format!("creating the work root {}", root.display()), e)
                    })?;
                    std::fs::create_dir(&dir)
                }
                other => other,
            }
            .map_err(|e| {
                Error::io(
                    format!("creating the action directory {}", dir.display()),
                    e,
                )
            })
        })
        .await
        .map_err(|e| Error::internal(format!("work directory task failed: {e}")))??;
        Ok(WorkDir {
            path,
            removed: false,
            cleanup,
        })
    }

    /// The input root, and the base of the working directory.
    pub fn exec_root(&self) -> PathBuf {
        self.path.clone()
    }

    pub fn stdout(&self) -> PathBuf {
        self.path.with_extension("stdout")
    }

    pub fn stderr(&self) -> PathBuf {
        self.path.with_extension("stderr")
    }

    /// The scratch directory (`additional_environment`'s `action_directory`), not made here.
    pub fn scratch(&self) -> PathBuf {
        self.path.with_extension("action")
    }

    /// The side channel file (`additional_environment`'s `side_channel_file`).
    pub fn side_channel(&self) -> PathBuf {
        self.path.with_extension("side_channel")
    }

    /// Deletes the directory and everything in it, and the capture files; failures are
    /// logged. A few attempts: a blocking task of a cancelled step may still be adding entries
    /// for a moment.
    pub async fn remove(mut self) {
        self.removed = true;
        let start = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(10).min(self.cleanup.max_backoff);
        loop {
            let paths = self.paths();
            let result = tokio::task::spawn_blocking(move || remove_all(&paths))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match result {
                Ok(()) => return,
                Err(e) if start.elapsed() + pause > self.cleanup.wait => {
                    tracing::warn!(
                        dir = %self.path.display(),
                        error = %e,
                        waited_ms = start.elapsed().as_millis() as u64,
                        "could not remove an action directory within max_cleanup_wait_s"
                    );
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(self.cleanup.max_backoff);
                }
            }
        }
    }

    fn paths(&self) -> [PathBuf; 5] {
        [
            self.path.clone(),
            self.scratch(),
            self.stdout(),
            self.stderr(),
            self.side_channel(),
        ]
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let paths = self.paths();
        let remove = move || {
            if let Err(e) = remove_all(&paths) {
                tracing::warn!(dir = %paths[0].display(), error = %e, "could not remove an action directory");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

/// Makes a fresh, uniquely named directory under `root` (and `root` if needed). Blocking.
fn make_dir(root: &Path) -> Result<PathBuf, Error> {
    let dir = root.join(uuid::Uuid::new_v4().to_string());
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(root)
                .map_err(|e| Error::io(format!("creating the work root {}", root.display()), e))?;
            std::fs::create_dir(&dir)
        }
        other => other,
    }
    .map_err(|e| {
        Error::io(
            format!("creating the action directory {}", dir.display()),
            e,
        )
    })?;
    Ok(dir)
}

/// Fresh, empty action directories made ahead of need: [`WorkDirs::take`] hands one out
/// without waiting when one is ready, and then has the stock made up again by one blocking
/// task. With `ahead` 0 every directory is made when it is taken. Directories still in stock
/// when the worker stops stay in the work root until it is cleaned (at the next start).
pub(crate) struct WorkDirs {
    root: PathBuf,
    ahead: usize,
    cleanup: Cleanup,
    ready: Mutex<Vec<PathBuf>>,
    refilling: AtomicBool,
}

impl WorkDirs {
    pub fn new(root: PathBuf, ahead: usize, cleanup: Cleanup) -> WorkDirs {
        WorkDirs {
            root,
            ahead,
            cleanup,
            ready: Mutex::new(Vec::with_capacity(ahead)),
            refilling: AtomicBool::new(false),
        }
    }

    /// A fresh directory, from the stock when there is one.
    pub async fn take(self: &Arc<Self>) -> Result<WorkDir, Error> {
        let ready = self.ready.lock().pop();
        let dir = match ready {
            Some(path) => WorkDir {
                path,
                removed: false,
                cleanup: self.cleanup,
            },
            None => WorkDir::create(&self.root, self.cleanup).await?,
        };
        self.refill();
        Ok(dir)
    }

    /// Forgets the stock (its directories are being deleted with the rest of the work root).
    pub fn forget(&self) {
        self.ready.lock().clear();
    }

    /// Makes the stock up to `ahead` in one blocking task, unless one is already at it. A
    /// failure is logged and leaves the stock short: `take` then makes directories itself and
    /// reports the error.
    fn refill(self: &Arc<Self>) {
        if self.ready.lock().len() >= self.ahead || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            while this.ready.lock().len() < this.ahead {
                match make_dir(&this.root) {
                    Ok(dir) => this.ready.lock().push(dir),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not make an action directory ahead");
                        break;
                    }
                }
            }
            this.refilling.store(false, Ordering::Release);
        });
    }
}

/// Removes the input root and the scratch directory (absent unless made), and the capture and
/// side channel files (absent when never written).
fn remove_all([dir, scratch, files @ ..]: &[PathBuf; 5]) -> std::io::Result<()> {
    remove_tree(dir)?;
    remove_tree(scratch)?;
    for f in files {
        match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// `remove_dir_all`, retried after making every directory of the tree writable (a command may
/// have left read-only directories, whose entries cannot be unlinked otherwise).
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    make_writable(path);
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn make_writable(dir: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets or clears the immutable attribute of `path` (root only; ext4, xfs, btrfs, tmpfs):
    /// a file that not even root can unlink until it is cleared.
    fn immutable(path: &Path, on: bool) {
        use std::os::fd::AsRawFd;
        const FS_IMMUTABLE_FL: libc::c_long = 0x10;
        let f = std::fs::File::open(path).unwrap();
        let mut flags: libc::c_long = 0;
        // SAFETY: FS_IOC_GETFLAGS and FS_IOC_SETFLAGS read and write one long through a valid
        // pointer on an open descriptor.
        unsafe {
            assert_eq!(
                libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags),
                0,
                "{}",
                std::io::Error::last_os_error()
            );
            flags = if on {
                flags | FS_IMMUTABLE_FL
            } else {
                flags & !FS_IMMUTABLE_FL
            };
            assert_eq!(
                libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags),
                0,
                "{}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// `max_cleanup_wait_s` and `max_cleanup_backoff_ms`: a directory that cannot be removed
    /// yet is retried (backing off) until it can, within the wait; with no wait, one attempt.
    #[tokio::test]
    async fn removal_is_retried_within_the_cleanup_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let patient = Cleanup {
            wait: Duration::from_secs(20),
            max_backoff: Duration::from_millis(20),
        };
        let dir = WorkDir::create(tmp.path(), patient).await.unwrap();
        let stuck = dir.exec_root().join("stuck");
        std::fs::write(&stuck, b"x").unwrap();
        immutable(&stuck, true);
        let root = dir.exec_root();
        // The obstacle goes away while the removal is being retried.
        let unstick = {
            let stuck = stuck.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                immutable(&stuck, false);
            })
        };
        dir.remove().await;
        unstick.await.unwrap();
        assert!(
            !root.exists(),
            "the directory was not removed once it could be"
        );

        let hasty = Cleanup {
            wait: Duration::ZERO,
            max_backoff: Duration::from_millis(20),
        };
        let dir = WorkDir::create(tmp.path(), hasty).await.unwrap();
        let stuck = dir.exec_root().join("stuck");
        std::fs::write(&stuck, b"x").unwrap();
        immutable(&stuck, true);
        let root = dir.exec_root();
        dir.remove().await;
        assert!(stuck.exists(), "removal succeeded on an immutable file");
        immutable(&stuck, false);
        std::fs::remove_dir_all(&root).unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn remove_tree_handles_read_only_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("a");
        std::fs::create_dir_all(top.join("b/c")).unwrap();
        std::fs::write(top.join("b/c/f"), b"x").unwrap();
        std::fs::set_permissions(top.join("b"), std::fs::Permissions::from_mode(0o500)).unwrap();
        std::fs::set_permissions(top.join("b/c"), std::fs::Permissions::from_mode(0o500)).unwrap();
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        remove_tree(&top).unwrap(); // already gone is fine
    }
}
