//! The web UI's record of each invocation's remote actions outlives the server: a real Cairn
//! (filesystem stores, a local worker) records an invocation's lookups and executions, is
//! stopped with SIGTERM (the record is written at shutdown) or killed with SIGKILL (after
//! the record reached its file), and the restarted server shows the invocation, its remote
//! actions with cache hits, misses and failures, and the failed action's stderr that the
//! action cache never held. A torn record at start is ignored (the server serves and the
//! next write replaces it), and garbage too, at the default path under `CAIRN_DATA`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::invocations::{
    action_row, assert_failed_and_fine, execute, exit_code, get_action_result, invocation_metadata,
    shell, start_invocation, ONE_OF_TWO_FAILED,
};
use common::{free_addr, http_get, Cairn};

/// `@WADDR@`: the worker API; `@ACTIVITY@`: the `activity_path` line.
const CONFIG: &str = r#"{
  stores: {
    CAS: { filesystem: { content_path: "@DIR@/cas", temp_path: "@DIR@/tmp-cas" } },
    AC: { filesystem: { content_path: "@DIR@/ac", temp_path: "@DIR@/tmp-ac" } },
    BEP: { filesystem: { content_path: "@DIR@/bep", temp_path: "@DIR@/tmp-bep" } },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/worker-tmp" } },
      slow: { ref_store: { name: "CAS" } } } },
  },
  schedulers: {
    MAIN: { cache_lookup: { ac_store: { ref_store: { name: "AC" } }, scheduler: { simple: {
      supported_platform_properties: { OSFamily: "exact" } } } } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        experimental_bep: { store: "BEP" },
        health: {},
        web_ui: { bep_store: "BEP", cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"], @ACTIVITY@ },
      } },
    { listener: { http: { socket_address: "@WADDR@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
  workers: [{ local: {
    name: "wk",
    worker_api_endpoint: { uri: "grpc://@WADDR@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
  } }],
}"#;

/// Polls `path` until its text has every one of `needles` (the writer runs within a second
/// of a change).
fn wait_for_file(path: &Path, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never held {needles:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn page(cairn: &Cairn, path: &str) -> String {
    common::invocations::page(cairn.addr, path).await
}

const TERM_SUMMARY: &str =
    "Remote actions (2: 0 cache hits, 2 cache misses, <span class=\"bad\">1 failed</span>)";
const KILL_SUMMARY: &str = "Remote actions (2: 1 cache hits, 1 cache misses)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_and_their_actions_survive_sigterm_sigkill_and_a_torn_record() {
    let tmp = tempfile::tempdir().unwrap();
    let record = tmp.path().join("ui").join("activity.json");
    let config = CONFIG.replace("@WADDR@", &free_addr().to_string()).replace(
        "@ACTIVITY@",
        &format!("activity_path: \"{}\"", record.display()),
    );
    let start = || Cairn::start_with(tmp.path(), &config, None);

    // 1. An invocation: two misses, both executed, one failing; then SIGTERM.
    let cairn = start();
    let ch = cairn.channel().await;
    start_invocation(ch.clone(), "inv-term").await;
    let meta = invocation_metadata("inv-term");
    let fine = shell(ch.clone(), "echo fine").await;
    let fails = shell(ch.clone(), "echo '<bad>' >&2; exit 3").await;
    for d in [&fine, &fails] {
        assert!(!get_action_result(ch.clone(), d, &meta).await);
    }
    assert_eq!(exit_code(ch.clone(), &fine, &meta).await, 0);
    assert_eq!(exit_code(ch.clone(), &fails, &meta).await, 3);
    assert!(page(&cairn, "/invocation/inv-term")
        .await
        .contains(TERM_SUMMARY));
    drop(ch);
    let status = cairn.terminate();
    assert!(status.success(), "SIGTERM: {status}");
    assert!(record.exists(), "the record is written at shutdown");

    // 2. Restarted: the invocation, its actions and the failed action's stderr are there.
    let cairn = start();
    let inv = page(&cairn, "/invocation/inv-term").await;
    assert_failed_and_fine(&inv, ONE_OF_TWO_FAILED, &fails, 3, "wk", &fine);
    let action = page(
        &cairn,
        &format!("/action/{}-{}", fails.hash_hex(), fails.size()),
    )
    .await;
    assert!(
        action.contains("the last failed execution this server recorded")
            && action.contains("&lt;bad&gt;"),
        "{action}"
    );
    let list = page(&cairn, "/invocations").await;
    assert!(
        list.contains("2: 0 hits, 2 misses, <span class=\"bad\">1 failed</span>"),
        "{list}"
    );

    // 3. Another invocation (a hit, by lookup and Execute, and a miss) reaches the file; then SIGKILL.
    let ch = cairn.channel().await;
    start_invocation(ch.clone(), "inv-kill").await;
    let meta = invocation_metadata("inv-kill");
    assert!(get_action_result(ch.clone(), &fine, &meta).await);
    assert!(execute(ch.clone(), &fine, &meta).await.cached_result);
    let absent = cairn_core::DigestFunction::Sha256.compute(b"never stored");
    assert!(!get_action_result(ch.clone(), &absent, &meta).await);
    let inv = page(&cairn, "/invocation/inv-kill").await;
    assert!(inv.contains(KILL_SUMMARY), "{inv}");
    wait_for_file(&record, &["\"inv-kill\"", "cache_hit", "\"inv-term\""]);
    drop(ch);
    cairn.kill9();

    let cairn = start();
    let inv = page(&cairn, "/invocation/inv-kill").await;
    assert!(inv.contains(KILL_SUMMARY), "{inv}");
    assert!(action_row(&inv, &fine).contains("from the cache"), "{inv}");
    assert!(page(&cairn, "/invocation/inv-term")
        .await
        .contains(TERM_SUMMARY));

    // 4. A torn record (the first half of the file): the server starts, serves, shows no
    // remote actions it cannot read, and the next change replaces the file.
    let whole = std::fs::read(&record).unwrap();
    cairn.kill9();
    std::fs::write(&record, &whole[..whole.len() / 2]).unwrap();
    let cairn = start();
    let inv = page(&cairn, "/invocation/inv-term").await;
    assert!(!inv.contains("Remote actions (2"), "{inv}");
    let ch = cairn.channel().await;
    let meta = invocation_metadata("inv-after");
    assert!(!get_action_result(ch.clone(), &absent, &meta).await);
    let text = wait_for_file(&record, &["\"inv-after\""]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_ok(),
        "the replaced record is whole: {text}"
    );
    drop(ch);
    cairn.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_at_the_default_path_under_cairn_data_is_survived() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let record = data.join("web_ui").join("activity.json");
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    std::fs::write(&record, b"\xff\xfe not json at all \x00\x01").unwrap();
    let text = CONFIG
        .replace("@WADDR@", &free_addr().to_string())
        .replace("@ACTIVITY@", "")
        .replace("@DIR@", &tmp.path().display().to_string())
        .replace("@ADDR@", "127.0.0.1:0");
    let config = tmp.path().join("cairn.json5");
    std::fs::write(&config, text).unwrap();
    let cairn = Cairn::start_config_env(
        tmp.path(),
        &config,
        &[("CAIRN_DATA", data.display().to_string())],
    );
    let (code, _) = http_get(cairn.addr, "/status").await;
    assert_eq!(code, 200);
    let ch = cairn.channel().await;
    start_invocation(ch.clone(), "inv-new").await;
    let absent = cairn_core::DigestFunction::Sha256.compute(b"never stored");
    assert!(!get_action_result(ch.clone(), &absent, &invocation_metadata("inv-new")).await);
    let inv = page(&cairn, "/invocation/inv-new").await;
    assert!(
        inv.contains("Remote actions (1: 0 cache hits, 1 cache misses)"),
        "{inv}"
    );
    let text = wait_for_file(&record, &["\"inv-new\""]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_ok(),
        "{text}"
    );
    drop(ch);
    let status = cairn.terminate();
    assert!(status.success(), "SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activity_path_that_cannot_be_written_leaves_the_record_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    // The path's directory is a file: every write fails.
    std::fs::write(tmp.path().join("not-a-dir"), b"a file").unwrap();
    let config = CONFIG.replace("@WADDR@", &free_addr().to_string()).replace(
        "@ACTIVITY@",
        "activity_path: \"@DIR@/not-a-dir/activity.json\"",
    );
    let cairn = Cairn::start_with(tmp.path(), &config, None);
    let ch = cairn.channel().await;
    start_invocation(ch.clone(), "inv-mem").await;
    let absent = cairn_core::DigestFunction::Sha256.compute(b"never stored");
    assert!(!get_action_result(ch.clone(), &absent, &invocation_metadata("inv-mem")).await);
    let inv = page(&cairn, "/invocation/inv-mem").await;
    assert!(
        inv.contains("Remote actions (1: 0 cache hits, 1 cache misses)"),
        "{inv}"
    );
    drop(ch);
    let status = cairn.terminate();
    assert!(status.success(), "SIGTERM with a failing write: {status}");
}
