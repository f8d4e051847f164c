//! The `cas` and `ac` phases: many small blobs from concurrent clients, and GetActionResult
//! round-robin over stored action results.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use re::action_cache_client::ActionCacheClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::{
    ac_client, cas_client, fill_pseudo_random, latency_summary, mb_per_s, report, secs,
    with_timeout, Bench, Errors, BLOB_HEADER, MAX_BATCH_BYTES, RPC_TIMEOUT,
};

/// Small blobs per BatchUpdateBlobs, unless [`MAX_BATCH_BYTES`] allows fewer.
const BLOBS_PER_BATCH: usize = 100;
/// Action keys the `ac` phase stores and then reads round-robin.
const AC_ACTIONS: usize = 100;
const KIND_CAS: u64 = 1;
const KIND_AC_OUTPUT: u64 = 2;
const KIND_AC_ACTION: u64 = 3;

impl Bench {
    /// Unique blobs of this run, for the other phases.
    pub(super) fn unique_blobs(&self) -> UniqueBlob {
        self.blobs()
    }

    fn blobs(&self) -> UniqueBlob {
        UniqueBlob {
            run_id: self.run_id,
            function: self.function,
        }
    }

    /// `clients` tasks upload unique small blobs, FindMissingBlobs then BatchUpdateBlobs.
    pub(super) async fn cas(&self) -> anyhow::Result<u64> {
        let per_batch = BLOBS_PER_BATCH
            .min(MAX_BATCH_BYTES / self.small_size)
            .max(1);
        let channels = self.connect_clients().await?;
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        for channel in channels {
            let job = CasJob {
                client: cas_client(channel),
                next: next.clone(),
                total: self.requests,
                per_batch,
                request: self.request_template(),
                blobs: self.blobs(),
                small_size: self.small_size,
            };
            tasks.spawn(job.run());
        }
        let mut stats = CasStats::default();
        while let Some(joined) = tasks.join_next().await {
            stats.merge(joined?);
        }
        let elapsed = start.elapsed();

        let bytes = stats.written as u64 * self.small_size as u64;
        report(
            "cas:",
            format_args!(
                "{} blobs x {} bytes in {:.2} s = {:.0} blobs/s, {:.1} MB/s ({} clients, {per_batch} \
                 blobs per batch)",
                stats.written,
                self.small_size,
                secs(elapsed),
                stats.written as f64 / elapsed.as_secs_f64(),
                mb_per_s(bytes, elapsed),
                self.clients
            ),
        );
        if stats.present > 0 {
            report(
                "cas already present:",
                format_args!("{} blobs (not uploaded)", stats.present),
            );
        }
        report("cas FindMissingBlobs:", latency_summary(stats.find));
        report("cas BatchUpdateBlobs:", latency_summary(stats.update));
        stats.errors.report("cas errors:");
        Ok(stats.errors.count)
    }

    /// Stores [`AC_ACTIONS`] action results, then `clients` tasks read them round-robin.
    pub(super) async fn ac(&self) -> anyhow::Result<u64> {
        let channel = self.connect().await?;
        let mut cas = cas_client(channel.clone());
        let mut ac = ac_client(channel);
        let template = self.request_template();

        let outputs: Vec<(Digest, Vec<u8>)> = (0..AC_ACTIONS)
            .map(|i| self.blobs().make(KIND_AC_OUTPUT, i, self.small_size))
            .collect();
        let per_batch = BLOBS_PER_BATCH
            .min(MAX_BATCH_BYTES / self.small_size)
            .max(1);
        let mut outputs = outputs.into_iter().peekable();
        let mut entries = Vec::with_capacity(AC_ACTIONS);
        while outputs.peek().is_some() {
            let batch: Vec<(Digest, Vec<u8>)> = outputs.by_ref().take(per_batch).collect();
            entries.extend(batch.iter().map(|(digest, _)| digest.to_proto()));
            let (_, errors) = batch_update(&mut cas, &template, batch).await;
            if errors.count > 0 {
                bail!(
                    "uploading the action outputs: {} blobs failed, first: {}",
                    errors.count,
                    errors.first.unwrap_or_default()
                );
            }
        }

        let mut updates = Vec::with_capacity(AC_ACTIONS);
        let mut actions = Vec::with_capacity(AC_ACTIONS);
        for (i, output) in entries.into_iter().enumerate() {
            let (action, _) = self.blobs().make(KIND_AC_ACTION, i, BLOB_HEADER);
            let request = re::UpdateActionResultRequest {
                instance_name: self.instance.clone(),
                action_digest: Some(action.to_proto()),
                action_result: Some(re::ActionResult {
                    output_files: vec![re::OutputFile {
                        path: format!("out/{i}"),
                        digest: Some(output.clone()),
                        ..Default::default()
                    }],
                    exit_code: 0,
                    ..Default::default()
                }),
                results_cache_policy: None,
                digest_function: template.digest_function,
            };
            let start = Instant::now();
            ac.update_action_result(with_timeout(request, RPC_TIMEOUT))
                .await
                .with_context(|| format!("UpdateActionResult of {action}"))?;
            updates.push(start.elapsed());
            actions.push((action.to_proto(), output));
        }
        report("ac UpdateActionResult:", latency_summary(updates));

        let actions = Arc::new(actions);
        let channels = self.connect_clients().await?;
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        for channel in channels {
            let job = AcJob {
                client: ac_client(channel),
                next: next.clone(),
                total: self.requests,
                actions: actions.clone(),
                request: template.clone(),
            };
            tasks.spawn(job.run());
        }
        let mut latencies = Vec::with_capacity(self.requests);
        let mut errors = Errors::default();
        while let Some(joined) = tasks.join_next().await {
            let (task_latencies, task_errors) = joined?;
            latencies.extend(task_latencies);
            errors.merge(task_errors);
        }
        let elapsed = start.elapsed();
        report(
            "ac GetActionResult:",
            format_args!(
                "{} requests in {:.2} s = {:.0} requests/s ({} clients)",
                latencies.len(),
                secs(elapsed),
                latencies.len() as f64 / elapsed.as_secs_f64(),
                self.clients
            ),
        );
        report("ac GetActionResult latency:", latency_summary(latencies));
        errors.report("ac errors:");
        Ok(errors.count)
    }

    /// The fields every CAS and AC request of this run shares.
    fn request_template(&self) -> RequestTemplate {
        RequestTemplate {
            instance_name: self.instance.clone(),
            digest_function: self.function.to_proto(),
        }
    }
}

#[derive(Clone)]
struct RequestTemplate {
    instance_name: String,
    digest_function: i32,
}

/// One client of the `cas` phase: claims batches of blob indexes until `total` are claimed.
struct CasJob {
    client: ContentAddressableStorageClient<Channel>,
    next: Arc<AtomicUsize>,
    total: usize,
    per_batch: usize,
    request: RequestTemplate,
    blobs: UniqueBlob,
    small_size: usize,
}

#[derive(Default)]
struct CasStats {
    find: Vec<Duration>,
    update: Vec<Duration>,
    written: usize,
    present: usize,
    errors: Errors,
}

impl CasStats {
    fn merge(&mut self, other: CasStats) {
        self.find.extend(other.find);
        self.update.extend(other.update);
        self.written += other.written;
        self.present += other.present;
        self.errors.merge(other.errors);
    }
}

impl CasJob {
    async fn run(mut self) -> CasStats {
        let mut stats = CasStats::default();
        loop {
            let first = self.next.fetch_add(self.per_batch, Ordering::Relaxed);
            if first >= self.total {
                return stats;
            }
            let count = self.per_batch.min(self.total - first);
            // Making a batch hashes up to MAX_BATCH_BYTES: off the reactor.
            let (maker, size) = (self.blobs, self.small_size);
            let made = tokio::task::spawn_blocking(move || {
                (first..first + count)
                    .map(|i| maker.make(KIND_CAS, i, size))
                    .collect::<Vec<_>>()
            })
            .await;
            let blobs = match made {
                Ok(blobs) => blobs,
                Err(e) => {
                    stats
                        .errors
                        .record(format_args!("making blobs {first}..: {e}"));
                    continue;
                }
            };

            let find = re::FindMissingBlobsRequest {
                instance_name: self.request.instance_name.clone(),
                blob_digests: blobs.iter().map(|(d, _)| d.to_proto()).collect(),
                digest_function: self.request.digest_function,
            };
            let start = Instant::now();
            let missing = match self
                .client
                .find_missing_blobs(with_timeout(find, RPC_TIMEOUT))
                .await
            {
                Ok(response) => response.into_inner().missing_blob_digests,
                Err(status) => {
                    stats
                        .errors
                        .record(format_args!("FindMissingBlobs: {status}"));
                    continue;
                }
            };
            stats.find.push(start.elapsed());
            let missing: HashSet<String> = missing.into_iter().map(|d| d.hash).collect();
            let upload: Vec<(Digest, Vec<u8>)> = blobs
                .into_iter()
                .filter(|(d, _)| missing.contains(&d.hash_hex()))
                .collect();
            stats.present += count - upload.len();
            if upload.is_empty() {
                continue;
            }
            let start = Instant::now();
            let (written, errors) = batch_update(&mut self.client, &self.request, upload).await;
            stats.update.push(start.elapsed());
            stats.written += written;
            stats.errors.merge(errors);
        }
    }
}

/// One client of the `ac` phase: GetActionResult round-robin over `actions`.
struct AcJob {
    client: ActionCacheClient<Channel>,
    next: Arc<AtomicUsize>,
    total: usize,
    /// (action digest, digest of its one output file)
    actions: Arc<Vec<(re::Digest, re::Digest)>>,
    request: RequestTemplate,
}

impl AcJob {
    async fn run(mut self) -> (Vec<Duration>, Errors) {
        let mut latencies = Vec::new();
        let mut errors = Errors::default();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.total {
                return (latencies, errors);
            }
            let (action, output) = &self.actions[i % self.actions.len()];
            let request = re::GetActionResultRequest {
                instance_name: self.request.instance_name.clone(),
                action_digest: Some(action.clone()),
                inline_stdout: false,
                inline_stderr: false,
                inline_output_files: Vec::new(),
                digest_function: self.request.digest_function,
            };
            let start = Instant::now();
            let result = self
                .client
                .get_action_result(with_timeout(request, RPC_TIMEOUT))
                .await;
            latencies.push(start.elapsed());
            match result {
                Ok(response) => {
                    let result = response.into_inner();
                    let got = result.output_files.first().and_then(|f| f.digest.as_ref());
                    if got != Some(output) {
                        errors.record(format_args!(
                            "GetActionResult of {}: output file {got:?}, expected {output:?}",
                            action.hash
                        ));
                    }
                }
                Err(status) => {
                    errors.record(format_args!("GetActionResult of {}: {status}", action.hash))
                }
            }
        }
    }
}

/// The digest function and run id that make unique small blobs.
#[derive(Clone, Copy)]
pub(super) struct UniqueBlob {
    run_id: u64,
    function: DigestFunction,
}

impl UniqueBlob {
    /// A blob that no other blob of any run shares: run id and (kind, index), then noise.
    pub(super) fn make(&self, kind: u64, index: usize, size: usize) -> (Digest, Vec<u8>) {
        let tag = (kind << 56) | index as u64;
        let mut data = vec![0u8; size];
        fill_pseudo_random(self.run_id ^ tag.rotate_left(17), 0, &mut data);
        let header = [self.run_id.to_le_bytes(), tag.to_le_bytes()].concat();
        let n = header.len().min(size);
        data[..n].copy_from_slice(&header[..n]);
        (self.function.compute(&data), data)
    }
}

/// Uploads `blobs` in one BatchUpdateBlobs; returns how many the server stored and the failures.
async fn batch_update(
    client: &mut ContentAddressableStorageClient<Channel>,
    template: &RequestTemplate,
    blobs: Vec<(Digest, Vec<u8>)>,
) -> (usize, Errors) {
    let mut errors = Errors::default();
    let count = blobs.len();
    let request = re::BatchUpdateBlobsRequest {
        instance_name: template.instance_name.clone(),
        requests: blobs
            .into_iter()
            .map(|(digest, data)| re::batch_update_blobs_request::Request {
                digest: Some(digest.to_proto()),
                data,
                ..Default::default()
            })
            .collect(),
        digest_function: template.digest_function,
    };
    let responses = match client
        .batch_update_blobs(with_timeout(request, RPC_TIMEOUT))
        .await
    {
        Ok(response) => response.into_inner().responses,
        Err(status) => {
            errors.record(format_args!("BatchUpdateBlobs of {count} blobs: {status}"));
            return (0, errors);
        }
    };
    let mut written = 0;
    for response in &responses {
        match &response.status {
            Some(status) if status.code != 0 => {
                let hash = response.digest.as_ref().map_or("?", |d| d.hash.as_str());
                errors.record(format_args!(
                    "BatchUpdateBlobs of {hash}: code {} {}",
                    status.code, status.message
                ));
            }
            _ => written += 1,
        }
    }
    if responses.len() != count {
        errors.record(format_args!(
            "BatchUpdateBlobs of {count} blobs answered {} responses",
            responses.len()
        ));
    }
    (written, errors)
}
