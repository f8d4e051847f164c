//! Execute calls through a scheduler whose state is shared in Redis
//! (`experimental_backend.redis`) are recorded for the web UI too: a real Cairn replica (a
//! Debian `redis-server` holding the scheduler state, a local worker) shows an invocation's
//! executions on its page, with how each ended, its exit code and worker, and the failed
//! action's stderr.

mod common;
#[path = "common/redis.rs"]
mod redis_kit;

use common::invocations::{
    assert_failed_and_fine, exit_code, invocation_metadata, page, shell, start_invocation,
    ONE_OF_TWO_FAILED,
};
use common::{free_addr, http_get, Cairn};
use redis_kit::RedisServer;

const CONFIG: &str = r#"{
  stores: {
    STATE: { redis_store: { addresses: ["@STATE@"] } },
    CAS: { memory: {} },
    AC: { memory: {} },
    BEP: { memory: {} },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/worker-tmp" } },
      slow: { ref_store: { name: "CAS" } } } },
  },
  schedulers: {
    MAIN: { simple: {
      supported_platform_properties: { OSFamily: "exact" },
      experimental_backend: { redis: { redis_store: "STATE" } },
    } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        experimental_bep: { store: "BEP" },
        web_ui: { bep_store: "BEP", cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"], activity_path: "" },
      } },
    { listener: { http: { socket_address: "@WADDR@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
  workers: [{ local: {
    name: "shared-wk",
    worker_api_endpoint: { uri: "grpc://@WADDR@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
  } }],
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_through_a_shared_scheduler_are_on_the_invocation_page() {
    let tmp = tempfile::tempdir().unwrap();
    let redis_dir = tmp.path().join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    let state = RedisServer::start(&redis_dir);
    let cairn_dir = tmp.path().join("cairn");
    std::fs::create_dir_all(&cairn_dir).unwrap();
    let cairn = Cairn::start_with(
        &cairn_dir,
        &CONFIG
            .replace("@STATE@", &state.url())
            .replace("@WADDR@", &free_addr().to_string()),
        None,
    );
    let ch = cairn.channel().await;
    start_invocation(ch.clone(), "inv-shared").await;
    let meta = invocation_metadata("inv-shared");
    let fine = shell(ch.clone(), "echo fine").await;
    let fails = shell(ch.clone(), "echo '<shared>' >&2; exit 6").await;
    assert_eq!(exit_code(ch.clone(), &fine, &meta).await, 0);
    assert_eq!(exit_code(ch.clone(), &fails, &meta).await, 6);

    let page = page(cairn.addr, "/invocation/inv-shared").await;
    assert_failed_and_fine(&page, ONE_OF_TWO_FAILED, &fails, 6, "shared-wk", &fine);
    let (code, action) = http_get(
        cairn.addr,
        &format!("/action/{}-{}", fails.hash_hex(), fails.size()),
    )
    .await;
    assert_eq!(code, 200, "{action}");
    assert!(action.contains("&lt;shared&gt;"), "{action}");
    cairn.kill9();
}
