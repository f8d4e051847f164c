//! ContentAddressableStorage: FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, GetTree, and
//! for instances with `experimental_chunking` the chunking RPCs ([`crate::chunking`]).
//!
//! Every uploaded blob is checked against its digest (size and hash) before it is stored; a
//! bad blob in a batch fails alone, with INVALID_ARGUMENT in its own response entry. Batches
//! are bounded by `max_batch_total_size_bytes` (RESOURCE_EXHAUSTED past it).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::rpc::Status as RpcStatus;
use cairn_core::{Digest, DigestFunction, Error};
use cairn_store::{Store, StoreExt, StoreRef};
use futures::stream::{self, StreamExt};
use prost::Message;
use re::compressor::Value as Compressor;
use re::content_addressable_storage_server::ContentAddressableStorage;
use tonic::{Request, Response, Status};

use crate::chunking::{Chunker, CHUNKING_FUNCTION};
use crate::instances::Instances;
use crate::metrics::Metrics;
use crate::{zstd_codec, Limits};

/// Directories per GetTree response when the client does not choose.
const DEFAULT_TREE_PAGE: usize = 1000;
/// Most directories in one GetTree response, whatever page size the client asks for.
const MAX_TREE_PAGE: usize = 10_000;
/// Largest Directory message GetTree reads (a Directory is a list of names and digests; real
/// ones are kilobytes).
const MAX_DIRECTORY_BYTES: usize = 4 << 20;
/// Most directories one GetTree walks (across all of its pages): bounds the walk's memory
/// (the set of directories seen) whatever tree a client uploads.
const MAX_TREE_DIRECTORIES: usize = 1_000_000;
/// Concurrent store calls within one batch.
const BATCH_CONCURRENCY: usize = 16;

pub struct CasService {
    instances: Instances,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Instances with `experimental_chunking`.
    chunkers: BTreeMap<String, Arc<Chunker>>,
    /// Instances that take and send zstd (`capabilities.remote_cache_compression`).
    zstd: Arc<std::collections::BTreeSet<String>>,
}

/// Chunk digests per GetChunkMapping response.
const MAPPING_PAGE: usize = 10_000;

impl CasService {
    pub fn new(instances: Instances, limits: Limits, metrics: Arc<Metrics>) -> CasService {
        CasService {
            instances,
            limits,
            metrics,
            chunkers: BTreeMap::new(),
            zstd: Arc::default(),
        }
    }

    /// Takes and sends zstd batch entries for these instances only.
    pub fn with_zstd(mut self, instances: Arc<std::collections::BTreeSet<String>>) -> CasService {
        self.zstd = instances;
        self
    }

    /// Serves chunking for `instance`.
    pub fn with_chunker(mut self, instance: String, chunker: Arc<Chunker>) -> CasService {
        self.chunkers.insert(instance, chunker);
        self
    }

    fn store(&self, instance: &str) -> Result<StoreRef, Status> {
        Ok(self.instances.get(instance)?.clone())
    }

    /// The chunker of an instance; UNIMPLEMENTED naming the key that turns chunking on.
    fn chunker(&self, instance: &str, method: &str) -> Result<Arc<Chunker>, Error> {
        self.instances.get(instance)?;
        self.chunkers.get(instance).cloned().ok_or_else(|| {
            Error::unimplemented(format!(
                "{method} is not enabled for instance {instance:?}: its CAS service has no \
                 experimental_chunking"
            ))
        })
    }

    async fn split(
        &self,
        method: &str,
        instance: &str,
        function: i32,
        digest: Option<&re::Digest>,
    ) -> Result<Vec<re::Digest>, Error> {
        let chunker = self.chunker(instance, method)?;
        let (_, blob) = crate::chunking::request_blob(function, digest)?;
        let chunks = chunker.split(&blob).await?;
        Ok(chunks.iter().map(Digest::to_proto).collect())
    }

    async fn splice(
        &self,
        method: &str,
        instance: &str,
        function: i32,
        digest: Option<&re::Digest>,
        chunks: &[re::Digest],
    ) -> Result<re::Digest, Error> {
        let chunker = self.chunker(instance, method)?;
        let (function, blob) = crate::chunking::request_blob(function, digest)?;
        let chunks = chunks
            .iter()
            .map(|c| Digest::from_proto_with(function, c))
            .collect::<Result<Vec<_>, _>>()?;
        chunker.splice(&blob, chunks).await?;
        Ok(blob.to_proto())
    }
}

fn ok_status() -> Option<RpcStatus> {
    Some(RpcStatus {
        code: 0,
        message: String::new(),
        details: vec![],
    })
}

/// Stores one batch entry: decode, verify, put.
async fn update_one(
    store: &dyn Store,
    zstd: bool,
    function: DigestFunction,
    req: re::batch_update_blobs_request::Request,
) -> (Option<re::Digest>, Result<(), Error>) {
    let wire = req.digest.clone();
    let result = async {
        let wire = wire
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("a request has no digest"))?;
        let digest = Digest::from_proto_with(function, wire)?;
        let data = match Compressor::try_from(req.compressor) {
            Ok(Compressor::Identity) => Bytes::from(req.data),
            Ok(Compressor::Zstd) if zstd => {
                zstd_codec::decompress_exact(&req.data, digest.size(), &digest)?
            }
            Ok(Compressor::Zstd) => {
                return Err(Error::invalid_argument(format!(
                    "{digest}: zstd is not enabled for this instance (capabilities remote_cache_compression); send identity"
                )))
            }
            _ => {
                return Err(Error::invalid_argument(format!(
                    "{digest}: compressor {} is not supported (supported: identity, zstd)",
                    req.compressor
                )))
            }
        };
        let actual = function.compute(&data);
        if actual != digest {
            return Err(Error::invalid_argument(if actual.size() != digest.size() {
                format!(
                    "{digest}: data has {} bytes, the digest says {}",
                    actual.size(),
                    digest.size()
                )
            } else {
                format!(
                    "{digest}: data hashes to {}, not to its digest",
                    actual.hash_hex()
                )
            }));
        }
        if digest.is_empty_blob() {
            return Ok(());
        }
        store.put_bytes(&digest, data).await
    }
    .await;
    (wire, result)
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<re::FindMissingBlobsRequest>,
    ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
        let timer = self.metrics.rpc("cas", "FindMissingBlobs");
        let r = async {
            let req = request.into_inner();
            crate::otlp::traces::record_request(&req.instance_name, None);
            let store = self.store(&req.instance_name)?;
            let mut digests = Vec::with_capacity(req.blob_digests.len());
            for d in &req.blob_digests {
                digests.push(Digest::from_proto(req.digest_function, d)?);
            }
            let to_ask: Vec<Digest> = digests
                .iter()
                .copied()
                .filter(|d| !d.is_empty_blob())
                .collect();
            // A blob stored with another size than its digest's (a truncated file, a value
            // cut short in a backend) is missing: the client uploads it again.
            let have: Vec<Option<u64>> = store
                .has_many(&to_ask)
                .await?
                .into_iter()
                .zip(&to_ask)
                .map(|(h, d)| h.filter(|size| *size == d.size()))
                .collect();
            let found = have.iter().filter(|h| h.is_some()).count() as u64;
            self.metrics.cas_lookups(
                digests.len() as u64,
                found + (digests.len() - to_ask.len()) as u64,
            );
            let missing = to_ask
                .iter()
                .zip(have)
                .filter(|(_, h)| h.is_none())
                .map(|(d, _)| d.to_proto())
                .collect();
            Ok(Response::new(re::FindMissingBlobsResponse {
                missing_blob_digests: missing,
            }))
        }
        .await
        .map_err(|e: Error| Status::from(e));
        timer.finish(&r);
        r
    }

    async fn batch_update_blobs(
        &self,
        request: Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
        let timer = self.metrics.rpc("cas", "BatchUpdateBlobs");
        let r = async {
            let req = request.into_inner();
            let store = self.store(&req.instance_name)?;
            // What the batch will occupy once decoded: for each entry the larger of the bytes
            // sent and the size its digest declares (a zstd entry inflates to the latter).
            // Checked before anything is decoded or allocated.
            let total = req.requests.iter().fold(0u64, |sum, r| {
                let declared = r
                    .digest
                    .as_ref()
                    .map_or(0, |d| u64::try_from(d.size_bytes).unwrap_or(0));
                sum.saturating_add(declared.max(r.data.len() as u64))
            });
            if total > self.limits.max_batch_total_size_bytes {
                return Err(Error::resource_exhausted(format!(
                    "BatchUpdateBlobs declares {total} bytes of blobs, more than max_batch_total_size_bytes ({}); upload large blobs with ByteStream.Write",
                    self.limits.max_batch_total_size_bytes
                )));
            }
            let first_hash_len = req
                .requests
                .first()
                .and_then(|r| r.digest.as_ref())
                .map_or(64, |d| d.hash.len());
            let function = DigestFunction::from_request(req.digest_function, first_hash_len)?;
            let store_ref: &dyn Store = store.as_ref();
            let zstd = self.zstd.contains(&req.instance_name);
            let responses: Vec<_> = stream::iter(req.requests)
                .map(|r| update_one(store_ref, zstd, function, r))
                .buffered(BATCH_CONCURRENCY)
                .map(|(digest, result)| re::batch_update_blobs_response::Response {
                    digest,
                    status: Some(match result {
                        Ok(()) => ok_status().unwrap_or_default(),
                        Err(e) => e.into(),
                    }),
                })
                .collect()
                .await;
            Ok(Response::new(re::BatchUpdateBlobsResponse { responses }))
        }
        .await
        .map_err(|e: Error| Status::from(e));
        timer.finish(&r);
        r
    }

    async fn batch_read_blobs(
        &self,
        request: Request<re::BatchReadBlobsRequest>,
    ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
        let timer = self.metrics.rpc("cas", "BatchReadBlobs");
        let r = async {
            let req = request.into_inner();
            let store = self.store(&req.instance_name)?;
            let mut digests = Vec::with_capacity(req.digests.len());
            for d in &req.digests {
                digests.push(Digest::from_proto(req.digest_function, d)?);
            }
            let total = digests
                .iter()
                .fold(0u64, |sum, d| sum.saturating_add(d.size()));
            if total > self.limits.max_batch_total_size_bytes {
                return Err(Error::resource_exhausted(format!(
                    "BatchReadBlobs asks for {total} bytes, more than max_batch_total_size_bytes ({}); read large blobs with ByteStream.Read",
                    self.limits.max_batch_total_size_bytes
                )));
            }
            let zstd = self.zstd.contains(&req.instance_name)
                && req.acceptable_compressors.contains(&(Compressor::Zstd as i32));
            let store_ref: &dyn Store = store.as_ref();
            let responses = stream::iter(digests)
                .map(|d| async move {
                    let result = if d.is_empty_blob() {
                        Ok(Bytes::new())
                    } else {
                        store_ref
                            .get_all(&d, d.size() as usize)
                            .await
                            .and_then(|data| {
                                if data.len() as u64 == d.size() {
                                    Ok(data)
                                } else {
                                    Err(Error::data_loss(format!(
                                        "{d}: the stored blob has {} bytes, its digest says {}; it is not served",
                                        data.len(),
                                        d.size()
                                    )))
                                }
                            })
                    };
                    let (data, compressor, status) = match result {
                        Ok(data) if zstd && data.len() > 64 => match zstd_codec::compress(&data) {
                            Ok(z) => (z, Compressor::Zstd as i32, ok_status()),
                            Err(e) => (vec![], 0, Some(e.into())),
                        },
                        Ok(data) => (data.to_vec(), 0, ok_status()),
                        Err(e) => (vec![], 0, Some(e.into())),
                    };
                    re::batch_read_blobs_response::Response {
                        digest: Some(d.to_proto()),
                        data,
                        compressor,
                        status,
                    }
                })
                .buffered(BATCH_CONCURRENCY)
                .collect()
                .await;
            Ok(Response::new(re::BatchReadBlobsResponse { responses }))
        }
        .await
        .map_err(|e: Error| Status::from(e));
        timer.finish(&r);
        r
    }

    type GetTreeStream = futures::stream::BoxStream<'static, Result<re::GetTreeResponse, Status>>;

    async fn get_tree(
        &self,
        request: Request<re::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let timer = self.metrics.rpc("cas", "GetTree");
        let r = async {
            let req = request.into_inner();
            let store = self.store(&req.instance_name)?;
            let root = req
                .root_digest
                .as_ref()
                .ok_or_else(|| Error::invalid_argument("GetTree: root_digest is missing"))?;
            let root = Digest::from_proto(req.digest_function, root)?;
            if req.page_size < 0 {
                return Err(Error::invalid_argument("GetTree: page_size is negative"));
            }
            let page = if req.page_size == 0 {
                DEFAULT_TREE_PAGE
            } else {
                (req.page_size as usize).min(MAX_TREE_PAGE)
            };
            let skip: usize = if req.page_token.is_empty() {
                0
            } else {
                req.page_token.parse().map_err(|_| {
                    Error::invalid_argument(format!(
                        "GetTree: page_token {:?} is not one this server issued",
                        req.page_token
                    ))
                })?
            };
            // The root must exist; missing subtrees are omitted, as the REAPI allows.
            if !root.is_empty_blob() && store.has(&root).await?.is_none() {
                return Err(Error::not_found(format!(
                    "GetTree: root directory {root} is not in the CAS"
                )));
            }
            Ok(tree_pages(
                store,
                root,
                skip,
                page,
                self.limits.max_message_bytes / 2,
            ))
        }
        .await
        .map_err(|e: Error| Status::from(e));
        timer.finish(&r);
        r.map(Response::new)
    }

    async fn split_blob(
        &self,
        request: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        let timer = self.metrics.rpc("cas", "SplitBlob");
        let req = request.into_inner();
        let r = self
            .split(
                "SplitBlob",
                &req.instance_name,
                req.digest_function,
                req.blob_digest.as_ref(),
            )
            .await
            .map(|chunk_digests| {
                Response::new(re::SplitBlobResponse {
                    chunk_digests,
                    chunking_function: CHUNKING_FUNCTION as i32,
                })
            })
            .map_err(Status::from);
        timer.finish(&r);
        r
    }

    type GetChunkMappingStream =
        futures::stream::BoxStream<'static, Result<re::GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        request: Request<re::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        let timer = self.metrics.rpc("cas", "GetChunkMapping");
        let req = request.into_inner();
        let r = self
            .split(
                "GetChunkMapping",
                &req.instance_name,
                req.digest_function,
                req.blob_digest.as_ref(),
            )
            .await
            .map(|chunks| {
                // Pages of MAPPING_PAGE digests (about 1 MB each); the chunking function is in
                // the first only. A blob of no chunks still gets one (empty) response.
                let mut pages: Vec<Vec<re::Digest>> = chunks
                    .chunks(MAPPING_PAGE)
                    .map(<[re::Digest]>::to_vec)
                    .collect();
                if pages.is_empty() {
                    pages.push(vec![]);
                }
                let stream =
                    stream::iter(pages.into_iter().enumerate().map(|(i, chunk_digests)| {
                        Ok(re::GetChunkMappingResponse {
                            chunk_digests,
                            chunking_function: if i == 0 { CHUNKING_FUNCTION as i32 } else { 0 },
                        })
                    }));
                Response::new(stream.boxed())
            })
            .map_err(Status::from);
        timer.finish(&r);
        r
    }

    async fn splice_blob(
        &self,
        request: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        let timer = self.metrics.rpc("cas", "SpliceBlob");
        let req = request.into_inner();
        let r = self
            .splice(
                "SpliceBlob",
                &req.instance_name,
                req.digest_function,
                req.blob_digest.as_ref(),
                &req.chunk_digests,
            )
            .await
            .map(|d| {
                Response::new(re::SpliceBlobResponse {
                    blob_digest: Some(d),
                })
            })
            .map_err(Status::from);
        timer.finish(&r);
        r
    }

    async fn register_chunk_mapping(
        &self,
        request: Request<tonic::Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
        let timer = self.metrics.rpc("cas", "RegisterChunkMapping");
        let mut messages = request.into_inner();
        let r = async {
            // The first message names the instance, the blob and the function; every message
            // adds chunk digests. The list is bounded by the instance's max_chunk_count.
            let first = messages
                .message()
                .await?
                .ok_or_else(|| Status::invalid_argument("RegisterChunkMapping: empty stream"))?;
            let chunker = self
                .chunker(&first.instance_name, "RegisterChunkMapping")
                .map_err(Status::from)?;
            let limit = chunker.max_chunks();
            let mut chunks = first.chunk_digests;
            while let Some(m) = messages.message().await? {
                chunks.extend(m.chunk_digests);
                if chunks.len() as u64 > limit {
                    return Err(Status::invalid_argument(format!(
                        "RegisterChunkMapping names more than {limit} chunks \
                         (services.cas[].experimental_chunking.max_chunk_count)"
                    )));
                }
            }
            let d = self
                .splice(
                    "RegisterChunkMapping",
                    &first.instance_name,
                    first.digest_function,
                    first.blob_digest.as_ref(),
                    &chunks,
                )
                .await
                .map_err(Status::from)?;
            Ok(Response::new(re::RegisterChunkMappingResponse {
                blob_digest: Some(d),
            }))
        }
        .await;
        timer.finish(&r);
        r
    }
}

/// Walks the tree breadth-first from `root` (each directory once), skipping the first `skip`
/// directories, and yields pages of `page` directories. The page token is the count of
/// directories sent so far: the walk order is a function of the tree, so it resumes exactly.
/// A page also ends before its encoded directories pass `page_bytes`, so that no response
/// outgrows the message limit; a walk of more than [`MAX_TREE_DIRECTORIES`] fails with
/// RESOURCE_EXHAUSTED.
fn tree_pages(
    store: StoreRef,
    root: Digest,
    skip: usize,
    page: usize,
    page_bytes: usize,
) -> futures::stream::BoxStream<'static, Result<re::GetTreeResponse, Status>> {
    struct Walk {
        store: StoreRef,
        queue: VecDeque<Digest>,
        seen: HashSet<Digest>,
        index: usize,
        skip: usize,
        page: usize,
        done: bool,
    }
    let mut seen = HashSet::new();
    seen.insert(root);
    let walk = Walk {
        store,
        queue: VecDeque::from([root]),
        seen,
        index: 0,
        skip,
        page,
        done: false,
    };
    stream::unfold(walk, move |mut w| async move {
        if w.done {
            return None;
        }
        let mut directories = Vec::new();
        let mut bytes = 0usize;
        while directories.len() < w.page && bytes < page_bytes {
            let Some(d) = w.queue.pop_front() else { break };
            let dir = if d.is_empty_blob() {
                re::Directory::default()
            } else {
                match w.store.get_all(&d, MAX_DIRECTORY_BYTES).await {
                    Ok(bytes) => match re::Directory::decode(bytes.as_ref()) {
                        Ok(dir) => dir,
                        Err(e) => {
                            w.done = true;
                            let e = Error::invalid_argument(format!(
                                "GetTree: {d} is not a Directory: {e}"
                            ));
                            return Some((Err(e.into()), w));
                        }
                    },
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => {
                        w.done = true;
                        return Some((Err(e.into()), w));
                    }
                }
            };
            for child in &dir.directories {
                if let Some(cd) = child
                    .digest
                    .as_ref()
                    .and_then(|cd| Digest::from_proto_with(d.function(), cd).ok())
                {
                    if w.seen.len() >= MAX_TREE_DIRECTORIES {
                        w.done = true;
                        let e = Error::resource_exhausted(format!(
                            "GetTree: the tree under {root} has more than {MAX_TREE_DIRECTORIES} directories; this server walks at most that many in one GetTree"
                        ));
                        return Some((Err(e.into()), w));
                    }
                    if w.seen.insert(cd) {
                        w.queue.push_back(cd);
                    }
                }
            }
            w.index += 1;
            if w.index > w.skip {
                bytes += dir.encoded_len();
                directories.push(dir);
            }
        }
        if w.queue.is_empty() {
            w.done = true;
        }
        if directories.is_empty() && w.done && w.index > 0 && w.index <= w.skip {
            // The token pointed past the end.
            return None;
        }
        let next_page_token = if w.done {
            String::new()
        } else {
            w.index.to_string()
        };
        Some((
            Ok(re::GetTreeResponse {
                directories,
                next_page_token,
            }),
            w,
        ))
    })
    .boxed()
}
