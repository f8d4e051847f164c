//! The input root of an action, read from the CAS as one flat list of entries.
//!
//! [`fetch_tree`] reads the root `Directory` and its descendants level by level, with bounded
//! concurrency and each distinct `Directory` fetched once, and checks every entry name. A
//! missing `Directory` is recorded, not fatal, so that [`find_missing_files`] can then ask the
//! stores about every file in one `has_many` each, and the caller can report every missing
//! digest in one PreconditionFailure.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction, Error};
use cairn_store::filesystem::FilesystemStore;
use cairn_store::{Store, StoreExt};
use futures::{StreamExt, TryStreamExt};
use prost::Message;

use crate::error::ActionError;
use crate::spec::{check_entry_name, display_rel};

/// How many `Directory` blobs are fetched at once.
const FETCH_CONCURRENCY: usize = 32;
/// Largest `Directory` proto read into memory.
const MAX_DIRECTORY_BYTES: usize = 64 << 20;
/// Most entries (files, directories, symlinks) an input tree may expand to. Content
/// addressing rules out cycles, but a small DAG can still name an enormous tree.
const MAX_ENTRIES: usize = 4_000_000;

/// A file of the input root.
#[derive(Debug, Clone)]
pub(crate) struct InputFile {
    /// Relative to the input root.
    pub path: PathBuf,
    pub digest: Digest,
    pub executable: bool,
}

/// The expanded input root.
#[derive(Debug, Default)]
pub(crate) struct InputTree {
    /// Subdirectories relative to the input root, each after its parent.
    pub dirs: Vec<PathBuf>,
    pub files: Vec<InputFile>,
    /// (path relative to the input root, target as given).
    pub symlinks: Vec<(PathBuf, String)>,
    /// `Directory` blobs that are not in the CAS (their contents are not listed).
    pub missing_dirs: Vec<Digest>,
}

/// Reads the tree under `root` from `cas`.
pub(crate) async fn fetch_tree(cas: &dyn Store, root: Digest) -> Result<InputTree, ActionError> {
    let function = root.function();
    let mut tree = InputTree::default();
    let mut known: HashMap<Digest, Option<Arc<re::Directory>>> = HashMap::new();
    let mut level: Vec<(PathBuf, Digest)> = vec![(PathBuf::new(), root)];
    let mut entries = 0usize;
    while !level.is_empty() {
        let wanted: Vec<Digest> = level
            .iter()
            .map(|(_, d)| *d)
            .filter(|d| !known.contains_key(d))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let fetched: Vec<(Digest, Option<re::Directory>)> = futures::stream::iter(wanted)
            .map(|d| async move { fetch_directory(cas, d).await.map(|dir| (d, dir)) })
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        for (d, dir) in fetched {
            if dir.is_none() {
                tree.missing_dirs.push(d);
            }
            known.insert(d, dir.map(Arc::new));
        }
        let mut next = Vec::new();
        for (path, digest) in level {
            let Some(Some(dir)) = known.get(&digest) else {
                continue;
            };
            entries += dir.files.len() + dir.directories.len() + dir.symlinks.len();
            if entries > MAX_ENTRIES {
                return Err(ActionError::invalid(format!(
                    "the input root {root} expands to more than {MAX_ENTRIES} entries"
                )));
            }
            expand(function, &path, digest, dir, &mut tree, &mut next)?;
        }
        level = next;
    }
    tree.missing_dirs.sort();
    tree.missing_dirs.dedup();
    Ok(tree)
}

/// One `Directory`, or `None` when the CAS does not have it.
async fn fetch_directory(cas: &dyn Store, d: Digest) -> Result<Option<re::Directory>, ActionError> {
    // The empty blob is always present (an empty input root is common), whatever the store.
    if d.is_empty_blob() {
        return Ok(Some(re::Directory::default()));
    }
    let bytes = match cas.get_all(&d, MAX_DIRECTORY_BYTES).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.context(format!("reading input Directory {d}")).into()),
    };
    re::Directory::decode(bytes).map(Some).map_err(|e| {
        ActionError::invalid(format!(
            "input Directory {d} is not a valid Directory proto: {e}"
        ))
    })
}

/// Adds the entries of one directory at `path` to `tree`, and its subdirectories to `next`.
fn expand(
    function: DigestFunction,
    path: &std::path::Path,
    digest: Digest,
    dir: &re::Directory,
    tree: &mut InputTree,
    next: &mut Vec<(PathBuf, Digest)>,
) -> Result<(), ActionError> {
    let mut names = HashSet::new();
    let mut name = |n: &str| -> Result<PathBuf, ActionError> {
        check_entry_name(path, n)?;
        if !names.insert(n.to_string()) {
            return Err(ActionError::invalid(format!(
                "input Directory {digest} at {:?} has two entries named {n:?}",
                display_rel(path)
            )));
        }
        Ok(path.join(n))
    };
    let parse = |what: &str, p: &PathBuf, d: &Option<re::Digest>| -> Result<Digest, ActionError> {
        let d = d.as_ref().ok_or_else(|| {
            ActionError::invalid(format!("input {what} {:?} has no digest", display_rel(p)))
        })?;
        Digest::from_proto_with(function, d).map_err(|e: Error| {
            ActionError::invalid(format!("input {what} {:?}: {}", display_rel(p), e.message))
        })
    };
    for f in &dir.files {
        let p = name(&f.name)?;
        let digest = parse("file", &p, &f.digest)?;
        tree.files.push(InputFile {
            path: p,
            digest,
            executable: f.is_executable,
        });
    }
    for s in &dir.symlinks {
        let p = name(&s.name)?;
        if s.target.is_empty() || s.target.contains('\0') {
            return Err(ActionError::invalid(format!(
                "input symlink {:?} has an invalid target {:?}",
                display_rel(&p),
                s.target
            )));
        }
        tree.symlinks.push((p, s.target.clone()));
    }
    for d in &dir.directories {
        let p = name(&d.name)?;
        let digest = parse("directory", &p, &d.digest)?;
        tree.dirs.push(p.clone());
        next.push((p, digest));
    }
    Ok(())
}

/// The distinct file digests of `files` that neither `local` nor `cas` holds (the empty blob
/// is never missing: it is written without a fetch). One `has_many` per store.
pub(crate) async fn find_missing_files(
    cas: &dyn Store,
    local: Option<&FilesystemStore>,
    files: &[InputFile],
) -> Result<Vec<Digest>, ActionError> {
    let mut unique: Vec<Digest> = files
        .iter()
        .map(|f| f.digest)
        .filter(|d| d.size() > 0)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    unique.sort();
    if let Some(local) = local {
        let sizes = local
            .has_many(&unique)
            .await
            .map_err(|e| e.context("looking up inputs in the local CAS"))?;
        unique = unique
            .into_iter()
            .zip(sizes)
            .filter_map(|(d, s)| s.is_none().then_some(d))
            .collect();
    }
    if unique.is_empty() {
        return Ok(vec![]);
    }
    let sizes = cas
        .has_many(&unique)
        .await
        .map_err(|e| e.context("looking up inputs in the CAS"))?;
    Ok(unique
        .into_iter()
        .zip(sizes)
        .filter_map(|(d, s)| s.is_none().then_some(d))
        .collect())
}
