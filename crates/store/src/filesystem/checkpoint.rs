//! Durability of the filesystem store without an `fdatasync` in every put.
//!
//! A put writes its temp file and renames it into place without waiting for the disk. From
//! then on the blob is visible and survives the process being killed (its bytes are in the
//! kernel's page cache, which outlives the process). Surviving a power loss is the job of a
//! background flusher: at most [`FLUSH_DELAY`] after a put it calls `syncfs` on the content
//! directory's file system and then records a *checkpoint* in `content_path/.cairn-checkpoint`:
//! the machine's boot id and the time at which that flush began. Every file written before
//! the checkpoint is whole on disk.
//!
//! After a power loss (or any restart of the machine), a file written after the last
//! checkpoint may have its name on disk without all of its bytes. So at start-up, when the
//! boot id differs from the checkpoint's, each blob modified after the checkpoint (less
//! [`MTIME_SLACK`] for the file system's coarse clock) is read and hashed: one that hashes to
//! its name is kept, any other is deleted. An action-cache entry, named by its action's digest,
//! never hashes to its name: those written in the last moments before a power loss are
//! dropped, which costs a cache miss and never serves a torn result. Within one boot nothing
//! is checked: a killed process loses no written byte.
//!
//! A directory without a checkpoint was written by a Cairn that synced every put, or is new:
//! its files are trusted. A checkpoint is written when the store opens, before any put, so a
//! directory in use always has one. When it has one, the index loads in the background
//! (`load.rs`) and this run's first checkpoint waits until the load has checked every suspect
//! file: a new checkpoint would otherwise vouch for files no one checked.
//!
//! Cost: the client of a put no longer waits for the disk (0.4-1.9 ms per put on the test
//! machine's virtual disk, see BENCHMARKS.md); the flusher's `syncfs` runs once per batch of
//! puts, off every request's path.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_core::{Digest, Error};
use tokio::sync::{mpsc, watch};

/// The checkpoint's file name in the content directory (not a blob name, so the index
/// rebuild skips it).
pub(super) const FILE_NAME: &str = ".cairn-checkpoint";
/// How long the flusher gathers puts before it syncs: a put is safe from power loss at most
/// this long (plus the sync's own time) after it returned.
pub(super) const FLUSH_DELAY: Duration = Duration::from_millis(250);
/// Files modified this long before a checkpoint are checked too: file-system timestamps come
/// from a clock that may lag the one the checkpoint was taken with by a tick. (A wall clock
/// stepped back by more than this while the store runs could hide a file from the check.)
pub(super) const MTIME_SLACK: Duration = Duration::from_secs(2);
/// Where Linux says which boot this is (a new random UUID at each boot).
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// What a checkpoint file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Checkpoint {
    pub boot_id: String,
    /// When the flush that it records began.
    pub time: SystemTime,
}

impl Checkpoint {
    fn encode(&self) -> String {
        let nanos = self
            .time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("boot_id={}\ntime_ns={nanos}\n", self.boot_id)
    }

    fn decode(text: &str) -> Option<Checkpoint> {
        let mut boot_id = None;
        let mut time = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("boot_id", v)) => boot_id = Some(v.to_string()),
                Some(("time_ns", v)) => {
                    let nanos: u64 = v.parse().ok()?;
                    time = Some(UNIX_EPOCH + Duration::from_nanos(nanos));
                }
                _ => {}
            }
        }
        Some(Checkpoint {
            boot_id: boot_id?,
            time: time?,
        })
    }

    /// Reads the checkpoint of `content`. `None` when there is none; an unreadable or
    /// garbled one is treated as a checkpoint of another boot at the beginning of time, so
    /// that every file is checked.
    pub fn read(content: &Path) -> Option<Checkpoint> {
        let unknown = || Checkpoint {
            boot_id: String::new(),
            time: UNIX_EPOCH,
        };
        match std::fs::read_to_string(content.join(FILE_NAME)) {
            Ok(text) => Some(Checkpoint::decode(&text).unwrap_or_else(unknown)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => Some(unknown()),
        }
    }

    /// Writes `self` durably as the checkpoint of `dir` (the open content directory at
    /// `content`): temp file, `fdatasync`, rename, `fsync` of the directory.
    fn write(&self, content: &Path, dir: &File) -> Result<(), Error> {
        let tmp = content.join(format!("{FILE_NAME}.tmp"));
        let path = content.join(FILE_NAME);
        let io = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
        let mut file = File::create(&tmp).map_err(|e| io("creating", e))?;
        file.write_all(self.encode().as_bytes())
            .map_err(|e| io("writing", e))?;
        file.sync_data().map_err(|e| io("syncing", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("renaming", e))?;
        dir.sync_all()
            .map_err(|e| Error::io(format!("syncing {}", content.display()), e))
    }
}

/// This boot's id; empty when the system does not say (then every start-up after a
/// checkpoint checks the files written after it).
pub(super) fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID_PATH)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The time after which files of `content` may be torn, given its checkpoint: `None` when
/// every file is whole (no checkpoint, or one of this boot).
pub(super) fn suspect_after(checkpoint: Option<&Checkpoint>, boot_id: &str) -> Option<SystemTime> {
    let c = checkpoint?;
    if !boot_id.is_empty() && c.boot_id == boot_id {
        return None;
    }
    Some(c.time.checked_sub(MTIME_SLACK).unwrap_or(UNIX_EPOCH))
}

/// Whether the file at `path` holds exactly the blob `key` (read and hashed whole).
pub(super) fn holds(path: &Path, key: &Digest) -> bool {
    hash_file(path, &[key.function()], key.size()).is_some_and(|d| d[0] == *key)
}

/// The digests under `functions` of the file at `path`, read once; `None` when it cannot be
/// read or is longer than `limit` bytes (not read past it).
pub(super) fn hash_file(
    path: &Path,
    functions: &[cairn_core::DigestFunction],
    limit: u64,
) -> Option<Vec<Digest>> {
    let mut file = File::open(path).ok()?;
    let mut hashers: Vec<_> = functions.iter().map(|f| f.hasher()).collect();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                for h in &mut hashers {
                    h.update(&buf[..n]);
                }
                size += n as u64;
                if size > limit {
                    return None;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(
        hashers
            .into_iter()
            .map(|h| h.finish_with_size(size))
            .collect(),
    )
}

/// Flushes the content directory's file system after puts and records checkpoints.
pub(super) struct Flusher {
    wrote: mpsc::Sender<()>,
    #[cfg(test)]
    checkpoints: watch::Receiver<SystemTime>,
}

impl Flusher {
    /// Starts the flusher task. Without a checkpoint in `content`, first syncs its file system
    /// and writes one, so that a directory in use always has one. With one, the first flush
    /// runs in the task, and only once `allowed` is true: the start-up load sets it when every
    /// file that may be torn (after a reboot) was checked. Until then the previous checkpoint
    /// stays, so a crash in the meantime leaves those files, and this run's, to be checked
    /// again. The task ends, after a last flush of what is pending, when the `Flusher` is
    /// dropped (and without one when `allowed` was dropped before it became true).
    /// Must be called from within a tokio runtime.
    pub async fn start(
        content: &Path,
        mut allowed: watch::Receiver<bool>,
        after_flush: AfterFlush,
    ) -> Result<Flusher, Error> {
        let dir = Arc::new(
            File::open(content)
                .map_err(|e| Error::io(format!("opening {}", content.display()), e))?,
        );
        let target = Target {
            content: content.into(),
            dir,
            boot_id: boot_id().into(),
            after: after_flush,
        };
        let first_now = Checkpoint::read(content).is_none();
        let first = if first_now {
            flush(target.clone()).await?
        } else {
            UNIX_EPOCH
        };
        let (wrote, mut pending) = mpsc::channel(1);
        let (done, _checkpoints) = watch::channel(first);
        tokio::spawn(async move {
            if !first_now {
                if allowed.wait_for(|&a| a).await.is_err() {
                    return;
                }
                // The first checkpoint of this run covers the puts made while waiting.
                let _ = pending.try_recv();
                match flush(target.clone()).await {
                    Ok(time) => {
                        done.send_replace(time);
                    }
                    Err(e) => tracing::warn!(error = %e, "filesystem store: flush failed"),
                }
            }
            while pending.recv().await.is_some() {
                tokio::time::sleep(FLUSH_DELAY).await;
                // The puts of the delay are covered by this flush.
                let _ = pending.try_recv();
                match flush(target.clone()).await {
                    Ok(time) => {
                        done.send_replace(time);
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "filesystem store: flush failed; blobs written since the last checkpoint are checked after a reboot"
                    ),
                }
            }
        });
        Ok(Flusher {
            wrote,
            #[cfg(test)]
            checkpoints: _checkpoints,
        })
    }

    /// Notes that a put renamed a blob into place.
    pub fn wrote(&self) {
        // Full means a flush is already pending, and it will cover this put.
        let _ = self.wrote.try_send(());
    }

    /// The time of the latest checkpoint, changing with each new one.
    #[cfg(test)]
    pub fn checkpoints(&self) -> watch::Receiver<SystemTime> {
        self.checkpoints.clone()
    }
}

/// What runs (on a blocking thread) after each flush.
pub(super) type AfterFlush = Arc<dyn Fn() + Send + Sync>;

/// What a flush works on.
#[derive(Clone)]
struct Target {
    content: Arc<Path>,
    /// The open content directory.
    dir: Arc<File>,
    boot_id: Arc<str>,
    after: AfterFlush,
}

/// `syncfs` on the content directory's file system, then a checkpoint at the time the sync
/// began, then `after`; returns that time.
async fn flush(target: Target) -> Result<SystemTime, Error> {
    let Target {
        content,
        dir,
        boot_id,
        after,
    } = target;
    tokio::task::spawn_blocking(move || {
        let began = SystemTime::now();
        // SAFETY: syncfs(2) takes a descriptor that `dir` keeps open.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(Error::io(
                format!("syncing the file system of {}", content.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Checkpoint {
            boot_id: boot_id.to_string(),
            time: began,
        }
        .write(&content, &dir)?;
        after();
        Ok(began)
    })
    .await
    .map_err(|e| Error::internal(format!("filesystem flush task failed: {e}")))?
}

/// Replaces the checkpoint of `content`, as a test that plays a reboot needs.
#[cfg(test)]
pub(super) fn forge(content: &Path, checkpoint: &Checkpoint) {
    std::fs::write(content.join(FILE_NAME), checkpoint.encode()).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_garbage_means_check_everything() {
        let c = Checkpoint {
            boot_id: "b1".into(),
            time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
        };
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c));
        assert_eq!(Checkpoint::decode("boot_id=x\n"), None);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Checkpoint::read(dir.path()), None);
        std::fs::write(dir.path().join(FILE_NAME), "half a").unwrap();
        let garbled = Checkpoint::read(dir.path()).unwrap();
        assert!(suspect_after(Some(&garbled), "b1").unwrap() <= UNIX_EPOCH);
    }

    #[test]
    fn only_a_checkpoint_of_another_boot_makes_files_suspect() {
        let t = UNIX_EPOCH + Duration::from_secs(1_000);
        let c = Checkpoint {
            boot_id: "b1".into(),
            time: t,
        };
        assert_eq!(suspect_after(None, "b1"), None);
        assert_eq!(suspect_after(Some(&c), "b1"), None);
        assert_eq!(suspect_after(Some(&c), "b2"), Some(t - MTIME_SLACK));
        // A system that does not say which boot it is: always check.
        assert_eq!(suspect_after(Some(&c), ""), Some(t - MTIME_SLACK));
        assert!(!boot_id().is_empty(), "Linux names its boot");
    }
}
