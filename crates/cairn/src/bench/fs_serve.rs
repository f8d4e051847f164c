//! `cairn bench fs-serve`: a filesystem store restarted through the binary and gRPC.
//!
//! One run starts `cairn run --config` (this executable) and measures, from the moment the
//! process is spawned:
//! - when its listener accepts a TCP connection;
//! - when the first FindMissingBlobs of 100 digests is answered;
//! - when `/status` says the CAS store's index is loaded (polled every 10 ms), with how many
//!   entries it holds, and the process's RSS then (`/proc/PID/status`), per entry;
//! - while the index loads, FindMissingBlobs of 100 stored digests and GetActionResult of a
//!   stored action (whose AC checks its output in the CAS), each one a millisecond on its own
//!   connection: p50, p99 and max, and whether any stored blob was reported missing.
//!
//! Then, when the store holds fewer than `--requests` blobs, it fills it through the API:
//! `--clients` connections each doing FindMissingBlobs then BatchUpdateBlobs of 1,000 blobs of
//! `--small-size` bytes (blob `i` is `i` as 8 little-endian bytes followed by zeros, so every
//! run knows which blobs the store should hold), and [`ACTIONS`] action results through
//! UpdateActionResult. `--extra-puts K` writes K new blobs after the load (as the puts before
//! a crash would leave them). Last it stops the server: `--stop term` (SIGTERM: a clean stop
//! that writes the index snapshot; how long the stop took is reported) or `--stop kill`
//! (SIGKILL: no last snapshot).
//!
//! The server's stderr goes to `--dir`/server.log. The config's listener must be `--endpoint`
//! and serve `/status` on it; its CAS store must be named `CAS`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::{ac_client, cas_client, endpoint, millis, report, secs, with_timeout, RPC_TIMEOUT};

/// Action results written by a fill and read while the index loads.
const ACTIONS: u64 = 1_000;
/// Blobs per FindMissingBlobs + BatchUpdateBlobs of the fill.
const FILL_BATCH: u64 = 1_000;
/// Digests per FindMissingBlobs while the index loads.
const LOOKUP: u64 = 100;
/// How long Cairn may take to listen and answer (another server gets `LOAD_DEADLINE`).
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long after the load the RSS is taken again.
const SETTLE: Duration = Duration::from_secs(5);
/// How long the index may take to load, and the server to stop.
const LOAD_DEADLINE: Duration = Duration::from_secs(1800);
const STOP_DEADLINE: Duration = Duration::from_secs(600);

const SHA256: i32 = re::digest_function::Value::Sha256 as i32;

/// Options of one `fs-serve` run.
pub struct Options {
    pub endpoint: String,
    pub config: PathBuf,
    pub dir: PathBuf,
    pub blobs: u64,
    pub small: usize,
    pub clients: usize,
    pub extra_puts: u64,
    pub kill: bool,
    /// How long to wait after the extra puts before the stop.
    pub stop_after: Duration,
    /// Another server to start instead of `cairn run` (its command line, the config appended),
    /// for a comparison on the same data: one without Cairn's `/status` index state, which is
    /// taken as loaded when it answers (NativeLink loads its index before it listens).
    pub server: Option<Vec<String>>,
}

fn blob(i: u64, size: usize) -> (Digest, Vec<u8>) {
    let mut data = vec![0u8; size.max(8)];
    data[..8].copy_from_slice(&i.to_le_bytes());
    (DigestFunction::Sha256.compute(&data), data)
}

fn action(i: u64) -> Digest {
    DigestFunction::Sha256.compute(format!("cairn bench fs-serve action {i}").as_bytes())
}

/// The server process; killed when dropped unless it was stopped.
struct Server {
    child: Child,
}

impl Server {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: i32) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        anyhow::ensure!(rc == 0, "kill({}, {signal}) failed", self.pid());
        Ok(())
    }

    /// Resident memory of the process, from `/proc/PID/status`.
    fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .context("no VmRSS in /proc/PID/status")
    }

    /// Waits for the process to end, up to `deadline` from now.
    async fn wait(&mut self, deadline: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > until {
                bail!("the server did not exit within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `host:port` of a `grpc://host:port` endpoint.
fn socket_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.trim_end_matches('/')
        .parse()
        .with_context(|| format!("--endpoint {url}: fs-serve needs an IP address and port"))
}

/// The CAS store's `index` object of `/status`, or `None` while the server does not answer.
async fn cas_index(addr: SocketAddr) -> Option<serde_json::Value> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split_once("\r\n\r\n")?.1;
    let body = &body[body.find('{')?..=body.rfind('}')?];
    let status: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(status["components"]["stores/CAS"]["index"].clone())
}

/// The p50, p99 and max of `v`, nearest rank, in ms.
fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "0 calls".to_string();
    }
    v.sort_unstable();
    let at = |p: f64| {
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        millis(v[rank.clamp(1, v.len()) - 1])
    };
    format!(
        "{} calls, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        v.len(),
        at(50.0),
        at(99.0),
        at(100.0)
    )
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let addr = socket_addr(&o.endpoint)?;
    let ep = endpoint(&o.endpoint)?;
    std::fs::create_dir_all(&o.dir).with_context(|| format!("creating {}", o.dir.display()))?;
    let log = std::fs::File::create(o.dir.join("server.log"))?;
    let exe = std::env::current_exe()?;
    if std::net::TcpStream::connect(addr).is_ok() {
        bail!("{addr} already accepts connections: another server is running there");
    }

    let mut command = match &o.server {
        Some(words) => {
            let (program, args) = words.split_first().context("--server-cmd is empty")?;
            let mut c = Command::new(program);
            c.args(args);
            c
        }
        None => {
            let mut c = Command::new(exe);
            c.arg("run");
            c
        }
    };
    // Another server may load its whole index before it listens (NativeLink does).
    let start_deadline = match o.server {
        Some(_) => LOAD_DEADLINE,
        None => START_DEADLINE,
    };
    let began = Instant::now();
    let mut server = Server {
        child: command
            .arg(&o.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the server")?,
    };
    // Listening: the first TCP connection accepted.
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        if let Some(status) = server.child.try_wait()? {
            bail!("the server exited with {status}: see {}", log_path(&o.dir));
        }
        anyhow::ensure!(
            began.elapsed() < start_deadline,
            "not listening after {start_deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let listening = began.elapsed();
    let channel = ep.connect().await.context("connecting")?;
    let mut cas = cas_client(channel.clone());
    let lookup = |j: u64| -> Vec<re::Digest> {
        (0..LOOKUP)
            .map(|k| {
                let i = (j * LOOKUP + k).wrapping_mul(7_919) % o.blobs.max(1);
                blob(i, o.small).0.to_proto()
            })
            .collect()
    };
    let first_missing = loop {
        let r = cas
            .find_missing_blobs(with_timeout(
                re::FindMissingBlobsRequest {
                    instance_name: String::new(),
                    blob_digests: lookup(0),
                    digest_function: SHA256,
                },
                RPC_TIMEOUT,
            ))
            .await;
        match r {
            Ok(a) => break a.into_inner().missing_blob_digests.len(),
            Err(e) if began.elapsed() < start_deadline => {
                tracing::debug!(error = %e, "FindMissingBlobs not answered yet");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => bail!("FindMissingBlobs not answered after {start_deadline:?}: {e}"),
        }
    };
    let answered = began.elapsed();

    // While the index loads: lookups and action-cache reads, each on its own connection.
    let loading = Arc::new(AtomicBool::new(true));
    let missed = Arc::new(AtomicU64::new(0));
    let ac_missing = Arc::new(AtomicU64::new(0));
    // Each probe returns its latencies and when (after the spawn) its slowest call began.
    type Probe = (&'static str, Vec<Duration>, Duration);
    let mut probes: JoinSet<anyhow::Result<Probe>> = JoinSet::new();
    {
        let mut cas = cas_client(ep.connect().await?);
        let (loading, missed) = (loading.clone(), missed.clone());
        let digests: Vec<Vec<re::Digest>> = (1..=64).map(lookup).collect();
        probes.spawn(async move {
            let mut took = Vec::new();
            let mut slowest = (Duration::ZERO, Duration::ZERO);
            let mut j = 0;
            while loading.load(Ordering::Relaxed) {
                let t = Instant::now();
                let a = cas
                    .find_missing_blobs(with_timeout(
                        re::FindMissingBlobsRequest {
                            instance_name: String::new(),
                            blob_digests: digests[j % digests.len()].clone(),
                            digest_function: SHA256,
                        },
                        RPC_TIMEOUT,
                    ))
                    .await
                    .context("FindMissingBlobs while loading")?;
                took.push(t.elapsed());
                slowest = slowest.max((t.elapsed(), t - began));
                missed.fetch_add(
                    a.into_inner().missing_blob_digests.len() as u64,
                    Ordering::Relaxed,
                );
                j += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(("FindMissingBlobs", took, slowest.1))
        });
    }
    {
        let mut ac = ac_client(ep.connect().await?);
        let (loading, ac_missing) = (loading.clone(), ac_missing.clone());
        probes.spawn(async move {
            let mut took = Vec::new();
            let mut slowest = (Duration::ZERO, Duration::ZERO);
            let mut i = 0;
            while loading.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = ac
                    .get_action_result(with_timeout(
                        re::GetActionResultRequest {
                            instance_name: String::new(),
                            action_digest: Some(action(i % ACTIONS).to_proto()),
                            inline_stdout: false,
                            inline_stderr: false,
                            inline_output_files: Vec::new(),
                            digest_function: SHA256,
                        },
                        RPC_TIMEOUT,
                    ))
                    .await;
                took.push(t.elapsed());
                slowest = slowest.max((t.elapsed(), t - began));
                match r {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        ac_missing.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => bail!("GetActionResult while loading: {s}"),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(("GetActionResult", took, slowest.1))
        });
    }
    let index = loop {
        match cas_index(addr).await {
            Some(index) if index["state"] == "loaded" => break index,
            Some(index) if !index.is_null() => {}
            // Another server, without Cairn's index state: loaded when it answers, and
            // holding the blobs when the first lookup found them all.
            _ if o.server.is_some() => {
                let entries = if first_missing == 0 { o.blobs } else { 0 };
                break serde_json::json!({ "state": "loaded", "entries": entries });
            }
            _ => {}
        }
        if let Some(status) = server.child.try_wait()? {
            bail!("the server exited with {status}: see {}", log_path(&o.dir));
        }
        anyhow::ensure!(
            began.elapsed() < LOAD_DEADLINE,
            "the index did not load within {LOAD_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let loaded = began.elapsed();
    loading.store(false, Ordering::Relaxed);
    let rss = server.rss_bytes()?;
    let entries = index["entries"].as_u64().unwrap_or(0);
    let mut during = Vec::new();
    while let Some(r) = probes.join_next().await {
        let (what, took, slowest_at) = r??;
        during.push(format!(
            "{what} {} (the slowest sent at {:.2} s)",
            percentiles(took),
            secs(slowest_at)
        ));
    }
    report(
        "fs-serve restart:",
        format_args!(
            "listening {:.3} s, first FindMissingBlobs answered {:.3} s ({first_missing} of \
             {LOOKUP} missing), index loaded {:.2} s ({entries} entries)",
            secs(listening),
            secs(answered),
            secs(loaded),
        ),
    );
    report(
        "fs-serve RSS when loaded:",
        format_args!(
            "{:.1} MB, {:.1} bytes per entry",
            rss as f64 / 1e6,
            rss as f64 / entries.max(1) as f64
        ),
    );
    // What the load left behind once its last work (the snapshot written after a walk or a
    // listing) is done and the allocator had time to hand freed pages back.
    tokio::time::sleep(SETTLE).await;
    let settled = server.rss_bytes()?;
    report(
        "fs-serve RSS 5 s after loaded:",
        format_args!(
            "{:.1} MB, {:.1} bytes per entry",
            settled as f64 / 1e6,
            settled as f64 / entries.max(1) as f64
        ),
    );
    report(
        "fs-serve while loading:",
        format_args!(
            "{}; stored blobs reported missing: {}; GetActionResult NOT_FOUND: {}",
            during.join("; "),
            missed.load(Ordering::Relaxed),
            ac_missing.load(Ordering::Relaxed)
        ),
    );
    if o.blobs > 0 && entries >= o.blobs && missed.load(Ordering::Relaxed) > 0 {
        bail!("a stored blob was reported missing while the index loaded");
    }

    if entries < o.blobs || ac_missing.load(Ordering::Relaxed) > 0 {
        fill(&ep, &o).await?;
        let rss = server.rss_bytes()?;
        report(
            "fs-serve RSS after the fill:",
            format_args!("{:.1} MB", rss as f64 / 1e6),
        );
    }
    if o.extra_puts > 0 {
        // New blobs each run: past the filled range, at an offset from the clock.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let base = o.blobs.max(1) * 2 + now.as_secs() * 1_000_000;
        let t = Instant::now();
        put_range(&ep, base, base + o.extra_puts, o.small, o.clients).await?;
        report(
            "fs-serve extra puts:",
            format_args!("{} blobs in {:.2} s", o.extra_puts, secs(t.elapsed())),
        );
    }

    if !o.stop_after.is_zero() {
        tokio::time::sleep(o.stop_after).await;
    }
    let t = Instant::now();
    if o.kill {
        server.signal(libc::SIGKILL)?;
        server.wait(STOP_DEADLINE).await?;
        report("fs-serve stop:", "SIGKILL (no last snapshot)");
    } else {
        server.signal(libc::SIGTERM)?;
        let status = server.wait(STOP_DEADLINE).await?;
        report(
            "fs-serve stop:",
            format_args!(
                "SIGTERM, exited ({status}) after {:.2} s",
                secs(t.elapsed())
            ),
        );
        anyhow::ensure!(status.success(), "the server's clean stop failed: {status}");
    }
    Ok(())
}

fn log_path(dir: &Path) -> String {
    dir.join("server.log").display().to_string()
}

async fn fill(ep: &tonic::transport::Endpoint, o: &Options) -> anyhow::Result<()> {
    let t = Instant::now();
    let written = put_range(ep, 0, o.blobs, o.small, o.clients).await?;
    report(
        "fs-serve fill:",
        format_args!(
            "{written} of {} blobs were missing, written through BatchUpdateBlobs by {} \
             clients in {:.1} s ({:.0} blobs/s)",
            o.blobs,
            o.clients,
            secs(t.elapsed()),
            written as f64 / secs(t.elapsed()).max(1e-9)
        ),
    );
    let mut ac = ac_client(ep.connect().await?);
    for i in 0..ACTIONS {
        let output = blob(i % o.blobs.max(1), o.small).0;
        ac.update_action_result(with_timeout(
            re::UpdateActionResultRequest {
                instance_name: String::new(),
                action_digest: Some(action(i).to_proto()),
                action_result: Some(re::ActionResult {
                    output_files: vec![re::OutputFile {
                        path: format!("out/{i}"),
                        digest: Some(output.to_proto()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                results_cache_policy: None,
                digest_function: SHA256,
            },
            RPC_TIMEOUT,
        ))
        .await
        .with_context(|| format!("UpdateActionResult of action {i}"))?;
    }
    Ok(())
}

/// Writes blobs `from..to` that the store lacks, `clients` connections each asking
/// FindMissingBlobs then BatchUpdateBlobs of [`FILL_BATCH`] blobs; the number written.
async fn put_range(
    ep: &tonic::transport::Endpoint,
    from: u64,
    to: u64,
    small: usize,
    clients: usize,
) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicU64::new(from));
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..clients.max(1) {
        let mut cas = cas_client(ep.connect().await?);
        let (next, written) = (next.clone(), written.clone());
        tasks.spawn(async move {
            loop {
                let start = next.fetch_add(FILL_BATCH, Ordering::Relaxed);
                if start >= to {
                    return anyhow::Ok(());
                }
                let blobs: Vec<(Digest, Vec<u8>)> = (start..(start + FILL_BATCH).min(to))
                    .map(|i| blob(i, small))
                    .collect();
                let missing = cas
                    .find_missing_blobs(with_timeout(
                        re::FindMissingBlobsRequest {
                            instance_name: String::new(),
                            blob_digests: blobs.iter().map(|(d, _)| d.to_proto()).collect(),
                            digest_function: SHA256,
                        },
                        RPC_TIMEOUT,
                    ))
                    .await
                    .context("FindMissingBlobs of the fill")?
                    .into_inner()
                    .missing_blob_digests;
                if missing.is_empty() {
                    continue;
                }
                let missing: std::collections::HashSet<String> =
                    missing.into_iter().map(|d| d.hash).collect();
                let requests: Vec<_> = blobs
                    .into_iter()
                    .filter(|(d, _)| missing.contains(&d.hash_hex()))
                    .map(|(d, data)| re::batch_update_blobs_request::Request {
                        digest: Some(d.to_proto()),
                        data,
                        compressor: 0,
                    })
                    .collect();
                let n = requests.len() as u64;
                let answer = cas
                    .batch_update_blobs(with_timeout(
                        re::BatchUpdateBlobsRequest {
                            instance_name: String::new(),
                            requests,
                            digest_function: SHA256,
                        },
                        RPC_TIMEOUT,
                    ))
                    .await
                    .context("BatchUpdateBlobs of the fill")?
                    .into_inner();
                for r in answer.responses {
                    if let Some(s) = r.status.filter(|s| s.code != 0) {
                        bail!("BatchUpdateBlobs refused a blob: {} {}", s.code, s.message);
                    }
                }
                written.fetch_add(n, Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(written.load(Ordering::Relaxed))
}
