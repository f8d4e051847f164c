//! The directory of one action run: `<work_root>/<uuid>/` holding `root/` (the input root,
//! where the command runs) and the `stdout` and `stderr` capture files.
//!
//! [`WorkDir::remove`] deletes it, also when the command left directories without write
//! permission; if a run is abandoned without calling it (its future dropped), `Drop` removes
//! the directory on a blocking thread.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_core::Error;

/// Attempts at removing an action directory.
const REMOVE_ATTEMPTS: u32 = 3;

pub(crate) struct WorkDir {
    path: PathBuf,
    removed: bool,
}

impl WorkDir {
    /// Creates a fresh, uniquely named directory (and its `root/`) under `work_root`.
    pub async fn create(work_root: &Path) -> Result<WorkDir, Error> {
        tokio::fs::create_dir_all(work_root)
            .await
            .map_err(|e| Error::io(format!("creating the work root {}", work_root.display()), e))?;
        let path = work_root.join(uuid::Uuid::new_v4().to_string());
        tokio::fs::create_dir(&path).await.map_err(|e| {
            Error::io(
                format!("creating the action directory {}", path.display()),
                e,
            )
        })?;
        let dir = WorkDir {
            path,
            removed: false,
        };
        tokio::fs::create_dir(dir.exec_root())
            .await
            .map_err(|e| Error::io(format!("creating {}", dir.exec_root().display()), e))?;
        Ok(dir)
    }

    /// The input root, and the base of the working directory.
    pub fn exec_root(&self) -> PathBuf {
        self.path.join("root")
    }

    pub fn stdout(&self) -> PathBuf {
        self.path.join("stdout")
    }

    pub fn stderr(&self) -> PathBuf {
        self.path.join("stderr")
    }

    /// Deletes the directory and everything in it; failures are logged. A few attempts: a
    /// blocking task of a cancelled step may still be adding entries for a moment.
    pub async fn remove(mut self) {
        self.removed = true;
        for attempt in 1..=REMOVE_ATTEMPTS {
            let path = self.path.clone();
            let result = tokio::task::spawn_blocking(move || remove_tree(&path))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            match result {
                Ok(()) => return,
                Err(e) if attempt == REMOVE_ATTEMPTS => {
                    tracing::warn!(dir = %self.path.display(), error = %e, "could not remove an action directory");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let path = std::mem::take(&mut self.path);
        let remove = move || {
            if let Err(e) = remove_tree(&path) {
                tracing::warn!(dir = %path.display(), error = %e, "could not remove an action directory");
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
