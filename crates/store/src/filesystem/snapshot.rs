//! The index snapshot: `content_path/.cairn-index`, the index written beside the data so that a
//! restart reads one file instead of walking and stat-ing every blob.
//!
//! Format (little-endian), ours:
//! - header, 48 bytes: magic `CAIRNIX1`, version (u32), the journal generation that begins
//!   with this snapshot (u32, 0: none to rely on; see `journal.rs`), entries (u64), the write
//!   time in ns since the epoch (u64), then the first 16 bytes of the BLAKE3 hash of those 32;
//! - blocks of at most [`BLOCK_ENTRIES`] records, hottest entry first: record count (u32), body
//!   length (u32), the first 16 bytes of the BLAKE3 hash of the body, the body. A record is the
//!   function (u8, its position in `DigestFunction::ALL`), the raw hash (its function's
//!   length), the digest's size (u64) and the stored length (u64): 49 bytes for SHA-256;
//! - an empty block ends the file; the records must add up to the header's count.
//!
//! A file that ends early, fails a check or has another version is *torn*: the reader says so
//! and the store falls back to walking the directory. The file is written to a temp file,
//! synced and renamed over the old one, so a crash leaves the old snapshot or the new one.
//! A snapshot is a hint, never trusted alone: at start-up the directory is listed after it is
//! loaded, and what the listing does not show is dropped (see `filesystem.rs`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use cairn_core::{Digest, DigestFunction, Error};

use super::index::Index;

/// The snapshot's file name in the content directory (not a blob name).
pub(super) const FILE_NAME: &str = ".cairn-index";
const MAGIC: &[u8; 8] = b"CAIRNIX1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
/// Records per block: a block is checked before any of its records is used.
pub(super) const BLOCK_ENTRIES: usize = 16 * 1024;
/// The largest body a block of `BLOCK_ENTRIES` SHA-512 records can have.
const MAX_BODY: usize = BLOCK_ENTRIES * (1 + 64 + 16);

fn check16(bytes: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..16]);
    out
}

fn header(entries: u64, written: SystemTime, generation: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&generation.to_le_bytes());
    h[16..24].copy_from_slice(&entries.to_le_bytes());
    let ns = written
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    h[24..32].copy_from_slice(&ns.to_le_bytes());
    let c = check16(&h[..32]);
    h[32..].copy_from_slice(&c);
    h
}

pub(super) fn encode_record(out: &mut Vec<u8>, key: &Digest, len: u64) {
    let f = DigestFunction::ALL
        .iter()
        .position(|&g| g == key.function())
        .unwrap_or(0) as u8;
    out.push(f);
    out.extend_from_slice(key.hash());
    out.extend_from_slice(&key.size().to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

fn write_block(w: &mut impl Write, count: u32, body: &[u8]) -> std::io::Result<()> {
    w.write_all(&count.to_le_bytes())?;
    w.write_all(&(body.len() as u32).to_le_bytes())?;
    w.write_all(&check16(body))?;
    w.write_all(body)
}

/// Writes `index` as the snapshot of `content` (temp file, `fdatasync`, rename, `fsync` of the
/// directory), naming the journal `generation` that began before it; returns the number of
/// entries written. The index stays usable meanwhile: it is locked for 64 Ki links at a time
/// while its order is listed (`Index::order`), then for each block's records.
pub(super) fn write(content: &Path, index: &Index, generation: u32) -> Result<u64, Error> {
    let tmp = content.join(format!("{FILE_NAME}.tmp"));
    let path = content.join(FILE_NAME);
    let io = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
    let written_at = SystemTime::now();
    let order = index.order();
    let file = File::create(&tmp).map_err(|e| io("creating", e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let result = (|| -> Result<u64, Error> {
        w.write_all(&[0u8; HEADER_LEN])
            .map_err(|e| io("writing", e))?;
        let mut entries = 0u64;
        let mut records = Vec::with_capacity(BLOCK_ENTRIES);
        let mut body = Vec::with_capacity(BLOCK_ENTRIES * 49);
        for slots in order.chunks(BLOCK_ENTRIES) {
            records.clear();
            body.clear();
            index.read_slots(slots, &mut records);
            for (key, len) in &records {
                encode_record(&mut body, key, *len);
            }
            write_block(&mut w, records.len() as u32, &body).map_err(|e| io("writing", e))?;
            entries += records.len() as u64;
        }
        write_block(&mut w, 0, &[]).map_err(|e| io("writing", e))?;
        let mut file = w.into_inner().map_err(|e| io("writing", e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header(entries, written_at, generation)))
            .map_err(|e| io("writing", e))?;
        file.sync_data().map_err(|e| io("syncing", e))?;
        Ok(entries)
    })();
    let entries = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming", e))?;
    File::open(content)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", content.display()), e))?;
    Ok(entries)
}

/// Why a snapshot cannot be used.
#[derive(Debug)]
pub(super) struct Torn(pub String);

/// Reads a snapshot block by block.
pub(super) struct Reader {
    file: BufReader<File>,
    expected: u64,
    read: u64,
    written_at: SystemTime,
    generation: u32,
    body: Vec<u8>,
}

impl Reader {
    /// Opens the snapshot of `content`: `Ok(None)` when there is none.
    pub fn open(content: &Path) -> Result<Option<Reader>, Torn> {
        let file = match File::open(content.join(FILE_NAME)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Torn(format!("opening: {e}"))),
        };
        let mut file = BufReader::with_capacity(1 << 20, file);
        let mut h = [0u8; HEADER_LEN];
        file.read_exact(&mut h)
            .map_err(|e| Torn(format!("reading the header: {e}")))?;
        if &h[..8] != MAGIC {
            return Err(Torn("not a Cairn index snapshot (magic)".into()));
        }
        if h[32..] != check16(&h[..32]) {
            return Err(Torn("the header's checksum does not match".into()));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(Torn(format!(
                "version {version}, this Cairn reads {VERSION}"
            )));
        }
        let expected = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
        let ns = u64::from_le_bytes(h[24..32].try_into().unwrap_or_default());
        Ok(Some(Reader {
            file,
            expected,
            read: 0,
            written_at: UNIX_EPOCH + std::time::Duration::from_nanos(ns),
            generation: u32::from_le_bytes(h[12..16].try_into().unwrap_or_default()),
            body: Vec::new(),
        }))
    }

    /// Entries the header announces.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    pub fn written_at(&self) -> SystemTime {
        self.written_at
    }

    /// The journal generation that began with this snapshot (0: none to rely on).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The next block's records (appended to `out`, after `out` is cleared); `Ok(false)` at
    /// the end of a whole snapshot.
    pub fn next_block(&mut self, out: &mut Vec<(Digest, u64)>) -> Result<bool, Torn> {
        out.clear();
        let mut bh = [0u8; 24];
        self.file
            .read_exact(&mut bh)
            .map_err(|e| Torn(format!("after {} entries: {e}", self.read)))?;
        let count = u32::from_le_bytes(bh[..4].try_into().unwrap_or_default()) as usize;
        let body_len = u32::from_le_bytes(bh[4..8].try_into().unwrap_or_default()) as usize;
        if count > BLOCK_ENTRIES || body_len > MAX_BODY {
            return Err(Torn(format!(
                "after {} entries: a block of {count} records in {body_len} bytes",
                self.read
            )));
        }
        self.body.resize(body_len, 0);
        self.file
            .read_exact(&mut self.body)
            .map_err(|e| Torn(format!("after {} entries: {e}", self.read)))?;
        if bh[8..] != check16(&self.body) {
            return Err(Torn(format!(
                "after {} entries: a block's checksum does not match",
                self.read
            )));
        }
        if count == 0 {
            if self.read != self.expected {
                return Err(Torn(format!(
                    "{} entries, the header says {}",
                    self.read, self.expected
                )));
            }
            return Ok(false);
        }
        let mut rest = &self.body[..];
        for _ in 0..count {
            let record = decode_record(&mut rest)
                .ok_or_else(|| Torn(format!("after {} entries: a bad record", self.read)))?;
            out.push(record);
        }
        if !rest.is_empty() {
            return Err(Torn(format!(
                "after {} entries: bytes after a block's records",
                self.read
            )));
        }
        self.read += count as u64;
        if self.read > self.expected {
            return Err(Torn(format!(
                "more entries than the header's {}",
                self.expected
            )));
        }
        Ok(true)
    }
}

/// Reads every block of `reader` on a thread of its own (reading, checking and decoding) while
/// the calling thread hands each block to `each` (inserting into the index), a few blocks
/// apart: the two halves of a load overlap. `each` returns false to stop early. `Ok(true)`
/// when the whole snapshot was read, `Ok(false)` when `each` stopped it.
pub(super) fn read_overlapped(
    mut reader: Reader,
    mut each: impl FnMut(&[(Digest, u64)]) -> bool,
) -> Result<bool, Torn> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(Digest, u64)>>(4);
    std::thread::scope(|scope| {
        let read = scope.spawn(move || -> Result<(), Torn> {
            loop {
                let mut block = Vec::with_capacity(BLOCK_ENTRIES);
                if !reader.next_block(&mut block)? {
                    return Ok(());
                }
                if tx.send(block).is_err() {
                    return Ok(()); // stopped
                }
            }
        });
        let mut whole = true;
        for block in rx.iter() {
            if !each(&block) {
                whole = false;
                break;
            }
        }
        drop(rx);
        let read = read
            .join()
            .unwrap_or_else(|_| Err(Torn("the snapshot reader panicked".into())));
        read.map(|()| whole)
    })
}

pub(super) fn decode_record(rest: &mut &[u8]) -> Option<(Digest, u64)> {
    let (&f, tail) = rest.split_first()?;
    let function = *DigestFunction::ALL.get(f as usize)?;
    let n = function.hash_len();
    if tail.len() < n + 16 {
        return None;
    }
    let (hash, tail) = tail.split_at(n);
    let size = u64::from_le_bytes(tail[..8].try_into().ok()?);
    let len = u64::from_le_bytes(tail[8..16].try_into().ok()?);
    if size > i64::MAX as u64 {
        return None;
    }
    *rest = &tail[16..];
    Some((Digest::new(function, hash, size), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: u32) -> Index {
        let index = Index::new(None);
        for i in 0..n {
            let f = DigestFunction::ALL[i as usize % DigestFunction::ALL.len()];
            index.insert(&f.compute(&i.to_le_bytes()), i as u64 * 3);
        }
        index
    }

    fn read_all(content: &Path) -> Result<Vec<(Digest, u64)>, Torn> {
        let mut r = Reader::open(content)?.ok_or_else(|| Torn("none".into()))?;
        let mut all = Vec::new();
        let mut block = Vec::new();
        while r.next_block(&mut block)? {
            all.extend_from_slice(&block);
        }
        assert_eq!(all.len() as u64, r.expected());
        Ok(all)
    }

    #[test]
    fn a_snapshot_round_trips_hottest_first() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Reader::open(dir.path()).unwrap().is_none());
        let n = BLOCK_ENTRIES as u32 * 2 + 17;
        let index = filled(n);
        assert_eq!(write(dir.path(), &index, 7).unwrap(), n as u64);
        assert_eq!(Reader::open(dir.path()).unwrap().unwrap().generation(), 7);
        let all = read_all(dir.path()).unwrap();
        let mut expect = Vec::new();
        index.read_slots(&index.order(), &mut expect);
        assert_eq!(all, expect);
        assert_eq!(all[0].1, (n as u64 - 1) * 3);
        assert!(!dir.path().join(format!("{FILE_NAME}.tmp")).exists());
        // Read on another thread, the same records in the same order; stopped early, not whole.
        let mut overlapped = Vec::new();
        let r = Reader::open(dir.path()).unwrap().unwrap();
        let whole = read_overlapped(r, |b| {
            overlapped.extend_from_slice(b);
            true
        });
        assert!(whole.unwrap());
        assert_eq!(overlapped, all);
        let r = Reader::open(dir.path()).unwrap().unwrap();
        assert!(!read_overlapped(r, |_| false).unwrap());
    }

    #[test]
    fn a_torn_or_garbled_snapshot_is_refused_never_misread() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &filled(40_000), 0).unwrap();
        let path = dir.path().join(FILE_NAME);
        let whole = std::fs::read(&path).unwrap();
        // Cut anywhere, a byte flipped anywhere, garbage: an error, never a wrong entry.
        let mut cases: Vec<Vec<u8>> = [0, 10, 47, 48, 60, whole.len() / 2, whole.len() - 1]
            .iter()
            .map(|&cut| whole[..cut].to_vec())
            .collect();
        for at in [3, 20, 40, 50, 70, whole.len() / 3, whole.len() - 5] {
            let mut bad = whole.clone();
            bad[at] ^= 0x40;
            cases.push(bad);
        }
        cases.push(b"CAIRNIX1 and then nonsense that goes on for a while......".to_vec());
        for (i, bytes) in cases.iter().enumerate() {
            std::fs::write(&path, bytes).unwrap();
            assert!(read_all(dir.path()).is_err(), "case {i}");
            if let Ok(Some(r)) = Reader::open(dir.path()) {
                assert!(read_overlapped(r, |_| true).is_err(), "case {i}");
            }
        }
    }
}
