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
//!   manifests wire ports, selectors and autoscalers as the guide says; `shared-cas/` (the
//!   guide's 3 CAS replicas over one bucket and one Redis) holds its config in its ConfigMap,
//!   passes `check-config`, and keeps no state in a pod.
//!
//! A missing tool fails its test with how to install it (`.ci/run` does), unless
//! `CAIRN_SKIP_PROMETHEUS=1` (promtool, amtool, prometheus), `CAIRN_SKIP_BAZEL=1` (bazel, for
//! the Prometheus end-to-end test) or `CAIRN_SKIP_K8S_VALIDATE=1` (the venv's
//! kubernetes-validate and Python) is set.
//!
//! One module per part: `metrics`, `prometheus_e2e` and `kubernetes` hold the tests; `files`
//! (where the kit is), `tools` (the tools that check it), `parse` (what the tests read out of
//! its YAML and PromQL) and `prometheus_server` (a real Prometheus) are what they share.

#[path = "../common/mod.rs"]
mod common;

mod files;
mod kubernetes;
mod metrics;
mod parse;
mod prometheus_e2e;
mod prometheus_server;
mod tools;
