//! End to end: Bazel builds a small C++ and genrule workspace with Cairn as its remote cache,
//! then, after `bazel clean`, builds it again and must get every action from the cache.
//!
//! Needs `bazel` (Debian's `bazel-bootstrap`, Bazel 4.2.3) on PATH and works offline: the
//! repositories Bazel would download are replaced by the small ones in `bazel-offline-repos/`
//! (see /work/shared/reference/bazel-offline.md). Without Bazel the test fails, unless
//! `CAIRN_SKIP_BAZEL=1` is set.

mod common;

use common::bazel::{self, Bazel};
use common::{Cairn, FILESYSTEM_CONFIG};

#[test]
fn bazel_rebuild_after_clean_is_served_from_cairn() {
    let Some(program) = bazel::find_or_skip("bazel_e2e") else {
        return;
    };

    let tmp = tempfile::tempdir().unwrap();
    let cairn_dir = tmp.path().join("cairn");
    std::fs::create_dir(&cairn_dir).unwrap();
    let cairn = Cairn::start_with(&cairn_dir, FILESYSTEM_CONFIG, None);
    let bazel = Bazel::new(program, &tmp.path().join("bazel"), "bazel-workspace");
    let mut build_args = bazel.cache_flags(cairn.addr);
    build_args.push("//...".to_string());

    // First build: a fresh cache, so every action runs locally and is uploaded.
    let first = bazel.run("build", &build_args);
    let executed = first.all_processes_were("local");
    first.assert_no_remote_cache_warning();

    // Second build after `bazel clean` (which drops the local action cache and outputs): every
    // action must come from Cairn, and nothing may run locally.
    bazel.run("clean", &[]);
    let second = bazel.run("build", &build_args);
    let hits = second.all_processes_were("remote cache hit");
    assert_eq!(executed, hits, "both builds should have the same actions");
    second.assert_no_remote_cache_warning();

    // The outputs downloaded from Cairn are the real ones.
    let report =
        std::fs::read_to_string(bazel.bin("report.txt")).expect("read bazel-bin/report.txt");
    assert_eq!(
        report, "A CACHE THAT REMEMBERS\n23\nhello, cairn\n",
        "bazel-bin/report.txt"
    );

    drop(bazel);
    cairn.kill9();
}
