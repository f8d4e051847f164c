//! The web UI driven through WebDriver (Debian's `chromedriver` and headless Chromium), as
//! an operator would use it while a build runs: Bazel 4.2.3 starts a remote build against a
//! Cairn with no worker, so its action waits; the browser sees it on `/queue` under the
//! build's invocation; a worker process is started and the browser sees it appear on
//! `/workers`; the build then finishes, and the browser opens the link Bazel printed, clicks
//! through to the remote action (a cache miss that ran on that worker), and looks the
//! action's digest up with the form on `/cache`. Screenshots of each step are written under
//! `CARGO_TARGET_TMPDIR/web_ui_webdriver/`.
//!
//! Needs `bazel` (Debian's `bazel-bootstrap`), `chromium` and `chromium-driver` (all
//! installed by `scripts/test`); without Bazel the test fails unless `CAIRN_SKIP_BAZEL=1`.

mod common;
#[path = "common/webdriver.rs"]
mod webdriver;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::bazel::{self, Bazel};
use common::{Cairn, CairnWorker};
use webdriver::ChromeDriver;

const CONFIG: &str = r#"{
  stores: {
    CAS: { memory: {} },
    AC: { memory: {} },
    BEP: { memory: {} },
  },
  schedulers: {
    MAIN: { simple: { supported_platform_properties: { OSFamily: "exact" },
                      unschedulable_grace_period_s: 600 } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "", remote_execution: { scheduler: "MAIN" } }],
        experimental_bep: { store: "BEP" },
        web_ui: { bep_store: "BEP", cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"] },
      } },
    { listener: { http: { socket_address: "127.0.0.1:@WPORT@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
}"#;

/// A worker-only process: its own filesystem CAS in front of the server's.
const WORKER_CONFIG: &str = r#"{
  stores: {
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/cas", temp_path: "@DIR@/tmp" } },
      slow: { grpc: { instance_name: "", endpoints: [{ address: "grpc://@CAIRN@" }], store_type: "cas" } } } },
    AC: { grpc: { instance_name: "", endpoints: [{ address: "grpc://@CAIRN@" }], store_type: "ac" } },
  },
  workers: [{ local: {
    name: "late-worker",
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

#[test]
fn an_operator_watches_a_build_wait_for_a_worker_then_reads_its_action() {
    let Some(program) = bazel::find_or_skip("web_ui_webdriver") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cairn_dir = tmp.path().join("cairn");
    std::fs::create_dir_all(&cairn_dir).unwrap();
    let wport = free_port();
    let cairn = Cairn::start_with(
        &cairn_dir,
        &CONFIG.replace("@WPORT@", &wport.to_string()),
        None,
    );
    let shots: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web_ui_webdriver");
    std::fs::create_dir_all(&shots).unwrap();
    let driver = ChromeDriver::start();
    let browser = driver.session(&tmp.path().join("chromium-profile"));
    let base = format!("http://{}", cairn.addr);

    // The build, in the background: its one action waits, for no worker is connected.
    let invocation = uuid::Uuid::new_v4().to_string();
    let bazel = Bazel::new(program, &tmp.path().join("bazel"), "bazel-webui-workspace");
    let mut flags = bazel.remote_flags(cairn.addr, None, "OSFamily=linux");
    flags.extend([
        format!("--bes_backend=grpc://{}", cairn.addr),
        format!("--bes_results_url={base}/invocation/"),
        "--bes_timeout=60s".to_string(),
        format!("--invocation_id={invocation}"),
        "//:fine".to_string(),
    ]);
    std::thread::scope(|scope| {
        let build = scope.spawn(|| bazel.try_run("build", &flags, bazel::COMMAND_DEADLINE));

        // The operator opens the queue and sees the build's action waiting.
        browser.goto(&format!("{base}/queue"));
        let dom = browser.reload_until(
            "the build's queued action",
            Duration::from_secs(120),
            |dom| dom.contains(&invocation),
        );
        assert!(dom.contains("queued"), "{dom}");
        browser.screenshot(&shots.join("1-queue-waiting.png"));
        browser.goto(&format!("{base}/workers"));
        assert!(!browser.source().contains("late-worker"));

        // A worker comes up; the operator sees it appear.
        let worker_dir = tmp.path().join("worker");
        std::fs::create_dir_all(&worker_dir).unwrap();
        let worker_config = worker_dir.join("worker.json5");
        std::fs::write(
            &worker_config,
            WORKER_CONFIG
                .replace("@DIR@", &worker_dir.display().to_string())
                .replace("@CAIRN@", &cairn.addr.to_string())
                .replace("@WPORT@", &wport.to_string()),
        )
        .unwrap();
        let worker =
            CairnWorker::start("late-worker", &worker_config, &[], Duration::from_secs(60));
        let dom = browser.reload_until("the new worker", Duration::from_secs(30), |dom| {
            dom.contains("late-worker-")
        });
        assert!(dom.contains("OSFamily=linux"), "{dom}");
        browser.screenshot(&shots.join("2-worker-appeared.png"));

        // The build finishes; the operator follows the link Bazel printed.
        let out = build.join().expect("the build thread");
        let text = out.text();
        assert!(out.status.success(), "the build failed:\n{text}");
        let link = format!("{base}/invocation/{invocation}");
        assert!(text.contains(&link), "Bazel printed no {link}:\n{text}");
        browser.goto(&link);
        let dom = browser.reload_until("the finished invocation", Duration::from_secs(60), |dom| {
            dom.contains("succeeded") || dom.contains("SUCCESS")
        });
        assert!(
            dom.contains("Remote actions (1: 0 cache hits, 1 cache misses)"),
            "{dom}"
        );
        browser.screenshot(&shots.join("3-invocation.png"));

        // Through to the action: it ran on the new worker.
        let action = browser
            .find("a[href^='/action/']")
            .unwrap_or_else(|| panic!("no action link on {link}:\n{dom}"));
        let digest = browser.text(&action);
        browser.click(&action);
        assert!(browser.url().contains("/action/"), "{}", browser.url());
        let dom = browser.source();
        assert!(
            dom.contains("echo fine") && dom.contains("Worker: <code>late-worker</code>"),
            "the action page shows its command and worker:\n{dom}"
        );
        browser.screenshot(&shots.join("4-action.png"));

        // The same digest, pasted into the lookup form on the cache page.
        browser.goto(&format!("{base}/cache"));
        let field = browser
            .find("input[name='digest']")
            .expect("the lookup field");
        browser.type_text(&field, &digest.replace('-', "/"));
        let button = browser
            .find("form[action='/lookup'] button")
            .expect("the lookup button");
        browser.click(&button);
        // The link's text may carry more than the digest; its hash is what must match.
        let hash: String = digest
            .split(|c: char| !c.is_ascii_hexdigit())
            .find(|w| w.len() == 64)
            .unwrap_or_else(|| panic!("no hash in the action link's text {digest:?}"))
            .to_string();
        assert!(
            browser.url().contains(&format!("/cas/{hash}-")),
            "the lookup of {digest:?} lands on the blob page: {}",
            browser.url()
        );
        assert!(browser.source().contains("Blob "), "{}", browser.source());
        browser.screenshot(&shots.join("5-lookup.png"));
        drop(worker);
    });
    eprintln!("screenshots: {}", shots.display());
    drop(browser);
    cairn.kill9();
}
