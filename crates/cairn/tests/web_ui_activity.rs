//! The web UI's own record of each invocation's remote actions, against a real Cairn with a
//! local worker whose scheduler forgets completed operations after 1 s: GetActionResult and
//! Execute calls carrying Bazel's `RequestMetadata` (its `tool_invocation_id`) show on the
//! invocation's page with cache hits and misses, how each execution ended, its exit code and
//! worker, after the scheduler forgot them. Garbage metadata and oversized ids are ignored
//! and the server stays up.

mod common;

use std::time::{Duration, Instant};

use common::invocations::{
    action_row as row, assert_failed_and_fine, execute, get_action_result, invocation_metadata,
    page, shell, start_invocation, ONE_OF_TWO_FAILED,
};
use common::{http_get, Cairn};

const CONFIG: &str = r#"{
  stores: {
    CAS: { memory: {} },
    AC: { memory: {} },
    BEP: { memory: {} },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/worker-tmp" } },
      slow: { ref_store: { name: "CAS" } } } },
  },
  schedulers: {
    MAIN: { cache_lookup: { ac_store: { ref_store: { name: "AC" } }, scheduler: { simple: {
      supported_platform_properties: { OSFamily: "exact" }, retain_completed_for_s: 1 } } } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        experimental_bep: { store: "BEP" },
        health: {},
        web_ui: { bep_store: "BEP", cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"] },
      } },
    { listener: { http: { socket_address: "127.0.0.1:@WPORT@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
  workers: [{ local: {
    name: "wk",
    worker_api_endpoint: { uri: "grpc://127.0.0.1:@WPORT@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
  } }],
}"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_pages_keep_remote_actions_after_the_scheduler_forgets_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cairn = Cairn::start_with(
        tmp.path(),
        &CONFIG.replace("@WPORT@", &free_port().to_string()),
        None,
    );
    let ch = cairn.channel().await;
    start_invocation(ch.clone(), "inv-a").await;
    start_invocation(ch.clone(), "inv-b").await;
    let (a, b) = (invocation_metadata("inv-a"), invocation_metadata("inv-b"));

    let fine = shell(ch.clone(), "echo fine").await;
    let fails = shell(ch.clone(), "echo '<bad>' >&2; exit 3").await;

    // inv-a: two cache misses, then both executed, one failing.
    assert!(!get_action_result(ch.clone(), &fine, &a).await);
    assert!(!get_action_result(ch.clone(), &fails, &a).await);
    let r = execute(ch.clone(), &fine, &a).await;
    assert_eq!(r.result.unwrap().exit_code, 0);
    let r = execute(ch.clone(), &fails, &a).await;
    assert_eq!(r.result.unwrap().exit_code, 3);
    // inv-b: a hit by GetActionResult, a hit by Execute, and a miss.
    assert!(get_action_result(ch.clone(), &fine, &b).await);
    let r = execute(ch.clone(), &fine, &b).await;
    assert!(r.cached_result);
    let absent = cairn_core::DigestFunction::Sha256.compute(b"no such action");
    assert!(!get_action_result(ch.clone(), &absent, &b).await);

    // Garbage metadata, an empty id and an oversized id: served, not recorded.
    for metadata in [
        vec![0xff, 0xff, 0xff],
        invocation_metadata(""),
        invocation_metadata(&"x".repeat(10_000)),
    ] {
        assert!(get_action_result(ch.clone(), &fine, &metadata).await);
    }

    // The scheduler forgets the completed operations (retain_completed_for_s: 1).
    let deadline = Instant::now() + Duration::from_secs(30);
    for d in [&fine, &fails] {
        let path = format!("/action/{}-{}", d.hash_hex(), d.size());
        loop {
            let (code, page) = http_get(cairn.addr, &path).await;
            assert_eq!(code, 200, "{page}");
            if !page.contains("<h2>Operations</h2>") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the scheduler still holds {d}:\n{page}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let page = page(cairn.addr, "/invocation/inv-a").await;
    let failed = assert_failed_and_fine(&page, ONE_OF_TWO_FAILED, &fails, 3, "wk", &fine);
    let ok = row(&page, &fine);
    assert!(
        ok.contains(">success</span>") && ok.contains("<td>0</td>") && ok.contains("<td>miss</td>"),
        "{ok}"
    );
    assert!(
        page.find(&failed).unwrap() < page.find(&ok).unwrap(),
        "failed actions first:\n{page}"
    );

    // The failed action's page still shows its stderr: its result is not in the action
    // cache and the scheduler forgot it, the record kept it.
    let (code, page) = http_get(
        cairn.addr,
        &format!("/action/{}-{}", fails.hash_hex(), fails.size()),
    )
    .await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("the last failed execution this server recorded")
            && page.contains("&lt;bad&gt;"),
        "{page}"
    );

    // The list of invocations counts them too.
    let (code, list) = http_get(cairn.addr, "/invocations").await;
    assert_eq!(code, 200, "{list}");
    assert!(
        list.contains("2: 0 hits, 2 misses, <span class=\"bad\">1 failed</span>")
            && list.contains("2: 1 hits, 1 misses"),
        "{list}"
    );

    let (code, page) = http_get(cairn.addr, "/invocation/inv-b").await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("Remote actions (2: 1 cache hits, 1 cache misses)"),
        "{page}"
    );
    let hit = row(&page, &fine);
    assert!(
        hit.contains(">hit</span>") && hit.contains("from the cache"),
        "{hit}"
    );

    let (code, _) = http_get(cairn.addr, "/status").await;
    assert_eq!(code, 200, "the server is still up");
    cairn.kill9();
}
