//! A real Prometheus scraping a CAS, a scheduler and a worker started from the Kubernetes
//! configs, after they served a real Bazel remote build: every expression of the rule files,
//! of the dashboard and of the guides is a query Prometheus accepts, and returns at least one
//! series.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::Digest;
use futures::StreamExt;
use prost::Message;

use crate::common::actions::ShellAction;
use crate::common::bazel::{self, Bazel, COMMAND_DEADLINE};
use crate::common::{free_addr, Cairn, CairnWorker};
use crate::files::{kubernetes_dir, metrics_dir, ALERTS, RECORDING_RULES};
use crate::metrics::dashboard_panels;
use crate::parse::{rules, selectors, without_threshold, Rule, Selector};
use crate::prometheus_server::{http_get, Prometheus};
use crate::tools::prometheus_tool;

/// The queries of the guides that are not in a rule file: the troubleshooting guide's
/// diagnostics, the metrics of the production guide's "Key Metrics" table, and the autoscalers'.
const GUIDE_QUERIES: [&str; 17] = [
    "sum(rate(nativelink_execution_completed_count_total{execution_result=\"cache_hit\"}[5m])) /\nsum(rate(nativelink_execution_completed_count_total[5m]))",
    "rate(nativelink_execution_completed_count_total{execution_result=\"failure\"}[5m])",
    "nativelink_execution_retry_count_total",
    "nativelink:cache_hit_rate < 0.5",
    // The guide's `nativelink_cache_size / <max_cache_size>`, whose divisor is a placeholder.
    "nativelink_cache_size",
    "rate(nativelink_cache_operations_total{cache_operation_name=\"evict\"}[5m])",
    "nativelink:queue_depth > 100",
    "nativelink:worker_utilization",
    "nativelink:cache_operation_latency_p95 > 1000",
    "nativelink_scheduler_queue_length",
    "nativelink_worker_active_count",
    "nativelink_cas_hit_rate",
    "histogram_quantile(0.99, sum by (le) (rate(nativelink_request_duration_seconds_bucket[5m])))",
    "nativelink_store_size_bytes",
    "nativelink_worker_execution_failures",
    // KEDA's query and the HPA's metric.
    "sum(nativelink_scheduler_queue_length)",
    "nativelink_queue_length",
];

/// Executes an action to the end; returns whether it came from the action cache and its exit
/// code.
async fn execute(
    exec: &mut re::execution_client::ExecutionClient<tonic::transport::Channel>,
    action: Digest,
) -> (bool, i32) {
    let mut stream = exec
        .execute(re::ExecuteRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .expect("Execute")
        .into_inner();
    let mut last = None;
    while let Some(op) = stream.next().await {
        last = Some(op.expect("an operation update"));
    }
    let op = last.expect("at least one operation update");
    assert!(op.done, "the last update is not done: {op:?}");
    let Some(cairn_core::proto::google::longrunning::operation::Result::Response(any)) = op.result
    else {
        panic!("operation without a response: {op:?}");
    };
    let response = re::ExecuteResponse::decode(any.value.as_slice()).expect("ExecuteResponse");
    let code = response.status.as_ref().map_or(0, |s| s.code);
    assert_eq!(code, 0, "execution status {:?}", response.status);
    (
        response.cached_result,
        response.result.map_or(-1, |r| r.exit_code),
    )
}

/// A real remote build, as the guides' operators run them: Bazel builds and tests
/// `bazel-exec-workspace` (C++ compile and link, genrules, an output directory, an `sh_test`)
/// with `--remote_executor` on the scheduler and `--remote_cache` on the CAS server, so that
/// every action runs on the worker (uploads, FindMissingBlobs hits and misses, action-cache
/// misses, executions that succeed); after `bazel clean` it builds again from the cache
/// (action-cache and CAS reads that hit); `//special:fail` is an action that exits 3 (an
/// execution `failure`); and a client set up with an instance name no server has fails on
/// its first requests (the gRPC errors that `HighErrorRate` and the "Errors" panel watch,
/// which a build that goes well does not make: action-cache misses are not errors).
fn bazel_remote_build(bazel: &Bazel, cas: &Cairn, scheduler: &Cairn) {
    let flags = bazel.remote_flags(scheduler.addr, Some(cas.addr), "OSFamily=linux");
    let with = |extra: &[&str]| -> Vec<String> {
        let mut args = flags.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let built = bazel.run("build", &with(&["//..."]));
    let executed = built.all_processes_were("remote");
    let tested = bazel.run("test", &with(&["//..."]));
    tested.all_processes_were("remote");

    bazel.run("clean", &[]);
    let again = bazel.run("build", &with(&["//..."]));
    assert_eq!(
        again.all_processes_were("remote cache hit"),
        executed,
        "after `bazel clean`, every action of the build should come from the cache"
    );

    let fails = bazel.try_run("build", &with(&["//special:fail"]), COMMAND_DEADLINE);
    assert!(
        !fails.status.success() && fails.text().contains("(Exit 3)"),
        "//special:fail should fail with exit 3:\n{}",
        fails.text()
    );

    let lost = bazel.try_run(
        "build",
        &with(&["--remote_instance_name=no-such-instance", "//..."]),
        COMMAND_DEADLINE,
    );
    assert!(
        !lost.status.success() && lost.text().contains("INVALID_ARGUMENT"),
        "a build on an instance no server has should fail with INVALID_ARGUMENT:\n{}",
        lost.text()
    );
}

/// Traffic for the one series a Bazel build cannot make: an Execute answered from the action
/// cache (`execution_result="cache_hit"`, read by the guide's cache-hit query and the
/// dashboard). Bazel looks every action up in the action cache itself before it asks to run
/// it, so its Executes never reach the scheduler's cache lookup. The same action is executed
/// twice: it runs, then comes from the cache.
async fn execute_an_action_already_in_the_cache(cas: &Cairn, scheduler: &Cairn) {
    let mut exec = re::execution_client::ExecutionClient::new(scheduler.channel().await);
    let action = ShellAction {
        script: "echo cached > out.txt",
        outputs: &["out.txt"],
        ..Default::default()
    }
    .upload(cas.channel().await, "")
    .await;
    assert_eq!(execute(&mut exec, action).await, (false, 0));
    assert_eq!(execute(&mut exec, action).await, (true, 0));
}

/// The samples of a Prometheus text exposition: each name with the label text of each of
/// its series (`name{labels} value`).
fn samples(exposition: &str) -> BTreeMap<String, Vec<String>> {
    let mut samples: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in exposition.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.split('}').next().unwrap_or("")),
            None => (line.split(' ').next().unwrap_or(""), ""),
        };
        samples
            .entry(name.to_string())
            .or_default()
            .push(labels.to_string());
    }
    samples
}

/// Whether some emitted series can match `selector`.
fn emitted(samples: &BTreeMap<String, Vec<String>>, selector: &Selector) -> bool {
    samples.get(&selector.name).is_some_and(|series| {
        series.iter().any(|labels| {
            selector
                .equals
                .iter()
                .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scraping_cairn_answers_every_rule_dashboard_and_guide_expression() {
    let test = "prometheus_scraping_cairn_answers_every_rule_dashboard_and_guide_expression";
    let Some(prometheus_bin) = prometheus_tool(test, "prometheus") else {
        return;
    };
    let Some(bazel_bin) = bazel::find_or_skip(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };

    // CAS, scheduler and worker from the configs of the Kubernetes ConfigMap, on loopback.
    let configs = kubernetes_dir().join("configs");
    let cas = Cairn::start_config_env(
        &dir("cas"),
        &configs.join("cas.json5"),
        &[
            ("CAIRN_CAS_LISTEN", "127.0.0.1:0".to_string()),
            ("CAIRN_DATA", dir("cas-data").display().to_string()),
            ("CAIRN_MEMORY_BYTES", "64mb".to_string()),
            ("CAIRN_DISK_BYTES", "1gb".to_string()),
        ],
    );
    let worker_api = free_addr();
    let (scheduler_tls, worker_tls) = crate::common::certs::cert_manager_secrets(&dir("secrets"));
    let scheduler = Cairn::start_config_env(
        &dir("scheduler"),
        &configs.join("scheduler.json5"),
        &[
            ("CAIRN_SCHEDULER_LISTEN", "127.0.0.1:0".to_string()),
            ("CAIRN_WORKER_API_LISTEN", worker_api.to_string()),
            ("CAIRN_CAS_ENDPOINT", format!("grpc://{}", cas.addr)),
            ("CAIRN_TLS_DIR", scheduler_tls.display().to_string()),
        ],
    );
    let _worker = CairnWorker::start(
        "worker",
        &configs.join("worker.json5"),
        &[
            ("CAIRN_WORKER_API_ENDPOINT", format!("grpcs://{worker_api}")),
            ("CAIRN_TLS_DIR", worker_tls.display().to_string()),
            ("CAIRN_CAS_ENDPOINT", format!("grpc://{}", cas.addr)),
            ("CAIRN_WORKER_DATA", dir("worker").display().to_string()),
            ("CAIRN_WORKER_CAS_BYTES", "1gb".to_string()),
            ("CAIRN_WORKER_CPUS", "2".to_string()),
            ("CAIRN_WORKER_SLOTS", "2".to_string()),
        ],
        Duration::from_secs(30),
    );

    // Prometheus scrapes both every second and evaluates both rule files every second.
    let metrics = metrics_dir();
    let prometheus = Prometheus::start(
        &prometheus_bin,
        &dir("prometheus"),
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n  - {}\n\
             scrape_configs:\n  - job_name: nativelink\n    static_configs:\n      \
             - targets: ['{}', '{}']\n",
            metrics.join(RECORDING_RULES).display(),
            metrics.join(ALERTS).display(),
            cas.addr,
            scheduler.addr
        ),
    );

    // Fresh servers, before any request: every guide query already returns a series (the
    // counters with known labels start at 0).
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    wait_for_two_scrapes_after(&prometheus, started).await;
    let fresh: Vec<String> = GUIDE_QUERIES
        .iter()
        .filter_map(|q| {
            let watched = without_threshold(q);
            match prometheus.series(watched) {
                Ok(n) if n > 0 => None,
                other => Some(format!("`{watched}`: {other:?}")),
            }
        })
        .collect();
    assert!(
        fresh.is_empty(),
        "guide queries with no series on fresh servers:\n{}",
        fresh.join("\n")
    );

    let bazel = Bazel::new(bazel_bin, &dir("bazel"), "bazel-exec-workspace");
    tokio::task::block_in_place(|| bazel_remote_build(&bazel, &cas, &scheduler));
    execute_an_action_already_in_the_cache(&cas, &scheduler).await;
    drop(bazel); // `bazel shutdown`
    let served = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();

    // Two scrapes of both targets after the build (rate() needs two samples).
    wait_for_two_scrapes_after(&prometheus, served).await;

    // What Cairn emits now: a metric without a sample cannot make a series.
    let mut exposed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for process in [&cas, &scheduler] {
        let (status, body) = http_get(process.addr, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "GET /metrics of {}", process.addr);
        for (name, series) in samples(&body) {
            exposed.entry(name).or_default().extend(series);
        }
    }
    exposed.insert("up".to_string(), vec!["job=\"nativelink\"".to_string()]);

    // Every expression: rule files, recorded series, dashboard, guides.
    let all_rules: Vec<Rule> = [RECORDING_RULES, ALERTS]
        .iter()
        .flat_map(|f| rules(&metrics.join(f)))
        .collect();
    let recorded: BTreeMap<&str, &str> = all_rules
        .iter()
        .filter(|r| r.kind == "record")
        .map(|r| (r.name.as_str(), r.expr.as_str()))
        .collect();
    let mut exprs: Vec<(String, String)> = Vec::new();
    for rule in &all_rules {
        exprs.push((format!("{} {}", rule.kind, rule.name), rule.expr.clone()));
        if rule.kind == "record" {
            exprs.push((format!("recorded {}", rule.name), rule.name.clone()));
        }
    }
    for (title, panel_exprs) in dashboard_panels() {
        for expr in panel_exprs {
            exprs.push((format!("dashboard panel {title:?}"), expr));
        }
    }
    for expr in GUIDE_QUERIES {
        exprs.push(("guide query".to_string(), expr.to_string()));
    }

    let mut failures = Vec::new();
    for (source, expr) in &exprs {
        if let Err(e) = prometheus.query(expr) {
            failures.push(format!("{source}: `{expr}` is not a valid query: {e}"));
            continue;
        }
        let watched = without_threshold(expr);
        let count = match prometheus.series(watched) {
            Ok(n) => n,
            Err(e) => {
                failures.push(format!("{source}: `{watched}`: {e}"));
                continue;
            }
        };
        eprintln!(
            "{count:>3} series  {source}: {}",
            watched.replace('\n', " ")
        );
        if count > 0 {
            continue;
        }
        // Why not: the raw metrics it reads (through the recording rules it reads) that Cairn
        // has not emitted in this run, if any.
        let mut reads = BTreeSet::new();
        for selector in selectors(watched) {
            match recorded.get(selector.name.as_str()) {
                Some(rule_expr) => reads.extend(selectors(rule_expr)),
                None => {
                    reads.insert(selector);
                }
            }
        }
        let missing: Vec<String> = reads
            .iter()
            .filter(|s| !emitted(&exposed, s))
            .map(Selector::to_string)
            .collect();
        failures.push(if missing.is_empty() {
            format!("{source}: `{watched}` returned no series, though Cairn emits what it reads")
        } else {
            format!(
                "{source}: `{watched}` returned no series: it reads {}, which Cairn has not \
                 emitted in this run",
                missing.join(" and ")
            )
        });
    }
    assert!(
        failures.is_empty(),
        "{} of {} expressions failed:\n{}\n--- prometheus log\n{}",
        failures.len(),
        exprs.len(),
        failures.join("\n"),
        prometheus.log_text()
    );
}

/// Waits until Prometheus has scraped both Cairn processes twice after `since` (Unix seconds;
/// rate() needs two samples), then for the recording rules to see them.
async fn wait_for_two_scrapes_after(prometheus: &Prometheus, since: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prometheus.number("sum(up{job=\"nativelink\"})");
        let oldest = prometheus.number("min(timestamp(up{job=\"nativelink\"}))");
        if up == Some(2.0) && oldest.is_some_and(|t| t > since + 2.5) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape both Cairn processes within 30s (sum(up) = {up:?}, \
             last scrape {oldest:?}, waiting for scrapes after {since}):\n{}",
            prometheus.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The recording rules are evaluated every second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
}
