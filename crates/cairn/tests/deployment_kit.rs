//! The deployment kit of the guides, checked with the real tools:
//!
//! - `deployment-examples/metrics/`: `promtool check rules` and `promtool test rules` on the
//!   alert and recording rules, `promtool check config` on the Prometheus config,
//!   `amtool check-config` on the Alertmanager config, every file docker-compose.yaml mounts,
//!   the Grafana provisioning and dashboard;
//! - a real `prometheus` scraping a CAS, a scheduler and a worker started from the Kubernetes
//!   configs, after they served a real Bazel 4.2.3 remote build (`--remote_executor`): every
//!   expression of the rule files, of the dashboard and of the guides is a query Prometheus
//!   accepts, and returns at least one series;
//! - `deployment-examples/kubernetes/`: the ConfigMap holds `configs/*.json5` byte for byte and
//!   `cairn check-config` accepts each; `kubernetes-validate` (PyPI, offline schemas, from the CI
//!   venv `.ci/venv`) passes every manifest; the two custom resources it has no schema for
//!   (cert-manager `Certificate`, KEDA `ScaledObject`) pass the schemas in `schemas/`; the
//!   manifests wire ports, selectors and autoscalers as the guide says.
//!
//! A missing tool fails its test with how to install it (`.ci/run` does), unless
//! `CAIRN_SKIP_PROMETHEUS=1` (promtool, amtool, prometheus), `CAIRN_SKIP_BAZEL=1` (bazel, for
//! the Prometheus end-to-end test) or `CAIRN_SKIP_K8S_VALIDATE=1` (the venv's
//! kubernetes-validate and Python) is set.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use common::bazel::{self, Bazel, COMMAND_DEADLINE};
use common::{free_addr, Cairn, CairnWorker};
use futures::StreamExt;
use prost::Message;
use serde_json::Value;

const SKIP_PROMETHEUS: &str = "CAIRN_SKIP_PROMETHEUS";
const SKIP_K8S_VALIDATE: &str = "CAIRN_SKIP_K8S_VALIDATE";

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.31.0";

const ALERTS: &str = "prometheus-alerts.yml";
const RECORDING_RULES: &str = "prometheus-recording-rules.yml";

/// Every alert of the production-deployment and troubleshooting guides.
const GUIDE_ALERTS: [&str; 9] = [
    "HighQueueLength",
    "LowCacheHitRate",
    "WorkerDown",
    "HighErrorRate",
    "HighExecutionErrorRate",
    "CacheMissRateHigh",
    "QueueBacklog",
    "WorkerUtilizationLow",
    "ComponentHealthFailed",
];

/// The recording rules the troubleshooting guide queries.
const GUIDE_RECORDS: [&str; 4] = [
    "nativelink:cache_hit_rate",
    "nativelink:queue_depth",
    "nativelink:worker_utilization",
    "nativelink:cache_operation_latency_p95",
];

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

// ---------------------------------------------------------------------------------------
// Paths, tools and processes.
// ---------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

fn metrics_dir() -> PathBuf {
    repo().join("deployment-examples/metrics")
}

fn kubernetes_dir() -> PathBuf {
    repo().join("deployment-examples/kubernetes")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The files under `dir` (recursively) whose name ends with one of `extensions`, sorted.
fn files(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("list {}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if extensions
                .iter()
                .any(|x| path.to_string_lossy().ends_with(x))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// For a missing tool: `None` (the test returns, skipped) when `skip_var` is 1, else a panic
/// naming the fix.
fn missing_tool<T>(test: &str, what: &str, skip_var: &str, install: &str) -> Option<T> {
    if std::env::var(skip_var).as_deref() == Ok("1") {
        eprintln!("{test}: SKIPPED, {what} is missing and {skip_var}=1");
        return None;
    }
    panic!("{test}: {what} is missing. {install}, or set {skip_var}=1 to skip this test.");
}

/// `promtool`, `amtool` or `prometheus` on PATH (Debian's `prometheus` and
/// `prometheus-alertmanager` packages).
fn prometheus_tool(test: &str, name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    found.or_else(|| {
        missing_tool(
            test,
            &format!("`{name}` (not on PATH)"),
            SKIP_PROMETHEUS,
            "Install it with `apt-get install -y prometheus prometheus-alertmanager`, as .ci/run does",
        )
    })
}

/// The CI venv's `kubernetes-validate` and the Python next to it (which has PyYAML and
/// jsonschema, its dependencies).
fn k8s_venv(test: &str) -> Option<(PathBuf, PathBuf)> {
    let bin = repo().join(".ci/venv/bin");
    let validate = bin.join("kubernetes-validate");
    let python = bin.join("python3");
    if validate.is_file() && python.is_file() {
        return Some((validate, python));
    }
    missing_tool(
        test,
        &format!("{} (or its python3)", validate.display()),
        SKIP_K8S_VALIDATE,
        "Create it with .ci/run (python3 -m venv .ci/venv && .ci/venv/bin/pip install \
         kubernetes-validate==1.37.0)",
    )
}

/// Runs `command` and returns its stdout; panics with both outputs unless it succeeds.
fn run_ok(what: &str, command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A `prometheus` server on a loopback port with its TSDB in a temporary directory; killed
/// on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` with `config` (a prometheus.yml text) and waits until it is ready.
    fn start(program: &Path, dir: &Path, config: &str) -> Prometheus {
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join("prometheus.log");
        let addr = free_addr();
        let child = Command::new(program)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let mut prometheus = Prometheus { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(prometheus.addr, "/-/ready") {
                return prometheus;
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prometheus.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready on {addr} within 30s:\n{}",
                prometheus.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/api/v1/query?query=EXPR`: the JSON answer, or the error Prometheus gave.
    fn query(&self, expr: &str) -> Result<Value, String> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(expr)),
        )
        .map_err(|e| format!("HTTP: {e}"))?;
        let json: Value =
            serde_json::from_str(&body).map_err(|e| format!("HTTP {status}, {e}: {body}"))?;
        if status != 200 || json["status"] != "success" {
            return Err(format!("HTTP {status}: {body}"));
        }
        Ok(json)
    }

    /// The series (or 1 for a scalar) `expr` returns now.
    fn series(&self, expr: &str) -> Result<usize, String> {
        let json = self.query(expr)?;
        Ok(match json["data"]["result"].as_array() {
            Some(result) => result.len(),
            None => 1,
        })
    }

    /// The value of a query that returns one number (a one-series vector or a scalar).
    fn number(&self, expr: &str) -> Option<f64> {
        let json = self.query(expr).ok()?;
        let result = &json["data"]["result"];
        let value = match result.as_array() {
            Some(series) => &series.first()?["value"],
            None => result,
        };
        value[1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET (no chunked bodies to decode); returns the status and the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reading our own YAML: rule files, the compose file, the ConfigMap. These files are written
// in a known shape; the real parsers (promtool, kubernetes-validate) check their syntax.
// ---------------------------------------------------------------------------------------

/// One rule of a rule file.
#[derive(Debug)]
struct Rule {
    /// `alert` or `record`.
    kind: &'static str,
    name: String,
    expr: String,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The value of `key: value` on `lines[i]`, or of the block scalar (`key: |`) that follows.
fn yaml_value(lines: &[&str], i: usize, key: &str) -> String {
    let line = lines[i];
    let value = line.trim_start().trim_start_matches("- ")[key.len() + 1..].trim();
    if !matches!(value, "|" | "|-" | ">" | ">-") {
        return value.trim_matches('"').trim_matches('\'').to_string();
    }
    let block: Vec<&str> = lines[i + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
        .map(|l| l.trim())
        .collect();
    block.join("\n").trim().to_string()
}

fn rules(path: &Path) -> Vec<Rule> {
    let text = read(path);
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut current: Option<(&'static str, String)> = None;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("- alert:") {
            current = Some(("alert", yaml_value(&lines, i, "alert")));
        } else if trimmed.starts_with("- record:") {
            current = Some(("record", yaml_value(&lines, i, "record")));
        } else if trimmed.starts_with("expr:") {
            let (kind, name) = current
                .take()
                .unwrap_or_else(|| panic!("{}:{}: expr without a rule", path.display(), i + 1));
            rules.push(Rule {
                kind,
                name,
                expr: yaml_value(&lines, i, "expr"),
            });
        }
    }
    rules
}

/// The data entries of a ConfigMap manifest: each `  KEY: |` block under `data:`, as the
/// string YAML reads (literal block, clipped: one final newline).
fn configmap_data(text: &str) -> BTreeMap<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "data:")
        .expect("a `data:` line");
    let mut data = BTreeMap::new();
    let mut i = start + 1;
    while i < lines.len() {
        let line = lines[i];
        if !line.starts_with("  ") || line.starts_with("   ") {
            break;
        }
        let key = line
            .trim()
            .strip_suffix(": |")
            .unwrap_or_else(|| panic!("configmap line {}: expected `KEY: |`", i + 1));
        i += 1;
        let mut body = Vec::new();
        while i < lines.len() && (lines[i].is_empty() || lines[i].starts_with("    ")) {
            body.push(lines[i].get(4..).unwrap_or(""));
            i += 1;
        }
        while body.last() == Some(&"") {
            body.pop();
        }
        data.insert(key.to_string(), body.join("\n") + "\n");
    }
    data
}

/// `expr` without a final top-level comparison with a number (`X > 100` gives `X`), so that
/// the series an alert or a diagnostic query watches can be counted when it is not firing.
fn without_threshold(expr: &str) -> &str {
    let bytes = expr.as_bytes();
    let (mut depth, mut quoted, mut last) = (0i32, false, None);
    let is_operator = |b: u8| matches!(b, b'<' | b'>' | b'=' | b'!');
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b'(' | b'{' | b'[' if !quoted => depth += 1,
            b')' | b'}' | b']' if !quoted => depth -= 1,
            // The first character of an operator outside parentheses, braces and strings.
            _ if is_operator(b)
                && !quoted
                && depth == 0
                && (i == 0 || !is_operator(bytes[i - 1])) =>
            {
                last = Some(i)
            }
            _ => {}
        }
    }
    match last {
        Some(i) => {
            let rest = expr[i..].trim_start_matches(['<', '>', '=', '!']);
            let number = rest.split('#').next().unwrap_or("").trim();
            if number.parse::<f64>().is_ok() {
                expr[..i].trim()
            } else {
                expr
            }
        }
        None => expr,
    }
}

/// A series selector an expression reads: a metric (or `nativelink:*` recorded) name and its
/// `label="value"` matchers (other matchers are not needed to tell whether it can match).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    name: String,
    equals: Vec<(String, String)>,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let equals: Vec<String> = self
            .equals
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        write!(f, "{}{{{}}}", self.name, equals.join(","))
    }
}

/// The `nativelink*` and `up` selectors of an expression: identifiers outside label matchers
/// and strings that are not function names, with the matchers that follow them.
fn selectors(expr: &str) -> BTreeSet<Selector> {
    let mut found = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let (mut i, mut depth_braces, mut quoted) = (0, 0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            quoted = !quoted;
        } else if !quoted && c == '{' {
            depth_braces += 1;
        } else if !quoted && c == '}' {
            depth_braces -= 1;
        } else if !quoted && depth_braces == 0 && (c.is_ascii_alphabetic() || c == '_') {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
            {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            let rest: String = chars[i..].iter().collect();
            let rest = rest.trim_start();
            let preceded_by_digit = start > 0 && chars[start - 1].is_ascii_digit();
            if rest.starts_with('(')
                || preceded_by_digit
                || !(name.starts_with("nativelink") || name == "up")
            {
                continue;
            }
            let mut equals = Vec::new();
            if let Some(matchers) = rest.strip_prefix('{') {
                let matchers = matchers.split('}').next().unwrap_or("");
                for matcher in matchers.split(',') {
                    if let Some((label, value)) = matcher.split_once('=') {
                        if !value.starts_with('~') && !label.ends_with('!') {
                            equals.push((
                                label.trim().to_string(),
                                value.trim().trim_matches('"').to_string(),
                            ));
                        }
                    }
                }
            }
            found.insert(Selector { name, equals });
            continue;
        }
        i += 1;
    }
    found
}

// ---------------------------------------------------------------------------------------
// deployment-examples/metrics
// ---------------------------------------------------------------------------------------

#[test]
fn rule_files_pass_promtool_and_their_unit_tests_cover_every_alert() {
    let test = "rule_files_pass_promtool_and_their_unit_tests_cover_every_alert";
    let dir = metrics_dir();

    // Every alert of both guides, and the recording rules the troubleshooting guide queries.
    let all_rules: Vec<Rule> = [ALERTS, RECORDING_RULES]
        .iter()
        .flat_map(|f| rules(&dir.join(f)))
        .collect();
    let alerts: Vec<&str> = all_rules
        .iter()
        .filter(|r| r.kind == "alert")
        .map(|r| r.name.as_str())
        .collect();
    let records: Vec<&str> = all_rules
        .iter()
        .filter(|r| r.kind == "record")
        .map(|r| r.name.as_str())
        .collect();
    for alert in GUIDE_ALERTS {
        assert!(alerts.contains(&alert), "{ALERTS} has no alert {alert}");
    }
    for record in GUIDE_RECORDS {
        assert!(
            records.contains(&record),
            "{RECORDING_RULES} does not record {record}"
        );
    }

    // Each alert has a unit test where it fires and one where it stays silent; each recorded
    // series has a unit test of its value.
    let unit_tests = files(&dir.join("tests"), &[".yml"]);
    assert!(
        !unit_tests.is_empty(),
        "no unit tests in {}/tests",
        dir.display()
    );
    let (mut fires, mut silent) = (BTreeSet::new(), BTreeSet::new());
    let mut tested_exprs = String::new();
    for file in &unit_tests {
        let text = read(file);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for (i, line) in lines.iter().enumerate() {
            if let Some(name) = line.strip_prefix("alertname: ") {
                let expected = lines[i + 1..]
                    .iter()
                    .find(|l| l.starts_with("exp_alerts:"))
                    .unwrap_or_else(|| panic!("{}: {name} without exp_alerts", file.display()));
                if *expected == "exp_alerts: []" {
                    silent.insert(name.to_string());
                } else {
                    fires.insert(name.to_string());
                }
            }
            if let Some(expr) = line.strip_prefix("- expr: ") {
                tested_exprs.push_str(expr);
                tested_exprs.push('\n');
            }
        }
    }
    for alert in &alerts {
        assert!(fires.contains(*alert), "no unit test makes {alert} fire");
        assert!(silent.contains(*alert), "no unit test keeps {alert} silent");
    }
    for record in &records {
        assert!(
            tested_exprs.contains(record),
            "no promql_expr_test reads {record}"
        );
    }

    let Some(promtool) = prometheus_tool(test, "promtool") else {
        return;
    };
    run_ok(
        "promtool check rules",
        Command::new(&promtool)
            .current_dir(&dir)
            .args(["check", "rules", ALERTS, RECORDING_RULES]),
    );
    let out = run_ok(
        "promtool test rules",
        Command::new(&promtool)
            .current_dir(&dir)
            .args(["test", "rules"])
            .args(&unit_tests),
    );
    eprintln!("{out}");
}

#[test]
fn prometheus_config_passes_promtool_and_loads_both_rule_files() {
    let dir = metrics_dir();
    let config = read(&dir.join("prometheus-config.yaml"));
    assert!(
        config.contains("job_name: nativelink\n"),
        "no `nativelink` scrape job"
    );
    assert!(config.contains("- targets: ['alertmanager:9093']"));
    for rule_file in [ALERTS, RECORDING_RULES] {
        assert!(
            config.contains(&format!("  - {rule_file}\n")),
            "prometheus-config.yaml does not load {rule_file}"
        );
    }
    let Some(promtool) = prometheus_tool("prometheus_config_passes_promtool", "promtool") else {
        return;
    };
    let out = run_ok(
        "promtool check config",
        Command::new(&promtool).current_dir(&dir).args([
            "check",
            "config",
            "prometheus-config.yaml",
        ]),
    );
    assert!(out.contains("SUCCESS: 2 rule files found"), "{out}");
}

#[test]
fn alertmanager_config_passes_amtool() {
    let Some(amtool) = prometheus_tool("alertmanager_config_passes_amtool", "amtool") else {
        return;
    };
    run_ok(
        "amtool check-config",
        Command::new(&amtool)
            .current_dir(metrics_dir())
            .args(["check-config", "alertmanager-config.yml"]),
    );
}

#[test]
fn compose_stack_mounts_only_files_that_exist_where_the_services_read_them() {
    let dir = metrics_dir();
    let compose = read(&dir.join("docker-compose.yaml"));
    for service in ["otel-collector", "prometheus", "grafana", "alertmanager"] {
        assert!(
            compose.contains(&format!("\n  {service}:\n")),
            "docker-compose.yaml has no service {service}"
        );
    }
    assert!(compose.contains("'--web.enable-otlp-receiver'"));

    let mut mounts = BTreeMap::new();
    for line in compose.lines().map(str::trim) {
        if let Some(mount) = line.strip_prefix("- ./") {
            let mut parts = mount.split(':');
            let host = parts.next().unwrap();
            let target = parts.next().expect("a mount target");
            assert!(
                dir.join(host).exists(),
                "docker-compose.yaml mounts ./{host}, which does not exist"
            );
            mounts.insert(host.to_string(), target.to_string());
        }
    }
    for file in [
        "otel-collector-config.yaml",
        "prometheus-config.yaml",
        ALERTS,
        RECORDING_RULES,
        "alertmanager-config.yml",
        "grafana/provisioning",
        "grafana/dashboards",
    ] {
        assert!(
            mounts.contains_key(file),
            "docker-compose.yaml does not mount ./{file}"
        );
    }
    // Each service reads its file where it is mounted.
    assert_eq!(
        mounts["otel-collector-config.yaml"],
        "/etc/otel-collector/config.yaml"
    );
    assert!(compose.contains("\"--config=/etc/otel-collector/config.yaml\""));
    assert_eq!(
        mounts["prometheus-config.yaml"],
        "/etc/prometheus/prometheus.yml"
    );
    assert!(compose.contains("'--config.file=/etc/prometheus/prometheus.yml'"));
    for rules in [ALERTS, RECORDING_RULES] {
        assert_eq!(mounts[rules], format!("/etc/prometheus/{rules}"));
    }
    assert!(compose.contains(&format!(
        "'--config.file={}'",
        mounts["alertmanager-config.yml"]
    )));
    assert_eq!(mounts["grafana/provisioning"], "/etc/grafana/provisioning");
    let providers = read(&dir.join("grafana/provisioning/dashboards/cairn.yaml"));
    assert!(
        providers.contains(&format!("path: {}\n", mounts["grafana/dashboards"])),
        "the dashboard provider does not read {}",
        mounts["grafana/dashboards"]
    );

    // The collector: OTLP in on 4317 and 4318, memory_limiter and batch, Prometheus out on 9090.
    let collector = read(&dir.join("otel-collector-config.yaml"));
    for needle in [
        "endpoint: 0.0.0.0:4317",
        "endpoint: 0.0.0.0:4318",
        "memory_limiter:",
        "batch:",
        "endpoint: 0.0.0.0:9090",
        "processors: [memory_limiter, attributes, batch]",
    ] {
        assert!(
            collector.contains(needle),
            "otel-collector-config.yaml lacks {needle:?}"
        );
    }
}

/// The dashboard's panels, as (title, expressions).
fn dashboard_panels() -> Vec<(String, Vec<String>)> {
    let path = metrics_dir().join("grafana/dashboards/cairn.json");
    let dashboard: Value = serde_json::from_str(&read(&path)).expect("cairn.json is JSON");
    let datasources = read(&metrics_dir().join("grafana/provisioning/datasources/prometheus.yaml"));
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("a panel title").to_string();
        let uid = panel["datasource"]["uid"]
            .as_str()
            .expect("a data source uid");
        assert!(
            datasources.contains(&format!("uid: {uid}\n")),
            "panel {title:?} uses data source {uid:?}, which is not provisioned"
        );
        let exprs: Vec<String> = panel["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .map(|t| t["expr"].as_str().expect("a PromQL expr").to_string())
            .collect();
        assert!(!exprs.is_empty(), "panel {title:?} has no query");
        panels.push((title, exprs));
    }
    panels
}

#[test]
fn dashboard_has_the_panels_of_the_issue() {
    let panels = dashboard_panels();
    let all: String = panels
        .iter()
        .flat_map(|(_, e)| e.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join("\n");
    for (title, needle) in [
        ("Queue length", "nativelink_scheduler_queue_length"),
        ("Workers", "nativelink_worker_active_count"),
        ("Worker utilization", "nativelink:worker_utilization"),
        ("Cache hit rate", "nativelink:cache_hit_rate"),
        ("Request latency p50 / p99", "histogram_quantile(0.99"),
        ("Errors", "nativelink_request_errors_total"),
        ("Store sizes", "nativelink_store_size_bytes"),
        ("Executions by result", "execution_result"),
    ] {
        let (_, exprs) = panels
            .iter()
            .find(|(t, _)| t == title)
            .unwrap_or_else(|| panic!("the dashboard has no panel {title:?}"));
        assert!(
            exprs.iter().any(|e| e.contains(needle)),
            "panel {title:?} does not query {needle}"
        );
    }
    assert!(all.contains("histogram_quantile(0.5,"), "no p50 latency");
}

// ---------------------------------------------------------------------------------------
// A real Prometheus scraping a real Cairn.
// ---------------------------------------------------------------------------------------

const SHA: DigestFunction = DigestFunction::Sha256;

/// Uploads a shell command as an Action, with its Command and input root, to the CAS.
async fn upload_action(
    cas: &mut re::content_addressable_storage_client::ContentAddressableStorageClient<
        tonic::transport::Channel,
    >,
    script: &str,
    outputs: &[&str],
) -> Digest {
    let root = re::Directory::default().encode_to_vec();
    #[allow(deprecated)]
    let command = re::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: vec![re::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/bin:/usr/bin".into(),
        }],
        output_files: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let action = re::Action {
        command_digest: Some(SHA.compute(&command).to_proto()),
        input_root_digest: Some(SHA.compute(&root).to_proto()),
        platform: Some(re::Platform {
            properties: vec![re::platform::Property {
                name: "OSFamily".into(),
                value: "linux".into(),
            }],
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let digest = SHA.compute(&action);
    let requests = [root, command, action]
        .into_iter()
        .map(|data| re::batch_update_blobs_request::Request {
            digest: Some(SHA.compute(&data).to_proto()),
            data,
            compressor: 0,
        })
        .collect();
    cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
        requests,
        ..Default::default()
    })
    .await
    .expect("upload the action");
    digest
}

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
    let mut cas_client =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(
            cas.channel().await,
        );
    let mut exec = re::execution_client::ExecutionClient::new(scheduler.channel().await);
    let action = upload_action(&mut cas_client, "echo cached > out.txt", &["out.txt"]).await;
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
    let scheduler = Cairn::start_config_env(
        &dir("scheduler"),
        &configs.join("scheduler.json5"),
        &[
            ("CAIRN_SCHEDULER_LISTEN", "127.0.0.1:0".to_string()),
            ("CAIRN_WORKER_API_LISTEN", worker_api.to_string()),
            ("CAIRN_CAS_ENDPOINT", format!("grpc://{}", cas.addr)),
        ],
    );
    let _worker = CairnWorker::start(
        "worker",
        &configs.join("worker.json5"),
        &[
            ("CAIRN_WORKER_API_ENDPOINT", format!("grpc://{worker_api}")),
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

    let bazel = Bazel::new(bazel_bin, &dir("bazel"), "bazel-exec-workspace");
    tokio::task::block_in_place(|| bazel_remote_build(&bazel, &cas, &scheduler));
    execute_an_action_already_in_the_cache(&cas, &scheduler).await;
    drop(bazel); // `bazel shutdown`
    let served = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();

    // Wait for two scrapes of both targets after the build (rate() needs two samples), then
    // for the recording rules to see them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prometheus.number("sum(up{job=\"nativelink\"})");
        let oldest = prometheus.number("min(timestamp(up{job=\"nativelink\"}))");
        if up == Some(2.0) && oldest.is_some_and(|t| t > served + 2.5) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape both Cairn processes within 30s (sum(up) = {up:?}, \
             last scrape {oldest:?}, build served at {served}):\n{}",
            prometheus.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;

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

#[test]
fn helpers_read_thresholds_and_selectors() {
    assert_eq!(
        without_threshold("nativelink_scheduler_queue_length > 100"),
        "nativelink_scheduler_queue_length"
    );
    assert_eq!(
        without_threshold("(1 - nativelink:cache_hit_rate) > 0.5"),
        "(1 - nativelink:cache_hit_rate)"
    );
    assert_eq!(
        without_threshold("nativelink:cache_operation_latency_p95 > 1000  # 1 second"),
        "nativelink:cache_operation_latency_p95"
    );
    assert_eq!(
        without_threshold("up{job=\"nativelink\"} == 0"),
        "up{job=\"nativelink\"}"
    );
    assert_eq!(
        without_threshold("sum(x{a=~\"b|c\"}) / sum(y)"),
        "sum(x{a=~\"b|c\"}) / sum(y)"
    );
    assert_eq!(
        selectors(
            "sum by (le) (rate(nativelink_request_duration_seconds_bucket{service=\"cas\", code=~\"x\"}[5m])) \
             / nativelink:queue_depth"
        )
        .iter()
        .map(Selector::to_string)
        .collect::<Vec<_>>(),
        [
            "nativelink:queue_depth{}",
            "nativelink_request_duration_seconds_bucket{service=\"cas\"}"
        ]
    );
    let data = configmap_data(
        "kind: ConfigMap\ndata:\n  a.json5: |\n    {\n\n      x: 1,\n    }\n  b.json5: |\n    {}\n",
    );
    assert_eq!(data["a.json5"], "{\n\n  x: 1,\n}\n");
    assert_eq!(data["b.json5"], "{}\n");
}

// ---------------------------------------------------------------------------------------
// deployment-examples/kubernetes
// ---------------------------------------------------------------------------------------

const K8S_CONFIGS: [&str; 3] = ["cas.json5", "scheduler.json5", "worker.json5"];

#[test]
fn configmap_holds_the_configs_and_cairn_check_config_accepts_each() {
    let dir = kubernetes_dir();
    let data = configmap_data(&read(&dir.join("configmap.yaml")));
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        K8S_CONFIGS.iter().collect::<Vec<_>>(),
        "the ConfigMap's keys"
    );
    for name in K8S_CONFIGS {
        let path = dir.join("configs").join(name);
        assert!(
            data[name] == read(&path),
            "configmap.yaml's {name} differs from configs/{name}; copy the file into the ConfigMap"
        );
        // The shipped defaults, not whatever this shell has set.
        let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
        command.arg("check-config").arg(&path);
        for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("CAIRN_")) {
            command.env_remove(var);
        }
        let out = run_ok(&format!("cairn check-config {name}"), &mut command);
        assert!(out.trim_end().ends_with(": ok"), "{out}");
    }
    // The Kubernetes names the configs dial and listen on.
    let scheduler = read(&dir.join("configs/scheduler.json5"));
    assert!(scheduler.contains("0.0.0.0:50052") && scheduler.contains("0.0.0.0:50061"));
    assert!(scheduler.contains("grpc://nativelink-cas:50051"));
    let worker = read(&dir.join("configs/worker.json5"));
    assert!(worker.contains("grpc://nativelink-scheduler-workers:50061"));
    assert!(worker.contains("grpc://nativelink-cas:50051"));
    assert!(read(&dir.join("configs/cas.json5")).contains("0.0.0.0:50051"));
}

/// Validates the custom resources of the given files against `schemas/KIND-GROUP-VERSION.json`
/// (GROUP: the first label of the API group) with jsonschema, and prints every document as JSON:
/// `[{"file", "doc", "schema", "errors"}]`.
const CR_VALIDATOR: &str = r#"
import json, pathlib, sys
import jsonschema, yaml
schemas = pathlib.Path(sys.argv[1])
out = []
for f in sys.argv[2:]:
    with open(f) as stream:
        docs = [d for d in yaml.safe_load_all(stream) if d]
    for doc in docs:
        group, _, version = doc.get("apiVersion", "").rpartition("/")
        schema = schemas / ("%s-%s-%s.json" % (doc.get("kind", "").lower(), group.split(".")[0], version))
        errors = None
        if group and schema.exists():
            validator = jsonschema.Draft202012Validator(json.loads(schema.read_text()))
            errors = ["%s: %s" % ("/".join(map(str, e.path)), e.message) for e in validator.iter_errors(doc)]
        out.append({"file": f, "doc": doc, "schema": str(schema) if errors is not None else None, "errors": errors})
print(json.dumps(out))
"#;

/// The documents of `files`, each with the custom-resource schema errors (`None` when no
/// schema of `schemas/` applies).
fn documents(python: &Path, files: &[PathBuf]) -> Vec<(String, Value, Option<Vec<String>>)> {
    let out = run_ok(
        "validate custom resources",
        Command::new(python)
            .arg("-c")
            .arg(CR_VALIDATOR)
            .arg(kubernetes_dir().join("schemas"))
            .args(files),
    );
    let docs: Value = serde_json::from_str(&out).expect("the validator's JSON");
    docs.as_array()
        .expect("a list")
        .iter()
        .map(|d| {
            let errors = d["errors"].as_array().map(|e| {
                e.iter()
                    .map(|m| m.as_str().unwrap_or_default().to_string())
                    .collect()
            });
            (
                d["file"].as_str().unwrap_or_default().to_string(),
                d["doc"].clone(),
                errors,
            )
        })
        .collect()
}

fn kind_name(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or_default().to_lowercase(),
        doc["metadata"]["name"].as_str().unwrap_or_default()
    )
}

#[test]
fn kubernetes_manifests_pass_schema_validation_and_wire_the_guides_ports() {
    let test = "kubernetes_manifests_pass_schema_validation_and_wire_the_guides_ports";
    let Some((validate, python)) = k8s_venv(test) else {
        return;
    };
    let dir = kubernetes_dir();
    let manifests = files(&dir, &[".yaml", ".yml"]);
    assert!(manifests.len() >= 8, "manifests: {manifests:?}");

    // Core kinds: kubernetes-validate's bundled schemas, strict (unknown fields are errors).
    let out = Command::new(&validate)
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(&manifests)
        .output()
        .expect("run kubernetes-validate");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !report.contains("ERROR") && !report.contains("FATAL"),
        "kubernetes-validate {}:\n{report}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let passed: BTreeSet<String> = report
        .lines()
        .filter_map(|l| l.split(" passed for resource ").nth(1))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();

    // Custom resources: our schemas. Every document is checked by one or the other.
    let docs = documents(&python, &manifests);
    for (file, doc, errors) in &docs {
        let name = kind_name(doc);
        match errors {
            Some(errors) => assert!(errors.is_empty(), "{file}: {name}: {errors:#?}"),
            None => assert!(
                passed.contains(&name),
                "{file}: {name} was neither validated by kubernetes-validate nor by a schema of \
                 schemas/:\n{report}"
            ),
        }
    }
    let custom: Vec<String> = docs
        .iter()
        .filter(|(_, _, e)| e.is_some())
        .map(|(_, d, _)| kind_name(d))
        .collect();
    assert_eq!(
        custom,
        [
            "scaledobject/nativelink-worker-scaler",
            "certificate/nativelink-tls"
        ],
        "custom resources validated against schemas/"
    );

    // The schemas reject what KEDA and cert-manager would.
    let broken = tempfile::tempdir().unwrap();
    let broken_file = broken.path().join("broken.yaml");
    std::fs::write(
        &broken_file,
        "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata: {name: x}\n\
         spec:\n  scaleTargetRef: {name: w}\n  minReplicas: 5\n  triggers:\n  \
         - type: prometheus\n    metadata: {serverAddress: 'http://p:9090', query: q, threshold: 20}\n\
         ---\napiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {name: y}\n\
         spec:\n  issuerRef: {name: i}\n",
    )
    .unwrap();
    let broken_docs = documents(&python, &[broken_file]);
    for (_, doc, errors) in &broken_docs {
        let errors = errors.as_ref().expect("a schema applies");
        assert!(!errors.is_empty(), "{} passed its schema", kind_name(doc));
    }

    // What the guide wires: ports, selectors, resources, autoscalers.
    let by_name: BTreeMap<String, &Value> =
        docs.iter().map(|(_, d, _)| (kind_name(d), d)).collect();
    let get = |name: &str| -> &Value {
        by_name
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {}", dir.display()))
    };
    let service_ports = |name: &str| -> Vec<i64> {
        get(name)["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| p["port"].as_i64().expect("a port"))
            .collect()
    };
    assert_eq!(service_ports("service/nativelink-cas"), [50051]);
    assert_eq!(service_ports("service/nativelink-scheduler"), [50052]);
    assert_eq!(
        service_ports("service/nativelink-scheduler-workers"),
        [50061]
    );
    assert_eq!(
        get("service/nativelink-scheduler-workers")["spec"]["type"],
        "ClusterIP"
    );
    for name in by_name.keys() {
        if name.starts_with("service/") && name != "service/nativelink-scheduler-workers" {
            assert!(
                !service_ports(name).contains(&50061),
                "{name} exposes the worker API"
            );
        }
    }
    // Only worker pods may reach 50061.
    for (name, doc) in &by_name {
        if !name.starts_with("networkpolicy/") {
            continue;
        }
        for rule in doc["spec"]["ingress"].as_array().into_iter().flatten() {
            let ports: Vec<i64> = rule["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["port"].as_i64())
                .collect();
            if ports.contains(&50061) {
                let from = rule["from"].as_array().expect("a from list");
                assert!(
                    from.iter()
                        .all(|peer| peer.as_object().is_some_and(|p| p.len() == 1)
                            && peer["podSelector"]["matchLabels"]
                                == serde_json::json!({"app": "nativelink-worker"})),
                    "{name} admits more than worker pods to 50061: {from:?}"
                );
            }
        }
    }
    let policy = &get("networkpolicy/nativelink-policy")["spec"];
    assert_eq!(policy["podSelector"]["matchLabels"]["app"], "nativelink");
    assert_eq!(
        policy["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["name"],
        "build-clients"
    );
    for (deployment, config, selector, requests, limits) in [
        (
            "nativelink-cas",
            "cas.json5",
            "nativelink",
            ("8Gi", "4000m"),
            ("16Gi", "8000m"),
        ),
        (
            "nativelink-scheduler",
            "scheduler.json5",
            "nativelink",
            ("4Gi", "2000m"),
            ("8Gi", "4000m"),
        ),
        (
            "nativelink-worker",
            "worker.json5",
            "nativelink-worker",
            ("8Gi", "4"),
            ("8Gi", "4"),
        ),
    ] {
        let spec = &get(&format!("deployment/{deployment}"))["spec"];
        let pod = &spec["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(
            container["args"],
            serde_json::json!(["run", format!("/etc/cairn/{config}")]),
            "{deployment} runs its config"
        );
        assert_eq!(spec["template"]["metadata"]["labels"]["app"], selector);
        let resources = &container["resources"];
        assert_eq!(
            (
                resources["requests"]["memory"].as_str(),
                resources["requests"]["cpu"].as_str()
            ),
            (Some(requests.0), Some(requests.1)),
            "{deployment} requests"
        );
        assert_eq!(
            (
                resources["limits"]["memory"].as_str(),
                resources["limits"]["cpu"].as_str()
            ),
            (Some(limits.0), Some(limits.1)),
            "{deployment} limits"
        );
        let config_map = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["configMap"]["name"] == "nativelink-config");
        assert!(config_map, "{deployment} does not mount the ConfigMap");
    }
    // One scheduler until scheduler state is shared (see scheduler.yaml).
    assert_eq!(
        get("deployment/nativelink-scheduler")["spec"]["replicas"],
        1
    );
    let hpa = &get("horizontalpodautoscaler/nativelink-worker-hpa")["spec"];
    assert_eq!(hpa["scaleTargetRef"]["name"], "nativelink-worker");
    assert_eq!(
        (hpa["minReplicas"].as_i64(), hpa["maxReplicas"].as_i64()),
        (Some(5), Some(50))
    );
    assert!(hpa["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .any(|m| m["external"]["metric"]["name"] == "nativelink_queue_length"));
    let keda = &get("scaledobject/nativelink-worker-scaler")["spec"];
    assert_eq!(keda["scaleTargetRef"]["name"], "nativelink-worker");
    assert_eq!(keda["triggers"][0]["metadata"]["threshold"], "20");
    assert_eq!(
        keda["triggers"][0]["metadata"]["query"]
            .as_str()
            .map(str::trim),
        Some("sum(nativelink_scheduler_queue_length)")
    );
    assert_eq!(
        get("certificate/nativelink-tls")["spec"]["secretName"],
        "nativelink-tls"
    );
}
