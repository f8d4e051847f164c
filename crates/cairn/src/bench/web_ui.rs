//! `cairn bench web-ui`: the web UI's server time on a loaded process, in this process (no
//! network, so the figures are the server's own): a scheduler holding `--requests`
//! operations (10,000 by default; 50 workers of 4 slots run 200 of them, the rest wait, a
//! tenth of them on a platform no worker offers) and a BEP store with 1,000 stored
//! invocations of 40 events each, whose remote actions are in the UI's record (each
//! operation queued under its invocation, 20 cache lookups per invocation, and
//! `BIG_INVOCATION` with 20,000 actions); then each page is rendered `ROUNDS` times and the
//! median, 99th percentile and largest times are printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use cairn_core::{Digest, DigestFunction};
use cairn_proto::bes::v1 as bes;
use cairn_scheduler::{ActionKey, ActionRequest, PropertyType, SchedulerOptions};
use cairn_server::execution::driver::ActionPayload;
use cairn_server::execution::{Backend, ExecutionPipeline, SchedulerHandle};
use cairn_server::web_ui::events as ev;
use cairn_server::web_ui::{self, InvocationIndex, WebUi};
use cairn_store::{StoreExt, StoreRef};
use http_body_util::BodyExt;
use prost::Message;
use tower::ServiceExt;

/// Renders of each page.
const ROUNDS: usize = 50;
const INVOCATIONS: usize = 1000;
const WORKERS: usize = 50;
/// The invocation with the most recorded actions (the record's per-invocation cap).
const BIG_INVOCATION: &str = "invocation-00500";

fn props(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// 40 events of a plausible `bazel test` (start, command line, progress, targets, a test,
/// the end).
fn invocation_events(i: usize) -> Vec<ev::BuildEvent> {
    let mut out = vec![
        ev::BuildEvent {
            started: Some(ev::BuildStarted {
                start_time_millis: 1_700_000_000_000 + i as i64 * 60_000,
                command: "test".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ev::BuildEvent {
            unstructured_command_line: Some(ev::CommandLine {
                args: vec![
                    "test".into(),
                    "--keep_going".into(),
                    format!("//pkg{i}/..."),
                ],
            }),
            ..Default::default()
        },
    ];
    for p in 0..20 {
        out.push(ev::BuildEvent {
            progress: Some(ev::Progress {
                stdout: String::new(),
                stderr: format!("INFO: [{p} / 20] compiling pkg{i}/file{p}.cc\n").repeat(20),
            }),
            ..Default::default()
        });
    }
    for t in 0..16 {
        out.push(ev::BuildEvent {
            id: Some(ev::BuildEventId {
                target_completed: Some(ev::LabelId {
                    label: format!("//pkg{i}:target{t}"),
                }),
                ..Default::default()
            }),
            completed: Some(ev::TargetComplete { success: t != 3 }),
            ..Default::default()
        });
    }
    out.push(ev::BuildEvent {
        id: Some(ev::BuildEventId {
            test_result: Some(ev::TestResultId {
                label: format!("//pkg{i}:target0"),
                run: 1,
                shard: 0,
                attempt: 1,
            }),
            ..Default::default()
        }),
        test_result: Some(ev::TestResult {
            status: 1,
            test_attempt_duration_millis: 120,
            ..Default::default()
        }),
        ..Default::default()
    });
    out.push(ev::BuildEvent {
        finished: Some(ev::BuildFinished {
            finish_time_millis: 1_700_000_030_000 + i as i64 * 60_000,
            exit_code: Some(ev::ExitCode {
                name: if i.is_multiple_of(5) {
                    "BUILD_FAILURE"
                } else {
                    "SUCCESS"
                }
                .into(),
                code: if i.is_multiple_of(5) { 1 } else { 0 },
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    out
}

async fn store_invocations(store: &StoreRef, index: &InvocationIndex) -> anyhow::Result<()> {
    for i in 0..INVOCATIONS {
        let stream = bes::StreamId {
            build_id: format!("build-{i}"),
            invocation_id: format!("invocation-{i:05}"),
            component: bes::stream_id::BuildComponent::Tool as i32,
        };
        for (n, e) in invocation_events(i).iter().enumerate() {
            let seq = n as i64 + 1;
            let event = ev::wrap_bazel_event(e);
            let ordered = bes::OrderedBuildEvent {
                stream_id: Some(stream.clone()),
                sequence_number: seq,
                event: event.clone(),
            };
            store
                .put_bytes(
                    &cairn_server::bep::event_key(&stream, Some(seq)),
                    ordered.encode_to_vec().into(),
                )
                .await?;
            index.record(&stream, seq, &event, 1_700_000_000_000 + i as i64);
        }
    }
    Ok(())
}

async fn fill_scheduler(
    handle: &SchedulerHandle,
    operations: usize,
) -> anyhow::Result<Vec<Box<dyn std::any::Any + Send>>> {
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for w in 0..WORKERS {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        handle
            .worker_connect(
                format!("bench-worker-{w:02}"),
                props(&[("OSFamily", "linux"), ("cpu_count", "4")]),
                4,
                tx,
            )
            .await?;
        keep.push(Box::new(rx));
    }
    for n in 0..operations {
        let digest = DigestFunction::Sha256.compute(format!("bench action {n}").as_bytes());
        let platform = if n % 10 == 9 {
            props(&[("OSFamily", "windows")])
        } else {
            props(&[("OSFamily", "linux")])
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        handle
            .add(
                format!("op-{n}"),
                digest,
                ActionRequest {
                    key: ActionKey(digest.to_string()),
                    cacheable: true,
                    priority: 0,
                    platform: platform.clone(),
                    invocation_id: format!("invocation-{:05}", n % INVOCATIONS),
                    payload: ActionPayload {
                        instance: String::new(),
                        digest,
                        skip_cache_write: false,
                        timeout: None,
                        queued_at_unix_ms: 0,
                        platform,
                        trace_context: vec![],
                    },
                },
                tx,
            )
            .await?;
        web_ui::activity::queued(
            &format!("invocation-{:05}", n % INVOCATIONS),
            "",
            digest,
            &format!("op-{n}"),
        );
        keep.push(Box::new(rx));
    }
    Ok(keep)
}

/// An action with its Command, input root and a result with 10 output files and 4 KiB of
/// stdout and stderr; its digest.
async fn store_action(cas: Option<&StoreRef>, ac: Option<&StoreRef>) -> anyhow::Result<Digest> {
    use cairn_core::proto::build::bazel::remote::execution::v2 as re;
    let (Some(cas), Some(ac)) = (cas, ac) else {
        anyhow::bail!("no CAS or AC");
    };
    let sha = DigestFunction::Sha256;
    let put = |data: Vec<u8>| async move {
        let d = sha.compute(&data);
        cas.put_bytes(&d, data.into()).await.map(|_| d)
    };
    let root = put(re::Directory::default().encode_to_vec()).await?;
    let command = put(re::Command {
        arguments: (0..200).map(|i| format!("--flag{i}=value{i}")).collect(),
        environment_variables: vec![re::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/bin:/usr/bin".into(),
        }],
        ..Default::default()
    }
    .encode_to_vec())
    .await?;
    let action = put(re::Action {
        command_digest: Some(command.to_proto()),
        input_root_digest: Some(root.to_proto()),
        ..Default::default()
    }
    .encode_to_vec())
    .await?;
    let stdout = put(b"compiler output line\n".repeat(200)).await?;
    let mut outputs = Vec::new();
    for i in 0..10 {
        let d = put(format!("output {i}").into_bytes()).await?;
        outputs.push(re::OutputFile {
            path: format!("out/file{i}.o"),
            digest: Some(d.to_proto()),
            ..Default::default()
        });
    }
    let result = re::ActionResult {
        exit_code: 0,
        stdout_digest: Some(stdout.to_proto()),
        stderr_digest: Some(stdout.to_proto()),
        output_files: outputs,
        ..Default::default()
    };
    ac.put_bytes(&action, result.encode_to_vec().into()).await?;
    Ok(action)
}

async fn time_page(router: &axum::Router, path: &str) -> anyhow::Result<(Vec<Duration>, usize)> {
    let mut times = Vec::with_capacity(ROUNDS);
    let mut size = 0;
    for _ in 0..ROUNDS {
        let request = axum::http::Request::get(path).body(Body::empty())?;
        let started = Instant::now();
        let response = router.clone().oneshot(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        times.push(started.elapsed());
        anyhow::ensure!(status.is_success(), "{path}: {status}");
        size = body.len();
    }
    times.sort();
    Ok((times, size))
}

/// Runs the bench with `operations` scheduler operations.
pub async fn run(operations: usize) -> anyhow::Result<()> {
    let mut opts = SchedulerOptions::default();
    opts.supported_platform_properties
        .insert("OSFamily".into(), PropertyType::Exact);
    opts.supported_platform_properties
        .insert("cpu_count".into(), PropertyType::Minimum);
    opts.unschedulable_grace_period = Duration::from_secs(3600);
    opts.client_action_timeout = Duration::from_secs(3600);
    opts.worker_timeout = Duration::from_secs(3600);
    let handle = SchedulerHandle::spawn(opts, None);
    let started = Instant::now();
    let _keep = fill_scheduler(&handle, operations)
        .await
        .context("queueing the operations")?;
    println!(
        "web-ui: {operations} operations and {WORKERS} workers in the scheduler ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let memory = |bytes: u64| -> StoreRef {
        let cfg: cairn_config::stores::MemoryStore = serde_json::from_value(
            serde_json::json!({ "eviction_policy": { "max_bytes": bytes } }),
        )
        .expect("a valid memory store config");
        Arc::new(cairn_store::memory::MemoryStore::new(&cfg))
    };
    web_ui::activity::enable(INVOCATIONS, None);
    for i in 0..INVOCATIONS {
        let lookups = if format!("invocation-{i:05}") == BIG_INVOCATION {
            web_ui::activity::MAX_ACTIONS_PER_INVOCATION
        } else {
            20
        };
        for n in 0..lookups {
            let digest = DigestFunction::Sha256.compute(format!("bench lookup {i} {n}").as_bytes());
            web_ui::activity::lookup(&format!("invocation-{i:05}"), "", digest, n % 3 != 0);
        }
    }
    let bep = memory(4 << 30);
    let index = Arc::new(InvocationIndex::new(INVOCATIONS, None));
    let started = Instant::now();
    store_invocations(&bep, &index).await?;
    println!(
        "web-ui: {INVOCATIONS} invocations of {} events stored ({:.1} s)",
        invocation_events(0).len(),
        started.elapsed().as_secs_f64()
    );
    let (cas, ac) = (memory(1 << 30), memory(1 << 30));
    let stores = vec![
        ("AC".to_string(), ac.clone()),
        ("BEP".to_string(), bep.clone()),
        ("CAS".to_string(), cas.clone()),
    ];
    let ui = WebUi {
        bep: Some((bep, index)),
        cas: Some(cas),
        ac: Some(ac),
        schedulers: vec![ExecutionPipeline {
            name: "MAIN".into(),
            backend: Backend::Local(handle),
            ac: None,
            steps: Arc::new(Vec::new()),
        }],
        read_only: true,
        stores,
        store_roles: vec![("CAS", "CAS".into()), ("AC", "AC".into())],
        metrics: Some(cairn_server::metrics::Metrics::new()),
    };
    let probe = store_action(ui.cas.as_ref(), ui.ac.as_ref()).await?;
    let router = web_ui::router(Arc::new(ui));
    println!("{:<58}  median      p99      max    bytes", "page");
    for path in [
        "/invocations".to_string(),
        "/invocations?status=failed&q=pkg99".to_string(),
        "/invocation/invocation-00499".to_string(),
        format!("/invocation/{BIG_INVOCATION}"),
        "/queue".to_string(),
        "/queue?scheduler=MAIN&platform=OSFamily%3Dlinux&offset=5000".to_string(),
        "/workers".to_string(),
        format!("/action/{}-{}", probe.hash_hex(), probe.size()),
        "/cache".to_string(),
        format!("/cas/{}-{}", probe.hash_hex(), probe.size()),
    ] {
        let (times, size) = time_page(&router, &path).await?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{path:<58} {:>7.2} ms {:>6.2} ms {:>6.2} ms {size:>8}",
            ms(times[times.len() / 2]),
            ms(times[times.len() * 99 / 100]),
            ms(times[times.len() - 1])
        );
    }
    // Keeping the record in a file: one write of all of it (every invocation's actions).
    let file = std::env::temp_dir().join(format!(
        "cairn-bench-web-ui-{}/activity.json",
        std::process::id()
    ));
    if let Some(record) = web_ui::activity::get() {
        let measured = web_ui::activity_file::measure_write(record, &file);
        if let Some(dir) = file.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        let cost = measured.context("writing the activity record")?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "web-ui: writing the activity record ({} invocations): {:.1} ms copying (its lock held {:.2} ms at most at once), {:.1} ms encoding and writing, {:.1} MB",
            record.invocations(),
            ms(cost.copy),
            ms(cost.longest_hold),
            ms(cost.write),
            cost.bytes as f64 / 1e6
        );
    }
    // What the services pay per recorded call: one lookup of an invocation's action (a new
    // one for each call, as a build's first lookups are), with 1,000 invocations held.
    let calls = 200_000;
    let digests: Vec<Digest> = (0..calls)
        .map(|n| DigestFunction::Sha256.compute(format!("bench record {n}").as_bytes()))
        .collect();
    let started = Instant::now();
    for (n, d) in digests.into_iter().enumerate() {
        web_ui::activity::lookup(&format!("invocation-{:05}", n % 100), "", d, false);
    }
    println!(
        "web-ui: recording a cache lookup: {:.0} ns per call ({calls} calls)",
        started.elapsed().as_nanos() as f64 / calls as f64
    );
    Ok(())
}
