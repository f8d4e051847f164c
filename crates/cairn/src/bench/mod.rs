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
//! - `findmissing`: one FindMissingBlobs of `requests` digests no store holds, three times.
//! - `ac`: UpdateActionResult for [`AC_ACTIONS`] actions whose result references an uploaded
//!   blob, then `clients` connections doing GetActionResult round-robin over them.
//!
//! Every run draws a fresh run id that goes into each blob and action key, so a run never finds
//! the previous run's data already stored. Output is plain text on stdout. A phase that cannot run
//! reports why and the next phase still runs; [`run`] returns an error when any phase failed or
//! any request failed, so scripts can rely on the exit status.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use re::action_cache_client::ActionCacheClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

mod bytestream;
mod cache;
mod execute;
mod find_missing;
mod fs_index;
mod fs_serve;
mod web_ui;
mod wire_client;

/// Largest gRPC message the bench clients send or accept.
const MAX_MESSAGE: usize = 64 << 20;
/// Blob bytes per BatchUpdateBlobs: below the 4 MiB that servers commonly advertise as
/// `max_batch_total_size_bytes`, with room for the digests.
const MAX_BATCH_BYTES: usize = (4 << 20) - (64 << 10);
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
/// Width of the label column of the output.
const LABEL_WIDTH: usize = 28;

/// Options of `cairn bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to run: bytestream | cas | ac | execute | findmissing (one FindMissingBlobs of --requests absent digests) | all (all = the cache benches) (or a comma-separated list); or web-ui alone (in this process, --requests operations); or fs-index alone (in this process: the filesystem store's index at --requests and 10x entries, the memory store's overhead, a filesystem store of --requests blobs of --small-size under --dir restarted); or fs-serve alone (starts `cairn run --config`, measures its restart through gRPC at --endpoint, fills it to --requests blobs of --small-size, stops it as --stop says)
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
    /// fs-index: where to lay out the filesystem store (default: ./cairn-bench-fs-index); kept
    /// afterwards, so that a second run measures restarts without filling again
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// fs-serve: the config `cairn run` is started with (its listener at --endpoint, its
    /// filesystem CAS store named CAS); the server's log goes to --dir/server.log
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// fs-serve: how the server is stopped at the end: term (SIGTERM, a clean stop that
    /// writes the index snapshot) or kill (SIGKILL)
    #[arg(long, default_value = "term")]
    pub stop: String,
    /// fs-serve: new blobs written after the index loaded, before the stop
    #[arg(long, default_value_t = 0)]
    pub extra_puts: u64,
    /// fs-serve: seconds to wait after the extra puts before the stop (a crash some time after
    /// the last writes, rather than during them)
    #[arg(long, default_value_t = 0.0)]
    pub stop_after: f64,
    /// fs-serve: start this server command instead of `cairn run` (the config path appended),
    /// e.g. "nativelink" for a comparison on the same data; a server without Cairn's /status
    /// index state counts as loaded once it answers
    #[arg(long)]
    pub server_cmd: Option<String>,
}

/// Runs the phases `args.what` names against `args.endpoint` and prints the results.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.what == "web-ui" {
        return web_ui::run(args.requests).await;
    }
    if args.what == "fs-index" {
        let small = cairn_config::parse_size(&args.small_size)
            .map_err(|e| anyhow::anyhow!("--small-size {:?}: {e}", args.small_size))?
            as usize;
        return fs_index::run(args.requests, small, args.dir.clone()).await;
    }
    if args.what == "fs-serve" {
        let small = cairn_config::parse_size(&args.small_size)
            .map_err(|e| anyhow::anyhow!("--small-size {:?}: {e}", args.small_size))?
            as usize;
        let kill = match args.stop.as_str() {
            "term" => false,
            "kill" => true,
            other => bail!("--stop {other:?}: expected term or kill"),
        };
        return fs_serve::run(fs_serve::Options {
            endpoint: args.endpoint.clone(),
            config: args.config.clone().context("fs-serve needs --config")?,
            dir: args
                .dir
                .clone()
                .context("fs-serve needs --dir (for the server's log)")?,
            blobs: args.requests as u64,
            small,
            clients: args.clients,
            extra_puts: args.extra_puts,
            kill,
            stop_after: Duration::try_from_secs_f64(args.stop_after)
                .map_err(|e| anyhow::anyhow!("--stop-after {}: {e}", args.stop_after))?,
            server: args
                .server_cmd
                .as_ref()
                .map(|c| c.split_whitespace().map(str::to_string).collect()),
        })
        .await;
    }
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
            Phase::FindMissing => bench.find_missing().await,
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
    FindMissing,
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
                "findmissing" => phases.push(Phase::FindMissing),
                _ => bail!(
                    "unknown bench {name:?}; expected bytestream, cas, ac, execute, findmissing or all"
                ),
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
            Phase::FindMissing => "findmissing",
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

    /// One connection per client, each its own HTTP/2 connection, made before the clock starts.
    async fn connect_clients(&self) -> anyhow::Result<Vec<Channel>> {
        let mut channels = Vec::with_capacity(self.clients);
        for _ in 0..self.clients {
            channels.push(self.connect().await?);
        }
        Ok(channels)
    }

    /// `{instance}/` or nothing, the start of every resource name.
    fn resource_prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }
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
        assert_eq!(
            Phase::parse_list("findmissing").unwrap(),
            [Phase::FindMissing]
        );
        assert!(Phase::parse_list("disk").is_err());
    }
}
