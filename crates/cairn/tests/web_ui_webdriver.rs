//! The web UI driven through WebDriver (Debian's `chromedriver` and headless Chromium), as
//! an operator would use it while a build runs: Bazel 4.2.3 starts a remote build against a
//! Cairn with no worker, so its action waits; the browser sees it on `/queue` under the
//! build's invocation; a worker process is started and the browser sees it appear on
//! `/workers`; the build then finishes, and the browser opens the link Bazel printed, clicks
//! through to the remote action (a cache miss that ran on that worker), and looks the
//! action's digest up with the form on `/cache`. Then the operator drains the worker with its
//! button (the admin action is on in this config): the worker shows as draining, a new
//! action waits on `/queue` instead of running, and once the worker is undrained with the
//! same button it runs. With the default config (`read_only`) there is no button and the
//! drain form, posted from the page itself, is refused. Screenshots of each step are
//! written under `CARGO_TARGET_TMPDIR/web_ui_webdriver/`.
//!
//! Needs `bazel` (Debian's `bazel-bootstrap`), `chromium` and `chromium-driver` (all
//! installed by `scripts/test`); without Bazel the test fails unless `CAIRN_SKIP_BAZEL=1`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use common::actions::{upload_blobs, ShellAction};
use common::bazel;
use common::web_ui_build::WebUiBuild;
use common::webdriver::{ChromeDriver, Session};
use common::{Cairn, CairnWorker};

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
        web_ui: { bep_store: "BEP", cas_store: "CAS", ac_store: "AC", schedulers: ["MAIN"] @ADMIN@ },
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

/// Starts a worker-only process named `name` for the Cairn at `cairn` (worker API on
/// `wport`), its files under `dir`; returns once it registered.
fn start_worker(dir: &Path, name: &str, cairn: std::net::SocketAddr, wport: u16) -> CairnWorker {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("worker.json5");
    std::fs::write(
        &config,
        WORKER_CONFIG
            .replace("late-worker", name)
            .replace("@DIR@", &dir.display().to_string())
            .replace("@CAIRN@", &cairn.to_string())
            .replace("@WPORT@", &wport.to_string()),
    )
    .unwrap();
    CairnWorker::start(name, &config, &[], Duration::from_secs(60))
}

/// Queues `script` (a Linux action) on `cairn`; the Execute stream, to be read to its end.
async fn queue_action(
    cairn: std::net::SocketAddr,
    script: &str,
) -> (
    cairn_core::Digest,
    tonic::Streaming<cairn_core::proto::google::longrunning::Operation>,
) {
    let (digest, blobs) = ShellAction {
        script,
        ..Default::default()
    }
    .build();
    let ch = tonic::transport::Channel::from_shared(format!("http://{cairn}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    upload_blobs(ch.clone(), "", blobs).await;
    let stream = re::execution_client::ExecutionClient::new(ch)
        .execute(re::ExecuteRequest {
            action_digest: Some(digest.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (digest, stream)
}

/// Reads an Execute stream to its end (at most 60 s): whether the operation finished.
async fn finished(
    mut stream: tonic::Streaming<cairn_core::proto::google::longrunning::Operation>,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = false;
    while let Ok(Ok(Some(op))) = tokio::time::timeout_at(deadline.into(), stream.message()).await {
        done |= op.done;
    }
    done
}

/// The drain button of the (only) worker on `/workers`, which must say `label`.
fn worker_button(browser: &Session, label: &str) -> common::webdriver::Element {
    let button = browser
        .find("form[action='/workers/drain'] button")
        .unwrap_or_else(|| panic!("no drain button on /workers:\n{}", browser.source()));
    assert_eq!(browser.text(&button), label);
    button
}

#[test]
fn an_operator_watches_a_build_wait_for_a_worker_then_reads_its_action() {
    let config = CONFIG.replace("@ADMIN@", ", read_only: false");
    let Some(build) = WebUiBuild::start("web_ui_webdriver", &config, "web_ui_webdriver") else {
        return;
    };
    let (cairn, shots, base) = (&build.cairn, &build.shots, &build.base);
    let driver = ChromeDriver::start();
    let browser = driver.session(&build.profile("chromium-profile"));
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The build, in the background: its one action waits, for no worker is connected.
    let invocation = uuid::Uuid::new_v4().to_string();
    let mut flags = build.flags();
    flags.extend([
        format!("--invocation_id={invocation}"),
        "//:fine".to_string(),
    ]);
    std::thread::scope(|scope| {
        let bazel_build = scope.spawn(|| {
            build
                .bazel
                .try_run("build", &flags, bazel::COMMAND_DEADLINE)
        });

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
        let worker = start_worker(
            &build.tmp.path().join("worker"),
            "late-worker",
            cairn.addr,
            build.wport,
        );
        let dom = browser.reload_until("the new worker", Duration::from_secs(30), |dom| {
            dom.contains("late-worker-")
        });
        assert!(dom.contains("OSFamily=linux"), "{dom}");
        browser.screenshot(&shots.join("2-worker-appeared.png"));

        // The build finishes; the operator follows the link Bazel printed.
        let out = bazel_build.join().expect("the build thread");
        let text = out.text();
        assert!(out.status.success(), "the build failed:\n{text}");
        let link = format!("{}{invocation}", build.link_prefix());
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
        let url = browser.url_after_navigation(|u| u.contains("/action/"));
        assert!(url.contains("/action/"), "{url}");
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
        let url = browser.url_after_navigation(|u| u.contains(&format!("/cas/{hash}-")));
        assert!(
            url.contains(&format!("/cas/{hash}-")),
            "the lookup of {digest:?} lands on the blob page: {url}"
        );
        assert!(browser.source().contains("Blob "), "{}", browser.source());
        browser.screenshot(&shots.join("5-lookup.png"));

        // The operator drains the worker with its button: it shows as draining.
        browser.goto(&format!("{base}/workers"));
        let button = worker_button(&browser, "Drain");
        browser.click(&button);
        // Until the page shows the drained state: the word "draining" alone is also in the
        // form of the page the click left (a field's name), which a fast read still sees.
        let dom = browser.reload_until("the draining worker", Duration::from_secs(30), |dom| {
            dom.contains("<button>Undrain</button>")
        });
        let url = browser.url_after_navigation(|u| u.ends_with("/workers"));
        assert!(url.ends_with("/workers"), "{url}");
        assert!(dom.contains("draining"), "{dom}");
        browser.screenshot(&shots.join("6-worker-draining.png"));

        // A new action gets no worker: it waits on the queue, the worker idle.
        let (queued, stream) = rt.block_on(queue_action(cairn.addr, "echo after the drain"));
        browser.goto(&format!("{base}/queue"));
        let dom = browser.reload_until("the action held back", Duration::from_secs(30), |dom| {
            dom.contains(&queued.hash_hex()[..12])
        });
        assert!(dom.contains("1 queued, 0 executing"), "{dom}");
        browser.screenshot(&shots.join("7-queued-while-draining.png"));
        browser.goto(&format!("{base}/workers"));
        let dom = browser.source();
        assert!(dom.contains("<td>0/") && dom.contains("draining"), "{dom}");

        // Undrained with the same button, the worker runs it.
        let button = worker_button(&browser, "Undrain");
        browser.click(&button);
        browser.reload_until("the serving worker", Duration::from_secs(30), |dom| {
            dom.contains("<button>Drain</button>") && dom.contains("serving")
        });
        assert!(rt.block_on(finished(stream)), "the held-back action ran");
        drop(worker);
    });

    // The default config: read-only. No button, and the form posted from the page is refused.
    let tmp = tempfile::tempdir().unwrap();
    let wport = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let read_only = Cairn::start_with(
        tmp.path(),
        &CONFIG
            .replace("@ADMIN@", "")
            .replace("@WPORT@", &wport.to_string()),
        None,
    );
    let _worker = start_worker(
        &tmp.path().join("worker"),
        "ro-worker",
        read_only.addr,
        wport,
    );
    let base = format!("http://{}", read_only.addr);
    browser.goto(&format!("{base}/workers"));
    let dom = browser.reload_until("the worker", Duration::from_secs(30), |dom| {
        dom.contains("ro-worker-")
    });
    assert!(
        browser.find("button").is_none() && !dom.contains("/workers/drain"),
        "{dom}"
    );
    // The form a drain button would post, from the page itself (same origin).
    let worker_id = dom[dom.find("ro-worker-").unwrap()..]
        .split('<')
        .next()
        .unwrap()
        .to_string();
    browser.execute(&format!(
        "const f = document.createElement('form'); f.method = 'post'; f.action = '/workers/drain'; \
         for (const [k, v] of [['scheduler', 'MAIN'], ['worker', '{worker_id}'], ['draining', '1']]) {{ \
           const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i); }} \
         document.body.appendChild(f); f.submit();"
    ));
    let dom = browser.wait_until("the refusal", Duration::from_secs(30), |dom| {
        dom.contains("read-only")
    });
    assert!(dom.contains("services.web_ui.read_only"), "{dom}");
    browser.screenshot(&shots.join("8-read-only-refused.png"));
    browser.goto(&format!("{base}/workers"));
    assert!(browser.source().contains("serving"), "still serving");
    eprintln!("screenshots: {}", shots.display());
    drop(browser);
}
