//! Content-defined chunking of CAS blobs (REAPI v2.12 SplitBlob / SpliceBlob and v2.13
//! GetChunkMapping / RegisterChunkMapping), for instances whose config sets
//! `services.cas[].experimental_chunking`.
//!
//! - **Split**: the chunk layout of a blob is read from the index store when one is kept and
//!   every chunk is still in the CAS; otherwise the blob is streamed from the CAS through
//!   FastCDC 2020 (normalization level 2, seed 0, min = avg / 4, max = avg * 4, as the REAPI
//!   parameters say), each chunk is stored in the CAS unless present, the whole blob is hashed
//!   on the way (a blob that no longer matches its digest is DATA_LOSS, and no layout is kept)
//!   and the layout is saved. At most one chunk plus one maximum chunk size is held in memory.
//! - **Splice**: the named chunks must all be in the CAS (NOT_FOUND otherwise) and their sizes
//!   must add up to the blob's (INVALID_ARGUMENT). They are streamed in order into a CAS write
//!   of the blob that is hashed as it passes and aborted unless it matches the digest, so a
//!   wrong splice stores nothing, not even its layout. A blob already in the CAS is not
//!   written again, but its layout is still checked before it is kept: a layout that other
//!   clients download by is never taken on trust.
//!
//! A layout is stored as an encoded `SplitBlobResponse` (the chunk digests and the chunking
//! function) under the blob's digest in the index store.

use bytes::{Bytes, BytesMut};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{BlobStream, Code, Digest, DigestFunction, Error};
use cairn_store::{StoreExt, StoreRef};
use futures::StreamExt;
use prost::Message;

/// Largest encoded layout read back from the index store: the most chunks a layout may hold
/// times the largest encoded digest, with room to spare.
const fn layout_limit(max_chunks: u64) -> usize {
    (max_chunks as usize)
        .saturating_mul(160)
        .saturating_add(4096)
}

/// The chunking function Cairn splits with and advertises.
pub const CHUNKING_FUNCTION: re::chunking_function::Value =
    re::chunking_function::Value::FastCdc2020;

/// Chunking for one CAS instance.
pub struct Chunker {
    cas: StoreRef,
    /// Where layouts are kept; `None` (a `grpc` CAS) computes each split again.
    index: Option<StoreRef>,
    avg: u32,
    max_chunks: u64,
}

impl Chunker {
    /// `avg` must be within the REAPI's bounds (checked by the config check).
    pub fn new(cas: StoreRef, index: Option<StoreRef>, avg: u64, max_chunks: u64) -> Chunker {
        Chunker {
            cas,
            index,
            avg: avg as u32,
            max_chunks,
        }
    }

    /// The FastCDC 2020 parameters advertised in the capabilities.
    pub fn avg_chunk_size(&self) -> u64 {
        u64::from(self.avg)
    }

    /// Most chunks one layout may have.
    pub fn max_chunks(&self) -> u64 {
        self.max_chunks
    }

    fn min(&self) -> u32 {
        self.avg / 4
    }

    fn max(&self) -> u32 {
        self.avg * 4
    }

    /// The chunk digests of `blob`, in order. NOT_FOUND when the blob is not in the CAS or
    /// would need more chunks than allowed.
    pub async fn split(&self, blob: &Digest) -> Result<Vec<Digest>, Error> {
        if let Some(chunks) = self.stored_layout(blob).await? {
            let present = self.cas.has_many(&chunks).await?;
            if present.iter().all(Option::is_some) {
                return Ok(chunks);
            }
        }
        let chunks = self.chunk_and_store(blob).await?;
        self.save_layout(blob, &chunks).await?;
        Ok(chunks)
    }

    /// Makes `blob` from `chunks` (see the module's documentation).
    pub async fn splice(&self, blob: &Digest, chunks: Vec<Digest>) -> Result<(), Error> {
        if chunks.len() as u64 > self.max_chunks {
            return Err(Error::invalid_argument(format!(
                "splice of {blob} names {} chunks; this instance takes at most {} \
                 (services.cas[].experimental_chunking.max_chunk_count)",
                chunks.len(),
                self.max_chunks
            )));
        }
        if let Some(c) = chunks.iter().find(|c| c.function() != blob.function()) {
            return Err(Error::invalid_argument(format!(
                "chunk {c} is a {} digest, the blob {blob} is {}",
                c.function(),
                blob.function()
            )));
        }
        let total = chunks
            .iter()
            .fold(0u64, |sum, c| sum.saturating_add(c.size()));
        if total != blob.size() {
            return Err(Error::invalid_argument(format!(
                "the {} chunks of the splice add up to {total} bytes, but {blob} has {}",
                chunks.len(),
                blob.size()
            )));
        }
        let present = self.cas.has_many(&chunks).await?;
        let missing: Vec<String> = chunks
            .iter()
            .zip(&present)
            .filter(|(c, p)| p.is_none() && !c.is_empty_blob())
            .map(|(c, _)| c.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(Error::not_found(format!(
                "{} of the {} chunks of {blob} are not in the CAS: {}{}",
                missing.len(),
                chunks.len(),
                missing[..missing.len().min(5)].join(", "),
                if missing.len() > 5 { ", ..." } else { "" }
            )));
        }
        let body = cairn_core::stream::verified(self.concatenated(chunks.clone()), *blob, true);
        let body = body.map(move |r| {
            r.map_err(|e| {
                if e.code == Code::InvalidArgument {
                    Error::invalid_argument(format!("the chunks do not make the blob: {e}"))
                } else {
                    e
                }
            })
        });
        if blob.is_empty_blob() || self.cas.has(blob).await?.is_some() {
            // Already stored: only the layout is new, and it is checked all the same.
            let mut body = body.boxed();
            while let Some(chunk) = body.next().await {
                chunk?;
            }
        } else {
            self.cas.put(blob, body.boxed()).await?;
        }
        self.save_layout(blob, &chunks).await
    }

    async fn stored_layout(&self, blob: &Digest) -> Result<Option<Vec<Digest>>, Error> {
        let Some(index) = &self.index else {
            return Ok(None);
        };
        let bytes = match index.get_all(blob, layout_limit(self.max_chunks)).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        // A layout that does not decode, names another function or does not add up is
        // ignored: the split is computed again and the layout rewritten.
        let Ok(layout) = re::SplitBlobResponse::decode(bytes) else {
            tracing::warn!(%blob, "chunk layout in the index store does not decode; splitting again");
            return Ok(None);
        };
        let chunks: Result<Vec<Digest>, Error> = layout
            .chunk_digests
            .iter()
            .map(|d| Digest::from_proto_with(blob.function(), d))
            .collect();
        match chunks {
            Ok(c) if c.iter().map(Digest::size).sum::<u64>() == blob.size() => Ok(Some(c)),
            _ => {
                tracing::warn!(%blob, "chunk layout in the index store does not add up; splitting again");
                Ok(None)
            }
        }
    }

    async fn save_layout(&self, blob: &Digest, chunks: &[Digest]) -> Result<(), Error> {
        let Some(index) = &self.index else {
            return Ok(());
        };
        let layout = re::SplitBlobResponse {
            chunk_digests: chunks.iter().map(Digest::to_proto).collect(),
            chunking_function: CHUNKING_FUNCTION as i32,
        };
        // The layout's size is not the blob's: the key names the blob, the value is the layout.
        index
            .put_bytes(blob, Bytes::from(layout.encode_to_vec()))
            .await
    }

    /// The chunks read from the CAS one after the other, as one body.
    fn concatenated(&self, chunks: Vec<Digest>) -> BlobStream {
        let cas = self.cas.clone();
        futures::stream::iter(chunks)
            .then(move |c| {
                let cas = cas.clone();
                async move {
                    if c.is_empty_blob() {
                        return Ok(cairn_core::stream::empty());
                    }
                    cas.get(&c, 0, None)
                        .await
                        .map_err(|e| e.context(format_args!("reading chunk {c}")))
                }
            })
            .map(|r| match r {
                Ok(s) => s,
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            })
            .flatten()
            .boxed()
    }

    /// Streams `blob` from the CAS through FastCDC, stores the chunks and returns their
    /// digests.
    async fn chunk_and_store(&self, blob: &Digest) -> Result<Vec<Digest>, Error> {
        let function = blob.function();
        let mut body = self.cas.get(blob, 0, None).await?;
        let mut whole = function.hasher();
        let mut seen = 0u64;
        let mut buf = BytesMut::new();
        let mut chunks = Vec::new();
        let mut ended = false;
        let max = self.max() as usize;
        loop {
            while !ended && buf.len() < max {
                match body.next().await {
                    Some(Ok(b)) => {
                        seen += b.len() as u64;
                        if seen > blob.size() {
                            return Err(blob_changed(blob));
                        }
                        whole.update(&b);
                        buf.extend_from_slice(&b);
                    }
                    Some(Err(e)) => return Err(e),
                    None => ended = true,
                }
            }
            if buf.is_empty() {
                break;
            }
            let len = self.first_cut(&buf, ended);
            let chunk = buf.split_to(len).freeze();
            let digest = function.compute(&chunk);
            if chunks.len() as u64 >= self.max_chunks {
                return Err(Error::not_found(format!(
                    "{blob} would be split into more than {} chunks \
                     (services.cas[].experimental_chunking.max_chunk_count); download it whole",
                    self.max_chunks
                )));
            }
            if self.cas.has(&digest).await?.is_none() {
                self.cas.put_bytes(&digest, chunk).await?;
            }
            chunks.push(digest);
        }
        if seen != blob.size() || whole.finish_with_size(seen) != *blob {
            return Err(blob_changed(blob));
        }
        Ok(chunks)
    }

    /// Length of the first chunk of `buf`, which holds at least a maximum chunk unless the
    /// blob ended.
    fn first_cut(&self, buf: &[u8], ended: bool) -> usize {
        let (min, max) = (self.min() as usize, self.max() as usize);
        if buf.len() <= min {
            debug_assert!(ended);
            return buf.len();
        }
        let window = &buf[..buf.len().min(max)];
        let cdc = fastcdc::v2020::FastCDC::with_level(
            window,
            self.min(),
            self.avg,
            self.max(),
            fastcdc::v2020::Normalization::Level2,
        );
        let (_, cut) = cdc.cut(0, window.len());
        cut.clamp(1, window.len())
    }
}

fn blob_changed(blob: &Digest) -> Error {
    Error::data_loss(format!(
        "{blob} in the CAS does not match its digest; it was not split"
    ))
}

/// The digest function of a chunking request (the one named, or the one its hash length
/// implies) and its blob digest.
pub fn request_blob(value: i32, d: Option<&re::Digest>) -> Result<(DigestFunction, Digest), Error> {
    let d = d.ok_or_else(|| Error::invalid_argument("the request has no blob_digest"))?;
    let function = DigestFunction::from_request(value, d.hash.len())?;
    Ok((function, Digest::from_proto_with(function, d)?))
}
