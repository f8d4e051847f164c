//! The deployment kit's files: where they are and how the tests read them.

use std::path::{Path, PathBuf};

/// The rule files under `metrics_dir()`.
pub const ALERTS: &str = "prometheus-alerts.yml";
pub const RECORDING_RULES: &str = "prometheus-recording-rules.yml";

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

pub fn metrics_dir() -> PathBuf {
    repo().join("deployment-examples/metrics")
}

pub fn kubernetes_dir() -> PathBuf {
    repo().join("deployment-examples/kubernetes")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The files under `dir` (recursively) whose name ends with one of `extensions`, sorted.
pub fn files(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
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
