//! External tools a test needs (`bazel`, `promtool`, ...): found on PATH or elsewhere, and
//! what happens without one. A missing tool fails the test with how to install it (CI installs
//! them all, see `.ci/run`), unless the tool's skip variable (`CAIRN_SKIP_BAZEL`, ...) is 1:
//! then the test is skipped.

use std::path::PathBuf;

/// The executable `name` in a directory of PATH, if any.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `name` on PATH; without it, what `missing_tool` says.
pub fn tool_on_path(test: &str, name: &str, skip_var: &str, install: &str) -> Option<PathBuf> {
    on_path(name)
        .or_else(|| missing_tool(test, &format!("`{name}` (not on PATH)"), skip_var, install))
}

/// For a missing tool: `None` (the test returns, skipped) when `skip_var` is 1, else a panic
/// naming the fix.
pub fn missing_tool<T>(test: &str, what: &str, skip_var: &str, install: &str) -> Option<T> {
    if std::env::var(skip_var).as_deref() == Ok("1") {
        eprintln!("{test}: SKIPPED, {what} is missing and {skip_var}=1");
        return None;
    }
    panic!("{test}: {what} is missing. {install}, or set {skip_var}=1 to skip this test.");
}
