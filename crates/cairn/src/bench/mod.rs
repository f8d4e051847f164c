//! `cairn bench`: a load generator for any REAPI v2 server.
//!
//! It first measures this machine's single-core SHA-256 rate, so that results read as ratios
//! rather than as numbers tied to one CPU, then runs any of three phases:
//! - `bytestream`: one large pseudo-random blob written with ByteStream.Write and read back with
//!   ByteStream.Read. The blob is a [`POOL_BYTES`] pseudo-random pool repeated to the blob's
//!   size, generated and hashed before the clock starts, so the client holds the pool, never the
//!   whole blob, and spends no CPU making data while the server is being measured.
//! - `cas`: `clients` connections, each doing FindMissingBlobs then BatchUpdateBlobs of unique
//!   small blobs until `requests` blobs are written in total.
//! - `ac`: UpdateActionResult for [`AC_ACTIONS`] actions whose result references an uploaded
//!   blob, then `clients` connections doing GetActionResult round-robin over them.
//!
//! Every run draws a fresh run id that goes into each blob and action key, so a run never finds
//! the previous run's data already stored. Output is plain text on stdout. A phase that cannot run
//! reports why and the next phase still runs; [`run`] returns an error when any phase failed or
//! any request failed, so scripts can rely on the exit status.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use futures::StreamExt;
use re::action_cache_client::ActionCacheClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

mod execute;
mod wire_client;

/// Largest gRPC message the bench clients send or accept.
const MAX_MESSAGE: usize = 64 << 20;
/// Payload of one ByteStream.Write request.
const WRITE_CHUNK: usize = 1 << 20;
/// The pseudo-random pool a bench blob repeats; a multiple of [`WRITE_CHUNK`].
const POOL_BYTES: usize = 64 << 20;
/// Small blobs per BatchUpdateBlobs, unless [`MAX_BATCH_BYTES`] allows fewer.
const BLOBS_PER_BATCH: usize = 100;
/// Blob bytes per BatchUpdateBlobs: below the 4 MiB that servers commonly advertise as
/// `max_batch_total_size_bytes`, with room for the digests.
const MAX_BATCH_BYTES: usize = (4 << 20) - (64 << 10);
/// Action keys the `ac` phase stores and then reads round-robin.
const AC_ACTIONS: usize = 100;
/// Deadline of one unary RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// A ByteStream transfer gets [`RPC_TIMEOUT`] plus its size at this rate (bytes/s).
const MIN_TRANSFER_RATE: u64 = 5_000_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 receive windows; large so that ByteStream.Read is not bound by flow control.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame the server may send us. 256 KiB instead of the 16 KiB default: a 1 GiB
/// ByteStream.Read went from about 1.0 to 1.5 GB/s (fewer frames, headers and wakeups), and
/// larger frames measured no faster.
const MAX_FRAME: u32 = 256 << 10;
/// The hash-rate reference: this buffer, hashed this many times on one thread.
const HASH_BUFFER: usize = 64 << 20;
const HASH_PASSES: u64 = 4;
/// Small blobs start with the run id and a (kind, index) word, so each one is unique.
const BLOB_HEADER: usize = 16;
const KIND_CAS: u64 = 1;
const KIND_AC_OUTPUT: u64 = 2;
const KIND_AC_ACTION: u64 = 3;
/// Width of the label column of the output.
const LABEL_WIDTH: usize = 28;

/// Options of `cairn bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to run: bytestream | cas | ac | execute | all (all = the cache benches) (or a comma-separated list)
    #[arg(default_value = "all")]
    pub what: String,
    /// REAPI endpoint, e.g. grpc://127.0.0.1:50051
    #[arg(long, default_value = "grpc://127.0.0.1:50051")]
    pub endpoint: String,
    #[arg(long, default_value = "")]
    pub instance_name: String,
    /// Concurrent clients
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// ByteStream blob size, e.g. 1GiB / 100MB
    #[arg(long, default_value = "1GiB")]
    pub blob_size: String,
    /// Number of small blobs (cas) / requests (ac) in total
    #[arg(long, default_value_t = 20000)]
    pub requests: usize,
    /// Size of each small blob (cas, ac)
    #[arg(long, default_value = "4KiB")]
    pub small_size: String,
    /// sha256 | blake3
    #[arg(long, default_value = "sha256")]
    pub digest_function: String,
}

/// Runs the phases `args.what` names against `args.endpoint` and prints the results.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let phases = Phase::parse_list(&args.what)?;
    let bench = Bench::new(&args)?;

    let (bytes, elapsed) =
        tokio::task::spawn_blocking(|| measure_hash_rate(DigestFunction::Sha256)).await?;
    let sha256_mb_s = mb_per_s(bytes, elapsed);
    report(
        "sha256 single core:",
        format_args!(
            "{bytes} bytes in {:.2} s = {sha256_mb_s:.0} MB/s",
            secs(elapsed)
        ),
    );
    if bench.function != DigestFunction::Sha256 {
        let function = bench.function;
        let (bytes, elapsed) =
            tokio::task::spawn_blocking(move || measure_hash_rate(function)).await?;
        report(
            &format!("{function} single core:"),
            format_args!(
                "{bytes} bytes in {:.2} s = {:.0} MB/s",
                secs(elapsed),
                mb_per_s(bytes, elapsed)
            ),
        );
    }
    let bench = Bench {
        sha256_mb_s,
        ..bench
    };

    let mut failed = Vec::new();
    let mut errors = 0;
    for phase in phases {
        let outcome = match phase {
            Phase::ByteStream => bench.bytestream().await,
            Phase::Cas => bench.cas().await,
            Phase::Ac => bench.ac().await,
            Phase::Execute => bench.execute().await,
        };
        match outcome {
            Ok(n) => errors += n,
            Err(e) => {
                report(&format!("{phase}:"), format_args!("FAILED: {e:#}"));
                failed.push(phase.to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!("bench phases failed: {}", failed.join(", "));
    }
    if errors > 0 {
        bail!("bench finished with {errors} failed requests");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ByteStream,
    Cas,
    Ac,
    Execute,
}

impl Phase {
    fn parse_list(what: &str) -> anyhow::Result<Vec<Phase>> {
        let mut phases = Vec::new();
        for name in what.split(',').map(str::trim) {
            match name.to_ascii_lowercase().as_str() {
                "all" => phases.extend([Phase::ByteStream, Phase::Cas, Phase::Ac]),
                "bytestream" => phases.push(Phase::ByteStream),
                "cas" => phases.push(Phase::Cas),
                "ac" => phases.push(Phase::Ac),
                "execute" => phases.push(Phase::Execute),
                _ => bail!("unknown bench {name:?}; expected bytestream, cas, ac, execute or all"),
            }
        }
        Ok(phases)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::ByteStream => "bytestream",
            Phase::Cas => "cas",
            Phase::Ac => "ac",
            Phase::Execute => "execute",
        })
    }
}

/// The validated settings of one bench run.
struct Bench {
    url: String,
    endpoint: Endpoint,
    instance: String,
    function: DigestFunction,
    clients: usize,
    blob_size: u64,
    requests: usize,
    small_size: usize,
    run_id: u64,
    sha256_mb_s: f64,
}

impl Bench {
    fn new(args: &BenchArgs) -> anyhow::Result<Bench> {
        let function = DigestFunction::from_name(&args.digest_function).with_context(|| {
            format!(
                "--digest-function {:?}: expected sha256 or blake3",
                args.digest_function
            )
        })?;
        let blob_size = cairn_config::parse_size(&args.blob_size)
            .map_err(|e| anyhow::anyhow!("--blob-size {:?}: {e}", args.blob_size))?;
        let small_size = cairn_config::parse_size(&args.small_size)
            .map_err(|e| anyhow::anyhow!("--small-size {:?}: {e}", args.small_size))?;
        let small_size = usize::try_from(small_size)
            .ok()
            .filter(|n| (BLOB_HEADER..=MAX_BATCH_BYTES).contains(n))
            .with_context(|| {
                format!(
                    "--small-size {:?}: must be {BLOB_HEADER} to {MAX_BATCH_BYTES} bytes (unique \
                     and small enough for one BatchUpdateBlobs)",
                    args.small_size
                )
            })?;
        if args.clients == 0 {
            bail!("--clients must be at least 1");
        }
        if args.requests == 0 {
            bail!("--requests must be at least 1");
        }
        Ok(Bench {
            url: args.endpoint.clone(),
            endpoint: endpoint(&args.endpoint)?,
            instance: args.instance_name.clone(),
            function,
            clients: args.clients,
            blob_size,
            requests: args.requests,
            small_size,
            run_id: rand::random(),
            sha256_mb_s: 0.0,
        })
    }

    async fn connect(&self) -> anyhow::Result<Channel> {
        self.endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.url))
    }

    /// `{instance}/` or nothing, the start of every resource name.
    fn resource_prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    fn blobs(&self) -> UniqueBlob {
        UniqueBlob {
            run_id: self.run_id,
            function: self.function,
        }
    }

    /// Writes one big blob with ByteStream.Write, reads it back, reports both rates.
    async fn bytestream(&self) -> anyhow::Result<u64> {
        let size = self.blob_size;
        let seed = self.run_id;
        let function = self.function;

        let start = Instant::now();
        let (blob, digest) = tokio::task::spawn_blocking(move || {
            let blob = GeneratedBlob::new(seed, size);
            let digest = blob.digest(function);
            (blob, digest)
        })
        .await?;
        let elapsed = start.elapsed();
        report(
            "bytestream generate+hash:",
            format_args!(
                "{size} bytes in {:.2} s = {:.0} MB/s ({digest})",
                secs(elapsed),
                mb_per_s(size, elapsed)
            ),
        );

        let channel = self.connect().await?;
        let blob_path = blob_path(&digest);
        let upload = format!(
            "{}uploads/{}/blobs/{blob_path}",
            self.resource_prefix(),
            uuid::Uuid::new_v4()
        );
        let chunks = blob.chunks();
        // Every request's data is a slice of the pool: nothing is generated or copied here.
        let body = futures::stream::iter(0..chunks).map(move |index| {
            let resource_name = if index == 0 {
                upload.clone()
            } else {
                String::new()
            };
            blob.write_request(index, resource_name)
        });
        let timeout = transfer_timeout(size);

        let start = Instant::now();
        let response = wire_client::write(channel.clone(), with_timeout(body, timeout))
            .await
            .context("ByteStream.Write")?;
        let elapsed = start.elapsed();
        if response.committed_size != size as i64 {
            bail!(
                "ByteStream.Write of {digest}: committed_size {} instead of {size}",
                response.committed_size
            );
        }
        let write_mb_s = mb_per_s(size, elapsed);
        report(
            "bytestream write:",
            format_args!(
                "{size} bytes in {:.2} s = {write_mb_s:.0} MB/s ({:.2} x sha256)",
                secs(elapsed),
                write_mb_s / self.sha256_mb_s
            ),
        );

        let read = cairn_server::bytestream_wire::ReadRequest {
            resource_name: format!("{}blobs/{blob_path}", self.resource_prefix()),
            read_offset: 0,
            read_limit: 0,
        };
        let start = Instant::now();
        let mut stream = wire_client::read(channel, MAX_MESSAGE, with_timeout(read, timeout))
            .await
            .context("ByteStream.Read")?;
        let mut received = 0u64;
        while let Some(message) = stream.message().await.context("ByteStream.Read")? {
            received += message.data.len() as u64;
        }
        let elapsed = start.elapsed();
        if received != size {
            bail!("ByteStream.Read of {digest}: got {received} bytes instead of {size}");
        }
        let read_mb_s = mb_per_s(size, elapsed);
        report(
            "bytestream read:",
            format_args!(
                "{size} bytes in {:.2} s = {read_mb_s:.0} MB/s ({:.2} x sha256)",
                secs(elapsed),
                read_mb_s / self.sha256_mb_s
            ),
        );
        Ok(0)
    }

    /// `clients` tasks upload unique small blobs, FindMissingBlobs then BatchUpdateBlobs.
    async fn cas(&self) -> anyhow::Result<u64> {
        let per_batch = BLOBS_PER_BATCH
            .min(MAX_BATCH_BYTES / self.small_size)
            .max(1);
        let mut channels = Vec::with_capacity(self.clients);
        for _ in 0..self.clients {
            channels.push(self.connect().await?);
        }
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
    async fn ac(&self) -> anyhow::Result<u64> {
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
        let mut channels = Vec::with_capacity(self.clients);
        for _ in 0..self.clients {
            channels.push(self.connect().await?);
        }
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
struct UniqueBlob {
    run_id: u64,
    function: DigestFunction,
}

impl UniqueBlob {
    /// A blob that no other blob of any run shares: run id and (kind, index), then noise.
    fn make(&self, kind: u64, index: usize, size: usize) -> (Digest, Vec<u8>) {
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

/// Failed requests: how many, and the first message to show.
#[derive(Default)]
struct Errors {
    count: u64,
    first: Option<String>,
}

impl Errors {
    fn record(&mut self, what: impl fmt::Display) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(what.to_string());
        }
    }

    fn merge(&mut self, other: Errors) {
        self.count += other.count;
        if self.first.is_none() {
            self.first = other.first;
        }
    }

    fn report(&self, label: &str) {
        match &self.first {
            Some(first) => report(label, format_args!("{} (first: {first})", self.count)),
            None => report(label, self.count),
        }
    }
}

/// The tonic endpoint for `url` (`grpc://host:port`, `http://host:port` or `host:port`).
fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let uri = match url.split_once("://") {
        Some(("grpc" | "http", rest)) => format!("http://{rest}"),
        Some(("grpcs" | "https", _)) => {
            bail!(
                "--endpoint {url}: TLS endpoints are not supported (this build has no TLS client)"
            )
        }
        Some((scheme, _)) => {
            bail!("--endpoint {url}: unknown scheme {scheme}://, expected grpc:// or http://")
        }
        None => format!("http://{url}"),
    };
    Ok(Endpoint::from_shared(uri)
        .with_context(|| format!("--endpoint {url}: not a valid address"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME))
}

fn cas_client(channel: Channel) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn ac_client(channel: Channel) -> ActionCacheClient<Channel> {
    ActionCacheClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

fn transfer_timeout(size: u64) -> Duration {
    RPC_TIMEOUT + Duration::from_secs(size / MIN_TRANSFER_RATE)
}

/// `{hash}/{size}`, with the function first where the REAPI requires it (BLAKE3, whose hashes
/// have the length of SHA-256 ones).
fn blob_path(digest: &Digest) -> String {
    match digest.function() {
        DigestFunction::Blake3 => format!("blake3/{}/{}", digest.hash_hex(), digest.size()),
        _ => format!("{}/{}", digest.hash_hex(), digest.size()),
    }
}

/// A bench blob: a [`POOL_BYTES`] pseudo-random pool (from a seed) repeated to `size` bytes.
#[derive(Clone)]
struct GeneratedBlob {
    pool: bytes::Bytes,
    size: u64,
}

impl GeneratedBlob {
    fn new(seed: u64, size: u64) -> GeneratedBlob {
        let mut pool = vec![0u8; size.min(POOL_BYTES as u64) as usize];
        fill_pseudo_random(seed, 0, &mut pool);
        GeneratedBlob {
            pool: pool.into(),
            size,
        }
    }

    /// Number of ByteStream.Write requests (at least one, for the empty blob).
    fn chunks(&self) -> u64 {
        self.size.div_ceil(WRITE_CHUNK as u64).max(1)
    }

    /// Bytes `offset..offset + len` of the blob, which never cross the pool's end: the pool is
    /// a multiple of [`WRITE_CHUNK`], or the whole blob.
    fn slice(&self, offset: u64, len: usize) -> bytes::Bytes {
        let at = (offset % self.pool.len().max(1) as u64) as usize;
        self.pool.slice(at..at + len)
    }

    /// Request `index` of [`Self::chunks`].
    fn write_request(
        &self,
        index: u64,
        resource_name: String,
    ) -> cairn_server::bytestream_wire::WriteRequest {
        let offset = index * WRITE_CHUNK as u64;
        let len = (self.size - offset).min(WRITE_CHUNK as u64) as usize;
        cairn_server::bytestream_wire::WriteRequest {
            resource_name,
            write_offset: offset as i64,
            finish_write: index + 1 == self.chunks(),
            data: self.slice(offset, len),
        }
    }

    fn digest(&self, function: DigestFunction) -> Digest {
        let mut hasher = function.hasher();
        let mut offset = 0;
        while offset < self.size {
            let len = (self.size - offset).min(WRITE_CHUNK as u64) as usize;
            hasher.update(&self.slice(offset, len));
            offset += len as u64;
        }
        hasher.finish_with_size(self.size)
    }
}

/// Hashes [`HASH_BUFFER`] bytes [`HASH_PASSES`] times on this thread; returns bytes and time.
fn measure_hash_rate(function: DigestFunction) -> (u64, Duration) {
    let mut buf = vec![0u8; HASH_BUFFER];
    fill_pseudo_random(0x5eed, 0, &mut buf);
    // One untimed pass brings the buffer into the page tables and the hasher code into cache.
    std::hint::black_box(function.compute(&buf));
    let start = Instant::now();
    for _ in 0..HASH_PASSES {
        std::hint::black_box(function.compute(std::hint::black_box(&buf)));
    }
    (HASH_BUFFER as u64 * HASH_PASSES, start.elapsed())
}

/// Fills `buf` with bytes `offset..offset + buf.len()` of the endless pseudo-random stream that
/// `seed` names (SplitMix64 of a counter, so any chunk can be made on its own). `offset` must be
/// a multiple of 8, as every chunk boundary here is.
fn fill_pseudo_random(seed: u64, offset: u64, buf: &mut [u8]) {
    debug_assert_eq!(offset % 8, 0);
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut state = seed.wrapping_add((offset / 8).wrapping_mul(GOLDEN));
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        state = state.wrapping_add(GOLDEN);
        word.copy_from_slice(&splitmix64(state).to_le_bytes());
    }
    let tail = words.into_remainder();
    if !tail.is_empty() {
        state = state.wrapping_add(GOLDEN);
        let len = tail.len();
        tail.copy_from_slice(&splitmix64(state).to_le_bytes()[..len]);
    }
}

fn splitmix64(state: u64) -> u64 {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `count calls: p50 .. ms, p99 .. ms, max .. ms` (nearest-rank percentiles).
fn latency_summary(mut latencies: Vec<Duration>) -> String {
    if latencies.is_empty() {
        return "no successful calls".to_string();
    }
    latencies.sort_unstable();
    let at = |p: f64| {
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        millis(latencies[rank.clamp(1, latencies.len()) - 1])
    };
    format!(
        "{} calls: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        at(50.0),
        at(99.0),
        at(100.0)
    )
}

fn report(label: &str, text: impl fmt::Display) {
    println!("{label:<LABEL_WIDTH$} {text}");
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_chunks_match_the_whole_stream() {
        let mut whole = vec![0u8; 100];
        fill_pseudo_random(7, 0, &mut whole);
        let mut part = vec![0u8; 36];
        fill_pseudo_random(7, 64, &mut part);
        assert_eq!(&whole[64..], &part[..]);
        let mut other = vec![0u8; 100];
        fill_pseudo_random(8, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn write_requests_cover_the_blob_once() {
        for size in [
            0,
            5,
            2 * WRITE_CHUNK as u64 + 5,
            POOL_BYTES as u64 + WRITE_CHUNK as u64 + 3,
        ] {
            let blob = GeneratedBlob::new(3, size);
            let mut whole = Vec::new();
            for i in 0..blob.chunks() {
                let r = blob.write_request(i, String::new());
                assert_eq!(r.write_offset as u64, whole.len() as u64);
                assert_eq!(r.finish_write, i + 1 == blob.chunks());
                whole.extend_from_slice(&r.data);
            }
            assert_eq!(whole.len() as u64, size);
            // The pool repeats; the blob's head is the seed's stream.
            let head = whole.len().min(POOL_BYTES);
            let mut expected = vec![0u8; head];
            fill_pseudo_random(3, 0, &mut expected);
            assert_eq!(whole[..head], expected[..]);
            assert_eq!(whole[head..], whole[..whole.len() - head]);
            assert_eq!(
                blob.digest(DigestFunction::Sha256),
                DigestFunction::Sha256.compute(&whole)
            );
        }
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(
            latency_summary(v),
            "100 calls: p50 50.00 ms, p99 99.00 ms, max 100.00 ms"
        );
    }

    #[test]
    fn phases_parse() {
        assert_eq!(Phase::parse_list("all").unwrap().len(), 3);
        assert_eq!(
            Phase::parse_list("cas, ac").unwrap(),
            [Phase::Cas, Phase::Ac]
        );
        assert!(Phase::parse_list("disk").is_err());
    }
}
