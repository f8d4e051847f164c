//! The tools that check the kit (promtool, amtool, prometheus, the CI venv's
//! kubernetes-validate), each with the variable that skips its tests when it is missing.

use std::path::PathBuf;
use std::process::Command;

use crate::common::tools::{missing_tool, tool_on_path};
use crate::files::repo;

const SKIP_PROMETHEUS: &str = "CAIRN_SKIP_PROMETHEUS";
const SKIP_K8S_VALIDATE: &str = "CAIRN_SKIP_K8S_VALIDATE";

/// `promtool`, `amtool` or `prometheus` on PATH (Debian's `prometheus` and
/// `prometheus-alertmanager` packages).
pub fn prometheus_tool(test: &str, name: &str) -> Option<PathBuf> {
    tool_on_path(
        test,
        name,
        SKIP_PROMETHEUS,
        "Install it with `apt-get install -y prometheus prometheus-alertmanager`, as .ci/run does",
    )
}

/// The CI venv's `kubernetes-validate` and the Python next to it (which has PyYAML and
/// jsonschema, its dependencies).
pub fn k8s_venv(test: &str) -> Option<(PathBuf, PathBuf)> {
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
pub fn run_ok(what: &str, command: &mut Command) -> String {
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
