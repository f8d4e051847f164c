//! Reads: a ranged GET whose body is passed on chunk by chunk and, when it breaks, resumed
//! from the next unread byte of the same object version (`If-Match` on its ETag), within the
//! retry budget; a body that makes no progress for the store's idle timeout (60 s, or gcs's
//! `read_timeout_s`) counts as broken.

use std::sync::Arc;

use bytes::Bytes;
use cairn_core::{BlobStream, Code, Error};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange};

use super::{transport, Inner, REQUEST_TIMEOUT};

/// `object_store` checks a ranged answer against the object's length itself (Azure answers a
/// range starting at the end with the whole object) and reports a range past the end with a
/// private error type; its text (pinned by the Azurite tests) is turned into the 416 that S3
/// sends, so both read as OUT_OF_RANGE.
fn range_past_end(e: object_store::Error) -> object_store::Error {
    if e.to_string().contains("Wanted range starting at") {
        return object_store::Error::Generic {
            store: "range",
            source: Box::new(transport::BackendStatus(
                http::StatusCode::RANGE_NOT_SATISFIABLE,
            )),
        };
    }
    e
}

/// One open GET: its body and where it stands.
pub(super) struct OpenRead {
    body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    /// Next byte expected, and the end (exclusive) of the range.
    next: u64,
    end: u64,
    e_tag: Option<String>,
}

impl Inner {
    /// Starts a GET of `[offset, end)` (to the object's end when `end` is `None`), with
    /// retries; `e_tag` pins the version when resuming.
    pub(super) async fn open(
        &self,
        path: &Path,
        offset: u64,
        end: Option<u64>,
        e_tag: Option<String>,
    ) -> Result<OpenRead, Error> {
        let objects = &self.client.objects;
        let range = match (offset, end) {
            (0, None) => None,
            (o, None) => Some(GetRange::Offset(o)),
            (o, Some(e)) => Some(GetRange::Bounded(o..e)),
        };
        let r = self
            .with_retries("get", path, true, REQUEST_TIMEOUT, || {
                let opts = GetOptions {
                    range: range.clone(),
                    if_match: e_tag.clone(),
                    ..GetOptions::default()
                };
                async { objects.get_opts(path, opts).await.map_err(range_past_end) }
            })
            .await?;
        Ok(OpenRead {
            next: r.range.start,
            end: r.range.end,
            e_tag: r.meta.e_tag.clone(),
            body: r.into_stream(),
        })
    }
}

/// The body of a GET, resumed from the next unread byte when it breaks.
pub(super) fn resuming_body(store: Arc<Inner>, path: Path, first: OpenRead) -> BlobStream {
    futures::stream::unfold(
        (store, path, Some(first), 0u32),
        |(store, path, read, mut retries)| async move {
            let mut read = read?;
            loop {
                if read.next >= read.end {
                    return None;
                }
                let idle = store.body_idle_timeout;
                let why = match tokio::time::timeout(idle, read.body.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        let room = read.end - read.next;
                        let chunk = if chunk.len() as u64 > room {
                            chunk.slice(..room as usize)
                        } else {
                            chunk
                        };
                        if chunk.is_empty() {
                            continue;
                        }
                        read.next += chunk.len() as u64;
                        return Some((Ok(chunk), (store, path, Some(read), retries)));
                    }
                    Ok(Some(Err(e))) => store.error("reading", &path, &e),
                    Ok(None) => Error::unavailable(format!(
                        "{}: reading {path}: the body ended at byte {} of {}",
                        store.name, read.next, read.end
                    )),
                    Err(_) => Error::new(
                        Code::DeadlineExceeded,
                        format!("{}: reading {path}: no data for {idle:?}", store.name),
                    ),
                };
                if retries >= store.retry.max_retries || !store.retry.retries(why.code) {
                    return Some((Err(why), (store, path, None, retries)));
                }
                retries += 1;
                store.events.retry("get");
                tokio::time::sleep(store.retry.wait(retries)).await;
                match store
                    .open(&path, read.next, Some(read.end), read.e_tag.clone())
                    .await
                {
                    Ok(r) if r.next == read.next && r.end == read.end => read.body = r.body,
                    Ok(r) => {
                        let e = Error::unavailable(format!(
                            "{}: resuming {path}: asked bytes {}..{}, got {}..{}",
                            store.name, read.next, read.end, r.next, r.end
                        ));
                        return Some((Err(e), (store, path, None, retries)));
                    }
                    Err(e) => return Some((Err(e), (store, path, None, retries))),
                }
            }
        },
    )
    .boxed()
}
