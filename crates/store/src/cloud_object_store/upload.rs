//! Uploads: one PUT for a body shorter than a part, else a multipart upload whose parts go up
//! while the body is still read, at most `multipart_max_concurrent_uploads` at once. Nothing
//! becomes visible before the body ended cleanly: a multipart upload is completed only then,
//! and aborted on any error (the body's or the backend's).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_core::{BlobStream, Code, Digest, Error};
use futures::StreamExt;
use object_store::multipart::PartId;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::task::JoinSet;

use super::{Inner, REQUEST_TIMEOUT};

/// The smallest part every provider accepts (S3's floor; GCS and Azure take it too).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// The most parts of one upload (S3's ceiling).
pub const MAX_PARTS: u64 = 10_000;
/// Time allowed per byte of a request body on top of [`REQUEST_TIMEOUT`] (1 MiB/s floor).
const BYTES_PER_SECOND_FLOOR: u64 = 1024 * 1024;

/// The part size for a blob that says it is `size_hint` bytes: `min` (5 MiB for S3), or more
/// (whole MiB) when `max_parts` parts of `min` would not hold it. Every part but the last has
/// this size.
pub fn part_size(size_hint: u64, min: u64, max_parts: u64) -> u64 {
    let needed = size_hint.div_ceil(max_parts.max(1));
    needed.max(min).div_ceil(1 << 20) << 20
}

/// How long one request carrying `len` bytes may take.
fn timeout_for(len: u64) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs(len / BYTES_PER_SECOND_FLOOR)
}

/// Reads a body in parts of a fixed size.
struct Parts {
    body: BlobStream,
    carry: Option<Bytes>,
    ended: bool,
}

/// One part: its chunks, its length, and whether the body ended with it.
struct Part {
    chunks: Vec<Bytes>,
    len: u64,
    last: bool,
}

impl Parts {
    /// Whether nothing follows (reads one chunk ahead when it must).
    async fn at_end(&mut self) -> Result<bool, Error> {
        loop {
            if self.carry.is_some() {
                return Ok(false);
            }
            if self.ended {
                return Ok(true);
            }
            match self.body.next().await {
                Some(Ok(c)) if c.is_empty() => {}
                Some(Ok(c)) => self.carry = Some(c),
                Some(Err(e)) => return Err(e),
                None => self.ended = true,
            }
        }
    }

    /// The next `size` bytes (fewer at the end). An error of the body is returned as it came.
    async fn next(&mut self, size: u64) -> Result<Part, Error> {
        let mut part = Part {
            chunks: Vec::new(),
            len: 0,
            last: false,
        };
        loop {
            let chunk = match self.carry.take() {
                Some(c) => c,
                None if self.ended => {
                    part.last = true;
                    return Ok(part);
                }
                None => match self.body.next().await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => return Err(e),
                    None => {
                        self.ended = true;
                        continue;
                    }
                },
            };
            let room = (size - part.len) as usize;
            if chunk.len() > room {
                self.carry = Some(chunk.slice(room..));
                part.chunks.push(chunk.slice(..room));
                part.len = size;
            } else {
                part.len += chunk.len() as u64;
                part.chunks.push(chunk);
            }
            if part.len == size {
                return Ok(part);
            }
        }
    }
}

pub(super) async fn put(store: &Arc<Inner>, key: &Digest, body: BlobStream) -> Result<(), Error> {
    let path = store.path(key);
    let size = part_size(
        key.size(),
        store.client.min_part_size,
        store.client.max_parts,
    );
    let mut parts = Parts {
        body,
        carry: None,
        ended: false,
    };
    let first = parts.next(size).await?;
    let first_is_all = first.last || parts.at_end().await?;
    if first_is_all {
        let len = first.len;
        let payload = PutPayload::from_iter(first.chunks);
        let objects = &store.client.objects;
        let retry = len <= store.max_retry_buffer;
        store
            .with_retries("put", &path, retry, timeout_for(len), || {
                let payload = payload.clone();
                async { objects.put(&path, payload).await }
            })
            .await?;
        return Ok(());
    }
    let mp = &store.client.multipart;
    let id = store
        .with_retries("create_multipart", &path, true, REQUEST_TIMEOUT, || {
            mp.create_multipart(&path)
        })
        .await?;
    // Aborted unless completed: on an error, and when this call is dropped (the client went
    // away), so that no parts are left behind to be billed.
    let mut guard = AbortOnDrop {
        store: store.clone(),
        path: path.clone(),
        id,
        armed: true,
    };
    let result = upload_parts(store, &path, &guard.id, size, first, parts).await;
    if result.is_ok() {
        guard.armed = false;
    }
    result
}

/// Aborts a multipart upload when dropped armed, in a task of its own (at most
/// [`REQUEST_TIMEOUT`]): parts never completed are deleted rather than left to a lifecycle
/// rule.
struct AbortOnDrop {
    store: Arc<Inner>,
    path: Path,
    id: String,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, path, id) = (self.store.clone(), self.path.clone(), self.id.clone());
        runtime.spawn(async move {
            let mp = &store.client.multipart;
            let abort = tokio::time::timeout(REQUEST_TIMEOUT, mp.abort_multipart(&path, &id)).await;
            if !matches!(abort, Ok(Ok(()))) {
                // A lifecycle rule on incomplete uploads cleans up what this leaves.
                tracing::warn!(store = %store.name, %path, "could not abort multipart upload {id}");
            }
        });
    }
}

async fn upload_parts(
    store: &Arc<Inner>,
    path: &Path,
    id: &str,
    size: u64,
    first: Part,
    mut parts: Parts,
) -> Result<(), Error> {
    let mut in_flight: JoinSet<PartResult> = JoinSet::new();
    let mut done: Vec<Option<PartId>> = Vec::new();
    let mut total = 0u64;
    let mut next = Some(first);
    loop {
        let part = match next.take() {
            Some(p) => p,
            None => parts.next(size).await?,
        };
        let last = part.last;
        if part.len > 0 {
            let idx = done.len();
            let max_parts = store.client.max_parts;
            if idx as u64 >= max_parts {
                return Err(Error::resource_exhausted(format!(
                    "{}: put {path}: the body is longer than {max_parts} parts of {size} bytes \
                     (larger than its digest says)",
                    store.name
                )));
            }
            total += part.len;
            done.push(None);
            let (store, path, id) = (store.clone(), path.clone(), id.to_string());
            in_flight.spawn(async move {
                let len = part.len;
                let payload = PutPayload::from_iter(part.chunks);
                let mp = &store.client.multipart;
                let pid = store
                    .with_retries("put_part", &path, true, timeout_for(len), || {
                        mp.put_part(&path, &id, idx, payload.clone())
                    })
                    .await?;
                Ok((idx, pid))
            });
        }
        while in_flight.len() >= store.max_concurrent_parts || (last && !in_flight.is_empty()) {
            let (idx, pid) = joined(in_flight.join_next().await)?;
            done[idx] = Some(pid);
        }
        if last {
            break;
        }
    }
    let done: Vec<PartId> = done.into_iter().flatten().collect();
    let mp = &store.client.multipart;
    let attempts = AtomicU32::new(0);
    let id = id.to_string();
    let completed = store
        .with_retries("complete_multipart", path, true, REQUEST_TIMEOUT, || {
            attempts.fetch_add(1, Ordering::Relaxed);
            mp.complete_multipart(path, &id, done.clone())
        })
        .await;
    match completed {
        Ok(_) => Ok(()),
        // An earlier attempt completed it and its answer was lost: the object is there.
        Err(e) if e.is_not_found() && attempts.load(Ordering::Relaxed) > 1 => {
            let objects = &store.client.objects;
            let meta = store
                .with_retries("head", path, true, REQUEST_TIMEOUT, || objects.head(path))
                .await?;
            if meta.size == total {
                Ok(())
            } else {
                Err(e)
            }
        }
        Err(e) => Err(e),
    }
}

/// What a part task returns: its index and the backend's id for it.
type PartResult = Result<(usize, PartId), Error>;

/// A part task's result; a task that panicked or was cancelled is INTERNAL.
fn joined(r: Option<Result<PartResult, tokio::task::JoinError>>) -> PartResult {
    match r {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(Error::new(
            Code::Internal,
            format!("part upload task failed: {e}"),
        )),
        None => Err(Error::internal("no part upload in flight")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_5mib_until_10000_of_them_would_not_hold_the_blob() {
        let s3 = |size| part_size(size, MIN_PART_SIZE, MAX_PARTS);
        assert_eq!(s3(0), MIN_PART_SIZE);
        assert_eq!(s3(50 * MIN_PART_SIZE), MIN_PART_SIZE);
        assert_eq!(s3(MAX_PARTS * MIN_PART_SIZE), MIN_PART_SIZE);
        let big = 100 * (1u64 << 30); // 100 GiB
        let p = s3(big);
        assert!(p > MIN_PART_SIZE && p.is_multiple_of(1 << 20));
        assert!(big.div_ceil(p) <= MAX_PARTS);
        let huge = 5 * (1u64 << 40); // 5 TiB
        assert!(huge.div_ceil(s3(huge)) <= MAX_PARTS);
        // GCS: at most 1000 parts (1024 components per object).
        let gcs = |size| part_size(size, MIN_PART_SIZE, super::super::gcs::MAX_PARTS);
        assert_eq!(gcs(4 << 30), 5 << 20);
        assert!(huge.div_ceil(gcs(huge)) <= 1000);
    }

    #[tokio::test]
    async fn parts_split_chunks_at_exact_sizes() {
        let chunks: Vec<Result<Bytes, Error>> =
            (0..10u8).map(|i| Ok(Bytes::from(vec![i; 7]))).collect();
        let mut p = Parts {
            body: futures::stream::iter(chunks).boxed(),
            carry: None,
            ended: false,
        };
        let mut lens = Vec::new();
        loop {
            let part = p.next(20).await.unwrap();
            let joined: Vec<u8> = part.chunks.iter().flat_map(|c| c.to_vec()).collect();
            assert_eq!(joined.len() as u64, part.len);
            lens.push(part.len);
            if part.last {
                break;
            }
        }
        assert_eq!(lens, vec![20, 20, 20, 10]);
    }
}
