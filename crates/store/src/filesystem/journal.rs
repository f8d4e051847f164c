//! The journal: every name the store adds to or removes from its prefix directories since the
//! index snapshot began, so that a restart after a crash reads the snapshot and the journal
//! instead of listing every directory that changed (which, with steady writes, is all 256 of
//! them: tens of seconds at ten million blobs).
//!
//! Files `content_path/.cairn-journal-<generation>`, appended with one `write` per put (and one
//! per batch of evictions) and never synced: a write survives the process being killed, since
//! the bytes are in the kernel's page cache. After a reboot the journal is not used (the
//! directories are listed, as without it; see `load.rs`).
//!
//! A record is written *before* the directory operation it announces (the rename of a put, the
//! unlink of an eviction), so a change the journal does not announce happened after its last
//! record (and leaves a later modification time on its directory). A record whose operation
//! may not have happened yet (the process was killed in between) is one written in the last
//! [`checkpoint::MTIME_SLACK`] before its file's last write: those names are stat-ed at
//! restart instead of trusted. A rename that fails after its record is announced is followed
//! by a removal record.
//!
//! Generations: writing a snapshot starts a new journal file first, and the snapshot names
//! it. A restart reads the snapshot, then the files from the one before the snapshot's
//! generation on (a put that wrote its record into the previous file may have indexed its
//! blob after the snapshot read that part of the index). Once a snapshot is written, older
//! files are deleted.
//!
//! Record (little-endian): operation (u8: 1 add, 2 remove), time in ns since the epoch (u64),
//! the snapshot's record (function, hash, digest size, stored length), then the first 4 bytes
//! of the BLAKE3 hash of all that. A record that fails its check, or a file that ends within
//! one, makes the journal unusable: the restart lists the directories changed since the
//! snapshot, as without a journal.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_core::{Digest, DigestFunction};
use parking_lot::RwLock;

use super::snapshot;

/// The journal files' names in the content directory: this, then the generation.
pub(super) const FILE_PREFIX: &str = ".cairn-journal-";
const OP_ADD: u8 = 1;
const OP_REMOVE: u8 = 2;

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// The name was (about to be) renamed into place, with this stored length.
    Add(u64),
    /// The name was (about to be) unlinked.
    Remove,
}

fn file_name(generation: u32) -> String {
    format!("{FILE_PREFIX}{generation}")
}

/// The journal files of `content`, oldest generation first.
pub(super) fn files(content: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(content) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name();
            let generation = name.to_str()?.strip_prefix(FILE_PREFIX)?.parse().ok()?;
            Some((generation, e.path()))
        })
        .collect();
    out.sort_unstable_by_key(|(g, _)| *g);
    out
}

fn encode(out: &mut Vec<u8>, op: u8, time_ns: u64, key: &Digest, len: u64) {
    let start = out.len();
    out.push(op);
    out.extend_from_slice(&time_ns.to_le_bytes());
    snapshot::encode_record(out, key, len);
    let check = blake3::hash(&out[start..]);
    out.extend_from_slice(&check.as_bytes()[..4]);
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// The journal being written.
pub(super) struct Journal {
    content: PathBuf,
    current: RwLock<Current>,
    /// Records written into the current generation.
    records: AtomicU64,
    /// A write failed since the last rotation: the files were removed and nothing is
    /// written until the next rotation starts a new one.
    broken: AtomicBool,
    /// The generation this process started with: older ones are the previous runs'.
    first: u32,
}

struct Current {
    generation: u32,
    file: Option<Arc<File>>,
}

impl Journal {
    /// Starts this run's journal in `content`: a new file after every generation there.
    pub fn start(content: &Path) -> Journal {
        let generation = files(content)
            .last()
            .map_or(0, |(g, _)| *g)
            .saturating_add(1);
        let journal = Journal {
            content: content.to_path_buf(),
            current: RwLock::new(Current {
                generation,
                file: None,
            }),
            records: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            first: generation,
        };
        match journal.create(generation) {
            Ok(file) => journal.current.write().file = Some(Arc::new(file)),
            Err(e) => journal.fail(&e),
        }
        journal
    }

    /// The generation this run started with.
    pub fn first(&self) -> u32 {
        self.first
    }

    fn create(&self, generation: u32) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.content.join(file_name(generation)))
    }

    /// A write failed: every journal file goes (a restart then lists the directories that
    /// changed since the snapshot) and nothing more is written until the next rotation.
    fn fail(&self, e: &std::io::Error) {
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        self.current.write().file = None;
        let mut left = 0;
        for (_, path) in files(&self.content) {
            if std::fs::remove_file(&path).is_err() {
                left += 1;
            }
        }
        tracing::warn!(
            error = %e,
            path = %self.content.display(),
            files_left = left,
            "filesystem store: the journal cannot be written; until the next index snapshot, a restart after a crash lists the directories changed since the last one"
        );
    }

    /// Records written into the current generation.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Records `op` for each of `keys` (one write). Never fails: a journal that cannot be
    /// written is dropped (see [`Journal::fail`]).
    pub fn record(&self, op: Op, keys: &[Digest]) -> u64 {
        if keys.is_empty() {
            return self.records.load(Ordering::Relaxed);
        }
        let Some(file) = self.current.read().file.clone() else {
            return 0;
        };
        let time = now_ns();
        let mut buf = Vec::with_capacity(keys.len() * 70);
        for key in keys {
            match op {
                Op::Add(len) => encode(&mut buf, OP_ADD, time, key, len),
                Op::Remove => encode(&mut buf, OP_REMOVE, time, key, 0),
            }
        }
        // One write with O_APPEND: the records of concurrent writers never interleave.
        if let Err(e) = (&*file).write_all(&buf) {
            self.fail(&e);
            return 0;
        }
        self.records.fetch_add(keys.len() as u64, Ordering::Relaxed) + keys.len() as u64
    }

    /// Starts a new generation, before a snapshot is written: its number, to be named by the
    /// snapshot, or 0 when the snapshot must not rely on the journal (it was broken since the
    /// last rotation, or the new file cannot be made).
    pub fn rotate(&self) -> u32 {
        let mut current = self.current.write();
        let next = current.generation.saturating_add(1);
        let was_broken = self.broken.load(Ordering::Acquire);
        match self.create(next) {
            Ok(file) => {
                current.generation = next;
                current.file = Some(Arc::new(file));
                self.records.store(0, Ordering::Relaxed);
                self.broken.store(false, Ordering::Release);
                if was_broken {
                    0
                } else {
                    next
                }
            }
            Err(e) => {
                drop(current);
                self.fail(&e);
                0
            }
        }
    }

    /// Deletes the files of generations before `generation`.
    pub fn remove_before(&self, generation: u32) {
        for (g, path) in files(&self.content) {
            if g < generation {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Why a journal cannot be used.
#[derive(Debug)]
pub(super) struct Unusable(pub String);

/// Reads the journal file at `path`, calling `each` with every record in order and whether it
/// may announce an operation that never happened (it is recent: stat its name).
pub(super) fn read(path: &Path, mut each: impl FnMut(Op, &Digest, bool)) -> Result<u64, Unusable> {
    let file =
        File::open(path).map_err(|e| Unusable(format!("opening {}: {e}", path.display())))?;
    let modified = file
        .metadata()
        .and_then(|m| m.modified())
        .map_err(|e| Unusable(format!("stat {}: {e}", path.display())))?;
    let recent_from = modified
        .checked_sub(super::checkpoint::MTIME_SLACK)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as u64;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(128);
    let mut n = 0u64;
    let bad = |n: u64, why: &str| Unusable(format!("{}: record {n}: {why}", path.display()));
    loop {
        buf.clear();
        buf.resize(10, 0);
        match read_full(&mut r, &mut buf) {
            Ok(0) => return Ok(n),
            Ok(10) => {}
            Ok(_) => return Err(bad(n, "ends within a record")),
            Err(e) => return Err(bad(n, &e.to_string())),
        }
        let op = buf[0];
        let time = u64::from_le_bytes(buf[1..9].try_into().unwrap_or_default());
        let Some(function) = DigestFunction::ALL.get(buf[9] as usize) else {
            return Err(bad(n, "an unknown digest function"));
        };
        let rest = function.hash_len() + 16 + 4;
        buf.resize(10 + rest, 0);
        match read_full(&mut r, &mut buf[10..]) {
            Ok(k) if k == rest => {}
            Ok(_) => return Err(bad(n, "ends within a record")),
            Err(e) => return Err(bad(n, &e.to_string())),
        }
        let body = buf.len() - 4;
        if buf[body..] != blake3::hash(&buf[..body]).as_bytes()[..4] {
            return Err(bad(n, "its checksum does not match"));
        }
        let mut record = &buf[9..body];
        let Some((key, len)) = snapshot::decode_record(&mut record) else {
            return Err(bad(n, "a bad name"));
        };
        let op = match op {
            OP_ADD => Op::Add(len),
            OP_REMOVE => Op::Remove,
            _ => return Err(bad(n, "an unknown operation")),
        };
        each(op, &key, time >= recent_from);
        n += 1;
    }
}

/// Reads until `buf` is full or the end: the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u32) -> Digest {
        DigestFunction::Sha256.compute(&i.to_le_bytes())
    }

    fn read_all(path: &Path) -> Result<Vec<(Op, Digest, bool)>, Unusable> {
        let mut out = Vec::new();
        read(path, |op, key, recent| out.push((op, *key, recent)))?;
        Ok(out)
    }

    #[test]
    fn records_round_trip_across_generations() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(dir.path());
        assert_eq!(j.first(), 1);
        assert_eq!(j.record(Op::Add(5), &[d(1)]), 1);
        let blake = DigestFunction::Blake3.compute(b"b3");
        j.record(Op::Add(7), &[blake]);
        assert_eq!(j.record(Op::Remove, &[d(1), d(2)]), 4);
        assert_eq!(j.rotate(), 2);
        j.record(Op::Add(9), &[d(3)]);
        let f = files(dir.path());
        assert_eq!(f.iter().map(|(g, _)| *g).collect::<Vec<_>>(), [1, 2]);
        let first = read_all(&f[0].1).unwrap();
        assert_eq!(
            first.iter().map(|(o, k, _)| (*o, *k)).collect::<Vec<_>>(),
            [
                (Op::Add(5), d(1)),
                (Op::Add(7), blake),
                (Op::Remove, d(1)),
                (Op::Remove, d(2))
            ]
        );
        // Just written: every record is recent.
        assert!(first.iter().all(|(_, _, recent)| *recent));
        assert_eq!(read_all(&f[1].1).unwrap().len(), 1);
        // A new run starts after the last generation; older files go when asked.
        assert_eq!(Journal::start(dir.path()).first(), 3);
        j.remove_before(2);
        assert_eq!(
            files(dir.path())
                .iter()
                .map(|(g, _)| *g)
                .collect::<Vec<_>>(),
            [2, 3]
        );
    }

    #[test]
    fn a_torn_or_garbled_journal_is_unusable_never_misread() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(dir.path());
        for i in 0..50 {
            j.record(Op::Add(i as u64), &[d(i)]);
        }
        let path = files(dir.path())[0].1.clone();
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(read_all(&path).unwrap().len(), 50);
        // Cut anywhere inside a record, or one byte flipped anywhere: refused.
        for cut in [1, 9, 10, 40, whole.len() - 1] {
            std::fs::write(&path, &whole[..whole.len() - cut]).unwrap();
            assert!(read_all(&path).is_err(), "cut {cut}");
        }
        for at in (0..whole.len()).step_by(7) {
            let mut bad = whole.clone();
            bad[at] ^= 0x41;
            std::fs::write(&path, &bad).unwrap();
            assert!(read_all(&path).is_err(), "flip at {at}");
        }
        // Garbage of every length: refused or read, never a panic.
        for len in 0..300 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            std::fs::write(&path, &junk).unwrap();
            let _ = read_all(&path);
        }
    }

    #[test]
    fn a_journal_that_cannot_be_written_is_dropped_and_the_next_snapshot_does_not_rely_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(dir.path());
        j.record(Op::Add(1), &[d(1)]);
        j.fail(&std::io::Error::other("disk full"));
        assert!(files(dir.path()).is_empty(), "its files are removed");
        assert_eq!(j.record(Op::Add(1), &[d(2)]), 0);
        // The rotation after the failure makes a new file, which the snapshot must not name
        // (what happened while broken is in no journal); the one after may.
        assert_eq!(j.rotate(), 0);
        j.record(Op::Add(1), &[d(3)]);
        assert_eq!(j.rotate(), 3);
    }
}
