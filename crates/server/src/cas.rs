//! ContentAddressableStorage: FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, GetTree.
//!
//! Every uploaded blob is checked against its digest (size and hash) before it is stored; a
//! bad blob in a batch fails alone, with INVALID_ARGUMENT in its own response entry. Batches
//! are bounded by `max_batch_total_size_bytes` (RESOURCE_EXHAUSTED past it).

use std::collections::{HashSet, VecDeque};
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
}

impl CasService {
    pub fn new(instances: Instances, limits: Limits, metrics: Arc<Metrics>) -> CasService {
        CasService {
            instances,
            limits,
            metrics,
        }
    }

    fn store(&self, instance: &str) -> Result<StoreRef, Status> {
        Ok(self.instances.get(instance)?.clone())
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
            Ok(Compressor::Zstd) => {
                zstd_codec::decompress_exact(&req.data, digest.size(), &digest)?
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
            let have = store.has_many(&to_ask).await?;
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
            let responses: Vec<_> = stream::iter(req.requests)
                .map(|r| update_one(store_ref, function, r))
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
            let zstd = req.acceptable_compressors.contains(&(Compressor::Zstd as i32));
            let store_ref: &dyn Store = store.as_ref();
            let responses = stream::iter(digests)
                .map(|d| async move {
                    let result = if d.is_empty_blob() {
                        Ok(Bytes::new())
                    } else {
                        store_ref.get_all(&d, d.size() as usize).await
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
        _: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SplitBlob is not supported by this server",
        ))
    }

    type GetChunkMappingStream =
        futures::stream::BoxStream<'static, Result<re::GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        _: Request<re::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented(
            "GetChunkMapping is not supported by this server",
        ))
    }

    async fn splice_blob(
        &self,
        _: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SpliceBlob is not supported by this server",
        ))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented(
            "RegisterChunkMapping is not supported by this server",
        ))
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
