//! `deployment-examples/metrics`: the rule files and their unit tests, the Prometheus and
//! Alertmanager configs, what docker-compose.yaml mounts, and the Grafana dashboard.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

use crate::files::{files, metrics_dir, read, ALERTS, RECORDING_RULES};
use crate::parse::{rules, Rule};
use crate::tools::{prometheus_tool, run_ok};

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
pub fn dashboard_panels() -> Vec<(String, Vec<String>)> {
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
