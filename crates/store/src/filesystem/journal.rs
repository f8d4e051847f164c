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
//! may not have happened (the process was killed in between) is one that no *done mark*
//! follows: a mark is written when no announced operation is unfinished (with the next record,
//! and after each background flush of the disk), and vouches for every record before it in its
//! file. Records after a file's last mark are stat-ed at restart instead of trusted. A rename
//! that fails after its record is announced is followed by a removal record.
//!
//! Generations: writing a snapshot starts a new journal file first, and the snapshot names
//! it. A put's operation lasts from its record to its index entry, so the snapshot waits until
//! the operations announced in the previous file are finished before it reads the index; once
//! it is written, the older files are deleted. A restart reads the snapshot, then the files
//! from the one before the snapshot's generation on (kept when that wait timed out).
//!
//! Record (little-endian): operation (u8: 1 add, 2 remove, 3 done), for an add or a removal
//! the snapshot's record (function, hash, digest size, stored length), then the first 4 bytes
//! of the BLAKE3 hash of all that. A record that fails its check, or a file that ends within
//! one, makes the journal unusable: the restart lists the directories changed since the
//! snapshot, as without a journal.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use cairn_core::{Digest, DigestFunction};
use parking_lot::Mutex;

use super::snapshot;

/// The journal files' names in the content directory: this, then the generation.
pub(super) const FILE_PREFIX: &str = ".cairn-journal-";
const OP_ADD: u8 = 1;
const OP_REMOVE: u8 = 2;
const OP_DONE: u8 = 3;

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

fn encode(out: &mut Vec<u8>, op: u8, name: Option<(&Digest, u64)>) {
    let start = out.len();
    out.push(op);
    if let Some((key, len)) = name {
        snapshot::encode_record(out, key, len);
    }
    let check = blake3::hash(&out[start..]);
    out.extend_from_slice(&check.as_bytes()[..4]);
}

/// The journal being written.
pub(super) struct Journal {
    content: PathBuf,
    /// The file written, locked for each write: the order of the records in the file is the
    /// order in which they were announced, and a done mark is written only when nothing
    /// announced before it is unfinished.
    current: Mutex<Current>,
    /// Records written into the current generation.
    records: AtomicU64,
    /// Announced operations not finished yet (their [`Pending`] not dropped), by the parity of
    /// the generation they were recorded in.
    in_flight: Arc<[AtomicU64; 2]>,
    /// A write failed since the last rotation: the files were removed and nothing is
    /// written until the next rotation starts a new one.
    broken: AtomicBool,
    /// The generation this process started with: older ones are the previous runs'.
    first: u32,
}

struct Current {
    /// Its parity says which count of `in_flight` its operations go to.
    generation: u32,
    file: Option<Arc<File>>,
    /// Records were written since the last done mark.
    unmarked: bool,
}

/// An announced operation: finished when dropped (a put's once its blob is renamed and
/// indexed, an eviction's once its files are unlinked).
pub(super) struct Pending {
    in_flight: Arc<[AtomicU64; 2]>,
    parity: usize,
    /// Records in the current generation, this one's included.
    pub records: u64,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.in_flight[self.parity].fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a snapshot waits for the operations of the previous generation to finish.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Journal {
    /// Starts this run's journal in `content`: a new file after every generation there.
    pub fn start(content: &Path) -> Journal {
        let generation = files(content)
            .last()
            .map_or(0, |(g, _)| *g)
            .saturating_add(1);
        let journal = Journal {
            content: content.to_path_buf(),
            current: Mutex::new(Current {
                generation,
                file: None,
                unmarked: false,
            }),
            records: AtomicU64::new(0),
            in_flight: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
            broken: AtomicBool::new(false),
            first: generation,
        };
        match journal.create(generation) {
            Ok(file) => journal.current.lock().file = Some(Arc::new(file)),
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
        self.current.lock().file = None;
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

    fn unfinished(&self) -> u64 {
        self.in_flight[0].load(Ordering::Acquire) + self.in_flight[1].load(Ordering::Acquire)
    }

    /// Waits (up to [`DRAIN_WAIT`]) until every operation recorded in generations of the
    /// parity of `generation` is finished: whether they are. Blocking.
    pub fn drain(&self, generation: u32) -> bool {
        let count = &self.in_flight[(generation & 1) as usize];
        let deadline = std::time::Instant::now() + DRAIN_WAIT;
        while count.load(Ordering::Acquire) != 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Announces `op` for each of `keys` (one write; after a done mark when nothing announced
    /// before is unfinished). The operation is finished when the returned [`Pending`] is
    /// dropped. Never fails: a journal that cannot be written is dropped (see
    /// [`Journal::fail`]).
    pub fn record(&self, op: Op, keys: &[Digest]) -> Pending {
        let mut buf = Vec::with_capacity(5 + keys.len() * 64);
        let mut current = self.current.lock();
        let mark = current.unmarked && self.unfinished() == 0;
        let parity = (current.generation & 1) as usize;
        self.in_flight[parity].fetch_add(1, Ordering::AcqRel);
        let mut pending = Pending {
            in_flight: self.in_flight.clone(),
            parity,
            records: 0,
        };
        let Some(file) = current.file.clone() else {
            return pending;
        };
        if mark {
            encode(&mut buf, OP_DONE, None);
        }
        for key in keys {
            match op {
                Op::Add(len) => encode(&mut buf, OP_ADD, Some((key, len))),
                Op::Remove => encode(&mut buf, OP_REMOVE, Some((key, 0))),
            }
        }
        // One write with O_APPEND, under the lock: records never interleave.
        if let Err(e) = (&*file).write_all(&buf) {
            drop(current);
            self.fail(&e);
            return pending;
        }
        current.unmarked = !keys.is_empty() || current.unmarked && !mark;
        pending.records =
            self.records.fetch_add(keys.len() as u64, Ordering::Relaxed) + keys.len() as u64;
        pending
    }

    /// Writes a done mark if records were written since the last one and every announced
    /// operation is finished (after a flush of the disk: the last puts before a quiet spell
    /// are then vouched for).
    pub fn mark_done(&self) {
        let mut current = self.current.lock();
        if !current.unmarked || self.unfinished() != 0 {
            return;
        }
        let Some(file) = current.file.clone() else {
            return;
        };
        let mut buf = Vec::with_capacity(5);
        encode(&mut buf, OP_DONE, None);
        if let Err(e) = (&*file).write_all(&buf) {
            drop(current);
            self.fail(&e);
            return;
        }
        current.unmarked = false;
    }

    /// Starts a new generation, before a snapshot is written: its number, to be named by the
    /// snapshot, or 0 when the snapshot must not rely on the journal (it was broken since the
    /// last rotation, or the new file cannot be made).
    pub fn rotate(&self) -> u32 {
        let mut current = self.current.lock();
        // The file ends with a mark if it can: its last records need no stat at a restart.
        if let (true, 0, Some(file)) =
            (current.unmarked, self.unfinished(), current.file.as_deref())
        {
            let mut buf = Vec::with_capacity(5);
            encode(&mut buf, OP_DONE, None);
            let _ = (&*file).write_all(&buf);
        }
        let next = current.generation.saturating_add(1);
        let was_broken = self.broken.load(Ordering::Acquire);
        match self.create(next) {
            Ok(file) => {
                current.generation = next;
                current.file = Some(Arc::new(file));
                current.unmarked = false;
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
/// may announce an operation that never happened (no done mark follows it: stat its name).
/// The records a mark vouches for are handed over when the mark is read; the rest at the end.
pub(super) fn read(path: &Path, mut each: impl FnMut(Op, &Digest, bool)) -> Result<u64, Unusable> {
    let file =
        File::open(path).map_err(|e| Unusable(format!("opening {}: {e}", path.display())))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(128);
    let mut unvouched: Vec<(Op, Digest)> = Vec::new();
    let mut n = 0u64;
    let bad = |n: u64, why: &str| Unusable(format!("{}: record {n}: {why}", path.display()));
    loop {
        buf.clear();
        buf.resize(1, 0);
        match read_full(&mut r, &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(bad(n, &e.to_string())),
        }
        let op = buf[0];
        let rest = match op {
            OP_DONE => 4,
            OP_ADD | OP_REMOVE => {
                buf.resize(2, 0);
                match read_full(&mut r, &mut buf[1..]) {
                    Ok(1) => {}
                    Ok(_) => return Err(bad(n, "ends within a record")),
                    Err(e) => return Err(bad(n, &e.to_string())),
                }
                let Some(function) = DigestFunction::ALL.get(buf[1] as usize) else {
                    return Err(bad(n, "an unknown digest function"));
                };
                function.hash_len() + 16 + 4
            }
            _ => return Err(bad(n, "an unknown operation")),
        };
        let at = buf.len();
        buf.resize(at + rest, 0);
        match read_full(&mut r, &mut buf[at..]) {
            Ok(k) if k == rest => {}
            Ok(_) => return Err(bad(n, "ends within a record")),
            Err(e) => return Err(bad(n, &e.to_string())),
        }
        let body = buf.len() - 4;
        if buf[body..] != blake3::hash(&buf[..body]).as_bytes()[..4] {
            return Err(bad(n, "its checksum does not match"));
        }
        n += 1;
        if op == OP_DONE {
            for (op, key) in unvouched.drain(..) {
                each(op, &key, false);
            }
            continue;
        }
        let mut record = &buf[1..body];
        let Some((key, len)) = snapshot::decode_record(&mut record) else {
            return Err(bad(n, "a bad name"));
        };
        let op = if op == OP_ADD {
            Op::Add(len)
        } else {
            Op::Remove
        };
        unvouched.push((op, key));
    }
    for (op, key) in unvouched {
        each(op, &key, true);
    }
    Ok(n)
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
    fn records_round_trip_and_a_done_mark_vouches_for_those_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(dir.path());
        assert_eq!(j.first(), 1);
        assert_eq!(j.record(Op::Add(5), &[d(1)]).records, 1);
        let blake = DigestFunction::Blake3.compute(b"b3");
        // Announced while the first is finished: a mark comes before it.
        let unfinished = j.record(Op::Add(7), &[blake]);
        // Announced while one is unfinished: no mark, and none after a flush either.
        assert_eq!(j.record(Op::Remove, &[d(1), d(2)]).records, 4);
        j.mark_done();
        let path = files(dir.path())[0].1.clone();
        let vouched = |all: &[(Op, Digest, bool)]| all.iter().filter(|r| !r.2).count();
        let all = read_all(&path).unwrap();
        assert_eq!(
            all.iter().map(|(o, k, _)| (*o, *k)).collect::<Vec<_>>(),
            [
                (Op::Add(5), d(1)),
                (Op::Add(7), blake),
                (Op::Remove, d(1)),
                (Op::Remove, d(2))
            ]
        );
        assert_eq!(vouched(&all), 1);
        // Once it is finished, the flush's mark vouches for all of them.
        drop(unfinished);
        j.mark_done();
        let all = read_all(&path).unwrap();
        assert_eq!(vouched(&all), 4);
        // A second mark with nothing new writes nothing.
        let len = std::fs::metadata(&path).unwrap().len();
        j.mark_done();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);

        assert_eq!(j.rotate(), 2);
        drop(j.record(Op::Add(9), &[d(3)]));
        let f = files(dir.path());
        assert_eq!(f.iter().map(|(g, _)| *g).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(read_all(&f[1].1).unwrap(), [(Op::Add(9), d(3), true)]);
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
    fn a_snapshot_waits_for_the_operations_of_the_previous_generation_only() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(dir.path());
        assert!(j.drain(1), "nothing announced");
        let old = j.record(Op::Add(1), &[d(1)]);
        let g = j.rotate();
        assert_eq!(g, 2);
        // What the new generation announces is not waited for.
        let new = j.record(Op::Add(2), &[d(2)]);
        // The old one is, until it is finished (on another thread here).
        std::thread::scope(|s| {
            let waiter = s.spawn(|| j.drain(g - 1));
            drop(old);
            assert!(waiter.join().unwrap());
        });
        assert!(j.drain(g - 1));
        drop(new);
    }

    #[test]
    fn a_torn_or_garbled_journal_is_unusable_never_misread() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(dir.path());
        for i in 0..50 {
            drop(j.record(Op::Add(i as u64), &[d(i)]));
        }
        j.mark_done();
        let path = files(dir.path())[0].1.clone();
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(read_all(&path).unwrap().len(), 50);
        // Cut anywhere inside a record, or one byte flipped anywhere: refused.
        for cut in [1, 4, 9, 10, 40, whole.len() - 1] {
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
        drop(j.record(Op::Add(1), &[d(1)]));
        j.fail(&std::io::Error::other("disk full"));
        assert!(files(dir.path()).is_empty(), "its files are removed");
        assert_eq!(j.record(Op::Add(1), &[d(2)]).records, 0);
        // The rotation after the failure makes a new file, which the snapshot must not name
        // (what happened while broken is in no journal); the one after may.
        assert_eq!(j.rotate(), 0);
        drop(j.record(Op::Add(1), &[d(3)]));
        assert_eq!(j.rotate(), 3);
    }
}
