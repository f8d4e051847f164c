//! `ontap_s3_existence_cache` (NativeLink's): an ONTAP S3 bucket with an index of the digests
//! it holds, so that FindMissingBlobs of a digest the bucket does not have costs no request.
//!
//! - The index lives in memory and in `index_path`. A background task lists the bucket at
//!   start and then every `sync_interval_seconds`, replaces the index with what it found (plus
//!   what was put while it listed) and writes the file: a temporary file renamed into place,
//!   with a header and a trailer that counts its lines, so a torn or foreign file is ignored
//!   (with a warning) rather than half read.
//! - `has_many`: a digest not in the index is missing, without a request; one in the index is
//!   asked of the bucket (HEAD), so a present answer is always the bucket's own, and an object
//!   gone behind the index's back leaves the index.
//! - `get` of a digest not in the index is NOT_FOUND; `put` writes to the bucket and then
//!   adds the digest.
//! - Until the index is first loaded (from the file, or by the first listing), every call
//!   goes to the bucket: a starting server answers like the bucket, never "missing" for a
//!   blob the bucket has.
//!
//! What it costs: a blob written to the bucket by another process is reported missing here
//! until the next listing (its client uploads it again); the index holds every digest of the
//! bucket in memory (about 100 bytes each).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use cairn_config::stores::OntapS3ExistenceCache as Cfg;
use cairn_core::{BlobStream, Digest, DigestFunction, Error};
use parking_lot::{Mutex, RwLock};

use crate::cloud_object_store::{check_at, CloudObjectStore};
use crate::{Health, Store, StoreInfo};

/// First line of an index file.
const HEADER: &str = "# cairn ontap_s3_existence_cache index v1";
/// Last line of an index file: `# end N` with N the number of digest lines.
const TRAILER: &str = "# end ";

/// Every check of the spec that needs no I/O; `path` is the store's key path.
pub fn check(cfg: &Cfg, path: &str) -> Result<(), Error> {
    let at = format!("{path}.ontap_s3_existence_cache");
    if cfg.index_path.trim().is_empty() {
        return Err(Error::invalid_argument(format!(
            "{at}.index_path: required, the file that keeps the index between starts"
        )));
    }
    if cfg.sync_interval_seconds == 0 {
        return Err(Error::invalid_argument(format!(
            "{at}.sync_interval_seconds: must be at least 1 (seconds between listings of the bucket)"
        )));
    }
    check_at(&backend_spec(cfg, &at)?, &format!("{at}.backend"))
}

/// The backend as an `experimental_cloud_object_store` spec of provider `ontap` (NativeLink's
/// ONTAP spec has no `provider` key; one written must say `ontap`).
fn backend_spec(cfg: &Cfg, at: &str) -> Result<cairn_config::stores::CloudObjectStore, Error> {
    let mut spec = (*cfg.backend).clone();
    match spec.provider.as_deref() {
        None | Some("ontap") => spec.provider = Some("ontap".into()),
        Some(other) => {
            return Err(Error::invalid_argument(format!(
                "{at}.backend.provider: {other:?}, but this store's backend is always ONTAP S3; \
                 remove the key or write \"ontap\""
            )))
        }
    }
    Ok(spec)
}

/// The index's key of a digest: the hash and size, whatever the digest function (an object
/// name carries no function).
fn key(hash: &[u8], size: u64) -> Digest {
    let function = match hash.len() {
        20 => DigestFunction::Sha1,
        48 => DigestFunction::Sha384,
        64 => DigestFunction::Sha512,
        _ => DigestFunction::Sha256,
    };
    Digest::new(function, hash, size)
}

fn key_of(d: &Digest) -> Digest {
    key(d.hash(), d.size())
}

pub struct OntapExistenceCache(Arc<Shared>);

struct Shared {
    /// The store's key path, the prefix of its messages.
    name: String,
    backend: CloudObjectStore,
    index: RwLock<HashSet<Digest>>,
    /// Whether `index` holds a listing (from the file or the bucket); until then every call
    /// goes to the bucket.
    ready: AtomicBool,
    /// Digests put while a listing runs (`Some` during one), added to its result.
    put_during_sync: Mutex<Option<Vec<Digest>>>,
    index_path: PathBuf,
    interval: Duration,
    /// Completed listings, for tests and the log.
    syncs: AtomicU64,
}

impl OntapExistenceCache {
    /// Builds the store and starts its index task (which stops when the store is dropped).
    pub fn new(cfg: &Cfg, path: &str) -> Result<OntapExistenceCache, Error> {
        check(cfg, path)?;
        let at = format!("{path}.ontap_s3_existence_cache");
        let spec = backend_spec(cfg, &at)?;
        let backend = CloudObjectStore::new_at(&spec, path, &format!("{at}.backend"))?;
        let shared = Arc::new(Shared {
            name: path.to_string(),
            backend,
            index: RwLock::default(),
            ready: AtomicBool::new(false),
            put_during_sync: Mutex::new(None),
            index_path: PathBuf::from(&cfg.index_path),
            interval: Duration::from_secs(cfg.sync_interval_seconds),
            syncs: AtomicU64::new(0),
        });
        tokio::spawn(keep_index(Arc::downgrade(&shared)));
        Ok(OntapExistenceCache(shared))
    }

    /// Digests in the index.
    pub fn indexed(&self) -> usize {
        self.0.index.read().len()
    }

    /// Listings of the bucket completed so far.
    pub fn syncs(&self) -> u64 {
        self.0.syncs.load(Ordering::Relaxed)
    }
}

/// Loads the file, then lists the bucket now and every interval, while the store lives.
async fn keep_index(shared: Weak<Shared>) {
    let Some(s) = shared.upgrade() else { return };
    let path = s.index_path.clone();
    let name = s.name.clone();
    drop(s);
    match tokio::task::spawn_blocking(move || read_index(&path)).await {
        Ok(Ok(Some(found))) => {
            let Some(s) = shared.upgrade() else { return };
            tracing::info!(store = %name, entries = found.len(), "ontap_s3_existence_cache: index loaded from its file");
            s.index.write().extend(found);
            s.ready.store(true, Ordering::Release);
        }
        Ok(Ok(None)) => {}
        Ok(Err(why)) => {
            tracing::warn!(store = %name, error = %why, "ontap_s3_existence_cache: index file ignored; listing the bucket")
        }
        Err(e) => {
            tracing::warn!(store = %name, error = %e, "ontap_s3_existence_cache: reading the index file failed")
        }
    }
    loop {
        let Some(s) = shared.upgrade() else { return };
        let interval = s.interval;
        if let Err(e) = s.sync().await {
            tracing::warn!(store = %s.name, error = %e, "ontap_s3_existence_cache: listing the bucket failed; keeping the index as it was");
        }
        drop(s);
        tokio::time::sleep(interval).await;
    }
}

impl Shared {
    /// Lists the bucket, replaces the index and writes the file.
    async fn sync(&self) -> Result<(), Error> {
        *self.put_during_sync.lock() = Some(Vec::new());
        let mut fresh = HashSet::new();
        let listed = self
            .backend
            .list_keys(|hash, size| {
                fresh.insert(key(hash, size));
            })
            .await;
        if let Err(e) = listed {
            self.put_during_sync.lock().take();
            return Err(e);
        }
        // Under the index's lock, as `remember` takes them: a put is in the list taken here
        // or in the index after the swap, never lost between the two.
        let old = {
            let mut index = self.index.write();
            fresh.extend(self.put_during_sync.lock().take().unwrap_or_default());
            std::mem::replace(&mut *index, fresh)
        };
        drop(old);
        self.ready.store(true, Ordering::Release);
        let lines: Vec<String> = self
            .index
            .read()
            .iter()
            .map(|d| format!("{}-{}", d.hash_hex(), d.size()))
            .collect();
        let entries = lines.len();
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let path = self.index_path.clone();
        let written = tokio::task::spawn_blocking(move || write_index(&path, &lines))
            .await
            .map_err(|e| Error::internal(format!("writing the index: {e}")))
            .and_then(|r| r);
        if let Err(e) = written {
            tracing::warn!(store = %self.name, error = %e, "ontap_s3_existence_cache: the index file was not written");
        }
        tracing::debug!(store = %self.name, entries, "ontap_s3_existence_cache: index synced with the bucket");
        Ok(())
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn contains(&self, d: &Digest) -> bool {
        self.index.read().contains(&key_of(d))
    }

    fn forget(&self, d: &Digest) {
        self.index.write().remove(&key_of(d));
    }

    fn remember(&self, d: &Digest) {
        let k = key_of(d);
        let mut index = self.index.write();
        index.insert(k);
        if let Some(during) = self.put_during_sync.lock().as_mut() {
            during.push(k);
        }
    }
}

/// The digests of an index file: `Ok(None)` when there is none, `Err` when it is torn,
/// foreign or unreadable.
fn read_index(path: &Path) -> Result<Option<Vec<Digest>>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if !text
        .lines()
        .next_back()
        .is_some_and(|l| l.starts_with(TRAILER))
    {
        return Err(format!("{}: torn (no trailer)", path.display()));
    }
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!(
            "{}: not an index written by Cairn (first line is not {HEADER:?})",
            path.display()
        ));
    }
    let mut out = Vec::new();
    let mut hash = Vec::with_capacity(64);
    for line in lines {
        if let Some(n) = line.strip_prefix(TRAILER) {
            return if n.parse() == Ok(out.len()) {
                Ok(Some(out))
            } else {
                Err(format!(
                    "{}: the trailer counts {n} entries, the file has {}",
                    path.display(),
                    out.len()
                ))
            };
        }
        let parsed = line.split_once('-').and_then(|(h, size)| {
            hash.clear();
            hash.resize(h.len() / 2, 0);
            hex::decode_to_slice(h, &mut hash).ok()?;
            Some(key(&hash, size.parse().ok()?))
        });
        match parsed {
            Some(d) => out.push(d),
            None => {
                return Err(format!(
                    "{}: line {} is not `hash-size`",
                    path.display(),
                    out.len() + 2
                ))
            }
        }
    }
    Err(format!("{}: torn (no trailer)", path.display()))
}

/// Writes the index file: a temporary file beside it, synced, renamed into place.
fn write_index(path: &Path, lines: &[String]) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::internal(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // Unique per write: two stores may share one index_path (the same bucket and prefix).
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "tmp{}.{}",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    writeln!(f, "{HEADER}").map_err(io)?;
    for l in lines {
        writeln!(f, "{l}").map_err(io)?;
    }
    writeln!(f, "{TRAILER}{}", lines.len()).map_err(io)?;
    let f = f.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[async_trait]
impl Store for OntapExistenceCache {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let s = &self.0;
        if !s.ready() {
            return s.backend.has_many(keys).await;
        }
        let mut out = vec![None; keys.len()];
        let mut ask = Vec::new();
        let mut at = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if k.is_empty_blob() {
                out[i] = Some(0);
            } else if s.contains(k) {
                ask.push(*k);
                at.push(i);
            }
        }
        if !ask.is_empty() {
            let found = s.backend.has_many(&ask).await?;
            for ((i, k), size) in at.into_iter().zip(&ask).zip(found) {
                if size.is_none() {
                    s.forget(k);
                }
                out[i] = size;
            }
        }
        Ok(out)
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let s = &self.0;
        if s.ready() && !key.is_empty_blob() && !s.contains(key) {
            return Err(Error::not_found(format!(
                "{}: {key} is not in the bucket's index",
                s.name
            )));
        }
        let r = s.backend.get(key, offset, length).await;
        if matches!(&r, Err(e) if e.is_not_found()) {
            s.forget(key);
        }
        r
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        self.0.backend.put(key, body).await?;
        self.0.remember(key);
        Ok(())
    }

    fn info(&self) -> StoreInfo {
        let mut info = StoreInfo::wrapper(
            "ontap_s3_existence_cache",
            vec![("backend", self.0.backend.info())],
        );
        info.entries = Some(self.indexed() as u64);
        info
    }

    async fn health(&self) -> Health {
        self.0.backend.health().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_files_round_trip_and_torn_or_foreign_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/index");
        assert_eq!(read_index(&p).unwrap(), None);
        let a = DigestFunction::Sha256.compute(b"a");
        let b = DigestFunction::Sha1.compute(b"b");
        let lines: Vec<String> = [a, b]
            .iter()
            .map(|d| format!("{}-{}", d.hash_hex(), d.size()))
            .collect();
        write_index(&p, &lines).unwrap();
        let got = read_index(&p).unwrap().unwrap();
        assert_eq!(got, vec![key_of(&a), key_of(&b)]);

        let full = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 3]).unwrap();
        assert!(read_index(&p).unwrap_err().contains("torn"));
        std::fs::write(&p, full.replace("# end 2", "# end 3")).unwrap();
        assert!(read_index(&p).unwrap_err().contains("counts 3"));
        std::fs::write(&p, "[\"json\"]\n# end 0\n").unwrap();
        assert!(read_index(&p).unwrap_err().contains("not an index"));
        std::fs::write(&p, format!("{HEADER}\nzz-1\n{TRAILER}1\n")).unwrap();
        assert!(read_index(&p).unwrap_err().contains("line 2"));
    }

    #[test]
    fn config_mistakes_are_refused_by_key_path() {
        let spec = |body: &str| {
            let text =
                format!(r#"{{ stores: {{ S: {{ ontap_s3_existence_cache: {{ {body} }} }} }} }}"#);
            let cfg = cairn_config::parse_str("t.json5", &text).unwrap();
            let found = match &cfg.stores.iter().next().unwrap().spec {
                cairn_config::stores::StoreSpec::OntapS3ExistenceCache(c) => c.clone(),
                other => panic!("{other:?}"),
            };
            found
        };
        let backend = r#"backend: { endpoint: "https://o:1", vserver_name: "v", bucket: "b" }"#;
        for (body, at) in [
            (
                format!(r#"index_path: "/i", sync_interval_seconds: 0, {backend}"#),
                "stores.S.ontap_s3_existence_cache.sync_interval_seconds",
            ),
            (
                format!(r#"index_path: " ", sync_interval_seconds: 5, {backend}"#),
                "stores.S.ontap_s3_existence_cache.index_path",
            ),
            (
                r#"index_path: "/i", sync_interval_seconds: 5, backend: { endpoint: "https://o:1", bucket: "b" }"#.into(),
                "stores.S.ontap_s3_existence_cache.backend.vserver_name",
            ),
            (
                r#"index_path: "/i", sync_interval_seconds: 5, backend: { provider: "aws", region: "r", bucket: "b" }"#.into(),
                "stores.S.ontap_s3_existence_cache.backend.provider",
            ),
        ] {
            let e = check(&spec(&body), "stores.S").unwrap_err();
            assert!(e.message.contains(at), "{body}: {e}");
        }
        check(
            &spec(&format!(
                r#"index_path: "/i", sync_interval_seconds: 5, {backend}"#
            )),
            "stores.S",
        )
        .unwrap();
    }

    #[test]
    fn the_index_key_ignores_the_digest_function() {
        let d = DigestFunction::Blake3.compute(b"x");
        assert_eq!(key_of(&d), key(d.hash(), d.size()));
        assert_eq!(key_of(&d).function(), DigestFunction::Sha256);
    }
}
