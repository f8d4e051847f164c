//! `deployment-examples/kubernetes`: the ConfigMap holds `configs/*.json5` byte for byte and
//! `cairn check-config` accepts each; `kubernetes-validate` passes every manifest, the schemas
//! in `schemas/` the two custom resources it has no schema for; the manifests wire ports,
//! selectors and autoscalers as the guide says.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::files::{files, kubernetes_dir, read};
use crate::parse::configmap_data;
use crate::tools::{k8s_venv, run_ok};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.31.0";

const K8S_CONFIGS: [&str; 3] = ["cas.json5", "scheduler.json5", "worker.json5"];

/// The guide's "CAS Server Redundancy", applied instead of `cas.yaml`.
const SHARED_CAS: &str = "shared-cas";
/// The guide's "Scheduler Redundancy", applied instead of `scheduler.yaml`.
const SHARED_SCHEDULER: &str = "shared-scheduler";

#[test]
fn configmap_holds_the_configs_and_cairn_check_config_accepts_each() {
    let dir = kubernetes_dir();
    let data = configmap_data(&read(&dir.join("configmap.yaml")));
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        K8S_CONFIGS.iter().collect::<Vec<_>>(),
        "the ConfigMap's keys"
    );
    let secrets = tempfile::tempdir().unwrap();
    let (scheduler_tls, worker_tls) = crate::common::certs::cert_manager_secrets(secrets.path());
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
        // The mounted Secrets (real certificates made here).
        match name {
            "scheduler.json5" => command.env("CAIRN_TLS_DIR", &scheduler_tls),
            "worker.json5" => command.env("CAIRN_TLS_DIR", &worker_tls),
            _ => &mut command,
        };
        let out = run_ok(&format!("cairn check-config {name}"), &mut command);
        assert!(out.trim_end().ends_with(": ok"), "{out}");
    }
    // The Kubernetes names the configs dial and listen on.
    let scheduler = read(&dir.join("configs/scheduler.json5"));
    assert!(scheduler.contains("0.0.0.0:50052") && scheduler.contains("0.0.0.0:50061"));
    assert!(scheduler.contains("grpc://nativelink-cas:50051"));
    let worker = read(&dir.join("configs/worker.json5"));
    assert!(worker.contains("grpcs://nativelink-scheduler-workers:50061"));
    // The worker API is mTLS on both sides.
    assert!(scheduler.contains("client_ca_file") && worker.contains("tls_config"));
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
            "certificate/nativelink-tls",
            "issuer/nativelink-selfsigned",
            "certificate/nativelink-internal-ca",
            "issuer/nativelink-internal-ca",
            "certificate/nativelink-scheduler-worker-api",
            "certificate/nativelink-worker",
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

    // What the guide wires: ports, selectors, resources, autoscalers. `shared-cas/` and
    // `shared-scheduler/` replace cas.yaml and scheduler.yaml (same names) and have tests of
    // their own.
    let shared = [dir.join(SHARED_CAS), dir.join(SHARED_SCHEDULER)];
    let by_name: BTreeMap<String, &Value> = docs
        .iter()
        .filter(|(f, _, _)| !shared.iter().any(|d| Path::new(f).starts_with(d)))
        .map(|(_, d, _)| (kind_name(d), d))
        .collect();
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
    // The worker API's certificates: the Secrets the Deployments mount at /etc/cairn-tls, from
    // the internal CA, for the right ends.
    let mounted = |deployment: &str| -> Vec<String> {
        get(deployment)["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| v["secret"]["secretName"].as_str().map(str::to_string))
            .collect()
    };
    for (deployment, certificate, secret, usage) in [
        (
            "deployment/nativelink-scheduler",
            "certificate/nativelink-scheduler-worker-api",
            "nativelink-scheduler-worker-api-tls",
            "server auth",
        ),
        (
            "deployment/nativelink-worker",
            "certificate/nativelink-worker",
            "nativelink-worker-tls",
            "client auth",
        ),
    ] {
        let spec = &get(certificate)["spec"];
        assert_eq!(spec["secretName"], secret);
        assert_eq!(spec["issuerRef"]["name"], "nativelink-internal-ca");
        assert!(spec["usages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == usage));
        assert!(
            mounted(deployment).contains(&secret.to_string()),
            "{deployment}"
        );
    }
    assert_eq!(
        get("issuer/nativelink-internal-ca")["spec"]["ca"]["secretName"],
        "nativelink-internal-ca"
    );
}

/// `shared-cas/`: the ConfigMap holds its config byte for byte and `cairn check-config` accepts
/// it; 3 replicas of `nativelink-cas` with no volume of their own, rolled one at a time, kept
/// at 2 by a disruption budget, reading the Redis URL from a Secret, behind the Service the
/// scheduler and workers dial. (`guide_layouts.rs` runs the config as 3 processes over moto and
/// Redis; the schema check is the test above, which reads every manifest.)
#[test]
fn shared_cas_runs_three_replicas_over_the_bucket_and_redis_only() {
    let dir = kubernetes_dir().join(SHARED_CAS);
    let config = dir.join("cas.json5");
    let data = configmap_data(&read(&dir.join("configmap.yaml")));
    assert_eq!(data.keys().collect::<Vec<_>>(), ["cas.json5"]);
    assert!(
        data["cas.json5"] == read(&config),
        "shared-cas/configmap.yaml's cas.json5 differs from shared-cas/cas.json5; copy it"
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
    command.arg("check-config").arg(&config);
    for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("CAIRN_")) {
        command.env_remove(var);
    }
    let out = run_ok("cairn check-config shared-cas/cas.json5", &mut command);
    assert!(out.trim_end().ends_with(": ok"), "{out}");
    for shared in [
        "redis_store mode=standard addresses=redis://nativelink-redis:6379 key_prefix=cas:",
        "redis_store mode=standard addresses=redis://nativelink-redis:6379 key_prefix=ac:",
        "experimental_cloud_object_store provider=aws bucket=nativelink-cas key_prefix=cas/",
        "experimental_cloud_object_store provider=aws bucket=nativelink-cas key_prefix=ac/",
    ] {
        assert!(out.contains(shared), "no `{shared}` in the tree:\n{out}");
    }
    assert!(!out.contains("filesystem"), "a replica keeps files:\n{out}");

    let test = "shared_cas_runs_three_replicas_over_the_bucket_and_redis_only";
    let Some((_, python)) = k8s_venv(test) else {
        return;
    };
    let docs = documents(&python, &files(&dir, &[".yaml"]));
    let by_name: BTreeMap<String, &Value> =
        docs.iter().map(|(_, d, _)| (kind_name(d), d)).collect();
    let get = |name: &str| -> &Value {
        by_name
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {}", dir.display()))
    };
    let spec = &get("deployment/nativelink-cas")["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "nativelink-cas");
    let volumes = pod["volumes"].as_array().expect("volumes");
    assert_eq!(
        volumes.len(),
        1,
        "a replica mounts only its config: {volumes:?}"
    );
    assert_eq!(
        volumes[0]["configMap"]["name"],
        "nativelink-cas-shared-config"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "/etc/cairn/cas.json5"])
    );
    let env: BTreeMap<&str, &Value> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or_default(), e))
        .collect();
    assert_eq!(
        env["CAIRN_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"],
        "nativelink-cas-storage"
    );
    assert!(env.contains_key("CAIRN_BUCKET") && env.contains_key("AWS_REGION"));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/status");
    let resources = &container["resources"];
    assert_eq!(resources["requests"]["memory"], "8Gi");
    assert_eq!(resources["limits"]["cpu"], "8000m");
    assert_eq!(
        get("service/nativelink-cas")["spec"]["ports"][0]["port"],
        50051
    );
    assert_eq!(
        get("poddisruptionbudget/nativelink-cas")["spec"]["minAvailable"],
        2
    );
    let egress: Vec<i64> = get("networkpolicy/nativelink-cas-storage")["spec"]["egress"]
        .as_array()
        .expect("egress rules")
        .iter()
        .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(egress, [6379, 443]);
}

/// `shared-scheduler/`: the ConfigMap holds its config byte for byte and `cairn check-config`
/// accepts it, with the scheduler's state in Redis; 3 replicas of `nativelink-scheduler` rolled
/// one at a time (maxSurge 1, maxUnavailable 0), never two on one node, kept at 2 by a
/// disruption budget, reading the Redis URL from a Secret, behind the Services Bazel and the
/// workers dial. (`shared_scheduler.rs` runs replicas over a real Redis, with failures.)
#[test]
fn shared_scheduler_runs_three_replicas_over_redis() {
    let dir = kubernetes_dir().join(SHARED_SCHEDULER);
    let config = dir.join("scheduler.json5");
    let data = configmap_data(&read(&dir.join("configmap.yaml")));
    assert_eq!(data.keys().collect::<Vec<_>>(), ["scheduler.json5"]);
    assert!(
        data["scheduler.json5"] == read(&config),
        "shared-scheduler/configmap.yaml's scheduler.json5 differs from \
         shared-scheduler/scheduler.json5; copy it"
    );
    let secrets = tempfile::tempdir().unwrap();
    let (scheduler_tls, _) = crate::common::certs::cert_manager_secrets(secrets.path());
    let mut command = Command::new(env!("CARGO_BIN_EXE_cairn"));
    command.arg("check-config").arg(&config);
    for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("CAIRN_")) {
        command.env_remove(var);
    }
    command.env("CAIRN_TLS_DIR", &scheduler_tls);
    let out = run_ok(
        "cairn check-config shared-scheduler/scheduler.json5",
        &mut command,
    );
    assert!(out.trim_end().ends_with(": ok"), "{out}");
    for want in [
        "STATE: redis_store mode=standard addresses=redis://nativelink-scheduler-redis:6379",
        "backend=redis(STATE)",
        "0.0.0.0:50052",
        "0.0.0.0:50061 (tls)",
    ] {
        assert!(out.contains(want), "no `{want}` in the tree:\n{out}");
    }
    // The same as the single scheduler's config but for the shared state.
    let single = read(&kubernetes_dir().join("configs/scheduler.json5"));
    assert!(
        single.contains("grpc://nativelink-cas:50051") && !single.contains("experimental_backend")
    );

    let test = "shared_scheduler_runs_three_replicas_over_redis";
    let Some((_, python)) = k8s_venv(test) else {
        return;
    };
    let docs = documents(&python, &files(&dir, &[".yaml"]));
    let by_name: BTreeMap<String, &Value> =
        docs.iter().map(|(_, d, _)| (kind_name(d), d)).collect();
    let get = |name: &str| -> &Value {
        by_name
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {}", dir.display()))
    };
    let spec = &get("deployment/nativelink-scheduler")["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &spec["template"]["spec"];
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    let volumes: Vec<&Value> = pod["volumes"].as_array().expect("volumes").iter().collect();
    assert_eq!(
        volumes[0]["configMap"]["name"],
        "nativelink-scheduler-shared-config"
    );
    assert_eq!(
        volumes[1]["secret"]["secretName"],
        "nativelink-scheduler-worker-api-tls"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "/etc/cairn/scheduler.json5"])
    );
    let env: BTreeMap<&str, &Value> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or_default(), e))
        .collect();
    assert_eq!(
        env["CAIRN_STATE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"],
        "nativelink-scheduler-state"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/status");
    assert_eq!(container["resources"]["requests"]["memory"], "4Gi");
    assert!(pod["terminationGracePeriodSeconds"].as_i64() >= Some(25));
    assert_eq!(
        get("service/nativelink-scheduler")["spec"]["ports"][0]["port"],
        50052
    );
    assert_eq!(
        get("service/nativelink-scheduler-workers")["spec"]["ports"][0]["port"],
        50061
    );
    assert_eq!(
        get("poddisruptionbudget/nativelink-scheduler")["spec"]["minAvailable"],
        2
    );
    let egress: Vec<i64> = get("networkpolicy/nativelink-scheduler-state")["spec"]["egress"]
        .as_array()
        .expect("egress rules")
        .iter()
        .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(egress, [6379]);
}
