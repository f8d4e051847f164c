//! Where a blob's file lives under `content_path`, and the older layouts it is moved from.
//!
//! Current layout: `content_path/<pp>/<function>-<hash>-<size>`, where `<pp>` is the first two
//! hex digits of the hash: 256 prefix directories, made when the store opens. Why one level of
//! 256: a directory is one lock for every create, rename and unlink in it, so 256 of them let
//! puts and evictions of different blobs proceed side by side; ext4 without the `large_dir`
//! feature refuses entries past about 10 million in one directory (a two-level hash tree),
//! which 256 directories push past 2.5 billion files; a listing or a directory-change check
//! can be done one prefix at a time. At 50 million blobs a prefix directory holds about
//! 200,000 names, which hashed directories (ext4 `dir_index`, XFS, btrfs) look up in O(1). A
//! second level (65,536 directories) would cost 65,536 directories to create, sync and list
//! even for a small cache, for no gain at the sizes a disk holds.
//!
//! Older layouts, read and moved into place in the background (`load.rs`) until
//! `content_path/.cairn-layout` says none is left:
//! - Cairn before the prefix directories: `content_path/<function>-<hash>-<size>`;
//! - NativeLink 1.6.6's filesystem store: `content_path/d/<hash>-<size>` (digest keys; its
//!   `s/` directory of string keys holds nothing Cairn can be asked for and is left alone), and
//!   the flat `content_path/<hash>-<size>` of its earlier versions. Its names do not say the
//!   digest function (NativeLink serves one file for a SHA-256 and a BLAKE3 digest of the same
//!   hash and size), so the bytes decide: the background move hashes each such file with both
//!   functions and files it under the one that matches. A file that matches neither (an action
//!   result, or a blob stored compressed) is filed under SHA-256, NativeLink's default. A
//!   lookup of either function finds a file not moved yet, and moves it under the function it
//!   was asked for: no SHA-256 and BLAKE3 digest share a hash, so the name is the file's.
//!
//! A move is `link(old, new)` then `unlink(old)`: it never replaces a file already at `new`
//! (a put of this run, or an earlier move), it keeps the inode and its modification time (so
//! the LRU order and the after-a-reboot check of `checkpoint.rs` see the same file), and a crash
//! between the two leaves both names of one whole file, which the next start's move resolves.
//! The marker is written only after a `syncfs`, so a power loss cannot undo moves it vouches for.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use cairn_core::{Digest, DigestFunction, Error};

/// Written once no blob is left in an older layout.
pub(super) const MARKER: &str = ".cairn-layout";
const MARKER_TEXT: &str = "prefix-dirs-v1\n";
/// NativeLink's directory of digest-named files.
pub(super) const NATIVELINK_DIGESTS: &str = "d";

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The prefix directory's name of `key`: the first two hex digits of its hash.
pub(super) fn prefix(key: &Digest) -> [u8; 2] {
    let b = key.hash().first().copied().unwrap_or(0);
    [HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]
}

fn prefix_str(p: &[u8; 2]) -> &str {
    // Two ASCII hex digits.
    std::str::from_utf8(p).unwrap_or("00")
}

/// The file of `key` under `content`.
pub fn blob_path(content: &Path, key: &Digest) -> PathBuf {
    let p = prefix(key);
    let mut path = content.join(prefix_str(&p));
    path.push(key.file_name());
    path
}

/// The 256 prefix directories' names, in order.
pub(super) fn prefixes() -> impl Iterator<Item = String> {
    (0..=255u8).map(|b| format!("{b:02x}"))
}

/// Where an older layout may hold `key`.
pub(super) fn legacy_paths(content: &Path, key: &Digest) -> Vec<PathBuf> {
    let mut out = vec![content.join(key.file_name())];
    if NATIVELINK_FUNCTIONS.contains(&key.function()) {
        let name = nativelink_name(key);
        out.push(content.join(NATIVELINK_DIGESTS).join(&name));
        out.push(content.join(name));
    }
    out
}

/// The digest functions NativeLink 1.6.6 stores under names that do not say which.
const NATIVELINK_FUNCTIONS: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

fn nativelink_name(key: &Digest) -> String {
    format!("{}-{}", key.hash_hex(), key.size())
}

/// A file name of an older layout.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LegacyName {
    /// A Cairn name: it says the digest.
    Cairn(Digest),
    /// NativeLink's `<hash>-<size>`, exactly as NativeLink writes it: the digest read as
    /// SHA-256, which [`nativelink_key`] settles from the file's bytes.
    NativeLink(Digest),
}

/// What an older layout's file name stands for.
pub(super) fn legacy_name(name: &str) -> Option<LegacyName> {
    if let Some(d) = Digest::from_file_name(name) {
        return Some(LegacyName::Cairn(d));
    }
    let (hash, size) = name.split_once('-')?;
    if hash.len() != 64 {
        return None;
    }
    let d = Digest::parse(DigestFunction::Sha256, hash, size.parse().ok()?).ok()?;
    (nativelink_name(&d) == name).then_some(LegacyName::NativeLink(d))
}

/// The digest of NativeLink's file at `path`, named `as_sha256` (its name read as SHA-256): the
/// function whose hash of the bytes is the name's, SHA-256 when none is (or the file cannot be
/// read: it is then found, or not, as before). Reads the file once. Blocking.
pub(super) fn nativelink_key(path: &Path, as_sha256: &Digest) -> Digest {
    super::checkpoint::hash_file(path, &NATIVELINK_FUNCTIONS, as_sha256.size())
        .and_then(|digests| {
            digests
                .into_iter()
                .find(|d| d.hash() == as_sha256.hash() && d.size() == as_sha256.size())
        })
        .unwrap_or(*as_sha256)
}

/// Whether `content` is known to hold no blob in an older layout.
pub(super) fn is_current(content: &Path) -> bool {
    std::fs::read_to_string(content.join(MARKER)).is_ok_and(|t| t == MARKER_TEXT)
}

/// The modification time of each prefix directory (by the hash's first byte), `None` when it
/// cannot be read.
pub(super) type DirTimes = Box<[Option<std::time::SystemTime>; 256]>;

/// Makes the 256 prefix directories (those missing) and syncs `content` when it made any;
/// their modification times as they are now (before the store changes anything).
pub(super) fn make_prefix_dirs(content: &Path) -> Result<DirTimes, Error> {
    let mut made = false;
    let mut times: DirTimes = Box::new([None; 256]);
    for (i, p) in prefixes().enumerate() {
        let dir = content.join(&p);
        match std::fs::create_dir(&dir) {
            Ok(()) => made = true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
        }
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => times[i] = m.modified().ok(),
            Ok(_) => {
                return Err(Error::io(
                    format!("creating {}", dir.display()),
                    std::io::Error::new(std::io::ErrorKind::AlreadyExists, "not a directory"),
                ))
            }
            Err(e) => return Err(Error::io(format!("stat {}", dir.display()), e)),
        }
    }
    if made {
        sync_dir(content)?;
    }
    Ok(times)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
}

/// What became of a file of an older layout.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Moved {
    /// Now at its place in the current layout.
    Now,
    /// A file was already there (written by this run, or moved before a crash): the old name
    /// was removed, the file in place kept.
    AlreadyThere,
    /// The old name no longer exists (moved or evicted meanwhile).
    Gone,
}

/// Moves `old`, the file of `key` in an older layout, to its place (see the module's doc).
pub(super) fn move_into_place(content: &Path, old: &Path, key: &Digest) -> Result<Moved, Error> {
    let new = blob_path(content, key);
    let moved = match std::fs::hard_link(old, &new) {
        Ok(()) => Moved::Now,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Moved::AlreadyThere,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !old.exists() {
                return Ok(Moved::Gone);
            }
            // The prefix directory is missing (removed by hand): make it, then try once more.
            make_prefix_dirs(content)?;
            match std::fs::hard_link(old, &new) {
                Ok(()) => Moved::Now,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Moved::AlreadyThere,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Moved::Gone),
                Err(e) => {
                    return Err(Error::io(
                        format!("linking {} to {}", old.display(), new.display()),
                        e,
                    ))
                }
            }
        }
        Err(e) => {
            return Err(Error::io(
                format!("linking {} to {}", old.display(), new.display()),
                e,
            ))
        }
    };
    match std::fs::remove_file(old) {
        Ok(()) => Ok(moved),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(moved),
        Err(e) => Err(Error::io(format!("removing {}", old.display()), e)),
    }
}

/// Records that no blob is left in an older layout: `syncfs` (so that no move it vouches for
/// can be undone by a power loss), then the marker (temp file, sync, rename, sync).
pub(super) fn mark_current(content: &Path) -> Result<(), Error> {
    let dir =
        File::open(content).map_err(|e| Error::io(format!("opening {}", content.display()), e))?;
    // SAFETY: syncfs(2) takes a descriptor that `dir` keeps open.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(Error::io(
            format!("syncing the file system of {}", content.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let tmp = content.join(format!("{MARKER}.tmp"));
    let io = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
    let mut file = File::create(&tmp).map_err(|e| io("creating", e))?;
    file.write_all(MARKER_TEXT.as_bytes())
        .map_err(|e| io("writing", e))?;
    file.sync_data().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, content.join(MARKER)).map_err(|e| io("renaming", e))?;
    dir.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", content.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_older_names() {
        let d = DigestFunction::Sha256.compute(b"hello");
        let content = Path::new("/c");
        let hex = d.hash_hex();
        assert_eq!(
            blob_path(content, &d),
            Path::new("/c").join(&hex[..2]).join(d.file_name())
        );
        assert_eq!(prefixes().count(), 256);
        assert!(prefixes().any(|p| p.as_bytes() == prefix(&d)));
        assert_eq!(legacy_name(&d.file_name()), Some(LegacyName::Cairn(d)));
        assert_eq!(
            legacy_name(&format!("{hex}-5")),
            Some(LegacyName::NativeLink(d))
        );
        let b = DigestFunction::Blake3.compute(b"hello");
        assert_eq!(legacy_name(&b.file_name()), Some(LegacyName::Cairn(b)));
        // NativeLink's names hold either function's blobs.
        for key in [d, b] {
            let nl = format!("{}-5", key.hash_hex());
            assert_eq!(
                legacy_paths(content, &key),
                [
                    content.join(key.file_name()),
                    content.join("d").join(&nl),
                    content.join(&nl)
                ]
            );
        }
        // Not as NativeLink writes them: upper case, a leading zero, no size, other lengths.
        for bad in [
            format!("{}-5", hex.to_uppercase()),
            format!("{hex}-05"),
            hex.clone(),
            format!("{}-5", &hex[..40]),
            ".cairn-index".into(),
            "d".into(),
            "ab".into(),
        ] {
            assert_eq!(legacy_name(&bad), None, "{bad}");
        }
    }

    #[test]
    fn the_bytes_say_the_function_of_a_nativelink_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, data: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, data).unwrap();
            path
        };
        let as_sha256 = |d: &Digest| Digest::new(DigestFunction::Sha256, d.hash(), d.size());
        let sha = DigestFunction::Sha256.compute(b"a sha-256 blob");
        assert_eq!(nativelink_key(&file("s", b"a sha-256 blob"), &sha), sha);
        let b3 = DigestFunction::Blake3.compute(b"a blake3 blob");
        let named = as_sha256(&b3);
        assert_eq!(nativelink_key(&file("b", b"a blake3 blob"), &named), b3);
        // An action result (or a compressed blob) is neither function's hash of its bytes:
        // filed under SHA-256, as NativeLink's default.
        let action = DigestFunction::Blake3.compute(b"an action");
        let named = as_sha256(&action);
        assert_eq!(nativelink_key(&file("ac", b"result bytes"), &named), named);
        // Longer than the name says, or gone: SHA-256, without reading past the size.
        let long = as_sha256(&DigestFunction::Blake3.compute(b"a blake3"));
        assert_eq!(nativelink_key(&file("l", b"a blake3 blob"), &long), long);
        assert_eq!(nativelink_key(&dir.path().join("gone"), &sha), sha);
    }

    #[test]
    fn a_move_never_replaces_and_resolves_a_half_done_one() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path();
        make_prefix_dirs(content).unwrap();
        let d = DigestFunction::Sha256.compute(b"blob");
        let old = content.join(d.file_name());
        std::fs::write(&old, b"blob").unwrap();
        assert_eq!(move_into_place(content, &old, &d).unwrap(), Moved::Now);
        assert!(!old.exists());
        assert_eq!(std::fs::read(blob_path(content, &d)).unwrap(), b"blob");
        assert_eq!(move_into_place(content, &old, &d).unwrap(), Moved::Gone);
        // A crash between link and unlink: both names; the file in place is kept.
        std::fs::hard_link(blob_path(content, &d), &old).unwrap();
        assert_eq!(
            move_into_place(content, &old, &d).unwrap(),
            Moved::AlreadyThere
        );
        assert!(!old.exists());
        // A newer file in place (a put of this run) is never replaced by an older one.
        std::fs::write(&old, b"older").unwrap();
        assert_eq!(
            move_into_place(content, &old, &d).unwrap(),
            Moved::AlreadyThere
        );
        assert_eq!(std::fs::read(blob_path(content, &d)).unwrap(), b"blob");
        assert!(!is_current(content));
        mark_current(content).unwrap();
        assert!(is_current(content));
    }
}
