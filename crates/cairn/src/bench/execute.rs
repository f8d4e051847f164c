//! `cairn bench execute`: unique no-op actions (`/bin/true` with a per-action argument, so
//! nothing is cached) from `clients` concurrent clients through Execute, until `requests`
//! actions have run. Prints actions/s and the per-action overhead: the time from Execute to
//! the final response, less the command's own run time as the worker reports it
//! (ExecutedActionMetadata.execution_start/completed). The overhead is also split into the
//! steps the worker timestamps (ExecutedActionMetadata), p50 of each, to show where it goes;
//! client and server share a clock when both run on the same machine.
//!
//! A client follows each action as Bazel does: when the Execute stream breaks after it named
//! its operation (the server went away: a restart, a failover behind a load balancer), it
//! follows the operation again with WaitExecution, and when the Execute call itself fails
//! with a transient status it sends it again, both until [`ACTION_DEADLINE`]. An operation
//! that ends in an error, is answered NOT_FOUND, or does not end in time is a failure, and
//! every failure makes the run exit non-zero. SIGINT stops handing out new actions: those
//! in flight finish, then the run reports (a steady load for as long as a test needs). Once
//! this phase has started, SIGINT stays the bench's: a phase after it is not interrupted.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::longrunning::{operation, Operation};
use cairn_core::proto::google::protobuf::Timestamp;
use cairn_core::DigestFunction;
use futures::StreamExt;
use prost::Message;
use tokio::task::JoinSet;

use super::{cas_client, latency_summary, report, secs, Bench};

fn duration_between(a: &Option<Timestamp>, b: &Option<Timestamp>) -> Option<Duration> {
    let (a, b) = (a.as_ref()?, b.as_ref()?);
    let ns = (b.seconds - a.seconds) as i128 * 1_000_000_000 + (b.nanos - a.nanos) as i128;
    (ns >= 0).then(|| Duration::from_nanos(ns as u64))
}

fn timestamp(t: SystemTime) -> Option<Timestamp> {
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    Some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

/// How long one action may take, reattaching included, before it counts as failed.
const ACTION_DEADLINE: Duration = Duration::from_secs(120);
/// Wait between two attempts to reach the server for an action.
const RETRY_WAIT: Duration = Duration::from_millis(100);

/// Whether a call that failed with `code` may succeed when sent again (the server or the
/// connection went away), rather than being the answer.
fn transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Aborted
            | tonic::Code::Internal
            | tonic::Code::DeadlineExceeded
    )
}

/// Runs one action to its final operation: Execute, then WaitExecution on the same channel
/// (which reconnects) whenever a stream breaks. `reattached` counts the WaitExecution calls
/// and Execute retries.
async fn run_action(
    exec: &mut re::execution_client::ExecutionClient<tonic::transport::Channel>,
    request: re::ExecuteRequest,
    reattached: &AtomicU64,
) -> Result<Operation, String> {
    let deadline = Instant::now() + ACTION_DEADLINE;
    let mut name: Option<String> = None;
    let mut last_error = String::new();
    loop {
        if Instant::now() > deadline {
            return Err(format!(
                "no final operation within {ACTION_DEADLINE:?} (operation {name:?}; last \
                 error: {last_error})"
            ));
        }
        let call = match &name {
            None => exec.execute(request.clone()).await,
            Some(n) => {
                exec.wait_execution(re::WaitExecutionRequest { name: n.clone() })
                    .await
            }
        };
        let mut stream = match call {
            Ok(s) => s.into_inner(),
            Err(e) if transient(e.code()) => {
                last_error = e.to_string();
                reattached.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(RETRY_WAIT).await;
                continue;
            }
            Err(e) => return Err(format!("operation {name:?}: {e}")),
        };
        loop {
            match stream.next().await {
                Some(Ok(op)) => {
                    if op.done {
                        return Ok(op);
                    }
                    name.get_or_insert(op.name);
                }
                Some(Err(e)) if transient(e.code()) => {
                    last_error = e.to_string();
                    break;
                }
                Some(Err(e)) => return Err(format!("operation {name:?}: {e}")),
                None => {
                    last_error = "the stream ended before the operation was done".into();
                    break;
                }
            }
        }
        reattached.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(RETRY_WAIT).await;
    }
}

/// The steps of one action between the client's clock readings and the worker's
/// timestamps, in order; each is the time from the end of the previous one.
const STEPS: [&str; 9] = [
    "to worker",
    "work dir",
    "input fetch",
    "to spawn",
    "command",
    "stdio drain",
    "output upload",
    "result",
    "to client",
];

/// The durations of [`STEPS`] for one action (`None` when a timestamp is missing).
fn steps(
    sent: SystemTime,
    received: SystemTime,
    m: &re::ExecutedActionMetadata,
) -> Option<[Duration; STEPS.len()]> {
    let points = [
        timestamp(sent),
        m.worker_start_timestamp,
        m.input_fetch_start_timestamp,
        m.input_fetch_completed_timestamp,
        m.execution_start_timestamp,
        m.execution_completed_timestamp,
        m.output_upload_start_timestamp,
        m.output_upload_completed_timestamp,
        m.worker_completed_timestamp,
        timestamp(received),
    ];
    let mut out = [Duration::ZERO; STEPS.len()];
    for (i, d) in out.iter_mut().enumerate() {
        *d = duration_between(&points[i], &points[i + 1])?;
    }
    Some(out)
}

impl Bench {
    /// Returns the number of failed actions.
    pub(super) async fn execute(&self) -> anyhow::Result<u64> {
        let f = self.function;
        let channel = self
            .endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        // Shared blobs: the Command (argv varies per action through the Action's salt) and
        // the empty input root.
        let root = re::Directory::default().encode_to_vec();
        let root_d = f.compute(&root);
        #[allow(deprecated)]
        let command = re::Command {
            arguments: vec!["/bin/true".into()],
            environment_variables: vec![re::command::EnvironmentVariable {
                name: "PATH".into(),
                value: "/bin:/usr/bin".into(),
            }],
            ..Default::default()
        };
        let cmd = command.encode_to_vec();
        let cmd_d = f.compute(&cmd);
        // Pre-build unique Actions (salted) and upload them with the shared blobs.
        let mut actions = Vec::with_capacity(self.requests);
        let mut blobs = vec![(root_d, root), (cmd_d, cmd)];
        for i in 0..self.requests {
            let a = re::Action {
                command_digest: Some(cmd_d.to_proto()),
                input_root_digest: Some(root_d.to_proto()),
                salt: format!("{}-{i}", self.run_id).into_bytes(),
                platform: Some(re::Platform {
                    properties: vec![re::platform::Property {
                        name: "OSFamily".into(),
                        value: "linux".into(),
                    }],
                }),
                ..Default::default()
            }
            .encode_to_vec();
            let d = f.compute(&a);
            actions.push(d);
            blobs.push((d, a));
        }
        let mut cas = cas_client(channel.clone());
        for chunk in blobs.chunks(2000) {
            let request = re::BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests: chunk
                    .iter()
                    .map(|(d, b)| re::batch_update_blobs_request::Request {
                        digest: Some(d.to_proto()),
                        data: b.clone(),
                        compressor: 0,
                    })
                    .collect(),
                digest_function: f.to_proto(),
            };
            // Sent again while the server answers with a transient status (a restart behind a
            // load balancer), up to the deadline of one action.
            let deadline = Instant::now() + ACTION_DEADLINE;
            let r = loop {
                match cas.batch_update_blobs(request.clone()).await {
                    Ok(r) => break r.into_inner(),
                    Err(e) if transient(e.code()) && Instant::now() < deadline => {
                        tokio::time::sleep(RETRY_WAIT).await;
                    }
                    Err(e) => return Err(e).context("uploading actions"),
                }
            };
            if r.responses
                .iter()
                .any(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
            {
                anyhow::bail!("uploading actions: the server refused some blobs");
            }
        }
        // A script that drives a load waits for this line before it disturbs the servers.
        eprintln!("execute: {} actions uploaded, running them", actions.len());

        let actions = Arc::new(actions);
        let next = Arc::new(AtomicUsize::new(0));
        let reattached = Arc::new(AtomicU64::new(0));
        // SIGINT: no new actions; those in flight finish.
        let stop = Arc::new(AtomicBool::new(false));
        let on_signal = {
            let stop = stop.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("execute: SIGINT, finishing the actions in flight");
                    stop.store(true, Ordering::Relaxed);
                }
            })
        };
        let start = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..self.clients {
            let (actions, next, channel, instance, reattached, stop) = (
                actions.clone(),
                next.clone(),
                channel.clone(),
                self.instance.clone(),
                reattached.clone(),
                stop.clone(),
            );
            set.spawn(async move {
                let mut exec = re::execution_client::ExecutionClient::new(channel);
                let mut overheads = Vec::new();
                let mut totals = Vec::new();
                let mut split: Vec<[Duration; STEPS.len()]> = Vec::new();
                let mut errors = 0usize;
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(d) = actions.get(i) else { break };
                    let sent = SystemTime::now();
                    let t = Instant::now();
                    let request = re::ExecuteRequest {
                        instance_name: instance.clone(),
                        action_digest: Some(d.to_proto()),
                        skip_cache_lookup: true,
                        digest_function: DigestFunction::Sha256.to_proto(),
                        ..Default::default()
                    };
                    let outcome = run_action(&mut exec, request, &reattached).await;
                    let total = t.elapsed();
                    let received = SystemTime::now();
                    let resp = match &outcome {
                        Ok(op) => match &op.result {
                            Some(operation::Result::Response(any)) => {
                                re::ExecuteResponse::decode(any.value.as_slice()).ok()
                            }
                            _ => None,
                        },
                        _ => None,
                    };
                    match resp {
                        Some(r)
                            if r.status.as_ref().is_none_or(|s| s.code == 0)
                                && r.result.as_ref().is_some_and(|x| x.exit_code == 0) =>
                        {
                            let meta = r.result.and_then(|x| x.execution_metadata);
                            let run = meta
                                .as_ref()
                                .and_then(|m| {
                                    duration_between(
                                        &m.execution_start_timestamp,
                                        &m.execution_completed_timestamp,
                                    )
                                })
                                .unwrap_or_default();
                            overheads.push(total.saturating_sub(run));
                            totals.push(total);
                            split.extend(meta.as_ref().and_then(|m| steps(sent, received, m)));
                        }
                        other => {
                            // Every failure is named (up to a few per client), so that a
                            // lost operation can be looked up.
                            if errors < 5 {
                                match &outcome {
                                    Err(e) => eprintln!("execute: failed: {e}"),
                                    Ok(op) => eprintln!(
                                        "execute: failed: operation {:?} ended with {other:?}",
                                        op.name
                                    ),
                                }
                            }
                            errors += 1
                        }
                    }
                }
                (overheads, totals, split, errors)
            });
        }
        let mut overheads = Vec::new();
        let mut totals = Vec::new();
        let mut split = Vec::new();
        let mut errors = 0u64;
        while let Some(r) = set.join_next().await {
            let (o, t, s, e) = r?;
            overheads.extend(o);
            totals.extend(t);
            split.extend(s);
            errors += e as u64;
        }
        on_signal.abort();
        let elapsed = start.elapsed();
        let completed = totals.len() as u64;
        report(
            "execute:",
            format_args!(
                "{} actions in {:.2} s = {:.0} actions/s ({} clients, /bin/true, unique, skip_cache_lookup)",
                totals.len(),
                secs(elapsed),
                totals.len() as f64 / elapsed.as_secs_f64().max(1e-9),
                self.clients
            ),
        );
        report("execute total latency:", latency_summary(totals));
        report("execute overhead:", latency_summary(overheads));
        if !split.is_empty() {
            let p50s: Vec<String> = (0..STEPS.len())
                .map(|i| {
                    let mut v: Vec<Duration> = split.iter().map(|s| s[i]).collect();
                    v.sort_unstable();
                    format!(
                        "{} {:.2}",
                        STEPS[i],
                        v[(v.len() - 1) / 2].as_secs_f64() * 1e3
                    )
                })
                .collect();
            report("execute steps p50 (ms):", p50s.join(", "));
        }
        report(
            "execute reattached:",
            format_args!(
                "{} (WaitExecution after a broken stream, or Execute sent again)",
                reattached.load(Ordering::Relaxed)
            ),
        );
        if stop.load(Ordering::Relaxed) {
            report(
                "execute stopped:",
                format_args!(
                    "by SIGINT after {} of {} actions",
                    completed + errors,
                    actions.len()
                ),
            );
        }
        report("execute errors:", errors);
        Ok(errors)
    }
}
