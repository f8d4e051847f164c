//! Step 3: find the declared outputs, hash them, and upload what the CAS lacks.
//!
//! Each output is looked at without following it: a symlink is reported as an `OutputSymlink`
//! with its target as read (even one pointing out of the action's directory); a regular file as
//! an `OutputFile`; a directory as a `Tree` (root and every distinct child `Directory`, entries
//! sorted by name as the REAPI requires; symlinks inside are `SymlinkNode`s, never followed).
//! An output whose parent directory resolves outside the input root is treated as absent, and
//! so is a missing one. Files are hashed in a blocking task, reading in chunks; only blobs the
//! CAS does not already have are uploaded, files streamed from disk.
//!
//! Outputs are capped ([`OutputCaps`]): entries (files, directories and symlinks, those inside
//! output directories included), bytes of files, and how deep an output directory nests. The
//! scan stops at the first cap passed, before anything is hashed further or uploaded, with a
//! RESOURCE_EXHAUSTED naming the cap.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction, Error, CHUNK_SIZE};
use cairn_store::Store;
use futures::{StreamExt, TryStreamExt};
use prost::Message;

use crate::error::ActionError;
use crate::spec::{DeclaredOutput, OutputKind};

/// How many blobs are uploaded at once.
const UPLOAD_CONCURRENCY: usize = 16;
/// Deepest output directory (levels below the output itself): past it, an action's tree
/// would only cost the worker its stack.
pub(crate) const MAX_OUTPUT_DEPTH: usize = 128;

/// What an action's outputs may add up to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutputCaps {
    /// Files, directories and symlinks.
    pub entries: u64,
    /// Bytes of all output files.
    pub bytes: u64,
}

/// What is left of the caps while scanning.
struct Budget {
    caps: OutputCaps,
    entries: u64,
    bytes: u64,
}

impl Budget {
    fn new(caps: OutputCaps) -> Budget {
        Budget {
            caps,
            entries: 0,
            bytes: 0,
        }
    }

    /// Counts one entry of `size` bytes (0 but for a file).
    fn take(&mut self, size: u64) -> Result<(), ActionError> {
        self.entries += 1;
        self.bytes = self.bytes.saturating_add(size);
        if self.entries > self.caps.entries {
            return Err(Error::resource_exhausted(format!(
                "the outputs hold more than {} files, directories and symlinks, this worker's \
                 cap (max_output_files); nothing was uploaded",
                self.caps.entries
            ))
            .into());
        }
        if self.bytes > self.caps.bytes {
            return Err(Error::resource_exhausted(format!(
                "the output files add up to more than {} bytes, this worker's cap \
                 (max_output_bytes); nothing was uploaded",
                self.caps.bytes
            ))
            .into());
        }
        Ok(())
    }
}

/// Where the bytes of a blob to upload are.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    File(PathBuf),
    Bytes(Bytes),
}

/// The outputs of an action, ready for its `ActionResult`, and the blobs they name.
#[derive(Debug, Default)]
pub(crate) struct Outputs {
    pub files: Vec<re::OutputFile>,
    pub directories: Vec<re::OutputDirectory>,
    /// Every output symlink (`output_symlinks`).
    pub symlinks: Vec<re::OutputSymlink>,
    /// Symlinks declared in `output_files` (REAPI 2.0 `output_file_symlinks`).
    pub file_symlinks: Vec<re::OutputSymlink>,
    /// Symlinks declared in `output_directories` (REAPI 2.0 `output_directory_symlinks`).
    pub directory_symlinks: Vec<re::OutputSymlink>,
    pub uploads: Vec<(Digest, Source)>,
}

/// Looks at every declared output under `exec_root`. Blocking: run it off the reactor.
pub(crate) fn scan_outputs(
    exec_root: &Path,
    outputs: &[DeclaredOutput],
    function: DigestFunction,
    directory_blobs: bool,
    caps: OutputCaps,
) -> Result<Outputs, ActionError> {
    let mut budget = Budget::new(caps);
    let root = std::fs::canonicalize(exec_root)
        .map_err(|e| Error::io(format!("resolving {}", exec_root.display()), e))?;
    let mut out = Outputs::default();
    for o in outputs {
        let Some(path) = locate(&root, &o.path) else {
            tracing::debug!(output = %o.name, "output is absent or outside the input root");
            continue;
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("reading output", &path, e)),
        };
        let kind = meta.file_type();
        budget.take(if kind.is_file() { meta.len() } else { 0 })?;
        if kind.is_symlink() {
            let target =
                std::fs::read_link(&path).map_err(|e| io_error("reading symlink", &path, e))?;
            let symlink = re::OutputSymlink {
                path: o.name.clone(),
                target: utf8(&path, target.into_os_string())?,
                node_properties: None,
            };
            match o.kind {
                OutputKind::File => out.file_symlinks.push(symlink.clone()),
                OutputKind::Directory => out.directory_symlinks.push(symlink.clone()),
                OutputKind::Any => {}
            }
            out.symlinks.push(symlink);
        } else if kind.is_file() {
            if o.kind == OutputKind::Directory {
                return Err(mismatch(&o.name, "output_directories", "a regular file"));
            }
            let digest = hash_file(&path, function)?;
            out.files.push(re::OutputFile {
                path: o.name.clone(),
                digest: Some(digest.to_proto()),
                is_executable: is_executable(&meta),
                contents: vec![],
                node_properties: None,
            });
            out.uploads.push((digest, Source::File(path)));
        } else if kind.is_dir() {
            if o.kind == OutputKind::File {
                return Err(mismatch(&o.name, "output_files", "a directory"));
            }
            let mut tree = TreeBuilder {
                function,
                directory_blobs,
                children: Vec::new(),
                seen: HashSet::new(),
                uploads: &mut out.uploads,
                budget: &mut budget,
                output: &o.name,
            };
            let (root_dir, root_digest) = tree.directory(&path, 0)?;
            let children: Vec<re::Directory> = tree.children.into_iter().map(|(_, d)| d).collect();
            if directory_blobs {
                let bytes = Bytes::from(root_dir.encode_to_vec());
                out.uploads.push((root_digest, Source::Bytes(bytes)));
            }
            let tree = re::Tree {
                root: Some(root_dir),
                children,
            };
            let bytes = Bytes::from(tree.encode_to_vec());
            let tree_digest = function.compute(&bytes);
            out.uploads.push((tree_digest, Source::Bytes(bytes)));
            out.directories.push(re::OutputDirectory {
                path: o.name.clone(),
                tree_digest: Some(tree_digest.to_proto()),
                is_topologically_sorted: false,
                root_directory_digest: directory_blobs.then(|| root_digest.to_proto()),
            });
        }
        // Sockets, fifos and devices are not outputs.
    }
    Ok(out)
}

/// The output at `rel` (relative to `root`), with its parent resolved: `None` when the parent
/// does not exist or resolves outside `root` (through a symlink the command made).
fn locate(root: &Path, rel: &Path) -> Option<PathBuf> {
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Some(root.to_path_buf()); // the input root itself
    };
    let parent = std::fs::canonicalize(root.join(parent)).ok()?;
    parent.starts_with(root).then(|| parent.join(name))
}

fn mismatch(name: &str, field: &str, found: &str) -> ActionError {
    Error::failed_precondition(format!(
        "output {name:?} is listed in Command.{field}, but the command left {found} there"
    ))
    .into()
}

fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.permissions().mode() & 0o100 != 0
}

/// Builds the `Directory` protos of an output directory.
struct TreeBuilder<'a> {
    function: DigestFunction,
    /// Whether each child `Directory` is also uploaded as a blob of its own.
    directory_blobs: bool,
    /// Every distinct child `Directory`, in the order first met.
    children: Vec<(Digest, re::Directory)>,
    seen: HashSet<Digest>,
    uploads: &'a mut Vec<(Digest, Source)>,
    budget: &'a mut Budget,
    /// The output's name, for errors.
    output: &'a str,
}

impl TreeBuilder<'_> {
    /// The `Directory` of `path` and its digest; files (and child `Directory` blobs when
    /// wanted) are queued for upload as they are met.
    fn directory(
        &mut self,
        path: &Path,
        depth: usize,
    ) -> Result<(re::Directory, Digest), ActionError> {
        if depth > MAX_OUTPUT_DEPTH {
            return Err(Error::resource_exhausted(format!(
                "output directory {:?} nests deeper than {MAX_OUTPUT_DEPTH} levels, this \
                 worker's cap; nothing was uploaded",
                self.output
            ))
            .into());
        }
        let mut entries = Vec::new();
        for entry in
            std::fs::read_dir(path).map_err(|e| io_error("reading output directory", path, e))?
        {
            let entry = entry.map_err(|e| io_error("reading output directory", path, e))?;
            let name = utf8(&entry.path(), entry.file_name())?;
            entries.push((name, entry));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut dir = re::Directory::default();
        for (name, entry) in entries {
            let p = entry.path();
            let meta = std::fs::symlink_metadata(&p).map_err(|e| io_error("reading", &p, e))?;
            let kind = meta.file_type();
            self.budget
                .take(if kind.is_file() { meta.len() } else { 0 })?;
            if kind.is_symlink() {
                let target =
                    std::fs::read_link(&p).map_err(|e| io_error("reading symlink", &p, e))?;
                dir.symlinks.push(re::SymlinkNode {
                    name,
                    target: utf8(&p, target.into_os_string())?,
                    node_properties: None,
                });
            } else if kind.is_file() {
                let digest = hash_file(&p, self.function)?;
                dir.files.push(re::FileNode {
                    name,
                    digest: Some(digest.to_proto()),
                    is_executable: is_executable(&meta),
                    node_properties: None,
                });
                self.uploads.push((digest, Source::File(p)));
            } else if kind.is_dir() {
                let (child, digest) = self.directory(&p, depth + 1)?;
                dir.directories.push(re::DirectoryNode {
                    name,
                    digest: Some(digest.to_proto()),
                });
                if self.seen.insert(digest) {
                    if self.directory_blobs {
                        let bytes = Bytes::from(child.encode_to_vec());
                        self.uploads.push((digest, Source::Bytes(bytes)));
                    }
                    self.children.push((digest, child));
                }
            }
        }
        let digest = self.function.compute(&dir.encode_to_vec());
        Ok((dir, digest))
    }
}

/// The digest of a captured stdout or stderr file, `None` when it is empty or was never
/// created (the result then names no blob). Blocking.
pub(crate) fn stdio_blob(
    path: &Path,
    function: DigestFunction,
) -> Result<Option<(Digest, Source)>, ActionError> {
    let size = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_error("reading", path, e)),
    };
    if size == 0 {
        return Ok(None);
    }
    let digest = hash_file(path, function)?;
    Ok(Some((digest, Source::File(path.to_path_buf()))))
}

/// Hashes a file in chunks. Blocking.
pub(crate) fn hash_file(path: &Path, function: DigestFunction) -> Result<Digest, ActionError> {
    let mut file = std::fs::File::open(path).map_err(|e| io_error("opening", path, e))?;
    let mut hasher = function.hasher();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error("reading", path, e)),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(hasher.finish_with_size(size))
}

/// Uploads the blobs of `uploads` that `cas` lacks (one `has_many`, then bounded concurrent
/// puts; a file is streamed from disk and must still have the size it was hashed at).
pub(crate) async fn upload(
    cas: &dyn Store,
    uploads: Vec<(Digest, Source)>,
) -> Result<(), ActionError> {
    let mut seen = HashSet::new();
    let uploads: Vec<(Digest, Source)> = uploads
        .into_iter()
        .filter(|(d, _)| seen.insert(*d))
        .collect();
    if uploads.is_empty() {
        return Ok(());
    }
    let keys: Vec<Digest> = uploads.iter().map(|(d, _)| *d).collect();
    let present = cas
        .has_many(&keys)
        .await
        .map_err(|e| e.context("looking up outputs in the CAS"))?;
    futures::stream::iter(
        uploads
            .into_iter()
            .zip(present)
            .filter_map(|(u, p)| p.is_none().then_some(u)),
    )
    .map(|(digest, source)| async move {
        let body = match source {
            Source::Bytes(b) => cairn_core::stream::once(b),
            Source::File(path) => {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| io_error("opening output", &path, e))?;
                let body = tokio_util::io::ReaderStream::with_capacity(file, CHUNK_SIZE)
                    .map(move |r| {
                        r.map_err(|e| Error::io(format!("reading {}", path.display()), e))
                    })
                    .boxed();
                cairn_core::stream::verified(body, digest, false)
            }
        };
        cas.put(&digest, body)
            .await
            .map_err(|e| ActionError::from(e.context(format!("uploading output {digest}"))))
    })
    .buffer_unordered(UPLOAD_CONCURRENCY)
    .try_collect::<()>()
    .await
}

fn utf8(path: &Path, s: std::ffi::OsString) -> Result<String, ActionError> {
    s.into_string().map_err(|s| {
        Error::failed_precondition(format!(
            "output {} has a name or target that is not UTF-8: {s:?}",
            path.display()
        ))
        .into()
    })
}

fn io_error(what: &str, p: &Path, e: std::io::Error) -> ActionError {
    Error::io(format!("{what} {}", p.display()), e).into()
}
