//! Step 1: materialise the input root in the action's directory and create output parents.
//!
//! Directories and symlinks are created as the tree says (symlink targets as given, never
//! resolved). Input files are read-only: 0444, or 0555 when executable. With a local
//! [`FilesystemStore`], each blob is first brought into it (fetched from the CAS and verified
//! when absent), then each input file is a copy of the store's file of its own: a reflink
//! (`FICLONE`, which shares the blocks until either is written) where the file system has them
//! (btrfs, XFS), else a copy made in the kernel (`copy_file_range`). Never a hard link: a
//! command running as the worker's user (or root) could `chmod` a linked input and rewrite the
//! store's blob under every later action. A blob evicted between lookup and copy is streamed
//! from the CAS instead. Without a local store every file is streamed from the CAS. Output
//! parents are created without following symlinks, so that a symlink in the input tree can
//! never make the worker create directories outside the action's directory.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_core::{Digest, Error};
use cairn_store::filesystem::FilesystemStore;
use cairn_store::Store;
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use crate::error::ActionError;
use crate::input_tree::{InputFile, InputTree};
use crate::spec::{display_rel, CommandSpec};

/// How many blobs are fetched at once.
const FETCH_CONCURRENCY: usize = 16;
const READ_ONLY: u32 = 0o444;
const READ_ONLY_EXECUTABLE: u32 = 0o555;

fn mode_of(f: &InputFile) -> u32 {
    if f.executable {
        READ_ONLY_EXECUTABLE
    } else {
        READ_ONLY
    }
}

/// Writes `tree` under `exec_root` (which exists and is empty).
pub(crate) async fn materialize(
    cas: &dyn Store,
    local: Option<&Arc<FilesystemStore>>,
    local_is_fast_tier: bool,
    fetch_limit: Option<&Arc<tokio::sync::Semaphore>>,
    tree: &InputTree,
    exec_root: &Path,
) -> Result<(), ActionError> {
    // Directories, symlinks and empty files: one blocking task, no fetches.
    let dirs: Vec<PathBuf> = tree.dirs.iter().map(|d| exec_root.join(d)).collect();
    let symlinks: Vec<(PathBuf, String)> = tree
        .symlinks
        .iter()
        .map(|(p, t)| (exec_root.join(p), t.clone()))
        .collect();
    let empty: Vec<(PathBuf, u32)> = tree
        .files
        .iter()
        .filter(|f| f.digest.size() == 0)
        .map(|f| (exec_root.join(&f.path), mode_of(f)))
        .collect();
    if !(dirs.is_empty() && symlinks.is_empty() && empty.is_empty()) {
        blocking(move || create_skeleton(&dirs, &symlinks, &empty)).await?;
    }

    let files: Vec<Placement> = tree
        .files
        .iter()
        .filter(|f| f.digest.size() > 0)
        .map(|f| Placement {
            digest: f.digest,
            dest: exec_root.join(&f.path),
            executable: f.executable,
        })
        .collect();
    let streamed = match local {
        Some(local) => link_from_local(cas, local, local_is_fast_tier, fetch_limit, files).await?,
        None => files,
    };
    futures::stream::iter(streamed)
        .map(|p| async move {
            let _permit = fetch_permit(fetch_limit).await;
            stream_to_file(cas, p).await
        })
        .buffer_unordered(FETCH_CONCURRENCY)
        .try_collect::<()>()
        .await
}

/// A non-empty input file to put in place.
struct Placement {
    digest: Digest,
    dest: PathBuf,
    executable: bool,
}

impl Placement {
    fn mode(&self) -> u32 {
        if self.executable {
            READ_ONLY_EXECUTABLE
        } else {
            READ_ONLY
        }
    }
}

fn create_skeleton(
    dirs: &[PathBuf],
    symlinks: &[(PathBuf, String)],
    empty: &[(PathBuf, u32)],
) -> Result<(), ActionError> {
    for d in dirs {
        std::fs::create_dir(d).map_err(|e| io_error("creating input directory", d, e))?;
    }
    for (p, target) in symlinks {
        std::os::unix::fs::symlink(target, p)
            .map_err(|e| io_error("creating input symlink", p, e))?;
    }
    for (p, mode) in empty {
        std::fs::File::create(p).map_err(|e| io_error("creating input file", p, e))?;
        set_mode(p, *mode)?;
    }
    Ok(())
}

/// Brings every blob of `files` into `local` and copies it into place. Returns
/// the files that must be streamed from the CAS instead (their blob was evicted meanwhile).
/// When `local` is the fast tier of `cas`, reading a blob through `cas` is what brings it
/// into `local` (a blob the tier does not take is streamed).
async fn link_from_local(
    cas: &dyn Store,
    local: &Arc<FilesystemStore>,
    local_is_fast_tier: bool,
    fetch_limit: Option<&Arc<tokio::sync::Semaphore>>,
    files: Vec<Placement>,
) -> Result<Vec<Placement>, ActionError> {
    let absent: Vec<Digest> = files
        .iter()
        .map(|f| f.digest)
        .filter(|d| local.path_of_blob(d).is_none())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    futures::stream::iter(absent)
        .map(|d| async move {
            let _permit = fetch_permit(fetch_limit).await;
            let body = open_in_cas(cas, d).await?;
            let mut body = cairn_core::stream::verified(body, d, true);
            if local_is_fast_tier {
                while let Some(chunk) = body.next().await {
                    chunk.map_err(|e| e.context(format!("reading input {d}")))?;
                }
                return Ok(());
            }
            local.put(&d, body).await.map_err(|e| {
                ActionError::from(e.context(format!("copying input {d} into the local CAS")))
            })
        })
        .buffer_unordered(FETCH_CONCURRENCY)
        .try_collect::<()>()
        .await?;

    let mut linked = Vec::with_capacity(files.len());
    let mut streamed = Vec::new();
    for f in files {
        match local.path_of_blob(&f.digest) {
            Some(src) => linked.push((src, f)),
            None => streamed.push(f),
        }
    }
    if linked.is_empty() {
        return Ok(streamed);
    }
    let evicted = blocking(move || {
        let mut evicted = Vec::new();
        for (src, f) in linked {
            if !place(&src, &f.dest, f.executable)? {
                evicted.push(f);
            }
        }
        Ok(evicted)
    })
    .await?;
    streamed.extend(evicted);
    Ok(streamed)
}

/// A permit of the worker-wide fetch limit (the directory cache's `max_concurrent_fetches`),
/// when there is one.
async fn fetch_permit(
    limit: Option<&Arc<tokio::sync::Semaphore>>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match limit {
        Some(s) => s.clone().acquire_owned().await.ok(),
        None => None,
    }
}

/// Copies `src` to a new file `dest`, read-only (and executable when asked): a reflink where
/// the file system can, else a copy in the kernel. `Ok(false)` when `src` is gone (evicted).
fn place(src: &Path, dest: &Path, executable: bool) -> Result<bool, ActionError> {
    let mut input = match std::fs::File::open(src) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error("opening", src, e)),
    };
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| io_error("creating input file", dest, e))?;
    // SAFETY: ioctl(2) FICLONE takes the source descriptor as its integer argument; both
    // descriptors are open for the whole call.
    let cloned = unsafe { libc::ioctl(output.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) } == 0;
    if !cloned {
        // Not supported here (ext4, tmpfs, another file system): std copies with
        // copy_file_range.
        std::io::copy(&mut input, &mut output)
            .map_err(|e| io_error("copying input file to", dest, e))?;
    }
    let mode = if executable {
        READ_ONLY_EXECUTABLE
    } else {
        READ_ONLY
    };
    output
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error("setting the mode of", dest, e))?;
    Ok(true)
}

async fn open_in_cas(cas: &dyn Store, d: Digest) -> Result<cairn_core::BlobStream, ActionError> {
    match cas.get(&d, 0, None).await {
        Ok(body) => Ok(body),
        // Gone since the check for missing inputs: still a missing blob for the client.
        Err(e) if e.is_not_found() => Err(ActionError::MissingBlobs(vec![d])),
        Err(e) => Err(e.context(format!("reading input {d}")).into()),
    }
}

/// Streams a blob from the CAS into a new file (verified), then sets its mode.
async fn stream_to_file(cas: &dyn Store, p: Placement) -> Result<(), ActionError> {
    let (d, dest, mode) = (p.digest, &p.dest, p.mode());
    let mut body = cairn_core::stream::verified(open_in_cas(cas, d).await?, d, true);
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| io_error("creating input file", dest, e))?;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.context(format!("reading input {d}")))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| io_error("writing input file", dest, e))?;
    }
    file.flush()
        .await
        .map_err(|e| io_error("writing input file", dest, e))?;
    drop(file);
    tokio::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(|e| io_error("setting the mode of", dest, e))
}

/// Creates the working directory and the parent directory of every declared output (not an
/// output directory itself), refusing to pass through anything but a real directory.
pub(crate) async fn create_output_parents(
    exec_root: &Path,
    command: &CommandSpec,
) -> Result<(), ActionError> {
    let mut wanted: Vec<PathBuf> = vec![command.working_directory.clone()];
    for o in &command.outputs {
        wanted.push(o.path.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    // The input root itself exists.
    wanted.retain(|rel| rel.components().next().is_some());
    if wanted.is_empty() {
        return Ok(());
    }
    wanted.sort();
    wanted.dedup();
    let root = exec_root.to_path_buf();
    blocking(move || {
        for rel in &wanted {
            create_dirs_no_follow(&root, rel)?;
        }
        Ok(())
    })
    .await
}

fn create_dirs_no_follow(root: &Path, rel: &Path) -> Result<(), ActionError> {
    let mut cur = root.to_path_buf();
    let mut sofar = PathBuf::new();
    for c in rel.components() {
        cur.push(c);
        sofar.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                let what = if m.file_type().is_symlink() {
                    "a symlink"
                } else {
                    "not a directory"
                };
                return Err(ActionError::invalid(format!(
                    "cannot create the output parent {:?}: {:?} is {what} in the input tree",
                    display_rel(rel),
                    display_rel(&sofar)
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::create_dir(&cur) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("creating output parent", &cur, e)),
            },
            Err(e) => return Err(io_error("reading", &cur, e)),
        }
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<(), ActionError> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error("setting the mode of", p, e))
}

fn io_error(what: &str, p: &Path, e: std::io::Error) -> ActionError {
    Error::io(format!("{what} {}", p.display()), e).into()
}

/// Runs blocking file-system work off the reactor.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ActionError> + Send + 'static,
) -> Result<T, ActionError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ActionError::Other(Error::internal(format!("file-system task failed: {e}"))))?
}
